"""Listing a site's cases from nnU-Net v2 and MSD folders, and the errors for broken folders."""

from __future__ import annotations

import json

import pytest

from fedpsmos.data.sources import CaseFiles, DataError, case_ids, list_cases
from tests.conftest import tiny_ct


def test_nnunet_layout_sorted_pairs(tmp_path, write_raw_case):
    image, label = tiny_ct()
    for case in ("b_001", "a_000"):
        write_raw_case(tmp_path, case, image, label)
    (tmp_path / "imagesTr" / "._a_000_0000.nii.gz").write_bytes(b"resource fork")

    cases = list_cases("nnunet", tmp_path, site="s")

    assert cases == [
        CaseFiles(
            "a_000", tmp_path / "imagesTr" / "a_000_0000.nii.gz", tmp_path / "labelsTr" / "a_000.nii.gz"
        ),
        CaseFiles(
            "b_001", tmp_path / "imagesTr" / "b_001_0000.nii.gz", tmp_path / "labelsTr" / "b_001.nii.gz"
        ),
    ]
    assert list_cases("synthetic", tmp_path, site="s") == cases
    assert case_ids("nnunet", tmp_path, site="s", spec=None) == ["a_000", "b_001"]


@pytest.mark.parametrize("ending", [".nii", ".mha", ".nrrd"])
def test_nnunet_file_ending_from_dataset_json(tmp_path, write_raw_case, ending):
    image, label = tiny_ct()
    write_raw_case(tmp_path, "c1", image, label, ending=ending, dataset_json={"file_ending": ending})
    write_raw_case(tmp_path, "other", image, label, ending=".nii.gz")  # another ending: not this data set

    cases = list_cases("nnunet", tmp_path, site="s")

    assert [(c.case, c.image.name, c.label.name) for c in cases] == [
        ("c1", f"c1_0000{ending}", f"c1{ending}")
    ]


def test_nnunet_ending_detected_without_dataset_json(tmp_path, write_raw_case):
    image, label = tiny_ct()
    write_raw_case(tmp_path, "c1", image, label, ending=".mha")
    assert [c.image.name for c in list_cases("nnunet", tmp_path, site="s")] == ["c1_0000.mha"]


def test_msd_layout_ignores_apple_double_files(tmp_path, write_raw_case):
    image, label = tiny_ct()
    write_raw_case(tmp_path, "liver_3", image, label, layout="msd")
    write_raw_case(tmp_path, "liver_10", image, label, layout="msd")
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder / "._liver_3.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "imagesTs" / "liver_99.nii.gz").write_bytes(b"")

    cases = list_cases("msd", tmp_path, site="site2")

    assert [(c.case, c.image.name, c.label.name) for c in cases] == [
        ("liver_10", "liver_10.nii.gz", "liver_10.nii.gz"),
        ("liver_3", "liver_3.nii.gz", "liver_3.nii.gz"),
    ]


def test_synthetic_case_ids_do_not_need_the_folder(tmp_path):
    ids = case_ids("synthetic", tmp_path / "not_yet", site="site3", spec={"cases": 2})
    assert ids == ["site3_000", "site3_001"]


def _remove(path):
    path.unlink()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (
            lambda root: _remove(root / "labelsTr" / "c2.nii.gz"),
            r"c2_0000\.nii\.gz: image of case c2 has no label",
        ),
        (
            lambda root: _remove(root / "imagesTr" / "c2_0000.nii.gz"),
            r"c2\.nii\.gz: label of case c2 has no image",
        ),
        (lambda root: (root / "labelsTr" / "c1.nii.gz").rename(root / "c1.nii.gz"), "has no label"),
        (
            lambda root: (root / "imagesTr" / "c1_0000.nii.gz").rename(root / "imagesTr" / "c1_0001.nii.gz"),
            "channel 0001 found; only single-channel",
        ),
        (
            lambda root: (root / "dataset.json").write_text(json.dumps({"file_ending": ".png"})),
            r"dataset\.json: file_ending '\.png' is not supported",
        ),
    ],
)
def test_unpaired_files_are_named(tmp_path, write_raw_case, breakage, message):
    image, label = tiny_ct()
    for case in ("c1", "c2"):
        write_raw_case(tmp_path, case, image, label)
    breakage(tmp_path)
    with pytest.raises(DataError, match=message):
        list_cases("nnunet", tmp_path, site="s")


def test_missing_folders_and_no_cases_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope'}: site s data folder does not exist"):
        list_cases("nnunet", tmp_path / "nope", site="s")
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path / 'labelsTr'}: site s folder is missing"):
        list_cases("msd", tmp_path, site="s")
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTr" / "._x.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=rf"{tmp_path / 'imagesTr'}: site s has no cases"):
        list_cases("msd", tmp_path, site="s")
    with pytest.raises(DataError, match="unknown data source 'dicom'"):
        list_cases("dicom", tmp_path, site="s")
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope'}"):
        case_ids("msd", tmp_path / "nope", site="s", spec=None)
