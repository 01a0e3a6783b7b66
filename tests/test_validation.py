"""Validation of image/label pairs, the deterministic split, the manifest (written only for valid sites)."""

from __future__ import annotations

import gzip
import json
import runpy
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedpsmos.data.sources import CaseFiles, DataError
from fedpsmos.data.validation import SplitSettings, build_manifest, split_cases, validate_case
from tests.conftest import Geometry, tiny_ct, write_sitk

LABELS = {"liver": [1], "spleen": [2]}
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def _site(root, write_raw_case, n=3, **kwargs):
    image, label = tiny_ct()
    for i in range(n):
        write_raw_case(root, f"c{i}", image, label, **kwargs)
    return image, label


def _manifest(tmp_path, root, labels=LABELS, **kwargs):
    split = SplitSettings(test_fraction=0.34)
    args = {"site": "s", "source": "nnunet", "root": root, "labels": labels, "split": split, "seed": 0}
    return build_manifest(tmp_path / "data" / "manifest.json", **{**args, **kwargs})


def test_valid_site_manifest_matches_contract(tmp_path, write_raw_case):
    root = tmp_path / "raw"
    geometry = Geometry(
        spacing=(0.8, 0.8, 2.5), origin=(-10.0, 5.0, 30.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    )
    _site(root, write_raw_case, n=6, geometry=geometry)

    manifest = _manifest(tmp_path, root)
    on_disk = json.loads((tmp_path / "data" / "manifest.json").read_text())

    assert on_disk == manifest
    assert manifest["site"] == "s" and manifest["source"] == "nnunet" and manifest["root"] == str(root)
    assert manifest["labels"] == LABELS and manifest["organs"] == ["liver", "spleen"]
    assert [c["case"] for c in manifest["cases"]] == [f"c{i}" for i in range(6)]
    assert len(manifest["test"]) == 2 and len(manifest["train"]) == 4
    assert sorted(manifest["train"] + manifest["test"]) == [f"c{i}" for i in range(6)]
    first = manifest["cases"][0]
    assert first["image"] == str(root / "imagesTr" / "c0_0000.nii.gz")
    assert first["label"] == str(root / "labelsTr" / "c0.nii.gz")
    assert first["sitk_size"] == [8, 6, 4]
    assert first["sitk_spacing"] == pytest.approx([0.8, 0.8, 2.5])
    assert first["sitk_origin"] == pytest.approx([-10.0, 5.0, 30.0])
    assert first["sitk_direction"] == pytest.approx([-1, 0, 0, 0, -1, 0, 0, 0, 1])
    assert {c["case"] for c in manifest["cases"] if c["split"] == "test"} == set(manifest["test"])
    assert manifest["validation"] == []
    assert list((tmp_path / "data").iterdir()) == [tmp_path / "data" / "manifest.json"]  # no temp files


def test_small_geometry_differences_within_tolerance_pass(tmp_path, write_raw_case):
    image, label = tiny_ct()
    g = Geometry(spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0))
    g_label = Geometry(
        spacing=(1.0005, 1.0, 3.0), origin=(0.0005, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 2e-5, 0, 0, 1)
    )
    img, lab = write_raw_case(tmp_path, "c", image, label, geometry=g, label_geometry=g_label)
    info = validate_case(CaseFiles("c", img, lab), label_values={1, 2})
    assert info["sitk_size"] == [8, 6, 4] and info["label_values"] == [0, 1, 2]


def _edit_pixdim(path: Path, index: int, value: float) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[76 + 4 * index : 80 + 4 * index] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(raw)))


