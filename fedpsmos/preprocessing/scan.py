"""Bring a CT scan's intensities to the network's grid: the image half of preprocessing.

Shared by :func:`fedpsmos.preprocessing.case.preprocess_case` (training and test cases of the workflow) and
:func:`fedpsmos.inference.apply.predict_folder` (new scans from the command line), both reading the scan with
:func:`fedpsmos.io.read_image`, so that a model sees a new scan exactly as it saw its training data:
reoriented to :data:`~fedpsmos.preprocessing.orientation.CANONICAL`, clipped and normalised
(:func:`~fedpsmos.preprocessing.normalise.normalise_ct`), then resampled to the target spacing
(:func:`~fedpsmos.preprocessing.resample.resample_array`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fedpsmos.preprocessing.normalise import normalise_ct
from fedpsmos.preprocessing.resample import resample_array


class PreprocessingError(ValueError):
    """An image/label pair cannot be preprocessed (unreadable, mismatched grids, unknown label values)."""


def check_settings(source: str | Path, *, spacing: Sequence[float], image_order: int) -> None:
    """Raise :class:`PreprocessingError` naming ``source`` unless the resampling settings are usable.

    Parameters
    ----------
    source:
        The file the settings are applied to (or came from).
    spacing, image_order:
        Target spacing (z, y, x) in mm and the image interpolation order (1 or 3).
    """
    if image_order not in (1, 3):
        raise PreprocessingError(f"{source}: image_order must be 1 or 3, got {image_order}")
    if len(spacing) != 3 or any(not float(s) > 0 for s in spacing):
        raise PreprocessingError(
            f"{source}: target spacing must be 3 positive values (z, y, x), got {list(spacing)}"
        )


def image_to_network_grid(
    oriented: sitk.Image,
    source: str | Path,
    *,
    spacing: Sequence[float],
    image_order: int,
    clip: Sequence[float],
    mean: float,
    std: float,
) -> np.ndarray:
    """Clip, normalise and resample an oriented CT to the target spacing; ``[Z, Y, X]`` float32.

    Parameters
    ----------
    oriented:
        The CT in Hounsfield units, already in the canonical orientation (its spacing is read from it).
    source:
        The file it came from, named in errors.
    spacing, image_order, clip, mean, std:
        The resolved preprocessing settings (``results/preprocessed/settings.json``).
    """
    check_settings(source, spacing=spacing, image_order=image_order)
    intensities = sitk.GetArrayViewFromImage(oriented)
    if not np.all(np.isfinite(intensities)):
        raise PreprocessingError(f"{source}: image holds non-finite values")
    try:
        normalised = normalise_ct(intensities, clip=clip, mean=mean, std=std)
    except ValueError as err:
        raise PreprocessingError(f"{source}: {err}") from err
    from_spacing = tuple(float(s) for s in reversed(oriented.GetSpacing()))
    resampled = resample_array(normalised, from_spacing, [float(s) for s in spacing], order=image_order)
    return resampled.astype(np.float32, copy=False)
