"""A real abdominal CT (../shared/realdata, TotalSegmentator data) through label map and preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fedpsmos.data.label_map import apply_label_map_image
from fedpsmos.organs import CLASS_INDEX
from fedpsmos.preprocessing import preprocess_case, resample_array
from fedpsmos.preprocessing.orientation import reorient
from fedpsmos.preprocessing.storage import read_case

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
IMAGE = REALDATA / "ct_abdomen_3mm.nii.gz"
LABEL = REALDATA / "ct_abdomen_3mm_5organs.nii.gz"
# The file's own values: 1 liver, 2 spleen, 3 pancreas, 4 kidney_right, 5 kidney_left (labels.json).
PAPER_SPACING = (2.41, 1.63, 1.63)
SETTINGS = {
    "spacing": list(PAPER_SPACING),
    "image_order": 3,
    "clip": [-80.0, 305.0],
    "mean": 90.9,
    "std": 65.5,
}

pytestmark = pytest.mark.skipif(
    not (IMAGE.is_file() and LABEL.is_file()),
    reason=f"real CT test data not found in {REALDATA} (shared folder beside the checkout)",
)


def _partial_label(tmp_path: Path, keep: dict[int, int]) -> Path:
    """Write a partial label image: values in ``keep`` renamed, every other organ erased to background."""
    label = sitk.ReadImage(str(LABEL))
    array = sitk.GetArrayFromImage(label)
    out = np.zeros_like(array)
    for old, new in keep.items():
        out[array == old] = new
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(label)
    path = tmp_path / "partial.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def test_real_ct_preprocesses_to_paper_spacing(tmp_path):
    # Prepare
    labels = {"liver": [1], "spleen": [2], "pancreas": [3], "kidney_right": [4], "kidney_left": [5]}
    reference = sitk.ReadImage(str(IMAGE))
    shape_in = np.array(reference.GetSize()[::-1])
    spacing_in = np.array(reference.GetSpacing()[::-1])

    # Execute
    info = preprocess_case(IMAGE, LABEL, tmp_path / "real.b2zip", labels=labels, **SETTINGS)
    data = read_case(tmp_path / "real.b2zip")

    # Assert: spacing, extent within half a target voxel, original geometry recorded, labels in range.
    np.testing.assert_allclose(data["spacing"], PAPER_SPACING)
    assert data["image"].shape == tuple(np.floor(shape_in * spacing_in / PAPER_SPACING + 0.5).astype(int))
    extent = np.array(data["image"].shape) * PAPER_SPACING
    assert np.all(np.abs(extent - shape_in * spacing_in) <= np.array(PAPER_SPACING) / 2)
    np.testing.assert_allclose(data["sitk_direction"], [-1, 0, 0, 0, -1, 0, 0, 0, 1])
    np.testing.assert_allclose(data["sitk_origin"], reference.GetOrigin())
    assert data["sitk_size"].tolist() == list(reference.GetSize())
    assert set(np.unique(data["label"])) == {0, 1, 2, 3, 4, 5}
    assert data["labelled"].all()
    # Normalised to the clip window, up to the cubic spline's overshoot at clipped edges (as in nnU-Net).
    bottom, top = (-80.0 - 90.9) / 65.5, (305.0 - 90.9) / 65.5
    outside = (data["image"] < bottom - 0.3) | (data["image"] > top + 0.3)  # 20 HU
    assert np.isfinite(data["image"]).all() and outside.mean() < 0.01
    assert bottom - 2.0 < data["image"].min() and data["image"].max() < top + 2.0
    # Nearest resampling keeps each organ's physical volume to within 10% (3 mm -> 2.41 x 1.63 x 1.63 mm).
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(LABEL)))
    voxel_ratio = np.prod(spacing_in) / np.prod(PAPER_SPACING)
    for organ, value in labels.items():
        expected = np.count_nonzero(original == value[0]) * voxel_ratio
        assert info["voxels"][organ] == pytest.approx(expected, rel=0.1)
    # The file is RAS; the arrays are canonical LPS, so the liver (the patient's right, -x) sits at low
    # array x although the file stores it at high x.
    assert str(data["orientation"]) == "RAS"
    liver_x = np.argwhere(data["label"] == CLASS_INDEX["liver"])[:, 2].mean()
    spleen_x = np.argwhere(data["label"] == CLASS_INDEX["spleen"])[:, 2].mean()
    assert liver_x < spleen_x


def test_partial_spleen_map(tmp_path):
    # Prepare: a spleen-only site whose label file holds only the spleen, as value 2.
    path = _partial_label(tmp_path, {2: 2})

    # Execute
    info = preprocess_case(IMAGE, path, tmp_path / "spleen.b2zip", labels={"spleen": [2]}, **SETTINGS)
    data = read_case(tmp_path / "spleen.b2zip")
    label, labelled = data["label"], data["labelled"]

    # Assert
    assert set(np.unique(label)) == {0, CLASS_INDEX["spleen"]}
    np.testing.assert_array_equal(labelled, [True, False, True, False, False, False])
    assert set(info["voxels"]) == {"spleen"}


def test_merged_kidney_label_splits_back_by_body_side(tmp_path):
    # Prepare: both kidneys merged into one value, as in a one-label kidney data set.
    path = _partial_label(tmp_path, {4: 7, 5: 7})
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(LABEL)))
    kidney = np.isin(truth, (4, 5))
    expected = np.where(truth == 5, CLASS_INDEX["kidney_left"], CLASS_INDEX["kidney_right"])

    # Execute: in the original grid, and through preprocessing.
    split = apply_label_map_image(sitk.ReadImage(str(path)), {"kidney": [7]})
    preprocess_case(IMAGE, path, tmp_path / "kidney.b2zip", labels={"kidney": [7]}, **SETTINGS)
    resampled = read_case(tmp_path / "kidney.b2zip")["label"]

    # Assert: the split agrees with the true left/right labels for >= 95% of kidney voxels, in both grids.
    assert np.mean(split[kidney] == expected[kidney]) >= 0.95
    assert set(np.unique(split)) == {0, CLASS_INDEX["kidney_left"], CLASS_INDEX["kidney_right"]}
    truth_lps = sitk.GetArrayFromImage(reorient(sitk.ReadImage(str(LABEL))))  # as preprocessing orients
    truth_resampled = resample_array(truth_lps, (3.0, 3.0, 3.0), PAPER_SPACING, order=0)
    kidney_resampled = np.isin(truth_resampled, (4, 5))
    expected_resampled = np.where(
        truth_resampled == 5, CLASS_INDEX["kidney_left"], CLASS_INDEX["kidney_right"]
    )
    assert np.mean(resampled[kidney_resampled] == expected_resampled[kidney_resampled]) >= 0.95
