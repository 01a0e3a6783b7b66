"""Canonical orientation (preprocessing and prediction) and laterality (no left-right mirroring)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from fedpsmos.data.label_map import apply_label_map
from fedpsmos.data.synthetic import write_site
from fedpsmos.inference.predict import label_to_image, predict_site
from fedpsmos.inference.sliding_window import predict_logits
from fedpsmos.network import build_network
from fedpsmos.organs import CLASS_INDEX
from fedpsmos.preprocessing import preprocess_case
from fedpsmos.preprocessing.orientation import (
    ORIENTATION_CODES,
    array_to_oriented,
    array_to_original,
    check_orientation_code,
    orientation_code,
    reorient,
)
from fedpsmos.preprocessing.storage import read_case
from fedpsmos.training.augmentation import AugmentationSettings, augment_batch
from fedpsmos.training.checkpoint import save_checkpoint
from tests.conftest import load_bench, tiny_spec

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
REAL_IMAGE = REALDATA / "ct_abdomen_3mm.nii.gz"
REAL_LABEL = REALDATA / "ct_abdomen_3mm_5organs.nii.gz"
SETTINGS = {"image_order": 3, "clip": [-80.0, 305.0], "mean": 90.9, "std": 65.5}
SITE_LABELS = {"liver": [1], "kidney": [3]}  # one kidney value, split by body side
# The same CT stored LPS, RAS (x and y flipped), slice axis first (KiTS19) and another permutation.
CODES = ("LPS", "RAS", "SPL", "IAR")
ROTATED_Z = (math.cos(0.3), -math.sin(0.3), 0.0, math.sin(0.3), math.cos(0.3), 0.0, 0.0, 0.0, 1.0)


def _lps_case(direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)) -> tuple[sitk.Image, sitk.Image]:
    """An anisotropic LPS CT, the liver on the patient's right and a kidney each side (one label value)."""
    rng = np.random.default_rng(0)
    shape = (10, 24, 30)  # z, y, x
    hu = (ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * 300).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[2:8, 4:12, 2:12] = 1  # liver: low x = the patient's right in LPS
    label[3:7, 14:20, 6:10] = 3  # right kidney
    label[3:7, 14:20, 21:25] = 3  # left kidney
    images = []
    for array in (hu, label):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.5, 1.2, 4.0))
        image.SetOrigin((-20.0, 10.0, 5.0))
        image.SetDirection(direction)
        images.append(image)
    return images[0], images[1]


def _write_stored(tmp_path: Path, code: str, image: sitk.Image, label: sitk.Image) -> tuple[Path, Path]:
    folder = tmp_path / code
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "img.nii.gz", folder / "lab.nii.gz"
    for item, path in zip((image, label), paths, strict=True):
        sitk.WriteImage(reorient(item, code), str(path))
    return paths


def _load(path: Path) -> dict[str, np.ndarray]:
    return read_case(path)


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (
        b.GetSize(),
        b.GetSpacing(),
        b.GetOrigin(),
        b.GetDirection(),
    )


def test_array_maps_undo_and_redo_dicomorient_for_every_code():
    # Prepare: a volume with distinct values, stored in each of the 48 orientations.
    array = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    base = sitk.GetImageFromArray(array)
    base.SetSpacing((1.0, 2.0, 3.0))
    for code in ORIENTATION_CODES:
        stored = reorient(base, code)
        # Execute
        oriented = reorient(stored)
        stored_array, oriented_array = sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(oriented)
        geometry = {
            "original_direction": stored.GetDirection(),
            "oriented_direction": oriented.GetDirection(),
        }
        # Assert
        assert orientation_code(stored.GetDirection()) == code
        np.testing.assert_array_equal(oriented_array, array)
        np.testing.assert_array_equal(array_to_original(oriented_array, **geometry), stored_array)
        np.testing.assert_array_equal(array_to_oriented(stored_array, **geometry), oriented_array)
    assert len(ORIENTATION_CODES) == 48
    with pytest.raises(ValueError, match="'LPL' is not a DICOM orientation code"):
        check_orientation_code("LPL")
    with pytest.raises(ValueError, match="not related by an axis permutation"):
        array_to_original(array, original_direction=ROTATED_Z, oriented_direction=np.eye(3).ravel())


