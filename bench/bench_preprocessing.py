"""Benchmark: resampling a CT to the paper spacing, this project vs nnU-Net v2's default resampling.

Baseline: ``nnunetv2.preprocessing.resampling.default_resampling.resample_data_or_seg_to_shape`` with
nnU-Net's default plan settings (images order 3, segmentations order 1 one-hot per label, ``order_z`` 0 and
``force_separate_z=None``, i.e. separate z handling when the spacing ratio exceeds 3). Measured in the same
process on the same normalised CT-like array (512 x 512 x 100 at 0.76 x 0.76 x 3 mm, or smaller with
``--quick``) and its label map; SimpleITK's 3-D ``sitkBSpline`` resampling is timed as a second reference.

The outputs are not expected to be identical: nnU-Net aligns the grid corners (its voxel centres shift by
up to half a voxel and its spacing is the extent over the rounded size) and uses order 0 along z here, while
this project keeps the origin, uses the target spacing exactly and interpolates cubically along every axis
(``fedpsmos.preprocessing.resample``). The differences are printed to show their size, not as an error.

Run: ``python bench/bench_preprocessing.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fedpsmos.preprocessing import normalise_ct, resample_array, resample_image_sitk, resampled_shape

PAPER_SPACING = (2.41, 1.63, 1.63)
CLIP, MEAN, STD = (-80.0, 305.0), 90.9, 65.5


def make_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int):
    """A CT-like volume (HU, int16) and a 5-organ label map (uint8): body, fat, organs, spine, noise.

    Parameters
    ----------
    shape, spacing:
        Array shape and voxel size, (z, y, x), mm.
    seed:
        Random seed of the noise.
    """
    rng = np.random.default_rng(seed)
    z, y, x = ((np.arange(n, dtype=np.float32) - n / 2) * s for n, s in zip(shape, spacing, strict=True))
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
    ct = np.full(shape, -1000.0, dtype=np.float32)
    body = (xx / 170) ** 2 + (yy / 120) ** 2 <= 1
    ct[np.broadcast_to(body, shape)] = -90.0  # fat
    ct[np.broadcast_to((xx / 150) ** 2 + (yy / 100) ** 2 <= 1, shape)] = 30.0  # muscle and bowel
    label = np.zeros(shape, dtype=np.uint8)
    organs = [  # (class, centre x, y, z mm, semi-axes mm, HU); LPS: the liver is on the patient's right (-x)
        (1, -60, -10, 40, (80, 70, 90), 60.0),
        (2, 90, 20, 60, (35, 45, 50), 50.0),
        (3, 10, 10, 10, (60, 15, 20), 40.0),
        (4, 60, 50, -10, (25, 30, 50), 35.0),
        (5, -60, 50, -30, (25, 30, 50), 35.0),
    ]
    for cls, cx, cy, cz, (ax, ay, az), hu in organs:
        inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 + ((zz - cz) / az) ** 2 <= 1
        ct[inside] = hu
        label[inside] = cls
    spine = np.broadcast_to((xx / 20) ** 2 + ((yy - 70) / 20) ** 2 <= 1, shape)
    ct[spine] = 700.0
    ct = ndimage.gaussian_filter(ct, (0.5, 0.8, 0.8))
    ct += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    return ct.astype(np.int16), label


def _best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run(quick: bool, repeats: int) -> dict[str, float | list[int] | str]:
    """Time both resampling paths on one synthetic CT and return the figures.

    Parameters
    ----------
    quick:
        Use a 40 x 256 x 256 array instead of 100 x 512 x 512.
    repeats:
        Timing repeats; the fastest is reported.
    """
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape,
        resample_data_or_seg_to_shape,
    )

    shape = (40, 256, 256) if quick else (100, 512, 512)  # quick: a smaller field of view, same spacing
    spacing = (3.0, 0.76, 0.76)
    ct, label = make_ct(shape, spacing, seed=0)
    image = normalise_ct(ct, clip=CLIP, mean=MEAN, std=STD)  # identical input for every path

    def ours():
        return resample_array(image, spacing, PAPER_SPACING, order=3), resample_array(
            label, spacing, PAPER_SPACING, order=0
        )

    new_shape = compute_new_shape(shape, spacing, PAPER_SPACING)

    def nnunet():
        data = resample_data_or_seg_to_shape(
            image[None],
            new_shape,
            spacing,
            PAPER_SPACING,
            is_seg=False,
            order=3,
            order_z=0,
            force_separate_z=None,
        )
        seg = resample_data_or_seg_to_shape(
            label[None],
            new_shape,
            spacing,
            PAPER_SPACING,
            is_seg=True,
            order=1,
            order_z=0,
            force_separate_z=None,
        )
        return data[0], seg[0]

    sitk_image = sitk.GetImageFromArray(image)
    sitk_image.SetSpacing(spacing[::-1])

    def simpleitk():
        return sitk.GetArrayFromImage(resample_image_sitk(sitk_image, PAPER_SPACING, order=3))

    t_ours, (img_ours, lab_ours) = _best_time(ours, repeats)
    t_nnunet, (img_nn, lab_nn) = _best_time(nnunet, repeats)
    t_sitk, img_sitk = _best_time(simpleitk, 1)
    assert (
        img_ours.shape == img_nn.shape == tuple(new_shape) == resampled_shape(shape, spacing, PAPER_SPACING)
    )
    inside = tuple(
        slice(0, int(np.floor((n - 1) * s / t)) + 1)
        for n, s, t in zip(shape, spacing, PAPER_SPACING, strict=True)
    )
    diff = np.abs(img_ours - img_nn)
    return {
        "benchmark": "preprocessing_resampling",
        "baseline": "nnunetv2.resample_data_or_seg_to_shape (order 3 images, order 1 segs, order_z 0)",
        "shape_in": list(shape),
        "shape_out": list(img_ours.shape),
        "seconds_project": round(t_ours, 4),
        "seconds_nnunet": round(t_nnunet, 4),
        "ratio_project_over_nnunet": round(t_ours / t_nnunet, 4),
        "seconds_sitk_bspline_image_only": round(t_sitk, 4),
        "max_abs_diff_image_vs_nnunet": float(diff.max()),
        "mean_abs_diff_image_vs_nnunet": float(diff.mean()),
        "label_disagreement_vs_nnunet": float(np.mean(lab_ours != lab_nn)),
        "max_abs_diff_image_vs_sitk_inside": float(np.abs(img_ours[inside] - img_sitk[inside]).max()),
    }


def main() -> None:
    """Parse arguments, run, print a few lines and one ``RESULT`` JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small array (seconds)")
    parser.add_argument("--repeats", type=int, default=1, help="timing repeats, fastest reported")
    args = parser.parse_args()
    result = run(args.quick, max(1, args.repeats))
    print(f"input {result['shape_in']} -> {result['shape_out']} (z, y, x) at {PAPER_SPACING} mm")
    print(f"project (cubic image + nearest labels): {result['seconds_project']:.3f} s")
    print(f"nnU-Net v2 default resampling:          {result['seconds_nnunet']:.3f} s")
    print(f"ratio project / nnU-Net: {result['ratio_project_over_nnunet']:.3f}")
    print(f"SimpleITK 3-D B-spline (image only):    {result['seconds_sitk_bspline_image_only']:.3f} s")
    print(
        f"image |diff| vs nnU-Net (normalised units): max {result['max_abs_diff_image_vs_nnunet']:.3f}, "
        f"mean {result['mean_abs_diff_image_vs_nnunet']:.4f}; vs SimpleITK inside: "
        f"max {result['max_abs_diff_image_vs_sitk_inside']:.2e}"
    )
    print(f"label disagreement vs nnU-Net: {result['label_disagreement_vs_nnunet']:.4%}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
