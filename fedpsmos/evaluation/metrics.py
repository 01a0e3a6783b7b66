"""Dice and HD95 on binary masks, pure NumPy (paper, Section 3: DC and HD95).

Empty-mask policy (stated in the README and in every table caption too):

- both masks empty (the organ is absent and none is predicted): Dice 1.0, HD95 NaN, because there is no
  surface to measure; tables leave these cases out of the HD95 mean (they still count in the Dice mean);
- exactly one empty (a *missed* organ: reference present, prediction empty; or a *spurious* one: reference
  empty, prediction present): Dice 0.0 and HD95 = the diagonal of the image in mm
  (:func:`image_diagonal`), the largest distance two voxels of that image can have. Leaving such a case out
  (NaN) would reward a model that predicts nothing with the best mean HD95; the penalty keeps it in the mean
  at the worst value the image allows, and :func:`fedpsmos.evaluation.evaluate.evaluate_site` flags it.

Surfaces are the mask voxels removed by one binary erosion with the 6-connected structure (masks touching
the array border keep their border voxels as surface); the directed distances from each surface voxel of one
mask to the nearest surface voxel of the other are computed in mm with
``distance_transform_edt(sampling=spacing)``. Two conventions turn them into one number (config
``evaluation.hd95``):

- ``max`` (default): the larger of the two directed 95th percentiles. This is what MONAI's
  ``compute_hausdorff_distance(percentile=95)`` and DeepMind's ``surface-distance``
  (``compute_robust_hausdorff(..., 95)``) return, and so the figure challenge reports and nnU-Net users quote;
  comparing our numbers with theirs needs the same definition. (DeepMind's package weights surface elements
  by their area and reads its percentile off the cumulative area, so its values can differ slightly from
  MONAI's voxel count on the same masks.)
- ``pooled``: medpy's ``hd95``, the 95th percentile of both directions' distances pooled together. It is
  never larger than ``max``, and on masks with a one-sided outlier it can be tens of mm lower, so the two
  are not interchangeable.

Percentiles use NumPy's linear interpolation, as MONAI and medpy do.

Voxels of unknown class (``ignore``: the reference holds :data:`fedpsmos.organs.IGNORE_CLASS` there) are
removed from both masks before anything is counted, as nnU-Net treats its ignore label: they count neither in
Dice nor as surface for HD95, and a prediction there is neither right nor wrong. The empty-mask policy then
applies to what is left.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    """Boolean view of a mask, rejecting non-3-D input with a clear message."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a 3-D [Z, Y, X] mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _without(p: np.ndarray, r: np.ndarray, ignore: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Both masks with the ignored voxels removed (module docstring); shapes must agree."""
    if p.shape != r.shape:
        raise ValueError(f"pred {p.shape} and ref {r.shape} differ in shape")
    if ignore is None:
        return p, r
    keep = ~_binary(ignore, "ignore")
    if keep.shape != p.shape:
        raise ValueError(f"ignore {keep.shape} and ref {r.shape} differ in shape")
    return p & keep, r & keep


