"""Preprocess one case: label map, CT normalisation, resampling, written as the architecture's ``.npz``.

Order of operations, and why:

1. Read image and label with SimpleITK and check they share one grid.
2. Apply the site label map in the original grid, so the kidney left/right split uses the original physical
   coordinates (:func:`fedpsmos.data.label_map.apply_label_map_image`).
3. Bring image and global label to the canonical orientation (:mod:`fedpsmos.preprocessing.orientation`:
   ``DICOMOrient`` to LPS, a permutation and flip of the axes with no interpolation), so the same anatomy
   gives the same array whether the file stored it LPS, RAS or slice axis first. Before resampling, because
   the target spacing is given in anatomical (z, y, x) order. The ``.npz`` records the original orientation
   code and the oriented grid so that predictions go back to the file's own voxel order.
4. Clip and normalise the intensities (paper: mean 90.9, std 65.5) before resampling, as nnU-Net v2's
   ``DefaultPreprocessor`` does: clipping first keeps air/bone edges from ringing through the cubic spline.
5. Resample the image (order 3 or 1) and the global label map (nearest) to the shared spacing on the
   shared-origin grid of :mod:`fedpsmos.preprocessing.resample`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fedpsmos.atomic import atomic_path
from fedpsmos.data.label_map import apply_label_map_image
from fedpsmos.organs import CLASS_INDEX, LabelMapError, labelled_mask, labelled_organs
from fedpsmos.preprocessing.normalise import normalise_ct
from fedpsmos.preprocessing.orientation import RECORD_KEYS, orientation_record, reorient
from fedpsmos.preprocessing.resample import resample_array

NPZ_KEYS = (
    "image",
    "label",
    "labelled",
    "spacing",
    "sitk_size",
    "sitk_spacing",
    "sitk_origin",
    "sitk_direction",
    *RECORD_KEYS,
)


class PreprocessingError(ValueError):
    """An image/label pair cannot be preprocessed (unreadable, mismatched grids, unknown label values)."""


def _read(path: Path, what: str) -> sitk.Image:
    """Read a 3-D scalar image, raising :class:`PreprocessingError` naming the file."""
    if not path.is_file():
        raise PreprocessingError(f"{path}: {what} file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise PreprocessingError(f"{path}: cannot read {what}: {first}") from err
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise PreprocessingError(
            f"{path}: {what} must be a 3-D scalar image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    return image


def _check_same_grid(image: sitk.Image, label: sitk.Image, label_path: Path) -> None:
    """Raise if the label's size, spacing, origin or direction differ from the image's."""
    if image.GetSize() != label.GetSize():
        raise PreprocessingError(
            f"{label_path}: label size {label.GetSize()} != image size {image.GetSize()}"
        )
    for name, a, b, tol in (
        ("spacing", image.GetSpacing(), label.GetSpacing(), 1e-3),
        ("origin", image.GetOrigin(), label.GetOrigin(), 1e-2),
        ("direction", image.GetDirection(), label.GetDirection(), 1e-3),
    ):
        if not np.allclose(a, b, atol=tol, rtol=0):
            raise PreprocessingError(f"{label_path}: label {name} {tuple(b)} != image {name} {tuple(a)}")


def preprocess_case(
    image_path: str | os.PathLike[str],
    label_path: str | os.PathLike[str],
    out_npz: str | os.PathLike[str],
    *,
    labels: Mapping[str, Sequence[int]],
    spacing: Sequence[float],
    image_order: int,
    clip: Sequence[float],
    mean: float,
    std: float,
) -> dict[str, Any]:
    """Preprocess one image/label pair into the ``.npz`` of docs/architecture.md, written atomically.

    The arrays are in the canonical orientation (module docstring, step 3) at the target spacing.

    Parameters
    ----------
    image_path, label_path:
        The CT image (Hounsfield units) and the site label image on the same grid.
    out_npz:
        Output path; must end in ``.npz`` (NumPy would otherwise append it).
    labels:
        The site's label map ``{organ: [site values]}`` (``kidney`` is split left/right by body side).
    spacing:
        Target spacing (z, y, x) in mm (``preprocessing.spacing``).
    image_order:
        3 cubic B-spline or 1 linear for the image; labels always use nearest neighbour.
    clip, mean, std:
        CT normalisation window and statistics (``preprocessing.clip``, ``mean``, ``std``).

    Returns
    -------
    dict
        ``shape`` (z, y, x) and ``spacing`` after orientation and resampling, the original ``sitk_size``,
        ``orientation`` (the file's orientation code) and
        ``voxels``: voxel count per labelled organ in the resampled label map.
    """
    image_path, label_path, out_npz = Path(image_path), Path(label_path), Path(out_npz)
    if out_npz.suffix != ".npz":
        raise PreprocessingError(f"{out_npz}: output must end in .npz")
    if image_order not in (1, 3):
        raise PreprocessingError(f"{image_path}: image_order must be 1 or 3, got {image_order}")
    if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
        raise PreprocessingError(
            f"{image_path}: target spacing must be 3 positive values (z, y, x), got {spacing}"
        )
    try:
        organs = labelled_organs(labels)
    except LabelMapError as err:
        raise PreprocessingError(f"{label_path}: {err}") from err
    image = _read(image_path, "image")
    label = _read(label_path, "label")
    _check_same_grid(image, label, label_path)
    try:
        global_label = apply_label_map_image(label, labels)
    except LabelMapError as err:
        raise PreprocessingError(f"{label_path}: {err}") from err

    global_image = sitk.GetImageFromArray(global_label)
    global_image.CopyInformation(label)
    oriented = reorient(image)
    oriented_label = sitk.GetArrayFromImage(reorient(global_image))

    intensities = sitk.GetArrayViewFromImage(oriented)
    if not np.all(np.isfinite(intensities)):
        raise PreprocessingError(f"{image_path}: image holds non-finite values")
    normalised = normalise_ct(intensities, clip=clip, mean=mean, std=std)
    from_spacing = tuple(float(s) for s in reversed(oriented.GetSpacing()))
    target = tuple(float(s) for s in spacing)
    resampled = resample_array(normalised, from_spacing, target, order=image_order)
    resampled_label = resample_array(oriented_label, from_spacing, target, order=0).astype(np.uint8)

    arrays: dict[str, Any] = {
        "image": resampled.astype(np.float32, copy=False),
        "label": resampled_label,
        "labelled": labelled_mask(organs),
        "spacing": np.asarray(target, dtype=np.float64),
        "sitk_size": np.asarray(image.GetSize(), dtype=np.int64),
        "sitk_spacing": np.asarray(image.GetSpacing(), dtype=np.float64),
        "sitk_origin": np.asarray(image.GetOrigin(), dtype=np.float64),
        "sitk_direction": np.asarray(image.GetDirection(), dtype=np.float64),
        **orientation_record(image, oriented),
    }
    with atomic_path(
        out_npz, suffix=".npz"
    ) as tmp:  # the temporary name keeps the .npz suffix, so NumPy writes it as is
        np.savez_compressed(tmp, **arrays)
    counts = np.bincount(resampled_label.ravel(), minlength=len(CLASS_INDEX))
    return {
        "shape": list(resampled.shape),
        "spacing": list(target),
        "sitk_size": list(image.GetSize()),
        "orientation": str(arrays["orientation"]),
        "voxels": {organ: int(counts[CLASS_INDEX[organ]]) for organ in organs},
    }


def preprocess_manifest_case(
    manifest_path: str | os.PathLike[str], case: str, out_npz: str | os.PathLike[str], **settings: Any
) -> dict[str, Any]:
    """Look up ``case`` in a site manifest's ``cases`` list and run :func:`preprocess_case` on its files.

    Parameters
    ----------
    manifest_path:
        The site manifest JSON (docs/architecture.md "Manifest"); image/label paths as written there.
    case:
        Case id.
    out_npz:
        Output ``.npz`` path.
    settings:
        Keyword arguments of :func:`preprocess_case` (``labels``, ``spacing``, ``image_order``, ``clip``,
        ``mean``, ``std``).
    """
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = [e for e in manifest["cases"] if e["case"] == case]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PreprocessingError(f"{manifest_path}: cannot read the manifest's cases: {err}") from err
    if len(entries) != 1:
        raise PreprocessingError(
            f"{manifest_path}: case {case!r} appears {len(entries)} times in the manifest"
        )
    return preprocess_case(entries[0]["image"], entries[0]["label"], out_npz, **settings)
