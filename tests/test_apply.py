"""fedpsmos predict: every input format, the scan's exact geometry, probabilities, errors, checkpoint meta."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fedpsmos.cli import main
from fedpsmos.federated.aggregation import aggregate_round
from fedpsmos.federated.rounds import init_global
from fedpsmos.inference.apply import ApplyError, find_scans, predict_folder
from fedpsmos.inference.predict import predict_site
from fedpsmos.inference.probabilities import argmax_on_grid
from fedpsmos.network import build_network
from fedpsmos.organs import ORGANS
from fedpsmos.preprocessing.orientation import orientation_record, reorient
from fedpsmos.preprocessing.resample import resample_label_to_geometry
from fedpsmos.preprocessing.scan import image_to_network_grid
from fedpsmos.preprocessing.storage import case_path, write_case
from fedpsmos.training.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import tiny_spec

SETTINGS = {"spacing": [3.0, 2.0, 2.0], "image_order": 1, "clip": [-100.0, 200.0], "mean": 50.0, "std": 60.0}
PATCH = [4, 8, 8]
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _rotation_z(degrees: float) -> tuple[float, ...]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def _model(path: Path, *, preprocessing: dict | None = SETTINGS) -> Path:
    """A tiny random-weight PlainConvUNet over the five organs, with the meta fedpsmos predict reads."""
    spec = tiny_spec(len(ORGANS) + 1)
    meta = {"network": spec.to_dict(), "organs": list(ORGANS), "kind": "pretrain", "patch_size": PATCH}
    if preprocessing is not None:
        meta["preprocessing"] = preprocessing
    save_checkpoint(path, {"model": build_network(spec, seed=0).state_dict(), "meta": meta})
    return path


def _ct(shape_zyx=(7, 10, 12), seed: int = 0) -> np.ndarray:
    """Smooth blobs in HU, so a random network still gives more than one class."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape_zyx).astype(np.float32)
    ct = 60.0 * np.sin(grid[2] / 2.0) * np.cos(grid[1] / 3.0) + 40.0 * np.sin(grid[0])
    return (ct + rng.normal(0, 10, shape_zyx)).astype(np.float32)


def _image(array, spacing, direction, origin=(-10.25, 5.5, 3.3)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One file per slice with the position/orientation tags a scanner writes (SimpleITK's DICOM example)."""
    folder.mkdir(parents=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    shared = {
        "0008|0060": "CT",
        "0020|000d": uid + ".1",
        "0020|000e": uid + ".2",
        "0020|0037": "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0008|103e": "fedpsmos test series",
    }
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in shared.items():
            slice_.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in position))
        slice_.SetMetaData("0020|0013", str(k + 1))
        slice_.SetMetaData("0008|0018", f"{uid}.3.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def _inputs(folder: Path) -> dict[str, sitk.Image]:
    """A folder with .nii.gz (RAS), .mha (rotated), .nrrd (slice axis first) and a DICOM series; the images
    as a reader sees them, by case name."""
    folder.mkdir()
    ras = _image(_ct(), (0.9, 0.8, 2.5), RAS)
    sitk.WriteImage(ras, str(folder / "ras.nii.gz"))
    sitk.WriteImage(_image(_ct(seed=1), (0.7, 0.9, 3.0), _rotation_z(30.0)), str(folder / "oblique_0000.mha"))
    spl = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # slice axis first, as KiTS19 stores it
    sitk.WriteImage(_image(_ct((12, 8, 6), seed=2), (2.0, 1.1, 1.3), spl), str(folder / "spl.nrrd"))
    _write_dicom_series(_image(_ct(seed=3), (0.8, 0.8, 2.0), _rotation_z(-20.0)), folder / "dicom_case")
    (folder / "notes.txt").write_text("not a scan")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / "dicom_case")))
    return {
        "ras": sitk.ReadImage(str(folder / "ras.nii.gz")),
        "oblique": sitk.ReadImage(str(folder / "oblique_0000.mha")),
        "spl": sitk.ReadImage(str(folder / "spl.nrrd")),
        "dicom_case": reader.Execute(),
    }