@pytest.mark.parametrize("direction", [np.eye(3).ravel().tolist(), ROTATED_Z], ids=["axial", "oblique"])
def test_orientations_give_identical_arrays_and_exact_round_trip(tmp_path, direction):
    # Prepare: the same CT stored in four orientations; target spacing = file spacing (no interpolation).
    image, label = _lps_case(tuple(direction))
    expected_lps = apply_label_map(
        sitk.GetArrayFromImage(label),
        SITE_LABELS,
        origin=label.GetOrigin(),
        spacing=label.GetSpacing(),
        direction=label.GetDirection(),
    )
    arrays = {}
    for code in CODES:
        img, lab = _write_stored(tmp_path, code, image, label)
        # Execute
        preprocess_case(
            img, lab, tmp_path / f"{code}.b2zip", labels=SITE_LABELS, spacing=(4.0, 1.2, 1.5), **SETTINGS
        )
        data = _load(tmp_path / f"{code}.b2zip")
        arrays[code] = data
        back = label_to_image(data["label"], data)
        # Assert: the label comes back voxel for voxel in the file's own order and geometry.
        stored = sitk.ReadImage(str(lab))
        assert _same_geometry(back, stored)
        expected = sitk.GetImageFromArray(expected_lps)
        expected.CopyInformation(label)
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(reorient(expected, code))
        )
    # Identical canonical arrays; the kidney split is by body side: kidney_left at high LPS x.
    for code in CODES[1:]:
        assert str(arrays[code]["orientation"]) == code
        np.testing.assert_array_equal(arrays[code]["image"], arrays["LPS"]["image"])
        np.testing.assert_array_equal(arrays[code]["label"], arrays["LPS"]["label"])
    lps = arrays["LPS"]["label"]
    assert (lps[:, :, 21:25] == CLASS_INDEX["kidney_left"]).sum() == 4 * 6 * 4
    assert (lps[:, :, 6:10] == CLASS_INDEX["kidney_right"]).sum() == 4 * 6 * 4


def _random_model(path: Path) -> None:
    spec = tiny_spec(6, deep_supervision=False)
    net = build_network(spec, seed=0)
    with torch.no_grad():
        for layer in net.decoder.seg_layers:
            layer.weight.mul_(20.0)  # spread the argmax over several classes
    organs = ["liver", "spleen", "pancreas", "kidney_left", "kidney_right"]
    save_checkpoint(path, {"model": net.state_dict(), "meta": {"network": spec.to_dict(), "organs": organs}})


def test_predictions_are_identical_in_each_files_own_geometry(tmp_path):
    # Prepare: preprocessed at another spacing (resampling both ways), one model, a manifest per orientation.
    image, label = _lps_case(ROTATED_Z)
    _random_model(tmp_path / "model.pt")
    written = {}
    for code in CODES:
        img, lab = _write_stored(tmp_path, code, image, label)
        npz_dir = tmp_path / f"npz_{code}"
        npz_dir.mkdir()
        preprocess_case(
            img, lab, npz_dir / "c1.b2zip", labels=SITE_LABELS, spacing=(3.0, 2.0, 2.0), **SETTINGS
        )
        manifest = tmp_path / f"manifest_{code}.json"
        manifest.write_text(json.dumps({"cases": [{"case": "c1", "split": "test"}], "test": ["c1"]}))
        # Execute
        (path,) = predict_site(
            model_path=tmp_path / "model.pt",
            manifest_path=manifest,
            npz_dir=npz_dir,
            out_dir=tmp_path / f"pred_{code}",
            patch_size=(4, 8, 8),
            mirror=True,
            device="cpu",
        )
        written[code] = sitk.ReadImage(str(path))
        # Assert: the input file's exact size, spacing, origin and (oblique) direction.
        assert _same_geometry(written[code], sitk.ReadImage(str(img)))
    # ... and the same labels once reoriented to LPS.
    reference = sitk.GetArrayFromImage(reorient(written["LPS"]))
    assert len(np.unique(reference)) > 2
    for code in CODES[1:]:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(reorient(written[code])), reference)


