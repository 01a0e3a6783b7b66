"""Site label maps onto global classes, including the left/right split of a single kidney label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from fedpsmos.data.label_map import REST, LabelMap, apply_label_map, apply_label_map_image, physical_x
from fedpsmos.organs import CLASS_INDEX, IGNORE_CLASS, LabelMapError
from fedpsmos.patches import index_case
from fedpsmos.preprocessing.case import PreprocessingError, preprocess_manifest_case
from fedpsmos.preprocessing.storage import read_case

LEFT, RIGHT = CLASS_INDEX["kidney_left"], CLASS_INDEX["kidney_right"]


def _two_kidneys(axis: int) -> np.ndarray:
    """A [6, 8, 10] volume with value 1 in two separated blocks along ``axis`` (low and high end)."""
    label = np.zeros((6, 8, 10), dtype=np.uint8)
    low = [slice(1, 5), slice(2, 6), slice(3, 7)]
    high = list(low)
    low[axis] = slice(0, 2)
    high[axis] = slice(label.shape[axis] - 2, label.shape[axis])
    label[tuple(low)] = 1
    label[tuple(high)] = 1
    return label


def _image(array: np.ndarray, direction, origin=(5.0, -3.0, 2.0), spacing=(0.8, 1.5, 2.5)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetDirection([float(v) for v in direction])
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    return image


def _sitk_x(image: sitk.Image, index_zyx: np.ndarray) -> np.ndarray:
    """Physical x of voxels computed by SimpleITK itself (an independent reference)."""
    return np.array([image.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]])[0] for i in index_zyx])


@pytest.mark.parametrize(
    ("direction", "axis"),
    [
        ((1, 0, 0, 0, 1, 0, 0, 0, 1), 2),  # identity: +x index is patient's left
        ((-1, 0, 0, 0, -1, 0, 0, 0, 1), 2),  # LPS-flipped storage (e.g. DICOM-derived RAS files)
        ((0, -1, 0, 1, 0, 0, 0, 0, 1), 1),  # rotated 90 degrees about z: physical x runs along array y
        ((0, 0, 1, 0, 1, 0, -1, 0, 0), 0),  # rotated about y: physical x runs along array z
    ],
)
def test_kidney_split_follows_physical_x(direction, axis):
    # Prepare: two kidney blocks at both ends of the array axis that maps onto physical x.
    label = _two_kidneys(axis)
    image = _image(label, direction)
    index = np.argwhere(label == 1)
    x = _sitk_x(image, index)
    midline = 0.5 * (x.min() + x.max())

    # Execute
    out = apply_label_map_image(image, {"kidney": [1]})

    # Assert: voxels on the patient's left (+x in LPS) are kidney_left, the others kidney_right.
    expected = np.where(x > midline, LEFT, RIGHT)
    np.testing.assert_array_equal(out[tuple(index.T)], expected)
    assert set(np.unique(out)) == {0, LEFT, RIGHT}
    assert np.count_nonzero(out == LEFT) == np.count_nonzero(out == RIGHT)


def test_physical_x_matches_simpleitk_for_oblique_direction():
    # Prepare: an oblique (non-axis-aligned) orthonormal direction.
    angle = 0.4
    c, s = np.cos(angle), np.sin(angle)
    direction = (c, -s, 0, s, c, 0, 0, 0, 1)
    image = _image(np.zeros((3, 4, 5), dtype=np.uint8), direction)
    index = np.argwhere(np.ones((3, 4, 5), dtype=bool))

    # Execute
    x = physical_x(
        index, origin=image.GetOrigin(), spacing=image.GetSpacing(), direction=image.GetDirection()
    )

    # Assert
    np.testing.assert_allclose(x, _sitk_x(image, index), atol=1e-9)


def test_many_to_one_and_partial_map():
    # Prepare: MSD-liver-style labels (1 liver, 2 tumour) plus background.
    label = np.zeros((2, 3, 4), dtype=np.int16)
    label[0, 0, :2] = 1
    label[1, 2, 3] = 2

    # Execute
    out = apply_label_map(label, {"liver": [1, 2]})

    # Assert
    assert out.dtype == np.uint8
    expected = np.zeros_like(out)
    expected[0, 0, :2] = CLASS_INDEX["liver"]
    expected[1, 2, 3] = CLASS_INDEX["liver"]
    np.testing.assert_array_equal(out, expected)


def test_site_values_map_to_global_classes():
    # Prepare: site values in a different order from the global classes (TotalSegmentator-style 4 = right).
    label = np.array([0, 1, 2, 3, 4, 5], dtype=np.uint8).reshape(1, 1, 6)
    labels = {"liver": [1], "spleen": [2], "pancreas": [3], "kidney_right": [4], "kidney_left": [5]}

    # Execute
    out = apply_label_map(label, labels)

    # Assert
    np.testing.assert_array_equal(out.ravel(), [0, 1, 2, 3, RIGHT, LEFT])


def test_values_not_in_map_are_named_in_the_error():
    label = np.array([0, 1, 3, 7], dtype=np.uint8).reshape(1, 1, 4)
    with pytest.raises(LabelMapError, match=r"\[3, 7\]"):
        apply_label_map(label, {"liver": [1]})


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"heart": [1]}, "unknown organ"),
        ({"liver": [1], "spleen": [1]}, "more than one organ"),
        ({"liver": [0]}, "positive integer"),
    ],
)
def test_malformed_maps_are_rejected(labels, message):
    with pytest.raises(LabelMapError, match=message):
        apply_label_map(np.zeros((1, 1, 2), dtype=np.uint8), labels)


def test_float_labels_must_be_integral():
    label = np.array([0.0, 1.0, 1.5], dtype=np.float32).reshape(1, 1, 3)
    with pytest.raises(LabelMapError, match="non-integer"):
        apply_label_map(label, {"liver": [1]})
    np.testing.assert_array_equal(apply_label_map(label[..., :2], {"liver": [1]}).ravel(), [0, 1])


def test_midline_from_unequal_kidneys_and_explicit_midline():
    # Prepare: a large kidney at x 0..3 and a small one at x 12..13 on a 16-wide grid; a voxel-weighted
    # centre of mass would sit inside the large kidney, the per-component mean sits between them.
    label = np.zeros((4, 4, 16), dtype=np.uint8)
    label[:, :, 0:4] = 1
    label[1:3, 1:3, 12:14] = 1

    # Execute
    out = apply_label_map(label, {"kidney": [1]})
    forced = apply_label_map(label, {"kidney": [1]}, midline_x=-1.0)

    # Assert
    assert np.all(out[:, :, 0:4] == RIGHT)
    assert np.all(out[1:3, 1:3, 12:14] == LEFT)
    assert set(np.unique(forced)) == {0, LEFT}


def test_single_kidney_component_uses_field_of_view_centre():
    # Prepare: one kidney on the patient's left half of the field of view (x index 7..8 of 0..9).
    label = np.zeros((3, 3, 10), dtype=np.uint8)
    label[:, :, 7:9] = 1

    # Execute
    out = apply_label_map(label, {"kidney": [1]})

    # Assert: the whole single component is kidney_left, not split in half.
    assert set(np.unique(out[label == 1])) == {LEFT}


# ------------------------------------------------------------ background, rest, ignore, dataset.json names


def test_background_and_ignore_values_map_to_zero_and_ignore_class():
    # Prepare: BTCV-like values: 1 liver, 8 gallbladder (background), 9 aorta (background), 4 unknown (ignore)
    label = np.array([0, 1, 8, 9, 4], dtype=np.uint8).reshape(1, 1, 5)
    label_map = LabelMap({"liver": [1]}, background=[8, 9], ignore=[4])

    # Execute
    out = apply_label_map(label, label_map)

    # Assert
    np.testing.assert_array_equal(out.ravel(), [0, 1, 0, 0, IGNORE_CLASS])
    assert label_map.organs == ("liver",)


def test_background_rest_maps_every_unnamed_value_to_background():
    label = np.array([0, 1, 2, 13, 200], dtype=np.uint8).reshape(1, 1, 5)
    out = apply_label_map(label, LabelMap({"liver": [1]}, background=REST, ignore=[13]))
    np.testing.assert_array_equal(out.ravel(), [0, 1, 0, IGNORE_CLASS, 0])
    assert LabelMap({"liver": [1]}, background=REST).allowed_values() is None


def test_unknown_values_without_rest_are_named():
    label = np.array([0, 1, 8, 5, 7], dtype=np.uint8).reshape(1, 1, 5)
    with pytest.raises(LabelMapError, match=r"label values \[5, 7\] are not in the site's label map"):
        apply_label_map(label, LabelMap({"liver": [1]}, background=[8]))


@pytest.mark.parametrize(
    ("background", "ignore", "message"),
    [
        ([1], (), r"label value 1 is in both liver and background"),
        ((), [1], r"label value 1 is in both liver and ignore"),
        ([3], [3], r"label value 3 is in both background and ignore"),
        ("all", (), "background must be a list of values or 'rest'"),
        ((), [0], "positive integer"),
        ([2.5], (), "non-negative integer"),
    ],
)
def test_a_value_belongs_to_one_group_only(background, ignore, message):
    with pytest.raises(LabelMapError, match=message):
        LabelMap({"liver": [1]}, background=background, ignore=ignore)


def test_label_map_manifest_round_trip():
    label_map = LabelMap({"liver": [1, 2], "kidney": [3]}, background=[0, 8], ignore=[255])
    entry = label_map.to_manifest()
    assert entry == {"labels": {"liver": [1, 2], "kidney": [3]}, "background": [0, 8], "ignore": [255]}
    assert LabelMap.from_manifest(json.loads(json.dumps(entry))) == label_map
    rest = LabelMap({"spleen": [1]}, background=REST)
    assert LabelMap.from_manifest(rest.to_manifest()) == rest
    # a manifest from before background/ignore existed: labels only
    assert LabelMap.from_manifest({"labels": {"liver": [1]}}) == LabelMap({"liver": [1]})
    with pytest.raises(LabelMapError, match="no 'labels'"):
        LabelMap.from_manifest({})


NNUNET_V2 = {"labels": {"background": 0, "liver": 1, "tumour": 2, "gallbladder": 3, "unsure": 4}}
MSD = {"labels": {"0": "background", "1": "spleen", "2": "aorta"}}


def test_names_resolve_against_nnunet_v2_dataset_json(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(NNUNET_V2))
    label_map = LabelMap.from_config(
        {"liver": ["liver", "tumour"]}, ["gallbladder"], ["unsure"], dataset_json=path
    )
    assert label_map == LabelMap({"liver": [1, 2]}, background=[3], ignore=[4])


def test_names_resolve_against_msd_dataset_json_and_mix_with_numbers(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(MSD))
    label_map = LabelMap.from_config({"spleen": ["spleen"]}, ["aorta", 7], None, dataset_json=path)
    assert label_map == LabelMap({"spleen": [1]}, background=[2, 7])
    assert LabelMap.from_config({"spleen": [1]}, REST, dataset_json=path).rest_is_background


def test_name_errors_name_the_dataset_json_and_the_name(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(NNUNET_V2))
    with pytest.raises(LabelMapError, match=r"dataset\.json: no label named 'livr'"):
        LabelMap.from_config({"liver": ["livr"]}, dataset_json=path)
    region = tmp_path / "regions.json"
    region.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2], "core": 2}}))
    with pytest.raises(LabelMapError, match=r"regions\.json: label 'whole' is region-based"):
        LabelMap.from_config({"liver": ["core"]}, dataset_json=region)
    missing = tmp_path / "absent" / "dataset.json"
    with pytest.raises(LabelMapError, match=r"absent.dataset\.json: label name 'liver' needs this dataset"):
        LabelMap.from_config({"liver": ["liver"]}, dataset_json=missing)
    # numbers alone never read the file
    assert LabelMap.from_config({"liver": [1]}, dataset_json=missing).organs == ("liver",)


def test_preprocessing_writes_ignore_class_for_ignored_voxels(tmp_path):
    # Prepare: a manifest whose resolved map ignores value 4 and sends value 8 to background
    image = np.full((6, 8, 8), -1000, dtype=np.int16)
    image[1:5, 1:7, 1:7] = 50
    label = np.zeros(image.shape, dtype=np.uint8)
    label[1:5, 1:4, 1:4] = 1
    label[1:5, 4:7, 4:7] = 4
    label[1:5, 1:3, 5:7] = 8
    for name, array in (("img", image), ("lab", label)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"{name}.nii.gz"))
    manifest = LabelMap({"liver": [1]}, background=[8], ignore=[4]).to_manifest()
    files = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    manifest["cases"] = [{"case": "c", **files}]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    settings = {"spacing": [1.0, 1.0, 1.0], "image_order": 1, "clip": [-100.0, 200.0], "mean": 0.0}
    settings["std"] = 1.0

    # Execute
    info = preprocess_manifest_case(tmp_path / "manifest.json", "c", tmp_path / "c.b2zip", **settings)

    # Assert: 4 -> 255 (ignored), 8 -> 0, 1 -> liver; the patch index does not count 255 as an organ
    data = read_case(tmp_path / "c.b2zip")
    out, labelled = data["label"], data["labelled"]
    assert set(np.unique(out)) == {0, 1, IGNORE_CLASS}
    assert int(np.count_nonzero(out == IGNORE_CLASS)) == int(np.count_nonzero(label == 4)) == info["ignored"]
    assert info["voxels"] == {"liver": int(np.count_nonzero(label == 1))}
    index = index_case(
        out, labelled, case="c", patch_size=[4, 4, 4], min_fraction=0.0, candidates_per_case=8, seed=0
    )
    assert set(index["organ"]) == {"liver"}
    with pytest.raises(PreprocessingError, match="pass no labels"):
        preprocess_manifest_case(tmp_path / "manifest.json", "c", tmp_path / "d.b2zip", labels={}, **settings)