def test_every_format_gives_a_label_in_the_scan_geometry(tmp_path):
    # Prepare
    model = _model(tmp_path / "model.pt")
    inputs = _inputs(tmp_path / "in")
    assert sorted(s.name for s in find_scans(tmp_path / "in")) == ["dicom_case", "oblique", "ras", "spl"]
    assert inputs["dicom_case"].GetSize() == (12, 10, 7)
    # Execute
    written = predict_folder(model, tmp_path / "in", tmp_path / "out", device="cpu", progress=False)
    # Assert
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{n}.nii.gz" for n in inputs)
    assert sorted(written) == sorted(tmp_path / "out" / f"{n}.nii.gz" for n in inputs)
    for name, scan in inputs.items():
        label = sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz"))
        assert label.GetSize() == scan.GetSize(), name
        # NIfTI stores the geometry in float32: exact for a NIfTI scan, float32-close for the others.
        exact = name == "ras"
        for what in ("GetSpacing", "GetOrigin", "GetDirection"):
            got, want = getattr(label, what)(), getattr(scan, what)()
            assert got == want if exact else np.allclose(got, want, rtol=1e-6, atol=1e-6), (name, what)
        assert label.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(label))) <= set(range(len(ORGANS) + 1))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_same_anatomy_stored_lps_or_ras_gives_the_same_labels(tmp_path):
    # Prepare: one volume stored LPS, and the same anatomy stored RAS (x and y reversed, direction flipped)
    array = _ct((6, 12, 14))
    lps = _image(array, (1.5, 1.5, 3.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), origin=(0.0, 0.0, 0.0))
    ras = _image(array[:, ::-1, ::-1].copy(), (1.5, 1.5, 3.0), RAS, origin=(19.5, 16.5, 0.0))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(lps, str(tmp_path / "in" / "lps.nii.gz"))
    sitk.WriteImage(ras, str(tmp_path / "in" / "ras.nii.gz"))
    # Execute
    predict_folder(_model(tmp_path / "m.pt"), tmp_path / "in", tmp_path / "out", device="cpu", progress=False)
    # Assert: the RAS file's labels are the LPS file's, in the RAS file's voxel order
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "lps.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ras.nii.gz")))
    assert len(np.unique(a)) > 1
    np.testing.assert_array_equal(b, a[:, ::-1, ::-1])


