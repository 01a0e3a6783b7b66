"""Preprocess one case: label map, CT normalisation, resampling, written as the architecture's case file.

Order of operations, and why:

1. Read image and label and check they share one grid (:func:`fedpsmos.io.read_image_pair`, the reading and
   tolerance of the site validation).
2. Apply the site label map in the original grid, so the kidney left/right split uses the original physical
   coordinates (:func:`fedpsmos.data.label_map.apply_label_map_image`); background values become 0 and
   ignored values :data:`fedpsmos.organs.IGNORE_CLASS` (255), which nearest-neighbour resampling keeps.
3. Bring image and global label to the canonical orientation (:mod:`fedpsmos.preprocessing.orientation`:
   ``DICOMOrient`` to LPS, a permutation and flip of the axes with no interpolation), so the same anatomy
   gives the same array whether the file stored it LPS, RAS or slice axis first. Before resampling, because
   the target spacing is given in anatomical (z, y, x) order. The case file records the original orientation
   code and the oriented grid so that predictions go back to the file's own voxel order.
4. Clip and normalise the intensities (paper: mean 90.9, std 65.5) before resampling, as nnU-Net v2's
   ``DefaultPreprocessor`` does: clipping first keeps air/bone edges from ringing through the cubic spline.
5. Resample the image (order 3 or 1) and the global label map (nearest) to the shared spacing on the
   shared-origin grid of :mod:`fedpsmos.preprocessing.resample`.
6. Write ``{case}.b2zip`` (:mod:`fedpsmos.preprocessing.storage`: blosc2 volumes a patch read can seek into,
   checksums in its metadata), atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fedpsmos.data.label_map import LabelMap, apply_label_map_image, as_label_map
from fedpsmos.data.manifest import Manifest
from fedpsmos.io import ImageError, read_image_pair
from fedpsmos.organs import CLASS_INDEX, IGNORE_CLASS, LabelMapError, labelled_mask
from fedpsmos.preprocessing.orientation import RECORD_KEYS, orientation_record, reorient
from fedpsmos.preprocessing.resample import resample_array
from fedpsmos.preprocessing.scan import PreprocessingError, check_settings, image_to_network_grid
from fedpsmos.preprocessing.storage import CASE_SUFFIX, write_case

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


def preprocess_case(
    image_path: str | os.PathLike[str],
    label_path: str | os.PathLike[str],
    out_npz: str | os.PathLike[str],
    *,
    labels: LabelMap | Mapping[str, Sequence[int]],
    spacing: Sequence[float],
    image_order: int,
    clip: Sequence[float],
    mean: float,
    std: float,
) -> dict[str, Any]:
    """Preprocess one image/label pair into the case file of docs/architecture.md, written atomically.

    The arrays are in the canonical orientation (module docstring, step 3) at the target spacing.

    Parameters
    ----------
    image_path, label_path:
        The CT image (Hounsfield units) and the site label image on the same grid.
    out_npz:
        Output path; must end in ``.b2zip`` (:data:`~fedpsmos.preprocessing.storage.CASE_SUFFIX`).
    labels:
        The site's :class:`~fedpsmos.data.label_map.LabelMap` (or a plain ``{organ: [site values]}`` map;
        ``kidney`` is split left/right by body side).
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
        ``voxels``: voxel count per labelled organ in the resampled label map, ``ignored``: its voxels of
        unknown class (IGNORE_CLASS).
    """
    image_path, label_path, out_npz = Path(image_path), Path(label_path), Path(out_npz)
    if not out_npz.name.endswith(CASE_SUFFIX):
        raise PreprocessingError(f"{out_npz}: output must end in {CASE_SUFFIX}")
    check_settings(image_path, spacing=spacing, image_order=image_order)
    try:
        label_map = as_label_map(labels)
        organs = label_map.organs
    except LabelMapError as err:
        raise PreprocessingError(f"{label_path}: {err}") from err
    try:
        image, label = read_image_pair(image_path, label_path)
    except ImageError as err:
        raise PreprocessingError(str(err)) from err
    try:
        global_label = apply_label_map_image(label, label_map)
    except LabelMapError as err:
        raise PreprocessingError(f"{label_path}: {err}") from err

    global_image = sitk.GetImageFromArray(global_label)
    global_image.CopyInformation(label)
    oriented = reorient(image)
    oriented_label = sitk.GetArrayFromImage(reorient(global_image))

    target = tuple(float(s) for s in spacing)
    resampled = image_to_network_grid(
        oriented, image_path, spacing=target, image_order=image_order, clip=clip, mean=mean, std=std
    )
    from_spacing = tuple(float(s) for s in reversed(oriented.GetSpacing()))
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
    write_case(out_npz, arrays)  # atomic
    counts = np.bincount(resampled_label.ravel(), minlength=IGNORE_CLASS + 1)
    return {
        "shape": list(resampled.shape),
        "spacing": list(target),
        "sitk_size": list(image.GetSize()),
        "orientation": str(arrays["orientation"]),
        "voxels": {organ: int(counts[CLASS_INDEX[organ]]) for organ in organs},
        "ignored": int(counts[IGNORE_CLASS]),
    }


def preprocess_manifest_case(
    manifest_path: str | os.PathLike[str], case: str, out_npz: str | os.PathLike[str], **settings: Any
) -> dict[str, Any]:
    """Look up ``case`` in a site manifest's ``cases`` list and run :func:`preprocess_case` on its files,
    with the resolved label map the manifest records (``labels``, ``background``, ``ignore``).

    Parameters
    ----------
    manifest_path:
        The site manifest JSON (docs/architecture.md "Manifest"); image/label paths resolved by
        :class:`fedpsmos.data.manifest.Manifest`.
    case:
        Case id.
    out_npz:
        Output ``.b2zip`` path.
    settings:
        Keyword arguments of :func:`preprocess_case` other than ``labels`` (``spacing``, ``image_order``,
        ``clip``, ``mean``, ``std``).
    """
    if "labels" in settings:
        raise PreprocessingError(f"{manifest_path}: the label map comes from the manifest; pass no labels")
    manifest = Manifest.load(manifest_path)
    if case not in manifest.case_ids:
        raise PreprocessingError(f"{manifest_path}: case {case!r} is not in the manifest's cases")
    record = manifest.case(case)
    return preprocess_case(record.image, record.label, out_npz, labels=manifest.label_map, **settings)