def dice(pred: np.ndarray, ref: np.ndarray, *, ignore: np.ndarray | None = None) -> float:
    """Dice coefficient 2|P∩R| / (|P| + |R|); 1.0 when both masks are empty (module docstring).

    Parameters
    ----------
    pred, ref:
        Predicted and reference masks ``[Z, Y, X]`` of the same shape (nonzero = organ).
    ignore:
        Optional mask of voxels of unknown class, removed from both masks first.
    """
    p, r = _without(_binary(pred, "pred"), _binary(ref, "ref"), ignore)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: the voxels one 6-connected erosion removes (medpy's border).

    Parameters
    ----------
    mask:
        Boolean ``[Z, Y, X]`` mask.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Directed distances (mm) from every surface voxel of ``pred`` to the surface of ``ref``.

    Parameters
    ----------
    pred, ref:
        Non-empty boolean masks of the same shape.
    spacing_zyx:
        Voxel spacing (z, y, x) in mm.
    """
    ref_surface = surface(ref)
    distance = ndimage.distance_transform_edt(~ref_surface, sampling=[float(s) for s in spacing_zyx])
    return np.asarray(distance[surface(pred)], dtype=np.float64)


def _union_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``a | b`` grown by one voxel on each side, clipped to the array."""
    nonzero = np.nonzero(a | b)
    return tuple(
        slice(max(int(i.min()) - 1, 0), min(int(i.max()) + 2, n))
        for i, n in zip(nonzero, a.shape, strict=True)
    )


HD95_CONVENTIONS = ("max", "pooled")
DEFAULT_HD95 = "max"


def check_convention(convention: str) -> str:
    """Return ``convention`` if it is one of :data:`HD95_CONVENTIONS`, else raise ``ValueError``.

    Parameters
    ----------
    convention:
        ``max`` or ``pooled`` (module docstring).
    """
    if convention not in HD95_CONVENTIONS:
        raise ValueError(f"unknown HD95 convention {convention!r} (expected one of {list(HD95_CONVENTIONS)})")
    return convention


def _check_spacing(spacing_zyx: Sequence[float]) -> None:
    """Reject spacings that are not three positive finite numbers."""
    if len(spacing_zyx) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing_zyx):
        raise ValueError(f"spacing must be 3 positive values (z, y, x), got {list(spacing_zyx)}")


def image_diagonal(shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> float:
    """Diagonal of an image in mm, ``sqrt(sum((size * spacing)^2))``: the HD95 of a missed or spurious organ.

    Parameters
    ----------
    shape_zyx:
        Image size in voxels (z, y, x).
    spacing_zyx:
        Voxel spacing (z, y, x) in mm.
    """
    _check_spacing(spacing_zyx)
    if len(shape_zyx) != 3:
        raise ValueError(f"shape must be 3 sizes (z, y, x), got {list(shape_zyx)}")
    extent = np.asarray(shape_zyx, dtype=np.float64) * np.asarray(spacing_zyx, dtype=np.float64)
    return float(np.sqrt(np.sum(extent**2)))


def hd95(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_zyx: Sequence[float],
    *,
    convention: str = DEFAULT_HD95,
    penalty: float | None = None,
    ignore: np.ndarray | None = None,
) -> float:
    """95th-percentile Hausdorff distance in mm under ``convention`` (module docstring).

    Both masks empty: NaN; exactly one empty: ``penalty``.

    Parameters
    ----------
    pred, ref:
        Predicted and reference masks ``[Z, Y, X]`` of the same shape.
    spacing_zyx:
        Voxel spacing (z, y, x) in mm (the original image's, so distances are in the original geometry).
    convention:
        ``max`` (larger directed 95th percentile, MONAI) or ``pooled`` (both directions pooled, medpy).
    penalty:
        Value when exactly one mask is empty; ``None``: the diagonal of the masks' image
        (:func:`image_diagonal` of their shape), which is the original image when the masks are full-size.
    ignore:
        Optional mask of voxels of unknown class, removed from both masks first.
    """
    check_convention(convention)
    p, r = _without(_binary(pred, "pred"), _binary(ref, "ref"), ignore)
    _check_spacing(spacing_zyx)
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return float("nan")
    if not p_any or not r_any:
        return image_diagonal(p.shape, spacing_zyx) if penalty is None else float(penalty)
    # Every surface voxel lies in the union's bounding box; one voxel of margin keeps the erosion at the crop
    # edge identical to the full array's, so cropping changes no distance and saves most of the EDT work.
    box = _union_box(p, r)
    p, r = p[box], r[box]
    forward, backward = surface_distances(p, r, spacing_zyx), surface_distances(r, p, spacing_zyx)
    if convention == "pooled":
        return float(np.percentile(np.concatenate([forward, backward]), 95))
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))