def _defects():
    """(name, how to break case c1 of a valid site, expected message) for every check."""
    image, label = tiny_ct()
    img = lambda root: root / "imagesTr" / "c1_0000.nii.gz"  # noqa: E731
    lab = lambda root: root / "labelsTr" / "c1.nii.gz"  # noqa: E731

    def rewrite(which, array, geometry=None):
        return lambda root: write_sitk(array, which(root), geometry)

    def not_gzip(root):
        write_sitk(image, root / "plain.nii")
        shutil.move(root / "plain.nii", img(root))

    nan = image.astype(np.float32)
    nan[2, 2, 2] = np.nan
    bad_label = label.copy()
    bad_label[0, 0, 0] = 7
    bad_label[0, 0, 1] = 9
    return [
        (
            "unreadable",
            lambda root: img(root).write_bytes(gzip.compress(b"not an image" * 20)),
            "cannot read image",
        ),
        ("not gzip", not_gzip, "named .gz but is not gzip-compressed"),
        ("2-D", rewrite(img, image[0]), "image is 2-D, a 3-D image is required"),
        ("4-D", rewrite(img, np.stack([image, image])), "image is 4-D, a 3-D image is required"),
        (
            "size",
            rewrite(lab, label[:, :, :-1]),
            r"label size \[7, 6, 4\] differs from the image's \[8, 6, 4\]",
        ),
        ("spacing", rewrite(lab, label, Geometry(spacing=(1.0, 1.0, 1.01))), "label spacing .* differs"),
        ("origin", rewrite(lab, label, Geometry(origin=(0.0, 0.01, 0.0))), "label origin .* differs"),
        (
            "direction",
            rewrite(lab, label, Geometry(direction=(-1, 0, 0, 0, 1, 0, 0, 0, -1))),
            "label direction .* differs",
        ),
        ("nan", rewrite(img, nan), r"image has 1 non-finite \(NaN or infinite\) intensities"),
        ("constant", rewrite(img, np.full_like(image, 40)), r"image intensity is constant \(40\)"),
        ("label values", rewrite(lab, bad_label), r"label values \[7, 9\] are not in the site's label map"),
        (
            "zero spacing",
            lambda root: _edit_pixdim(img(root), 2, 0.0),
            r"spacing must be > 0.*pixdim \[1.0, 0.0",
        ),
        ("negative spacing", lambda root: _edit_pixdim(lab(root), 1, -1.0), r"label spacing must be > 0"),
    ]


@pytest.mark.parametrize(("name", "breakage", "message"), _defects(), ids=[d[0] for d in _defects()])
def test_each_defect_is_named_and_no_manifest_is_written(tmp_path, write_raw_case, name, breakage, message):
    root = tmp_path / "raw"
    _site(root, write_raw_case)
    breakage(root)

    with pytest.raises(DataError, match=message) as info:
        _manifest(tmp_path, root)

    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(str(root / "imagesTr" / "c1_0000.nii.gz")) or text.startswith(
        str(root / "labelsTr" / "c1.nii.gz")
    )
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_site_without_cases_names_the_folder(tmp_path):
    (tmp_path / "raw" / "imagesTr").mkdir(parents=True)
    (tmp_path / "raw" / "labelsTr").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path / 'raw' / 'imagesTr'}: site s has no cases"):
        _manifest(tmp_path, tmp_path / "raw")
    assert not (tmp_path / "data").exists()


def test_unknown_organ_in_label_map_is_refused(tmp_path, write_raw_case):
    _site(tmp_path / "raw", write_raw_case)
    with pytest.raises(DataError, match="site s: unknown organ 'heart'"):
        _manifest(tmp_path, tmp_path / "raw", labels={"heart": [1]})


def _btcv_like_site(root, write_raw_case, dataset_json=None):
    """Three cases whose labels hold 1 liver, 2 spleen, 3 gallbladder and 4 an unknown structure."""
    image, label = tiny_ct()
    label[1:-1, 4, 4] = 3
    label[1, 3, 5] = 4
    for i in range(3):
        write_raw_case(root, f"c{i}", image, label, dataset_json=dataset_json)
    return label


def test_manifest_records_resolved_background_and_ignore(tmp_path, write_raw_case):
    root = tmp_path / "raw"
    _btcv_like_site(root, write_raw_case)

    manifest = _manifest(tmp_path, root, background=[3], ignore=[4])

    assert manifest["labels"] == LABELS and manifest["background"] == [3] and manifest["ignore"] == [4]
    assert manifest["organs"] == ["liver", "spleen"]
    assert all(c["label_values"] == [0, 1, 2, 3, 4] for c in manifest["cases"])
    rest = _manifest(tmp_path, root, background="rest")
    assert rest["background"] == "rest" and rest["ignore"] == []


