"""Patch index: summed-area fractions, the target-fraction filter, determinism and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpsmos.organs import CLASS_INDEX, labelled_mask
from fedpsmos.patches import INDEX_COLUMNS, PatchIndexError, index_site, organ_fractions
from fedpsmos.preprocessing.storage import case_path, write_case

PATCH = (4, 8, 8)


def _label(seed: int = 0) -> np.ndarray:
    """A [10, 24, 24] global label map: big liver, small pancreas, and a spleen the site does not label."""
    label = np.zeros((10, 24, 24), dtype=np.uint8)
    label[1:9, 2:14, 2:16] = CLASS_INDEX["liver"]  # 8 x 12 x 14 = 1344 voxels: no 4x8x8 patch holds 33%
    label[5:7, 18:21, 18:20] = CLASS_INDEX["pancreas"]  # 12 voxels: fits in one patch
    label[0:2, 18:22, 2:6] = CLASS_INDEX["spleen"]
    return label


def _site(
    tmp_path: Path, labels: dict[str, np.ndarray], train: list[str], organs=("liver", "pancreas")
) -> Path:
    """Write one case file per case and a manifest listing ``train`` cases plus one test case."""
    for case, label in labels.items():
        write_case(
            case_path(tmp_path, case),
            {
                "image": np.zeros(label.shape, dtype=np.float32),
                "label": label,
                "labelled": labelled_mask(organs),
            },
        )
    manifest = {
        "site": "siteX",
        "cases": [{"case": c, "split": "train" if c in train else "test"} for c in labels],
        "train": train,
        "test": [c for c in labels if c not in train],
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def _brute_force_fraction(label: np.ndarray, cls: int, corner, size) -> float:
    z, y, x = corner
    box = label[z : z + size[0], y : y + size[1], x : x + size[2]]
    return np.count_nonzero(box == cls) / np.count_nonzero(label == cls)


def test_organ_fractions_match_hand_counts():
    # Prepare
    label = _label()
    corners = np.array([[0, 0, 0], [4, 16, 16], [6, 10, 10], [5, 18, 18]])

    # Execute
    fractions = organ_fractions(label, [CLASS_INDEX["liver"], CLASS_INDEX["pancreas"]], corners, PATCH)

    # Assert: liver box [1:4, 2:8, 2:8] = 3*6*6 = 108 of 1344; pancreas wholly in [4:8, 16:24, 16:24];
    # [6:10, 10:18, 10:18] holds liver [6:9, 10:14, 10:16] = 3*4*6 = 72; the last box is clipped at the image.
    np.testing.assert_allclose(fractions[0], [108 / 1344, 0.0])
    np.testing.assert_allclose(fractions[1], [0.0, 1.0])
    np.testing.assert_allclose(fractions[2], [72 / 1344, 0.0])
    np.testing.assert_allclose(fractions[3], [0.0, 1.0])


def test_index_site_keeps_only_passing_patches(tmp_path):
    # Prepare: two train cases and one test case.
    labels = {"siteX_000": _label(), "siteX_001": np.roll(_label(), 2, axis=2), "siteX_002": _label()}
    manifest = _site(tmp_path, labels, train=["siteX_000", "siteX_001"])
    npz = sorted(tmp_path.glob("*.b2zip"))
    out = tmp_path / "patches" / "siteX.parquet"

    # Execute
    index = index_site(
        manifest, npz, out, patch_size=PATCH, min_fraction=0.33, candidates_per_case=40, seed=3
    )

    # Assert: contract columns, only train cases, every kept patch passes by a brute-force recount, and
    # only the small pancreas can pass (the unlabelled spleen never appears).
    assert tuple(index.columns) == INDEX_COLUMNS
    assert set(index["site"]) == {"siteX"}
    assert set(index["case"]) == {"siteX_000", "siteX_001"}
    assert set(index["organ"]) == {"pancreas"}
    for row in index.itertuples():
        fraction = _brute_force_fraction(
            labels[row.case], CLASS_INDEX[row.organ], (row.z, row.y, row.x), PATCH
        )
        assert fraction == pytest.approx(row.fraction)
        assert row.fraction >= 0.33
        assert 0 <= row.z <= 10 - PATCH[0] and 0 <= row.y <= 24 - PATCH[1] and 0 <= row.x <= 24 - PATCH[2]
    assert not index.duplicated(["case", "z", "y", "x"]).any()
    pd.testing.assert_frame_equal(pd.read_parquet(out), index)


def test_index_site_is_deterministic_and_seeded(tmp_path):
    labels = {"siteX_000": _label(), "siteX_001": _label()}
    manifest = _site(tmp_path, labels, train=list(labels))
    npz = sorted(tmp_path.glob("*.b2zip"))
    kwargs = {"patch_size": (6, 16, 16), "min_fraction": 0.2, "candidates_per_case": 30}

    first = index_site(manifest, npz, tmp_path / "a.parquet", seed=0, **kwargs)
    again = index_site(manifest, list(reversed(npz)), tmp_path / "b.parquet", seed=0, **kwargs)
    other = index_site(manifest, npz, tmp_path / "c.parquet", seed=1, **kwargs)

    pd.testing.assert_frame_equal(first, again)
    assert set(first["organ"]) == {"liver", "pancreas"}
    assert not first[["z", "y", "x"]].equals(other[["z", "y", "x"]])


def test_threshold_is_respected(tmp_path):
    # A lower threshold lets the liver pass too; a threshold of 1.0 keeps only patches holding a whole organ.
    labels = {"siteX_000": _label()}
    manifest = _site(tmp_path, labels, train=["siteX_000"])
    npz = sorted(tmp_path.glob("*.b2zip"))
    low = index_site(
        manifest,
        npz,
        tmp_path / "l.parquet",
        patch_size=PATCH,
        min_fraction=0.05,
        candidates_per_case=200,
        seed=0,
    )
    full = index_site(
        manifest,
        npz,
        tmp_path / "f.parquet",
        patch_size=PATCH,
        min_fraction=1.0,
        candidates_per_case=200,
        seed=0,
    )
    assert "liver" in set(low["organ"]) and low["fraction"].min() >= 0.05
    assert set(full["organ"]) == {"pancreas"} and np.all(full["fraction"] == 1.0)


def test_small_image_pads_and_huge_patch_fails(tmp_path):
    # Prepare: an image of 3 slices for a 4-slice patch (padded), then a patch > 2x the image.
    label = np.zeros((3, 24, 24), dtype=np.uint8)
    label[1, 4:8, 4:8] = CLASS_INDEX["liver"]
    manifest = _site(tmp_path, {"siteX_000": label}, train=["siteX_000"])
    npz = sorted(tmp_path.glob("*.b2zip"))

    index = index_site(
        manifest,
        npz,
        tmp_path / "p.parquet",
        patch_size=PATCH,
        min_fraction=0.5,
        candidates_per_case=20,
        seed=0,
    )
    assert set(index["z"]) == {0} and set(index["organ"]) == {"liver"}
    message = r"^case siteX_000: patch \(7, 8, 8\) exceeds the preprocessed image \(3, 24, 24\)"
    message += r" by more than 2\.0x on an axis"
    with pytest.raises(PatchIndexError, match=message):
        index_site(
            manifest,
            npz,
            tmp_path / "q.parquet",
            patch_size=(7, 8, 8),
            min_fraction=0.5,
            candidates_per_case=20,
            seed=0,
        )
    assert not (tmp_path / "q.parquet").exists()


def test_errors_name_the_site(tmp_path):
    labels = {"siteX_000": _label()}
    manifest = _site(tmp_path, labels, train=["siteX_000", "siteX_009"])
    npz = sorted(tmp_path.glob("*.b2zip"))
    out = tmp_path / "x.parquet"
    with pytest.raises(PatchIndexError, match="siteX: no preprocessed case file for train case siteX_009"):
        index_site(manifest, npz, out, patch_size=PATCH, min_fraction=0.33, candidates_per_case=10, seed=0)

    # Only the liver is labelled and no 4x8x8 patch can hold 90% of it.
    manifest = _site(tmp_path, labels, train=["siteX_000"], organs=("liver",))
    with pytest.raises(PatchIndexError, match="site siteX: no patch holds >= 0.9"):
        index_site(manifest, npz, out, patch_size=PATCH, min_fraction=0.9, candidates_per_case=50, seed=0)
    assert not out.exists()
