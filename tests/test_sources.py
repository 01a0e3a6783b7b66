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
    # case_ids is what the workflow calls when it loads: the same one-line errors name the folder
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nope'}: site s data folder does not exist$"):
        case_ids("msd", tmp_path / "nope", site="s", spec=None)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'imagesTr'}: site s has no cases"):
        case_ids("nnunet", tmp_path, site="s", spec=None)


# ---------------------------------------------------------------- the files source (data sets as downloaded)


def _touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


BTCV = {"images": "img/img{case}.nii.gz", "labels": "label/label{case}.nii.gz"}
KITS = {"images": "case_{case}/imaging.nii.gz", "labels": "case_{case}/segmentation.nii.gz"}
LITS = {"images": "*/volume-{case}.nii", "labels": "*/segmentation-{case}.nii"}


def test_files_source_reads_template_names(tmp_path):
    _touch(tmp_path, "img/img0002.nii.gz", "img/img0001.nii.gz", "label/label0002.nii.gz")
    _touch(tmp_path, "label/label0001.nii.gz", "label/._label0003.nii.gz", "label/notes.txt")

    cases = list_cases("files", tmp_path, site="site1", files=BTCV)

    assert cases == [
        CaseFiles("0001", tmp_path / "img/img0001.nii.gz", tmp_path / "label/label0001.nii.gz"),
        CaseFiles("0002", tmp_path / "img/img0002.nii.gz", tmp_path / "label/label0002.nii.gz"),
    ]
    assert case_ids("files", tmp_path, site="site1", spec=None, files=BTCV) == ["0001", "0002"]


def test_files_source_case_in_folder_name_skips_unlabelled_images(tmp_path, caplog):
    _touch(tmp_path, "case_00000/imaging.nii.gz", "case_00000/segmentation.nii.gz")
    _touch(tmp_path, "case_00001/imaging.nii.gz", "case_00001/segmentation.nii.gz")
    _touch(tmp_path, "case_00210/imaging.nii.gz", "kits.json")  # a test case: imaging only

    with caplog.at_level("INFO", logger="fedpsmos.data.sources"):
        cases = list_cases("files", tmp_path, site="site5", files=KITS)

    assert [c.case for c in cases] == ["00000", "00001"]
    assert cases[1].image == tmp_path / "case_00001" / "imaging.nii.gz"
    assert "1 images without a label are not cases" in caplog.text and "00210" in caplog.text


def test_files_source_wildcard_folders(tmp_path):
    _touch(tmp_path, "Training Batch 1/volume-0.nii", "Training Batch 1/segmentation-0.nii")
    _touch(tmp_path, "Training Batch 2/volume-28.nii", "Training Batch 2/segmentation-28.nii")
    _touch(tmp_path, "Training Batch 2/volume-29.nii.gz", "Training Batch 2/segmentation-29.nii.gz")

    cases = list_cases("files", tmp_path, site="site2", files=LITS)

    assert [(c.case, c.image.parent.name, c.label.name) for c in cases] == [
        ("0", "Training Batch 1", "segmentation-0.nii"),
        ("28", "Training Batch 2", "segmentation-28.nii"),
    ]


def test_files_source_errors_name_the_file(tmp_path):
    _touch(tmp_path, "Training Batch 1/volume-0.nii", "Training Batch 1/segmentation-0.nii")
    _touch(tmp_path, "Training Batch 2/segmentation-1.nii")
    with pytest.raises(
        DataError, match=r"segmentation-1\.nii: label of case 1 has no image '\*/volume-1\.nii'"
    ):
        list_cases("files", tmp_path, site="s", files=LITS)

    _touch(tmp_path, "Training Batch 2/volume-1.nii", "copy/volume-0.nii")
    with pytest.raises(
        DataError, match=r"segmentation-0\.nii: case 0 has 2 image files .*copy/volume-0\.nii"
    ):
        list_cases("files", tmp_path, site="s", files=LITS)

    _touch(tmp_path, "copy/segmentation-0.nii")
    with pytest.raises(DataError, match=r"case 0 has a second label file"):
        list_cases("files", tmp_path, site="s", files=LITS)

    other = tmp_path / "other"
    _touch(other, "label/label a.nii.gz")
    with pytest.raises(DataError, match=r"label a\.nii\.gz: case id ' a' may hold only letters"):
        list_cases(
            "files",
            other,
            site="s",
            files={"images": "img{case}.nii.gz", "labels": "label/label{case}.nii.gz"},
        )
    with pytest.raises(DataError, match=rf"{tmp_path}: site s has no cases \(no file matches files.labels"):
        list_cases("files", tmp_path, site="s", files=BTCV)
    with pytest.raises(DataError, match="a files source needs its 'files' templates"):
        list_cases("files", tmp_path, site="s")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"images": "img/img.nii.gz", "labels": "l/{case}.nii.gz"},
            r"files\.images: .* \{case\} field exactly once",
        ),
        ({"images": "i/{case}{case}.nii", "labels": "l/{case}.nii"}, r"files\.images: .* exactly once"),
        (
            {"images": "i/{case}.nii", "labels": "/abs/{case}.nii"},
            r"files\.labels: .* relative to the site folder",
        ),
        ({"images": "i/{case}.nii", "labels": "../l/{case}.nii"}, r"files\.labels: .* '\.\.' folder"),
        (
            {"images": "i/{case}.png", "labels": "l/{case}.nii"},
            r"files\.images: .* must end in one of \.nii\.gz",
        ),
        ({"images": "i/{case}_*.nii", "labels": "l/{case}.nii"}, r"files\.images: .* folder names only"),
        ({"images": "i/{id}{case}.nii", "labels": "l/{case}.nii"}, r"files\.images: .* a field other than"),
        ({"images": "i/{case}.nii", "labels": "i/{case}.nii"}, r"are the same template"),
        ({"images": "i/{case}.nii"}, r"site s: files must map exactly images and labels"),
    ],
)
def test_files_source_bad_templates(tmp_path, files, message):
    with pytest.raises(DataError, match=rf"site s: {message}" if message.startswith("files") else message):
        list_cases("files", tmp_path, site="s", files=files)
