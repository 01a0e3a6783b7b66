"""Apply a site's partial label map to its label image (docs/design.md "Organs and label maps").

A site maps its own label values onto the global classes of :mod:`fedpsmos.organs` (0 background, 1 liver,
2 spleen, 3 pancreas, 4 kidney_left, 5 kidney_right); several values may map to one organ (MSD liver: 1 liver
and 2 tumour are both liver). Value 0 is background; any other value not in the map is an error, because
silently treating an unknown structure as background would teach the network that it is background.

The key ``kidney`` stands for one label covering both kidneys. Its voxels are split by the side of the body
in physical LPS coordinates, where +x points to the patient's left: a voxel with ``x > midline`` is
``kidney_left``, the others ``kidney_right``. Physical x comes from each voxel's index through the image
geometry (``origin + direction @ (spacing * index)``), so flipped or rotated direction matrices are handled.

The midline, unless given, is the mean of the x-centroids of the two largest connected components of the
kidney mask (26-connectivity), each component counted once so that kidneys of unequal size do not pull it
sideways; the two kidneys lie about symmetrically either side of the spine. When the mask has a single
component (one kidney, or a fused horseshoe kidney) the midline falls back to the x-centre of the image's
physical field of view, since CT is reconstructed centred on the patient; pass ``midline_x`` to override.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fedpsmos.organs import CLASS_INDEX, SPLIT_KIDNEY, LabelMapError, labelled_organs


def _lookup_table(labels: Mapping[str, Sequence[int]]) -> dict[int, int]:
    """Site value -> global class; ``kidney`` values map to a placeholder resolved by the side split."""
    labelled_organs(labels)  # validates the organ names
    table: dict[int, int] = {}
    for organ, values in labels.items():
        target = -1 if organ == SPLIT_KIDNEY else CLASS_INDEX[organ]
        for value in values:
            if int(value) != value or int(value) <= 0:
                raise LabelMapError(f"label value {value!r} of {organ!r} must be a positive integer")
            if int(value) in table and table[int(value)] != target:
                raise LabelMapError(f"label value {int(value)} is mapped to more than one organ")
            table[int(value)] = target
    return table


def physical_x(index_zyx: np.ndarray, *, origin: Sequence[float], spacing: Sequence[float], direction):
    """Physical LPS x (mm) of voxels given as ``[N, 3]`` (z, y, x) indices.

    Parameters
    ----------
    index_zyx:
        Voxel indices, one row per voxel, NumPy axis order.
    origin, spacing, direction:
        SimpleITK geometry in (x, y, z) order; ``direction`` has 9 values, row-major.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    step = d[0] * np.asarray(spacing, dtype=np.float64)  # mm of x per unit index along sitk x, y, z
    return float(origin[0]) + np.asarray(index_zyx, dtype=np.float64)[:, ::-1] @ step


def kidney_midline(kidney: np.ndarray, x_of_voxels: np.ndarray, fov_centre_x: float) -> float:
    """Body midline x (mm) from a kidney mask: mean x-centroid of its two largest components (module doc).

    Parameters
    ----------
    kidney:
        Boolean ``[Z, Y, X]`` mask of the single kidney label.
    x_of_voxels:
        Physical x of the mask's voxels in ``np.nonzero(kidney)`` order.
    fov_centre_x:
        Fallback when the mask has fewer than two components: x-centre of the field of view.
    """
    components, count = ndimage.label(kidney, structure=np.ones((3, 3, 3), dtype=bool))
    if count < 2:
        return float(fov_centre_x)
    ids = components[np.nonzero(kidney)]
    sizes = np.bincount(ids, minlength=count + 1)
    sums = np.bincount(ids, weights=x_of_voxels, minlength=count + 1)
    largest = np.argsort(sizes[1:], kind="stable")[::-1][:2] + 1
    return float(np.mean(sums[largest] / sizes[largest]))


def apply_label_map(
    label: np.ndarray,
    labels: Mapping[str, Sequence[int]],
    *,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    direction: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    midline_x: float | None = None,
) -> np.ndarray:
    """Map a site label array ``[Z, Y, X]`` onto the global classes; returns uint8 (module docstring).

    Parameters
    ----------
    label:
        Site label values, integer (or integral float) array in NumPy (z, y, x) order.
    labels:
        The site's label map ``{organ: [site values]}``; ``kidney`` is split left/right by body side.
    origin, spacing, direction:
        The label image's SimpleITK geometry (x, y, z order; direction row-major), used for the kidney split.
    midline_x:
        Physical x (mm) of the body midline; estimated from the kidney mask when ``None``.

    Raises
    ------
    LabelMapError
        If the array holds values the map does not name (the message lists them) or the map is malformed.
    """
    table = _lookup_table(labels)
    if label.ndim != 3:
        raise LabelMapError(f"expected a 3-D label array, got shape {label.shape}")
    values = np.asarray(label)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise LabelMapError("label array holds non-integer values")
        values = values.astype(np.int64)
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0:
        raise LabelMapError(f"label array holds negative values (min {low})")
    present = np.flatnonzero(np.bincount(values.ravel(), minlength=high + 1))
    unknown = [int(v) for v in present if v != 0 and int(v) not in table]
    if unknown:
        raise LabelMapError(f"label values {unknown} are not in the site's label map {dict(labels)}")
    lut = np.zeros(high + 1, dtype=np.int16)
    for value, target in table.items():
        if value <= high:
            lut[value] = target
    mapped = lut[values]
    out = np.clip(mapped, 0, None).astype(np.uint8)
    kidney = mapped == -1
    if kidney.any():
        index = np.argwhere(kidney)
        x = physical_x(index, origin=origin, spacing=spacing, direction=direction)
        if midline_x is None:
            corners = np.array(
                [
                    [i, j, k]
                    for i in (0, label.shape[0] - 1)
                    for j in (0, label.shape[1] - 1)
                    for k in (0, label.shape[2] - 1)
                ]
            )
            corner_x = physical_x(corners, origin=origin, spacing=spacing, direction=direction)
            midline_x = kidney_midline(kidney, x, 0.5 * (corner_x.min() + corner_x.max()))
        side = np.where(x > midline_x, CLASS_INDEX["kidney_left"], CLASS_INDEX["kidney_right"])
        out[tuple(index.T)] = side.astype(np.uint8)
    return out


def apply_label_map_image(
    image: sitk.Image, labels: Mapping[str, Sequence[int]], *, midline_x: float | None = None
) -> np.ndarray:
    """Apply a label map to a SimpleITK label image, using its geometry for the kidney split.

    Parameters
    ----------
    image:
        3-D single-component label image.
    labels:
        The site's label map ``{organ: [site values]}``.
    midline_x:
        Optional body midline x (mm), see :func:`apply_label_map`.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise LabelMapError(
            f"expected a 3-D scalar label image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    return apply_label_map(
        sitk.GetArrayViewFromImage(image),
        labels,
        origin=image.GetOrigin(),
        spacing=image.GetSpacing(),
        direction=image.GetDirection(),
        midline_x=midline_x,
    )
