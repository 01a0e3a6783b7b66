"""predict_site: global classes, a rotated anisotropic original geometry restored exactly, whole output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fedpsmos.inference.predict import class_lookup, output_classes, predict_site
from fedpsmos.network import build_network
from fedpsmos.preprocessing.orientation import orientation_record, reorient
from fedpsmos.preprocessing.resample import resample_array
from fedpsmos.preprocessing.storage import case_path, write_case
from fedpsmos.training.checkpoint import save_checkpoint
from tests.conftest import tiny_spec

TARGET_SPACING = (3.0, 1.5, 1.5)


def _rotation_z(degrees: float) -> tuple[float, ...]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def _original_case(tmp_path, case: str) -> sitk.Image:
    """A rotated, anisotropic original image, written and read back as the pipeline would see it."""
    array = np.random.default_rng(0).normal(size=(7, 9, 11)).astype(np.float32)  # z, y, x
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.83, 0.91, 2.5))
    image.SetOrigin((-10.25, 5.5, 3.3))
    image.SetDirection(_rotation_z(30.0))
    path = tmp_path / "raw" / f"{case}_0000.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return sitk.ReadImage(str(path))


def _npz(tmp_path, case: str, original: sitk.Image) -> None:
    oriented = reorient(original)  # as preprocessing does
    spacing_zyx = oriented.GetSpacing()[::-1]
    image = resample_array(sitk.GetArrayFromImage(oriented), spacing_zyx, TARGET_SPACING, order=1)
    out = tmp_path / "npz"
    out.mkdir(exist_ok=True)
    write_case(
        case_path(out, case),
        {
            "image": image,
            "label": np.zeros(image.shape, np.uint8),
            "labelled": np.ones(6, bool),
            "spacing": np.asarray(TARGET_SPACING, np.float64),
            "sitk_size": np.asarray(original.GetSize(), np.int64),
            "sitk_spacing": np.asarray(original.GetSpacing(), np.float64),
            "sitk_origin": np.asarray(original.GetOrigin(), np.float64),
            "sitk_direction": np.asarray(original.GetDirection(), np.float64),
            **orientation_record(original, oriented),
        },
    )


def _constant_model(path, organs: list[str], winner: int) -> None:
    """A real PlainConvUNet whose output layer always votes for channel ``winner``."""
    spec = tiny_spec(len(organs) + 1)
    net = build_network(spec, seed=0)
    with torch.no_grad():
        for layer in net.decoder.seg_layers:
            layer.weight.zero_()
            layer.bias.zero_()
            layer.bias[winner] = 5.0
    save_checkpoint(
        path,
        {
            "model": net.state_dict(),
            "meta": {"network": spec.to_dict(), "organs": organs, "kind": "site_alone", "site": "site5"},
        },
    )


def _manifest(tmp_path, cases: list[str]) -> None:
    manifest = {
        "site": "site5",
        "cases": [{"case": c, "split": "test"} for c in cases],
        "train": [],
        "test": cases,
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))


def test_prediction_has_original_geometry_and_global_classes(tmp_path):
    # Prepare: a site-alone kidney model (channels background, kidney_left, kidney_right) voting kidney_right
    original = _original_case(tmp_path, "c1")
    _npz(tmp_path, "c1", original)
    _manifest(tmp_path, ["c1"])
    _constant_model(tmp_path / "model.pt", ["kidney_left", "kidney_right"], winner=2)
    stale = tmp_path / "pred" / "stale.nii.gz"
    stale.parent.mkdir()
    stale.write_text("old")
    # Execute
    written = predict_site(
        model_path=tmp_path / "model.pt",
        manifest_path=tmp_path / "manifest.json",
        npz_dir=tmp_path / "npz",
        out_dir=tmp_path / "pred",
        patch_size=(4, 8, 8),
        step=0.5,
        mirror=False,
        device="cpu",
    )
    # Assert
    assert written == [tmp_path / "pred" / "c1.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["c1.nii.gz"]  # replaced whole
    pred = sitk.ReadImage(str(written[0]))
    assert pred.GetSize() == original.GetSize()
    assert pred.GetSpacing() == original.GetSpacing()
    assert pred.GetOrigin() == original.GetOrigin()
    assert pred.GetDirection() == original.GetDirection()
    assert pred.GetPixelID() == sitk.sitkUInt8
    assert np.unique(sitk.GetArrayFromImage(pred)).tolist() == [5]  # global kidney_right
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pred")]


def test_failure_leaves_no_output(tmp_path):
    # Prepare: the manifest names a test case without a preprocessed file
    original = _original_case(tmp_path, "c1")
    _npz(tmp_path, "c1", original)
    _manifest(tmp_path, ["c1", "c2"])
    _constant_model(tmp_path / "model.pt", ["liver"], winner=1)
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="c2.b2zip"):
        predict_site(
            model_path=tmp_path / "model.pt",
            manifest_path=tmp_path / "manifest.json",
            npz_dir=tmp_path / "npz",
            out_dir=tmp_path / "pred",
            patch_size=(4, 8, 8),
        )
    assert not (tmp_path / "pred").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pred")]


def test_output_classes_and_lookup():
    assert output_classes(["spleen"]) == ("background", "spleen")
    assert output_classes(["background", "liver", "spleen"]) == ("background", "liver", "spleen")
    assert class_lookup(("background", "pancreas", "kidney_left")).tolist() == [0, 3, 4]
    with pytest.raises(ValueError, match="unknown organ"):
        output_classes(["heart"])