def test_cli_predicts_and_reports_a_bad_file_on_one_line(tmp_path, capsys):
    # Prepare
    model = _model(tmp_path / "model.pt")
    (tmp_path / "in").mkdir()
    sitk.WriteImage(_image(_ct(), (0.9, 0.8, 2.5), RAS), str(tmp_path / "in" / "a.nii.gz"))
    args = ["predict", "-m", str(model), "-o", str(tmp_path / "out"), "--device", "cpu", "--quiet"]
    # Execute / Assert: a good folder
    assert main([*args, "-i", str(tmp_path / "in")]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.nii.gz"]
    # Execute / Assert: a broken file beside it; the earlier output stays as it was
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a nifti")
    assert main([*args, "-i", str(tmp_path / "in")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.nii.gz" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.nii.gz"]
    # Execute / Assert: a 2-D image
    sitk.WriteImage(sitk.Image(5, 6, sitk.sitkInt16), str(tmp_path / "flat.mha"))
    assert main([*args, "-i", str(tmp_path / "flat.mha")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flat.mha" in err and "3-D" in err


def test_model_without_preprocessing_meta_is_refused(tmp_path, capsys):
    # Prepare
    old = _model(tmp_path / "old.pt", preprocessing=None)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(_image(_ct(), (0.9, 0.8, 2.5), RAS), str(tmp_path / "in" / "a.nii.gz"))
    # Execute
    status = main(["predict", "-m", str(old), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o")])
    # Assert
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1
    assert "old.pt" in err and "preprocessing" in err and "rerun" in err
    assert not (tmp_path / "o").exists()


def test_output_may_not_replace_the_input(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ApplyError, match="replace the input"):
        predict_folder(_model(tmp_path / "m.pt"), tmp_path / "in", tmp_path, device="cpu", progress=False)


def test_saved_probabilities_sum_to_one_and_give_the_labels(tmp_path):
    # Prepare: an oblique scan, so the probabilities must come back in the file's voxel order
    (tmp_path / "in").mkdir()
    scan = _image(_ct((5, 9, 11)), (0.7, 0.9, 3.0), _rotation_z(120.0))
    sitk.WriteImage(scan, str(tmp_path / "in" / "c.mha"))
    # Execute
    predict_folder(
        _model(tmp_path / "m.pt"),
        tmp_path / "in",
        tmp_path / "out",
        device="cpu",
        save_probabilities=True,
        ending=".mha",
        progress=False,
    )
    # Assert
    with np.load(tmp_path / "out" / "c.npz") as data:
        probabilities, classes, labels = data["probabilities"], data["classes"], data["labels"]
    assert probabilities.dtype == np.float16
    assert probabilities.shape == (len(ORGANS) + 1, *sitk.GetArrayViewFromImage(scan).shape)
    assert classes.tolist() == ["background", *ORGANS]
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(axis=0), 1.0, atol=1e-2)
    written = sitk.ReadImage(str(tmp_path / "out" / "c.mha"))
    assert written.GetSpacing() == scan.GetSpacing() and written.GetDirection() == scan.GetDirection()
    assert written.GetOrigin() == scan.GetOrigin()  # MetaImage keeps the geometry exactly
    label = sitk.GetArrayFromImage(written)
    agree = labels[probabilities.astype(np.float32).argmax(axis=0)] == label
    assert agree.mean() > 0.98  # float16 rounding may flip near-ties


def test_probability_resampling_equals_label_resampling_when_the_grids_coincide():
    rng = np.random.default_rng(0)
    probabilities = torch.softmax(torch.from_numpy(rng.normal(size=(4, 5, 6, 7)).astype(np.float32)), dim=0)
    kwargs = {"from_spacing_zyx": (2.0, 1.0, 1.5), "to_spacing_zyx": (2.0, 1.0, 1.5), "shape_zyx": (5, 6, 7)}
    by_probabilities = argmax_on_grid(probabilities, mode="probabilities", **kwargs)
    by_labels = argmax_on_grid(probabilities, mode="labels", **kwargs)
    np.testing.assert_array_equal(by_probabilities, by_labels)
    np.testing.assert_array_equal(by_labels, probabilities.argmax(dim=0).numpy())


def test_label_mode_is_the_nearest_neighbour_lookup_and_probabilities_interpolate():
    # Prepare: two classes along x on a 2 mm grid, back to a 1 mm grid
    p1 = np.broadcast_to(np.asarray([0.0, 0.2, 0.9, 1.0], np.float32), (1, 1, 4))
    probabilities = np.stack([1.0 - p1, p1])
    kwargs = {"from_spacing_zyx": (1.0, 1.0, 2.0), "to_spacing_zyx": (1.0, 1.0, 1.0), "shape_zyx": (1, 1, 8)}
    kept = {}
    # Execute
    by_probabilities = argmax_on_grid(probabilities, keep=lambda c, p: kept.update({c: p}), **kwargs)
    by_labels = argmax_on_grid(probabilities, mode="labels", **kwargs)
    # Assert: labels are nearest neighbour; probabilities cross 0.5 between coarse voxels 1 and 2
    expected = resample_label_to_geometry(
        probabilities.argmax(axis=0),
        spacing_zyx=(1.0, 1.0, 2.0),
        sitk_size=(8, 1, 1),
        sitk_spacing=(1.0, 1.0, 1.0),
        sitk_origin=(0.0, 0.0, 0.0),
        sitk_direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
    )
    np.testing.assert_array_equal(by_labels, expected)
    np.testing.assert_allclose(kept[1][0, 0], [0.0, 0.1, 0.2, 0.55, 0.9, 0.95, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(kept[0] + kept[1], 1.0, atol=1e-6)
    assert by_probabilities[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_workflow_prediction_matches_predict_folder(tmp_path):
    # Prepare: a scan preprocessed as the workflow does, and the same scan given to predict_folder
    scan = _image(_ct((6, 11, 13)), (0.9, 0.8, 2.5), RAS)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(scan, str(tmp_path / "in" / "c1.nii.gz"))
    scan = sitk.ReadImage(str(tmp_path / "in" / "c1.nii.gz"))
    oriented = reorient(scan)
    (tmp_path / "npz").mkdir()
    image = image_to_network_grid(oriented, "c1", **SETTINGS)
    write_case(
        case_path(tmp_path / "npz", "c1"),
        {
            "image": image,
            "label": np.zeros(image.shape, np.uint8),
            "spacing": np.asarray(SETTINGS["spacing"], np.float64),
            "sitk_size": np.asarray(scan.GetSize(), np.int64),
            "sitk_spacing": np.asarray(scan.GetSpacing(), np.float64),
            "sitk_origin": np.asarray(scan.GetOrigin(), np.float64),
            "sitk_direction": np.asarray(scan.GetDirection(), np.float64),
            **orientation_record(scan, oriented),
        },
    )
    (tmp_path / "manifest.json").write_text('{"test": ["c1"]}')
    model = _model(tmp_path / "m.pt")
    site = {"model_path": model, "manifest_path": tmp_path / "manifest.json", "npz_dir": tmp_path / "npz"}
    # Execute
    predict_folder(model, tmp_path / "in", tmp_path / "cli", device="cpu", progress=False)
    for mode in ("probabilities", "labels"):
        predict_site(**site, out_dir=tmp_path / mode, patch_size=PATCH, device="cpu", resample=mode)
    # Assert: the workflow's default is the command's path; the two modes differ on a coarser grid
    cli = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli" / "c1.nii.gz")))
    by_probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "probabilities" / "c1.nii.gz")))
    by_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels" / "c1.nii.gz")))
    np.testing.assert_array_equal(cli, by_probabilities)
    assert (by_probabilities != by_labels).any()
    with pytest.raises(ValueError, match="resample must be one of"):
        predict_site(**site, out_dir=tmp_path / "x", patch_size=PATCH, device="cpu", resample="nearest")


def test_preprocessing_meta_is_carried_through_the_rounds(tmp_path):
    # Prepare: M0 with the meta, round 0 from it, one site's round-1 file
    m0 = _model(tmp_path / "m0.pt")
    init_global(m0, tmp_path / "round_0" / "global.pt")
    payload = load_checkpoint(tmp_path / "round_0" / "global.pt")
    site_meta = {"site": "site1", "round": 1, "n_cases": 3, "local_iterations": 1, "failed": False}
    save_checkpoint(tmp_path / "round_1" / "site1.pt", {"model": payload["model"], "meta": site_meta})
    # Execute
    aggregate_round(
        previous_global=tmp_path / "round_0" / "global.pt",
        site_paths=[tmp_path / "round_1" / "site1.pt"],
        out_global=tmp_path / "round_1" / "global.pt",
        out_record=tmp_path / "round_1" / "record.json",
        round_index=1,
        policy="fail",
    )
    # Assert
    for path in (tmp_path / "round_0" / "global.pt", tmp_path / "round_1" / "global.pt"):
        meta = load_checkpoint(path)["meta"]
        assert meta["preprocessing"] == SETTINGS and meta["patch_size"] == PATCH