def test_values_not_named_anywhere_stop_the_site_naming_file_and_values(tmp_path, write_raw_case):
    root = tmp_path / "raw"
    _btcv_like_site(root, write_raw_case)
    label_file = root / "labelsTr" / "c0.nii.gz"
    with pytest.raises(DataError, match=rf"{label_file}: label values \[4\] are not in the site's label map"):
        _manifest(tmp_path, root, background=[3])
    with pytest.raises(DataError, match=r"site s: label value 3 is in both background and ignore"):
        _manifest(tmp_path, root, background=[3], ignore=[3, 4])
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "labels_json",
    [
        {"background": 0, "liver": 1, "spleen": 2, "gallbladder": 3, "unsure": 4},  # nnU-Net v2
        {"0": "background", "1": "liver", "2": "spleen", "3": "gallbladder", "4": "unsure"},  # MSD
    ],
    ids=["nnunet_v2", "msd"],
)
def test_dataset_json_names_resolve_when_the_manifest_is_built(tmp_path, write_raw_case, labels_json):
    root = tmp_path / "raw"
    dataset = {"labels": labels_json, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}}
    _btcv_like_site(root, write_raw_case, dataset_json=dataset)

    labels = {"liver": ["liver"], "spleen": [2]}  # names and numbers mix
    manifest = _manifest(tmp_path, root, labels=labels, background=["gallbladder"], ignore=["unsure"])

    assert manifest["labels"] == {"liver": [1], "spleen": [2]}
    assert manifest["background"] == [3] and manifest["ignore"] == [4]
    with pytest.raises(DataError, match=rf"{root / 'dataset.json'}: no label named 'aorta'"):
        _manifest(tmp_path, root, background=["aorta"], ignore=[4])


def _split(ids, fraction=0.3, seed=0, **kwargs):
    return split_cases(ids, split=SplitSettings(test_fraction=fraction, **kwargs), seed=seed, site="s")


def test_split_is_deterministic_and_keeps_both_sides():
    ids = [f"c{i:02d}" for i in range(10)]
    a = _split(ids)
    b = _split(list(reversed(ids)))
    others = [_split(ids, seed=k)["test"] for k in range(1, 6)]

    assert a == b and len(a["test"]) == 3 and sorted(a["train"] + a["test"]) == ids and a["validation"] == []
    assert any(t != a["test"] for t in others)  # the seed matters
    assert _split(ids[:2], 0.01)["test"] != []
    assert len(_split(ids[:3], 0.99)["train"]) == 1
    with pytest.warns(UserWarning, match="single case"):
        assert _split(["only"]) == {"train": ["only"], "validation": [], "test": []}
    with pytest.raises(ValueError, match="test_fraction"):
        _split(ids, 1.0)


def test_validation_cases_come_from_the_training_cases_disjoint_and_deterministic():
    ids = [f"c{i:02d}" for i in range(10)]
    without = _split(ids)
    with_val = _split(ids, validation_cases=2)
    again = _split(list(reversed(ids)), validation_cases=2)

    assert with_val == again
    assert len(with_val["validation"]) == 2 and len(with_val["test"]) == 3 and len(with_val["train"]) == 5
    # disjoint, covering every case; the test split is the one without validation
    parts = [set(with_val[k]) for k in ("train", "validation", "test")]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == len(ids)
    assert with_val["test"] == without["test"]
    assert set(with_val["validation"]) <= set(without["train"])
    assert any(
        _split(ids, seed=k, validation_cases=2)["validation"] != with_val["validation"] for k in (1, 2, 3)
    )


def test_split_counts_test_override_and_at_least_one_training_case():
    ids = [f"c{i:02d}" for i in range(30)]
    # a per-site test count (paper Table 1: site1 has 6 test cases) overrides the fraction
    assert len(_split(ids, 0.2, test_cases=6)["test"]) == 6
    site = SplitSettings.from_config({"test_fraction": 0.2, "validation_cases": 2}, {"test": 6})
    assert site == SplitSettings(test_fraction=0.2, test_cases=6, validation_cases=2)
    assert SplitSettings.from_config({"test_fraction": 0.2}).validation_cases == 0
    # the tiny CI site: 3 cases -> 1 test, 1 validation, 1 training case
    tiny = _split(ids[:3], 0.34, validation_cases=1)
    assert [len(tiny[k]) for k in ("train", "validation", "test")] == [1, 1, 1]
    with pytest.warns(UserWarning, match="validation cases asked"):
        small = _split(ids[:3], 0.34, validation_cases=5)
    assert [len(small[k]) for k in ("train", "validation", "test")] == [1, 1, 1]


