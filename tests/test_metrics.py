"""Dice and HD95 (both conventions) against hand computation and brute force, empty masks, evaluate_site."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from fedpsmos.evaluation.evaluate import evaluate_site
from fedpsmos.evaluation.metrics import dice, hd95, image_diagonal, surface


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


def test_hd95_conventions_hand_computed():
    # Prepare: pred has a voxel on the reference and one 4 voxels away in x (0.5 mm): pred->ref [0, 2],
    # ref->pred [0]. Pooled (medpy): 95th percentile of [0, 0, 2] = 0.9 * 2 = 1.8. Max (MONAI): the larger of
    # the directed 95th percentiles, percentile([0, 2]) = 0.95 * 2 = 1.9 and percentile([0]) = 0.
    pred = _mask((2, 2, 6), (0, 0, 0), (0, 0, 4))
    ref = _mask((2, 2, 6), (0, 0, 0))
    # Execute / Assert
    assert hd95(pred, ref, (3.0, 2.0, 0.5), convention="pooled") == pytest.approx(1.8)
    assert hd95(pred, ref, (3.0, 2.0, 0.5), convention="max") == pytest.approx(1.9)
    assert hd95(pred, ref, (3.0, 2.0, 0.5)) == pytest.approx(1.9)  # max is the default
    assert hd95(ref, pred, (3.0, 2.0, 0.5)) == pytest.approx(1.9)  # symmetric


def test_hd95_max_catches_a_one_sided_outlier_pooled_hides():
    # Prepare: a row of voxels (all are surface in a 1 x 1 x 60 array), spacing 1 mm. Reference x 0..29;
    # prediction the same plus x 58, 59 (a false positive 29-30 mm away). pred->ref: 30 zeros, 29, 30; its
    # 95th percentile sits at rank 0.95 * 31 = 29.45, between 0 and 29: 0.45 * 29 = 13.05. ref->pred: 30
    # zeros. Pooled: 60 zeros, 29, 30, rank 0.95 * 61 = 57.95 -> 0.
    pred = np.zeros((1, 1, 60), dtype=bool)
    ref = np.zeros((1, 1, 60), dtype=bool)
    ref[0, 0, :30] = True
    pred[0, 0, :30] = True
    pred[0, 0, 58:] = True
    # Execute / Assert
    assert hd95(pred, ref, (1.0, 1.0, 1.0), convention="max") == pytest.approx(13.05)
    assert hd95(pred, ref, (1.0, 1.0, 1.0), convention="pooled") == pytest.approx(0.0)


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
    # Both empty: nothing to measure
    assert dice(empty, empty) == 1.0 and math.isnan(hd95(empty, empty, (1, 1, 1)))
    # Exactly one empty: Dice 0 and the image diagonal, sqrt((3*2.5)^2 + (4*0.8)^2 + (5*0.7)^2) mm
    diagonal = math.sqrt(7.5**2 + 3.2**2 + 3.5**2)
    assert image_diagonal((3, 4, 5), (2.5, 0.8, 0.7)) == pytest.approx(diagonal)
    for convention in ("max", "pooled"):
        assert hd95(organ, empty, (2.5, 0.8, 0.7), convention=convention) == pytest.approx(diagonal)
        assert hd95(empty, organ, (2.5, 0.8, 0.7), convention=convention) == pytest.approx(diagonal)
    assert dice(organ, empty) == 0.0 and dice(empty, organ) == 0.0
    assert hd95(empty, organ, (1, 1, 1), penalty=123.0) == 123.0


def _brute_force_directed(a, b, spacing):
    """Distances from every surface voxel of a to its nearest surface voxel of b, by all pairs (no EDT)."""
    sa = np.argwhere(surface(a)) * np.asarray(spacing)
    sb = np.argwhere(surface(b)) * np.asarray(spacing)
    return np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1)).min(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force(seed):
    # Prepare: random blobs (MONAI and medpy are not dependencies, so the reference is every surface voxel
    # pair's distance, computed directly)
    rng = np.random.default_rng(seed)
    pred = ndimage.binary_dilation(rng.random((8, 14, 12)) > 0.99, iterations=2)
    ref = ndimage.binary_dilation(rng.random((8, 14, 12)) > 0.99, iterations=2)
    pred[0, 0, :4] = True  # one blob on the border
    ref[4, 7, 6] = True
    spacing = (2.5, 0.9, 1.3)
    forward = _brute_force_directed(pred, ref, spacing)
    backward = _brute_force_directed(ref, pred, spacing)
    # Execute / Assert
    assert hd95(pred, ref, spacing, convention="max") == pytest.approx(
        max(np.percentile(forward, 95), np.percentile(backward, 95))
    )
    assert hd95(pred, ref, spacing, convention="pooled") == pytest.approx(
        np.percentile(np.concatenate([forward, backward]), 95)
    )
    assert hd95(pred, ref, spacing, convention="max") >= hd95(pred, ref, spacing, convention="pooled")


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

    forward, backward = full(pred, ref), full(ref, pred)
    # Execute / Assert
    pooled = np.percentile(np.concatenate([forward, backward]), 95)
    assert hd95(pred, ref, spacing, convention="pooled") == pytest.approx(pooled)
    largest = max(np.percentile(forward, 95), np.percentile(backward, 95))
    assert hd95(pred, ref, spacing, convention="max") == pytest.approx(largest)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((2, 2, 2)), np.ones((2, 2, 2)), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="unknown HD95 convention"):
        hd95(np.ones((2, 2, 2)), np.ones((2, 2, 2)), (1.0, 1.0, 1.0), convention="mean")


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
    assert list(written.columns) == [
        "model",
        "site",
        "case",
        "organ",
        "dice",
        "hd95",
        "missed",
        "spurious",
        "hd95_convention",
    ]
    assert set(written["hd95_convention"]) == {"max"}
    assert list(written["organ"]) == ["liver", "spleen"]
    liver = written[written["organ"] == "liver"].iloc[0]
    assert liver["dice"] == pytest.approx(2 * 4 / 12)
    assert liver["hd95"] == pytest.approx(0.8)  # the missing x column is one 0.8 mm voxel away
    assert not liver["missed"] and not liver["spurious"]
    spleen = written[written["organ"] == "spleen"].iloc[0]
    # Missed: Dice 0, HD95 = the reference image's diagonal, (4, 6, 6) voxels of (2.0, 0.9, 0.8) mm (z, y, x)
    assert spleen["dice"] == 0.0 and bool(spleen["missed"]) and not spleen["spurious"]
    assert spleen["hd95"] == pytest.approx(math.sqrt(8.0**2 + 5.4**2 + 4.8**2))
    assert len(frame) == 2


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


def test_evaluate_site_flags_spurious_and_absent_organs(tmp_path):
    # Prepare: site labels liver (1), spleen (2), pancreas (3); case c1 has only the liver in its reference.
    # The prediction has the liver, a spurious spleen voxel, and no pancreas (absent from both).
    ref = np.zeros((3, 5, 5), dtype=np.uint8)
    ref[1, 1:3, 1:3] = 1
    pred = np.zeros_like(ref)
    pred[1, 1:3, 1:3] = 1
    pred[0, 4, 4] = 2
    spacing_xyz = (0.5, 0.5, 3.0)
    _write(ref, tmp_path / "lab.nii.gz", spacing=spacing_xyz)
    (tmp_path / "pred").mkdir()
    _write(pred, tmp_path / "pred" / "c1.nii.gz", spacing=spacing_xyz)
    manifest = {"cases": [{"case": "c1", "label": "lab.nii.gz"}], "test": ["c1"]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    # Execute
    frame = evaluate_site(
        predictions_dir=tmp_path / "pred",
        manifest_path=tmp_path / "manifest.json",
        labels={"liver": [1], "spleen": [2], "pancreas": [3]},
        model="pretrain",
        site="s",
        out_csv=tmp_path / "m.csv",
        hd95_convention="pooled",
    )
    # Assert
    rows = pd.read_csv(tmp_path / "m.csv").set_index("organ")
    assert rows.loc["liver", "dice"] == 1.0 and rows.loc["liver", "hd95"] == 0.0
    assert rows.loc["spleen", "dice"] == 0.0 and bool(rows.loc["spleen", "spurious"])
    assert not rows.loc["spleen", "missed"]
    # image diagonal: (3, 5, 5) voxels of (3.0, 0.5, 0.5) mm
    assert rows.loc["spleen", "hd95"] == pytest.approx(math.sqrt(9.0**2 + 2.5**2 + 2.5**2))
    assert rows.loc["pancreas", "dice"] == 1.0 and math.isnan(rows.loc["pancreas", "hd95"])
    assert not rows.loc["pancreas", "missed"] and not rows.loc["pancreas", "spurious"]
    assert set(frame["hd95_convention"]) == {"pooled"}
    with pytest.raises(ValueError, match="unknown HD95 convention"):
        evaluate_site(
            predictions_dir=tmp_path / "pred",
            manifest_path=tmp_path / "manifest.json",
            labels={"liver": [1]},
            model="pretrain",
            site="s",
            out_csv=tmp_path / "m2.csv",
            hd95_convention="median",
        )


def test_ignored_voxels_are_left_out_of_dice_and_hd95():
    # Prepare: on a 1 x 1 x 8 row, reference organ at x 1..4 with x 3..4 ignored; prediction at x 2..5
    ref = np.zeros((1, 1, 8), dtype=bool)
    ref[0, 0, 1:5] = True
    pred = np.zeros_like(ref)
    pred[0, 0, 2:6] = True
    ignore = np.zeros_like(ref)
    ignore[0, 0, 3:5] = True
    # Without ignore: |P∩R| = 3 (x 2..4), |P| + |R| = 8 -> 0.75. With x 3..4 removed from both masks:
    # R = {1, 2}, P = {2, 5}, |P∩R| = 1, |P| + |R| = 4 -> 0.5.
    assert dice(pred, ref) == pytest.approx(0.75)
    assert dice(pred, ref, ignore=ignore) == pytest.approx(0.5)
    # HD95 on what is left: every voxel is surface; distances P->R: 2->2 is 0, 5->2 is 3; R->P: 1->2 is 1,
    # 2->2 is 0. max convention: max(95th pct of [0, 3], 95th pct of [1, 0]) = max(2.85, 0.95).
    assert hd95(pred, ref, (1.0, 1.0, 1.0), ignore=ignore) == pytest.approx(2.85)
    # masks lying wholly in the ignored region: both empty once it is removed (Dice 1, HD95 NaN)
    assert dice(ignore, ignore, ignore=ignore) == 1.0
    assert math.isnan(hd95(ignore, ignore, (1.0, 1.0, 1.0), ignore=ignore))
    with pytest.raises(ValueError, match="ignore"):
        dice(pred, ref, ignore=ignore[..., :4])


def test_evaluate_site_uses_the_manifest_label_map_and_skips_ignored_voxels(tmp_path):
    # Prepare: a liver site whose manifest maps 1 -> liver, 6 -> background, 9 -> ignore (unknown class)
    ref = np.zeros((4, 6, 6), dtype=np.uint8)
    ref[1:3, 1:3, 1:3] = 1  # liver, 8 voxels
    ref[1:3, 1:3, 3:5] = 9  # unknown, 8 voxels next to it
    ref[0, 5, 5] = 6  # a structure outside the task
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1:5] = 1  # liver over the liver and the unknown region: not penalised there
    pred[3, 0, 0] = 1  # one false positive voxel
    _write(ref, tmp_path / "lab.nii.gz")
    (tmp_path / "pred").mkdir()
    _write(pred, tmp_path / "pred" / "c1.nii.gz")
    manifest = {
        "labels": {"liver": [1]},
        "background": [6],
        "ignore": [9],
        "cases": [{"case": "c1", "label": "lab.nii.gz"}],
        "test": ["c1"],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    # Execute: no labels argument, as the workflow calls it
    frame = evaluate_site(
        predictions_dir=tmp_path / "pred",
        manifest_path=tmp_path / "manifest.json",
        model="pretrain",
        site="s",
        out_csv=tmp_path / "m.csv",
    )

    # Assert: Dice 2 * 8 / (9 + 8): the 8 predicted voxels in the ignored region count nowhere
    (row,) = frame.itertuples()
    assert row.organ == "liver" and row.dice == pytest.approx(16 / 17)
    assert not row.missed and not row.spurious
