"""The site manifest: a round trip, what each property gives, path resolution, and one error per bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpsmos.data.label_map import LabelMap
from fedpsmos.data.manifest import Manifest, ManifestError
from fedpsmos.data.validation import SplitSettings, build_manifest
from tests.conftest import tiny_ct


def _data(root: Path) -> dict:
    """A complete manifest of three cases whose files lie under ``root`` (paths as listed: absolute)."""
    cases = []
    for case, split in (("c0", "train"), ("c1", "validation"), ("c2", "test")):
        for kind in ("img", "lab"):
            (root / f"{case}_{kind}.nii.gz").parent.mkdir(parents=True, exist_ok=True)
            (root / f"{case}_{kind}.nii.gz").write_bytes(b"")
        cases.append(
            {
                "case": case,
                "image": str(root / f"{case}_img.nii.gz"),
                "label": str(root / f"{case}_lab.nii.gz"),
                "split": split,
                "label_values": [0, 1],
            }
        )
    return {
        "site": "s1",
        "source": "nnunet",
        "root": str(root),
        "labels": {"liver": [1], "kidney": [3]},
        "background": [8],
        "ignore": [9],
        "organs": ["liver", "kidney_left", "kidney_right"],
        "cases": cases,
        "train": ["c0"],
        "validation": ["c1"],
        "test": ["c2"],
    }


def test_round_trip_and_properties(tmp_path: Path) -> None:
    # Prepare
    data = _data(tmp_path / "raw")
    path = tmp_path / "data" / "s1" / "manifest.json"
    # Execute
    Manifest(data, path).write()
    manifest = Manifest.load(path, site="s1")
    # Assert: the file is the data, and every stage's view of it
    assert json.loads(path.read_text()) == data and manifest.to_dict() == data
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]  # no temporary left
    assert (manifest.site, manifest.source, manifest.root) == ("s1", "nnunet", tmp_path / "raw")
    assert (manifest.train, manifest.validation, manifest.test) == (("c0",), ("c1",), ("c2",))
    assert manifest.case_ids == ("c0", "c1", "c2")
    assert manifest.label_map == LabelMap({"liver": [1], "kidney": [3]}, background=[8], ignore=[9])
    assert manifest.organs == ("liver", "kidney_left", "kidney_right")
    record = manifest.case("c2")
    assert (record.split, record.image, record.label) == (
        "test",
        tmp_path / "raw" / "c2_img.nii.gz",
        tmp_path / "raw" / "c2_lab.nii.gz",
    )
    assert [r.case for r in manifest.records([*manifest.train, *manifest.validation])] == ["c0", "c1"]
    assert [r.case for r in manifest.cases] == ["c0", "c1", "c2"]


def test_relative_paths_resolve_against_root_then_the_manifest_folder(tmp_path: Path) -> None:
    # Prepare: c0's files under root, c1's beside the manifest, c2's nowhere
    data = _data(tmp_path / "raw")
    data["cases"][0]["image"] = "c0_img.nii.gz"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c1_lab.nii.gz").write_bytes(b"")
    (tmp_path / "raw" / "c1_lab.nii.gz").unlink()
    data["cases"][1]["label"] = "c1_lab.nii.gz"
    data["cases"][2]["label"] = "elsewhere/c2_lab.nii.gz"
    path = tmp_path / "data" / "manifest.json"
    path.write_text(json.dumps(data))
    # Execute
    manifest = Manifest.load(path)
    # Assert
    assert manifest.case("c0").image == tmp_path / "raw" / "c0_img.nii.gz"
    assert manifest.case("c1").label == tmp_path / "data" / "c1_lab.nii.gz"
    with pytest.raises(ManifestError, match=rf"^{path}: case c2 label 'elsewhere/c2_lab.nii.gz' not found"):
        _ = manifest.case("c2").label


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d.update(train="c0"), r"'train' must be a list of names"),
        (lambda d: d.update(site=3), r"'site' must be a string"),
        (lambda d: d.update(test=["c0"]), r"cases \['c0'\] are in both train and test"),
        (lambda d: d["cases"].append(dict(d["cases"][0])), r"case 'c0' appears twice"),
        (lambda d: d["cases"].append({"image": "x"}), r"every entry of 'cases' needs a 'case' id"),
        (lambda d: d.update(labels=[1]), r"'labels' must be a map"),
    ],
)
def test_a_malformed_manifest_names_its_file(tmp_path: Path, edit, problem: str) -> None:
    # Prepare
    data = _data(tmp_path / "raw")
    edit(data)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    # Execute / Assert
    with pytest.raises(ManifestError, match=rf"^{path}: {problem}"):
        Manifest.load(path)


def test_missing_unreadable_or_foreign_files_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    with pytest.raises(ManifestError, match=rf"^{path}: manifest file not found"):
        Manifest.load(path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match=rf"^{path}: cannot read the manifest"):
        Manifest.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ManifestError, match=rf"^{path}: a manifest is a JSON object, got list"):
        Manifest.load(path)
    path.write_text(json.dumps(_data(tmp_path / "raw")))
    with pytest.raises(ManifestError, match=rf"^{path}: manifest of site 's1', expected 's2'"):
        Manifest.load(path, site="s2")


def test_keys_a_stage_needs_are_required_when_asked_for(tmp_path: Path) -> None:
    # Prepare: only a test list (a hand-made manifest for prediction)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"test": ["c1"]}))
    # Execute
    manifest = Manifest.load(path)
    # Assert
    assert manifest.test == ("c1",) and manifest.validation == ()
    with pytest.raises(ManifestError, match=rf"^{path}: the manifest has no 'train'"):
        _ = manifest.train
    with pytest.raises(ManifestError, match=rf"^{path}: the manifest has no 'labels' map"):
        _ = manifest.label_map
    with pytest.raises(ManifestError, match=rf"^{path}: case 'c1' is not in the manifest's cases"):
        manifest.case("c1")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d.pop("source"), r"the manifest lacks \['source'\]"),
        (
            lambda d: d.update(test=[]),
            r"train, validation and test must together list every case exactly once",
        ),
        (lambda d: d["cases"][0].update(split="test"), r"case 'c0' is in train but its entry says 'test'"),
        (lambda d: d["cases"][1].pop("label"), r"case 'c1' has no 'label' path"),
        (lambda d: d.update(labels={"heart": [1]}), r"unknown organ"),
    ],
)
def test_an_incomplete_manifest_is_not_written(tmp_path: Path, edit, problem: str) -> None:
    # Prepare
    data = _data(tmp_path / "raw")
    edit(data)
    path = tmp_path / "data" / "manifest.json"
    # Execute / Assert
    with pytest.raises(ManifestError, match=rf"^{path}: {problem}"):
        Manifest(data, path).write()
    assert not path.parent.exists() or not any(path.parent.iterdir())


def test_build_manifest_writes_what_manifest_reads(tmp_path: Path, write_raw_case) -> None:
    # Prepare
    image, label = tiny_ct()
    for i in range(4):
        write_raw_case(tmp_path / "raw", f"c{i}", image, label)
    split = SplitSettings(test_fraction=0.25, validation_cases=1)
    # Execute
    data = build_manifest(
        tmp_path / "m.json",
        site="s",
        source="nnunet",
        root=tmp_path / "raw",
        labels={"liver": [1], "spleen": [2]},
        split=split,
        seed=0,
    )
    manifest = Manifest.load(tmp_path / "m.json", site="s")
    # Assert
    assert manifest.to_dict() == data
    assert len(manifest.train) == 2 and len(manifest.validation) == 1 and len(manifest.test) == 1
    assert manifest.organs == ("liver", "spleen")
    record = manifest.case(manifest.test[0])
    assert record.image == tmp_path / "raw" / "imagesTr" / f"{record.case}_0000.nii.gz"
    assert record.entry["sitk_size"] == [8, 6, 4] and record.entry["label_values"] == [0, 1, 2]