def test_manifest_lists_validation_cases(tmp_path, write_raw_case):
    root = tmp_path / "raw"
    _site(root, write_raw_case, n=6)

    manifest = _manifest(tmp_path, root, split=SplitSettings(test_fraction=0.34, validation_cases=1))

    assert len(manifest["validation"]) == 1 and len(manifest["test"]) == 2 and len(manifest["train"]) == 3
    assert not set(manifest["validation"]) & (set(manifest["train"]) | set(manifest["test"]))
    by_split = {
        name: {c["case"] for c in manifest["cases"] if c["split"] == name} for name in manifest_splits()
    }
    assert all(by_split[name] == set(manifest[name]) for name in by_split)


def manifest_splits():
    return ("train", "validation", "test")


def test_single_case_site_is_train_only(tmp_path, write_raw_case):
    _site(tmp_path / "raw", write_raw_case, n=1)
    with pytest.warns(UserWarning, match="single case"):
        manifest = _manifest(tmp_path, tmp_path / "raw")
    assert manifest["train"] == ["c0"] and manifest["test"] == []


def _run_script(name: str, **namespaces) -> None:
    """Run a thin Snakemake script with a stand-in ``snakemake`` object, as the rule would."""
    smk = SimpleNamespace(log=[], **{k: SimpleNamespace(**v) for k, v in namespaces.items()})
    runpy.run_path(str(SCRIPTS / name), init_globals={"snakemake": smk})


def test_scripts_generate_validate_and_preview_a_synthetic_site(tmp_path):
    spec = {"cases": 3, "spacing": [8.0, 5.0, 5.0], "noise": 20.0, "contrast": 1.0, "offset": 0.0, "fov": 1.0}
    labels = {"kidney_left": [1], "kidney_right": [2]}
    raw, manifest_path, png = (
        tmp_path / "raw" / "site5",
        tmp_path / "data" / "manifest.json",
        tmp_path / "p.png",
    )
    common = {"site": "site5", "labels": labels, "seed": 0}

    _run_script("make_synthetic_site.py", output={"root": str(raw)}, params={**common, "spec": spec})
    _run_script(
        "validate_site.py",
        output={"manifest": str(manifest_path)},
        params={
            **common,
            "source": "synthetic",
            "root": str(raw),
            "split": {"test_fraction": 0.34},
            "background": None,
            "ignore": None,
            "files": None,
        },
    )
    _run_script("plot_site_preview.py", input={"manifest": str(manifest_path)}, output={"png": str(png)})

    manifest = json.loads(manifest_path.read_text())
    assert manifest["organs"] == ["kidney_left", "kidney_right"]
    assert all(c["label_values"] == [0, 1, 2] for c in manifest["cases"])
    assert len(manifest["test"]) == 1 and len(manifest["train"]) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_real_ct_validates_as_nnunet_case(tmp_path):
    image = REALDATA / "ct_abdomen_3mm.nii.gz"
    label = REALDATA / "ct_abdomen_3mm_5organs.nii.gz"
    if not (image.is_file() and label.is_file()):
        pytest.skip(f"real CT test data not found at {REALDATA} (../shared/realdata beside the checkout)")
    root = tmp_path / "raw"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copy(image, root / "imagesTr" / "real_000_0000.nii.gz")
    shutil.copy(label, root / "labelsTr" / "real_000.nii.gz")
    labels = {"liver": [1], "spleen": [2], "pancreas": [3], "kidney_right": [4], "kidney_left": [5]}

    with pytest.warns(UserWarning, match="single case"):
        manifest = _manifest(tmp_path, root, labels=labels, site="real")

    (case,) = manifest["cases"]
    assert case["sitk_size"] == [122, 101, 30]
    assert case["sitk_spacing"] == pytest.approx([3.0, 3.0, 3.0])
    assert case["sitk_direction"] == pytest.approx([-1, 0, 0, 0, -1, 0, 0, 0, 1])
    assert case["label_values"] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(DataError, match=r"label values \[4, 5\] are not in the site's label map"):
        _manifest(tmp_path, root, labels={"liver": [1], "spleen": [2], "pancreas": [3]}, site="real")
