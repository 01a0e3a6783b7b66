"""Dice and HD95 on binary masks, pure NumPy (paper, Section 3: DC and HD95; DESIGN.md "Metrics").

Empty-mask policy (stated in the README too):

- both masks empty (the organ is absent and none is predicted): Dice 1.0, HD95 0.0;
- exactly one empty (the organ is missed, or predicted where there is none): Dice 0.0, HD95 NaN, because a
  surface distance to nothing is undefined. Tables average HD95 over the cases where it is defined (NaN is
  skipped) and Dice over all cases, so a missed organ still costs Dice.

HD95 follows medpy's ``hd95``: the surfaces are the mask voxels removed by one binary erosion with the
6-connected structure (masks touching the array border keep their border voxels as surface); the directed
distances from each surface voxel of one mask to the nearest surface voxel of the other are computed in mm
with ``distance_transform_edt(sampling=spacing)``; the distances of both directions are pooled and their 95th
percentile (NumPy's linear interpolation) is returned. MONAI instead takes the larger of the two directed
95th percentiles; on the same masks that is greater than or equal to the pooled value.
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


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient 2|P∩R| / (|P| + |R|); 1.0 when both masks are empty (module docstring).

    Parameters
    ----------
    pred, ref:
        Predicted and reference masks ``[Z, Y, X]`` of the same shape (nonzero = organ).
    """
    p, r = _binary(pred, "pred"), _binary(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred {p.shape} and ref {r.shape} differ in shape")
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


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm, pooled over both directions (module docstring).

    Both empty: 0.0; exactly one empty: NaN.

    Parameters
    ----------
    pred, ref:
        Predicted and reference masks ``[Z, Y, X]`` of the same shape.
    spacing_zyx:
        Voxel spacing (z, y, x) in mm (the original image's, so distances are in the original geometry).
    """
    p, r = _binary(pred, "pred"), _binary(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred {p.shape} and ref {r.shape} differ in shape")
    if len(spacing_zyx) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing_zyx):
        raise ValueError(f"spacing must be 3 positive values (z, y, x), got {list(spacing_zyx)}")
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return 0.0
    if not p_any or not r_any:
        return float("nan")
    # Every surface voxel lies in the union's bounding box; one voxel of margin keeps the erosion at the crop
    # edge identical to the full array's, so cropping changes no distance and saves most of the EDT work.
    box = _union_box(p, r)
    p, r = p[box], r[box]
    pooled = np.concatenate([surface_distances(p, r, spacing_zyx), surface_distances(r, p, spacing_zyx)])
    return float(np.percentile(pooled, 95))
