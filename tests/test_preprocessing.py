"""Resampling geometry, CT normalisation and the preprocessed case-file contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from fedpsmos.inference.predict import label_to_image
from fedpsmos.organs import CLASS_INDEX
from fedpsmos.preprocessing import (
    NPZ_KEYS,
    PreprocessingError,
    normalise_ct,
    preprocess_case,
    preprocess_manifest_case,
    resample_array,
    resample_image_sitk,
    resample_label_to_geometry,
    resampled_shape,
)
from fedpsmos.preprocessing.storage import read_case

SETTINGS = {"spacing": [3.0, 2.0, 2.0], "image_order": 3, "clip": [-80.0, 305.0], "mean": 90.9, "std": 65.5}
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _smooth_volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 400).astype(np.float32)


def _write(array: np.ndarray, path: Path, spacing_xyz, origin=(10.0, -20.0, 30.0), direction=FLIPPED) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def _case(tmp_path: Path, direction=FLIPPED):
    """An anisotropic CT-like case (z 5 mm, in-plane 0.9 mm) with liver and one kidney label."""
    image = np.full((12, 40, 44), -1000, dtype=np.int16)
    image[:, 5:35, 4:40] = 40
    image[3:9, 10:20, 8:20] = 1200  # bone: above the clip window
    label = np.zeros(image.shape, dtype=np.uint8)
    label[2:10, 8:22, 6:18] = 1  # liver
    label[4:8, 24:30, 30:36] = 2  # liver tumour
    label[3:9, 24:32, 6:12] = 3  # kidney blob 1
    label[3:9, 24:32, 32:38] = 3  # kidney blob 2 (x index 32..37)
    spacing = (0.9, 0.9, 5.0)
    img = _write(image, tmp_path / "img.nii.gz", spacing, direction=direction)
    lab = _write(label, tmp_path / "lab.nii.gz", spacing, direction=direction)
    return img, lab, image, label


def test_resampled_shape_rounds_extent():
    assert resampled_shape((100, 512, 512), (3.0, 0.76, 0.76), (2.41, 1.63, 1.63)) == (124, 239, 239)
    assert resampled_shape((1, 2, 3), (1.0, 1.0, 1.0), (10.0, 10.0, 10.0)) == (1, 1, 1)
    with pytest.raises(ValueError, match="positive"):
        resampled_shape((4, 4, 4), (1.0, 1.0, 1.0), (1.0, 0.0, 1.0))


@pytest.mark.parametrize("order", [1, 3])
def test_separable_resampling_matches_simpleitk(order):
    # Prepare: anisotropic input resampled up in z and down in-plane, with a flipped direction.
    array = _smooth_volume((9, 30, 28))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.7, 4.0))
    image.SetDirection(FLIPPED)
    target = (2.5, 1.6, 1.6)

    # Execute
    ours = resample_array(array, (4.0, 0.7, 0.8), target, order=order)
    reference = sitk.GetArrayFromImage(resample_image_sitk(image, target, order=order))

    # Assert: same grid, same values inside (ITK fills 0 past the last voxel centre, we extend the edge).
    assert ours.shape == reference.shape == resampled_shape(array.shape, (4.0, 0.7, 0.8), target)
    assert ours.dtype == np.float32
    inside = tuple(
        slice(0, int(np.floor((n - 1) * s / t)) + 1)
        for n, s, t in zip(array.shape, (4.0, 0.7, 0.8), target, strict=True)
    )
    np.testing.assert_allclose(ours[inside], reference[inside], atol=1e-3 * np.abs(array).max())


def test_cubic_resampling_interpolates_and_keeps_edges():
    # Prepare: a linear ramp along z and a constant volume.
    z = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 4, 5), dtype=np.float32)

    # Execute
    out = resample_array(z * 3.0, (3.0, 1.0, 1.0), (2.0, 1.0, 1.0), order=3)
    flat = resample_array(
        np.full((5, 6, 7), 7.5, dtype=np.float32), (2.0, 1.0, 1.0), (1.3, 0.7, 2.2), order=3
    )

    # Assert: output voxel j sits at input index j * 2 / 3 (shared origin). Where that index is an integer
    # the spline interpolates the sample exactly; a cubic B-spline reproduces the ramp away from the mirror
    # boundary; past the last voxel centre the edge value is kept.
    position = np.arange(out.shape[0]) * 2.0 / 3.0
    on_sample = np.isclose(position, np.round(position))
    np.testing.assert_allclose(out[on_sample, 0, 0], 3.0 * position[on_sample], atol=1e-4)
    interior = (position >= 3) & (position <= 6)
    np.testing.assert_allclose(out[interior, 0, 0], 3.0 * position[interior], atol=0.1)
    assert position[-1] > 9 and out[-1, 0, 0] == pytest.approx(27.0, abs=1e-4)
    np.testing.assert_allclose(flat, 7.5, atol=1e-5)


def test_nearest_labels_stay_in_value_set():
    rng = np.random.default_rng(1)
    label = rng.choice(np.array([0, 2, 5], dtype=np.uint8), size=(7, 13, 11))
    out = resample_array(label, (5.0, 0.9, 0.9), (2.0, 1.7, 1.7), order=0)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 2, 5}
    assert out.shape == resampled_shape(label.shape, (5.0, 0.9, 0.9), (2.0, 1.7, 1.7))


def test_resample_label_back_to_geometry_samples_nearest_voxel():
    # Prepare: a prediction on a 1 mm grid; the original grid has 2 mm voxels on the same origin, so original
    # voxel k sits on preprocessed voxel 2k; the original is one voxel wider in x than the preprocessed grid.
    label = np.arange(8 * 12 * 15, dtype=np.int32).reshape(8, 12, 15)

    # Execute
    back = resample_label_to_geometry(
        label,
        spacing_zyx=(1.0, 1.0, 1.0),
        sitk_size=(9, 6, 4),
        sitk_spacing=(2.0, 2.0, 2.0),
        sitk_origin=(0.0, 0.0, 0.0),
        sitk_direction=FLIPPED,
    )

    # Assert: exact size, exact samples, and the voxel past the end takes the last one (x index 16 -> 14).
    assert back.shape == (4, 6, 9)
    np.testing.assert_array_equal(back[:, :, :8], label[::2, ::2, ::2])
    np.testing.assert_array_equal(back[:, :, 8], label[::2, ::2, 14])
    with pytest.raises(ValueError, match="orthonormal"):
        resample_label_to_geometry(
            label,
            spacing_zyx=(1, 1, 1),
            sitk_size=(9, 6, 4),
            sitk_spacing=(2, 2, 2),
            sitk_origin=(0, 0, 0),
            sitk_direction=(2, 0, 0, 0, 1, 0, 0, 0, 1),
        )


def test_normalise_ct_clips_then_standardises():
    out = normalise_ct(
        np.array([-1000, -80, 90.9, 305, 3000], dtype=np.int16), clip=(-80, 305), mean=90.9, std=65.5
    )
    expected = (np.array([-80, -80, 90, 305, 305]) - 90.9) / 65.5  # int16 truncates 90.9 to 90
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lo < hi"):
        normalise_ct(np.zeros(2), clip=(10, -10), mean=0.0, std=1.0)
    with pytest.raises(ValueError, match="positive std"):
        normalise_ct(np.zeros(2), clip=(-1, 1), mean=0.0, std=0.0)


def test_preprocess_case_writes_npz_contract(tmp_path):
    # Prepare
    img, lab, image, label = _case(tmp_path)
    out = tmp_path / "out" / "case_000.b2zip"

    # Execute
    info = preprocess_case(img, lab, out, labels={"liver": [1, 2], "kidney": [3]}, **SETTINGS)

    # Assert: keys, dtypes, geometry and values.
    data = read_case(out)
    assert sorted(data) == sorted(NPZ_KEYS)
    assert data["image"].dtype == np.float32 and data["label"].dtype == np.uint8
    assert data["labelled"].dtype == bool
    np.testing.assert_array_equal(data["labelled"], [True, True, False, False, True, True])
    assert data["spacing"].dtype == np.float64 and data["spacing"].tolist() == SETTINGS["spacing"]
    assert data["sitk_size"].dtype == np.int64 and data["sitk_size"].tolist() == [44, 40, 12]
    np.testing.assert_allclose(data["sitk_spacing"], (0.9, 0.9, 5.0))
    np.testing.assert_allclose(data["sitk_origin"], (10.0, -20.0, 30.0))
    np.testing.assert_allclose(data["sitk_direction"], FLIPPED)
    expected_shape = resampled_shape(image.shape, (5.0, 0.9, 0.9), SETTINGS["spacing"])
    assert data["image"].shape == data["label"].shape == expected_shape == tuple(info["shape"])
    extent_in = np.array(image.shape) * np.array([5.0, 0.9, 0.9])
    extent_out = np.array(expected_shape) * np.array(SETTINGS["spacing"])
    assert np.all(np.abs(extent_out - extent_in) <= np.array(SETTINGS["spacing"]) / 2 + 1e-9)
    assert set(np.unique(data["label"])) == {0, 1, 4, 5}
    # The file is RAS (x and y flipped); the arrays are LPS: oriented index = 43 - x, 39 - y.
    assert str(data["orientation"]) == "RAS"
    np.testing.assert_allclose(data["oriented_direction"], np.eye(3).ravel())
    assert data["oriented_size"].tolist() == [44, 40, 12]
    np.testing.assert_allclose(data["oriented_origin"], (10.0 - 43 * 0.9, -20.0 - 39 * 0.9, 30.0))
    # Kidney blob 2 (file x 32..37, physical -x: the patient's right) is at oriented x 6..11, y 8..15.
    # Output (7, 5, x) samples oriented z 4.2 -> 4, y 11.1 -> 11; output x 4 -> 8.9 -> 9, x 16 -> 35.6 -> 36.
    assert data["label"][7, 5, 4] == CLASS_INDEX["kidney_right"]
    assert data["label"][7, 5, 16] == CLASS_INDEX["kidney_left"]
    top, bottom = (305 - 90.9) / 65.5, (-80 - 90.9) / 65.5
    assert data["image"][0, 0, 0] == pytest.approx(bottom, abs=1e-4)  # air is clipped to -80 HU
    # Inside the bone block (1200 HU, clipped to 305; oriented y 20..29, x 24..35), up to spline ringing.
    assert data["image"][9, 11, 13] == pytest.approx(top, abs=0.1)
    assert info["voxels"]["liver"] == int(np.count_nonzero(data["label"] == 1))


def test_preprocess_manifest_case_looks_up_files(tmp_path):
    img, lab, _, _ = _case(tmp_path)
    manifest = tmp_path / "manifest.json"
    labels = {"liver": [1, 2], "kidney": [3]}  # the manifest's resolved label map
    cases = [{"case": "c1", "image": str(img), "label": str(lab)}]
    manifest.write_text(json.dumps({"labels": labels, "background": [], "ignore": [], "cases": cases}))
    info = preprocess_manifest_case(manifest, "c1", tmp_path / "c1.b2zip", **SETTINGS)
    assert (tmp_path / "c1.b2zip").is_file() and info["voxels"]["kidney_left"] > 0
    with pytest.raises(PreprocessingError, match="c2"):
        preprocess_manifest_case(manifest, "c2", tmp_path / "c2.b2zip", **SETTINGS)


def test_preprocess_case_errors_name_the_file(tmp_path):
    # Prepare: a label with a value outside the map, and a label on a shifted grid.
    img, lab, image, label = _case(tmp_path)
    shifted = _write(label, tmp_path / "shifted.nii.gz", (0.9, 0.9, 5.0), origin=(0.0, 0.0, 0.0))
    out = tmp_path / "x.b2zip"

    # Execute / Assert
    with pytest.raises(PreprocessingError, match=r"lab\.nii\.gz.*\[3\]"):
        preprocess_case(img, lab, out, labels={"liver": [1, 2]}, **SETTINGS)
    with pytest.raises(PreprocessingError, match=r"shifted\.nii\.gz: label origin"):
        preprocess_case(img, shifted, out, labels={"liver": [1, 2], "kidney": [3]}, **SETTINGS)
    with pytest.raises(PreprocessingError, match="missing.nii.gz: image file not found"):
        preprocess_case(tmp_path / "missing.nii.gz", lab, out, labels={"liver": [1]}, **SETTINGS)
    with pytest.raises(PreprocessingError, match=r"must end in \.b2zip"):
        preprocess_case(img, lab, tmp_path / "x.npy", labels={"liver": [1, 2], "kidney": [3]}, **SETTINGS)
    assert not out.exists()
    assert not list(tmp_path.glob(".x.b2zip*"))  # no temporary left behind


def test_round_trip_to_original_geometry(tmp_path):
    # Prepare
    img, lab, image, label = _case(tmp_path)
    out = tmp_path / "c.b2zip"
    preprocess_case(img, lab, out, labels={"liver": [1, 2], "kidney": [3]}, **SETTINGS)
    data = read_case(out)

    # Execute
    written = label_to_image(data["label"], data)  # through the canonical orientation and back
    back = sitk.GetArrayFromImage(written)

    # Assert: original size, and the organs come back where they were (nearest both ways: >= 88% overlap; the
    # resampled grid starts at the oriented first voxel, here the file's last, which moves the blob's edges).
    assert back.shape == label.shape
    assert written.GetDirection() == FLIPPED and written.GetOrigin() == (10.0, -20.0, 30.0)
    liver = np.isin(label, (1, 2))
    assert np.count_nonzero(back[liver] == 1) >= 0.88 * np.count_nonzero(liver)
