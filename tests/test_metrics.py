"""Dice and HD95 against hand-computed values (anisotropic spacing, empty masks) and evaluate_site's CSV."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from fedpsmos.evaluation.evaluate import evaluate_site
from fedpsmos.evaluation.metrics import dice, hd95, surface


def _mask(shape, *voxels):
    mask = np.zeros(shape, dtype=bool)
    for v in voxels:
        mask[v] = True
    return mask


def test_dice_hand_computed():
    # Prepare: 4 predicted voxels, 2 reference voxels, 2 shared
    pred = _mask((3, 3, 3), (0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 1, 1))
    ref = _mask((3, 3, 3), (0, 0, 0), (0, 0, 1))
    # Execute / Assert
    assert dice(pred, ref) == pytest.approx(2 * 2 / 6)
    assert dice(ref, ref) == 1.0


def test_hd95_single_voxels_anisotropic():
    # Prepare: one voxel each, 1 voxel apart in z and y, 2 in x, spacing (2.5, 1.0, 0.7) mm
    pred = _mask((4, 4, 4), (0, 0, 0))
    ref = _mask((4, 4, 4), (1, 1, 2))
    # Execute
    value = hd95(pred, ref, (2.5, 1.0, 0.7))
    # Assert
    assert value == pytest.approx(math.sqrt(2.5**2 + 1.0**2 + 1.4**2))


def test_hd95_pools_both_directions_like_medpy():
    # Prepare: pred has a voxel on the reference and one 4 voxels away in x (0.5 mm): pred->ref [0, 2],
    # ref->pred [0]; the pooled 95th percentile of [0, 0, 2] is 0.9 * 2 = 1.8 (MONAI's max of the directed
    # percentiles would give 1.9)
    pred = _mask((2, 2, 6), (0, 0, 0), (0, 0, 4))
    ref = _mask((2, 2, 6), (0, 0, 0))
    # Execute / Assert
    assert hd95(pred, ref, (3.0, 2.0, 0.5)) == pytest.approx(1.8)


def test_hd95_shifted_slab_uses_z_spacing():
    # Prepare: two full 5 x 5 slabs two slices apart, spacing z 2.5 mm -> every surface distance is 5 mm
    pred = np.zeros((6, 5, 5), dtype=bool)
    ref = np.zeros((6, 5, 5), dtype=bool)
    pred[3], ref[1] = True, True
    # Execute / Assert
    assert hd95(pred, ref, (2.5, 0.8, 0.8)) == pytest.approx(5.0)
    assert dice(pred, ref) == 0.0


def test_empty_policy():
    empty = np.zeros((3, 4, 5), dtype=bool)
    organ = _mask((3, 4, 5), (1, 2, 3))
    assert dice(empty, empty) == 1.0 and hd95(empty, empty, (1, 1, 1)) == 0.0
    assert dice(organ, empty) == 0.0 and math.isnan(hd95(organ, empty, (1, 1, 1)))
    assert dice(empty, organ) == 0.0 and math.isnan(hd95(empty, organ, (1, 1, 1)))


def test_cropping_changes_nothing():
    # Prepare: random blobs, one touching the array border; reference computation on the full arrays
    rng = np.random.default_rng(3)
    pred = ndimage.binary_dilation(rng.random((12, 30, 25)) > 0.995, iterations=2)
    ref = ndimage.binary_dilation(rng.random((12, 30, 25)) > 0.995, iterations=2)
    pred[0, :3, :3] = True
    spacing = (3.0, 0.9, 1.1)

    def full(a, b):
        dt = ndimage.distance_transform_edt(~surface(b), sampling=spacing)
        return dt[surface(a)]

    expected = np.percentile(np.concatenate([full(pred, ref), full(ref, pred)]), 95)
    # Execute / Assert
    assert hd95(pred, ref, spacing) == pytest.approx(expected)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((2, 2, 2)), np.ones((2, 2, 2)), (1.0, 0.0, 1.0))


def _write(array, path, spacing=(0.8, 0.9, 2.0), origin=(1.0, -2.0, 3.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def test_evaluate_site_scores_only_labelled_organs(tmp_path):
    # Prepare: a liver+spleen site (site values 7 -> liver, 3 -> spleen) with one test case
    ref = np.zeros((4, 6, 6), dtype=np.uint8)
    ref[1:3, 1:3, 1:3] = 7  # liver, 8 voxels
    ref[0, 4, 4] = 3  # spleen, 1 voxel
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1:2] = 1  # liver (global 1), 4 voxels inside the reference
    pred[3, 5, 5] = 3  # pancreas: not labelled by this site, must not be scored
    _write(ref, tmp_path / "lab.nii.gz")
    (tmp_path / "pred").mkdir()
    _write(pred, tmp_path / "pred" / "c1.nii.gz")
    manifest = {
        "site": "s",
        "root": str(tmp_path),
        "labels": {},
        "organs": [],
        "cases": [{"case": "c1", "image": "img.nii.gz", "label": "lab.nii.gz", "split": "test"}],
        "train": [],
        "test": ["c1"],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    # Execute
    frame = evaluate_site(
        predictions_dir=tmp_path / "pred",
        manifest_path=tmp_path / "manifest.json",
        labels={"liver": [7], "spleen": [3]},
        model="federated/V2",
        site="s",
        out_csv=tmp_path / "out" / "metrics.csv",
    )
    # Assert
    written = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert list(written.columns) == ["model", "site", "case", "organ", "dice", "hd95"]
    assert list(written["organ"]) == ["liver", "spleen"]
    liver = written[written["organ"] == "liver"].iloc[0]
    assert liver["dice"] == pytest.approx(2 * 4 / 12)
    assert liver["hd95"] == pytest.approx(0.8)  # the missing x column is one 0.8 mm voxel away
    spleen = written[written["organ"] == "spleen"].iloc[0]
    assert spleen["dice"] == 0.0 and math.isnan(spleen["hd95"])
    assert len(frame) == 2

    # Execute: a model that outputs only the liver is scored on the liver only
    only = evaluate_site(
        predictions_dir=tmp_path / "pred",
        manifest_path=tmp_path / "manifest.json",
        labels={"liver": [7], "spleen": [3]},
        model="site_alone",
        site="s",
        out_csv=tmp_path / "m2.csv",
        model_organs=["liver"],
    )
    assert list(only["organ"]) == ["liver"]


def test_evaluate_site_rejects_wrong_geometry(tmp_path):
    _write(np.zeros((4, 6, 6), np.uint8), tmp_path / "lab.nii.gz")
    (tmp_path / "pred").mkdir()
    _write(np.zeros((4, 6, 7), np.uint8), tmp_path / "pred" / "c1.nii.gz")
    manifest = {"cases": [{"case": "c1", "label": str(tmp_path / "lab.nii.gz")}], "test": ["c1"]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="c1.nii.gz: size"):
        evaluate_site(
            predictions_dir=tmp_path / "pred",
            manifest_path=tmp_path / "manifest.json",
            labels={"liver": [1]},
            model="pretrain",
            site="s",
            out_csv=tmp_path / "m.csv",
        )
    assert not (tmp_path / "m.csv").exists()
