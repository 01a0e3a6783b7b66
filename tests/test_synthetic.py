"""The synthetic five-site generator: determinism, partial label sets, anatomy sides, written geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from fedpsmos.data.phantom import make_case
from fedpsmos.data.synthetic import default_case_ids, site_seed, write_site
from fedpsmos.organs import CLASS_INDEX, ORGANS

# Coarser than the default config so the tests stay fast; same keys.
SPEC = {"cases": 2, "spacing": [8.0, 5.0, 5.0], "noise": 20.0, "contrast": 1.0, "offset": 0.0, "fov": 1.0}
ALL = {"liver": [1], "spleen": [2], "pancreas": [3], "kidney_left": [4], "kidney_right": [5]}


def _read(path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def _case(root, case):
    return _read(root / "imagesTr" / f"{case}_0000.nii.gz"), _read(root / "labelsTr" / f"{case}.nii.gz")


def test_same_seed_gives_identical_arrays_and_other_site_differs(tmp_path):
    # Prepare / Execute
    a = write_site(tmp_path / "a", site="site1", spec=SPEC, labels=ALL, seed=3)
    b = write_site(tmp_path / "b", site="site1", spec=SPEC, labels=ALL, seed=3)
    write_site(tmp_path / "c", site="site9", spec=SPEC, labels=ALL, seed=3)
    write_site(tmp_path / "d", site="site1", spec=SPEC, labels=ALL, seed=4)

    # Assert
    assert a == b == ["site1_000", "site1_001"]
    for case in a:
        (_, ia), (_, la) = _case(tmp_path / "a", case)
        (_, ib), (_, lb) = _case(tmp_path / "b", case)
        assert ia.tobytes() == ib.tobytes() and la.tobytes() == lb.tobytes()
    (_, i0), _ = _case(tmp_path / "a", "site1_000")
    (_, i1), _ = _case(tmp_path / "a", "site1_001")
    (_, ic), _ = _case(tmp_path / "c", "site9_000")
    (_, id_), _ = _case(tmp_path / "d", "site1_000")
    assert i0.shape != i1.shape or not np.array_equal(i0, i1)
    assert ic.shape != i0.shape or not np.array_equal(ic, i0)
    assert id_.shape != i0.shape or not np.array_equal(id_, i0)


def test_geometry_dtype_and_dataset_json_as_configured(tmp_path):
    spec = {**SPEC, "cases": 1, "spacing": [6.0, 3.04, 3.2], "fov": 0.9}
    write_site(tmp_path, site="site3", spec=spec, labels={"spleen": [7]}, seed=0)

    (image, hu), (label, lab) = _case(tmp_path, "site3_000")
    meta = json.loads((tmp_path / "dataset.json").read_text())

    assert image.GetSpacing() == pytest.approx((3.2, 3.04, 6.0))  # SimpleITK (x, y, z)
    assert image.GetOrigin() == (0.0, 0.0, 0.0) and image.GetDirection() == tuple(np.eye(3).ravel())
    assert label.GetSpacing() == image.GetSpacing() and label.GetSize() == image.GetSize()
    assert hu.dtype == np.int16 and lab.dtype == np.uint8
    # fov 0.9 of the nominal 290 x 360 mm in-plane extent at this spacing.
    assert hu.shape[1:] == (round(0.9 * 290 / 3.04), round(0.9 * 360 / 3.2))
    assert hu.min() >= -1024 and (hu < -900).mean() > 0.05 and (hu > 300).any()  # air and bone
    assert set(np.unique(lab)) == {0, 7}
    assert meta == {
        "name": "fedpsmos synthetic site3",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "spleen": 7},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }


SITES = {
    "site1": ({"liver": [1], "spleen": [2], "pancreas": [3], "kidney_left": [4], "kidney_right": [5]}, 6.0),
    "site2": ({"liver": [1]}, 4.0),
    "site5": ({"kidney_left": [1], "kidney_right": [2]}, 3.2),
}


@pytest.mark.parametrize("site", sorted(SITES))
def test_partial_label_sets_per_site(tmp_path, site):
    labels, z_spacing = SITES[site]
    spec = {**SPEC, "cases": 1, "spacing": [z_spacing, 3.1, 3.1]}
    write_site(tmp_path, site=site, spec=spec, labels=labels, seed=0)
    (_, hu), (label, lab) = _case(tmp_path, f"{site}_000")
    # The same draw with its global labels, to see the organs the site does not annotate.
    hu_again, global_label = make_case(
        spacing=spec["spacing"], fov=1.0, noise=20.0, contrast=1.0, offset=0.0,
        rng=np.random.default_rng([site_seed(0, site), 0]),
    )  # fmt: skip

    assert np.array_equal(hu, hu_again)
    assert set(np.unique(global_label)) == set(range(6))  # every organ is in every image
    expected = {0} | {v for vals in labels.values() for v in vals}
    assert set(np.unique(lab)) == expected
    for organ, (value,) in labels.items():
        assert np.array_equal(lab == value, global_label == CLASS_INDEX[organ])
    unlabelled = [CLASS_INDEX[o] for o in ORGANS if o not in labels]
    assert np.all(lab[np.isin(global_label, unlabelled)] == 0)


def test_kidney_left_is_on_the_patients_left_and_liver_on_the_right(tmp_path):
    labels = {"kidney_left": [1], "kidney_right": [2]}
    spec = {**SPEC, "cases": 3, "spacing": [3.2, 3.12, 3.12]}
    write_site(tmp_path, site="site5", spec=spec, labels=labels, seed=1)

    for case in default_case_ids("site5", spec):
        (image, hu), (_, lab) = _case(tmp_path, case)
        # Physical x (LPS: towards the patient's left) of the body midline and of each kidney.
        x_mm = np.arange(hu.shape[2]) * image.GetSpacing()[0] + image.GetOrigin()[0]
        body_mid = float(np.mean(x_mm[np.nonzero(hu > -500)[2]]))
        left = float(np.mean(x_mm[np.nonzero(lab == 1)[2]]))
        right = float(np.mean(x_mm[np.nonzero(lab == 2)[2]]))
        assert left > body_mid + 30 and right < body_mid - 30

    _, global_label = make_case(
        spacing=(6.0, 4.0, 4.0), fov=1.0, noise=10.0, contrast=1.0, offset=0.0, rng=np.random.default_rng(5)
    )
    xs = {organ: np.nonzero(global_label == CLASS_INDEX[organ])[2].mean() for organ in ORGANS}
    assert xs["liver"] < xs["pancreas"] < xs["spleen"]  # liver right, spleen left, pancreas between


def test_kidney_key_writes_one_value_for_both_and_case_ids(tmp_path):
    spec = {**SPEC, "cases": 1}
    write_site(tmp_path, site="s", spec=spec, labels={"kidney": [3]}, seed=0)
    _, (_, lab) = _case(tmp_path, "s_000")
    assert set(np.unique(lab)) == {0, 3}
    assert default_case_ids("site4", {"cases": 3}) == ["site4_000", "site4_001", "site4_002"]
    with pytest.raises(ValueError, match="cases must be >= 1"):
        default_case_ids("site4", {"cases": 0})


def test_refuses_non_empty_output_and_unknown_organ(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="out"):
        write_site(tmp_path / "out", site="s", spec=SPEC, labels={"liver": [1]}, seed=0)
    with pytest.raises(ValueError, match="unknown organ 'heart'"):
        write_site(tmp_path / "new", site="s", spec=SPEC, labels={"heart": [1]}, seed=0)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