def test_synthetic_site_orientation_keeps_the_physical_content(tmp_path):
    # Prepare
    spec = {"cases": 1, "spacing": [8.0, 6.0, 6.0], "noise": 20.0, "contrast": 1.0, "offset": 0.0, "fov": 0.8}
    labels = {"liver": [1], "kidney": [2]}
    # Execute
    write_site(tmp_path / "lps", site="s", spec=spec, labels=labels, seed=0)
    write_site(tmp_path / "spl", site="s", spec={**spec, "orientation": "SPL"}, labels=labels, seed=0)
    # Assert: SPL puts the slice axis first; reoriented to LPS, image and label are the same voxels at the
    # same physical positions.
    for sub in ("imagesTr/s_000_0000.nii.gz", "labelsTr/s_000.nii.gz"):
        lps, spl = (sitk.ReadImage(str(tmp_path / o / sub)) for o in ("lps", "spl"))
        assert orientation_code(spl.GetDirection()) == "SPL" and spl.GetSize() == lps.GetSize()[::-1]
        back = reorient(spl)
        np.testing.assert_allclose(back.GetOrigin(), lps.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(back.GetDirection(), lps.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(lps))
    with pytest.raises(ValueError, match="site s: synthetic.orientation 'XYZ'"):
        write_site(tmp_path / "bad", site="s", spec={**spec, "orientation": "XYZ"}, labels=labels, seed=0)


def test_flipped_batches_never_mirror_the_left_right_axis():
    # Prepare: every voxel holds its own index, so any flip shows; mirroring always, nothing else.
    shape = (4, 5, 6)
    index = torch.arange(math.prod(shape)).reshape(1, 1, *shape)
    image, target = index.float().repeat(8, 1, 1, 1, 1), index.repeat(8, 1, 1, 1, 1)
    zero = {f"p_{k}": 0.0 for k in ("rotation", "scaling", "noise", "brightness", "contrast", "gamma")}
    always = AugmentationSettings(**zero, p_gamma_inverted=0.0, p_mirror=1.0)
    default_p = AugmentationSettings(**zero, p_gamma_inverted=0.0)
    # Execute
    flipped_image, flipped = augment_batch(image, target, np.random.default_rng(0), always)
    draws = [augment_batch(image, target, np.random.default_rng(s), default_p)[1] for s in range(20)]
    every_axis = AugmentationSettings(**zero, p_gamma_inverted=0.0, p_mirror=1.0, mirror_axes=(0, 1, 2))
    nnunet = augment_batch(image, target, np.random.default_rng(0), every_axis)[1]
    # Assert: z and y mirrored, x (the patient's right -> left) never; nnU-Net's axes remain available.
    assert torch.equal(flipped, torch.flip(target, (2, 3)))
    assert torch.equal(flipped_image, flipped.float())
    for batch in draws:
        x_order = batch[:, 0, 0, 0, :] % shape[2]
        assert torch.equal(x_order, torch.arange(shape[2]).expand_as(x_order))
    assert torch.equal(nnunet, torch.flip(target, (2, 3, 4)))


class _RampNet(torch.nn.Module):
    """Outputs the patch's x coordinate as its only logit: unchanged by z/y flips, reversed by an x flip."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.arange(x.shape[-1], dtype=x.dtype)
        return torch.zeros_like(x) + ramp + self.dummy


def test_test_time_mirroring_leaves_the_left_right_axis_alone():
    image = np.zeros((6, 8, 10), np.float32)
    plain = predict_logits(_RampNet(), image, patch_size=(4, 4, 6), mirror=False, device="cpu")
    mirrored = predict_logits(_RampNet(), image, patch_size=(4, 4, 6), mirror=True, device="cpu")
    every_axis = predict_logits(
        _RampNet(), image, patch_size=(4, 4, 6), mirror=True, mirror_axes=(0, 1, 2), device="cpu"
    )
    torch.testing.assert_close(mirrored, plain)
    assert not torch.allclose(every_axis, plain)
    with pytest.raises(ValueError, match="mirror_axes"):
        predict_logits(_RampNet(), image, patch_size=(4, 4, 6), mirror=True, mirror_axes=(2, 3), device="cpu")


@pytest.mark.skipif(
    not (REAL_IMAGE.is_file() and REAL_LABEL.is_file()),
    reason=f"real CT test data not found in {REALDATA} (shared folder beside the checkout)",
)
def test_real_ct_in_three_orientations(tmp_path):
    # Prepare: the RAS file itself, an LPS copy and a slice-first copy, written in tmp_path only.
    labels = {"liver": [1], "spleen": [2], "pancreas": [3], "kidney_right": [4], "kidney_left": [5]}
    image, label = sitk.ReadImage(str(REAL_IMAGE)), sitk.ReadImage(str(REAL_LABEL))
    lut = np.array([0, 1, 2, 3, CLASS_INDEX["kidney_right"], CLASS_INDEX["kidney_left"]], np.uint8)
    paths = {"RAS": (REAL_IMAGE, REAL_LABEL)}
    for code in ("LPS", "IPL"):
        paths[code] = _write_stored(tmp_path, code, image, label)
    arrays = {}
    for code, (img, lab) in paths.items():
        # Execute: at the file's 3 mm spacing, so prediction geometry round-trips exactly.
        preprocess_case(
            img, lab, tmp_path / f"{code}.b2zip", labels=labels, spacing=(3.0, 3.0, 3.0), **SETTINGS
        )
        arrays[code] = _load(tmp_path / f"{code}.b2zip")
        back = label_to_image(arrays[code]["label"], arrays[code])
        # Assert: the written label is the file's, voxel for voxel, in the file's own geometry.
        stored = sitk.ReadImage(str(lab))
        assert _same_geometry(back, stored)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), lut[sitk.GetArrayFromImage(stored)])
    for code in ("LPS", "IPL"):
        np.testing.assert_array_equal(arrays[code]["image"], arrays["RAS"]["image"])
        np.testing.assert_array_equal(arrays[code]["label"], arrays["RAS"]["label"])
    # Canonical x runs right -> left: the liver at low x, the left kidney at higher x than the right one.
    label_lps = arrays["RAS"]["label"]
    x_of = {c: np.argwhere(label_lps == CLASS_INDEX[c])[:, 2].mean() for c in ("liver", "spleen")}
    assert x_of["liver"] < x_of["spleen"]
    kidneys = [np.argwhere(label_lps == CLASS_INDEX[c])[:, 2].mean() for c in ("kidney_right", "kidney_left")]
    assert kidneys[0] < kidneys[1]


def test_tiny_network_tells_the_kidneys_apart_by_side():
    # Prepare: a phantom whose two kidneys are identical but for their side; fedpsmos' mirroring (not x).
    experiment = load_bench("laterality_experiment")
    # Execute (one torch thread, set by the conftest fixture)
    net = experiment.train("no_lr_flip", iterations=300, seed=0)
    dice = experiment.kidney_dice(net)
    # Assert: both kidneys well above chance (a side-blind network scores at most about 0.5 on each).
    assert dice["kidney_left"] > 0.7 and dice["kidney_right"] > 0.7, dice
