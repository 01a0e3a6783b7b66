"""CT intensity normalisation (paper "Implementation details": mean 90.9, std 65.5; nnU-Net CTNormalization).

nnU-Net's CT scheme clips intensities to the foreground's [0.5, 99.5] percentile window and then subtracts the
foreground mean and divides by its standard deviation; the paper fixes those statistics for all sites, and the
config carries them (``preprocessing.clip``, ``mean``, ``std``) so every site normalises identically.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def normalise_ct(image: np.ndarray, *, clip: Sequence[float], mean: float, std: float) -> np.ndarray:
    """Clip to ``[lo, hi]`` HU, then ``(x - mean) / std``; returns float32.

    Parameters
    ----------
    image:
        Intensities in Hounsfield units, any shape.
    clip:
        ``(lo, hi)`` HU window, ``lo < hi``.
    mean, std:
        Shared statistics (paper: 90.9 and 65.5); ``std > 0``.
    """
    if len(clip) != 2 or not float(clip[0]) < float(clip[1]):
        raise ValueError(f"clip must be [lo, hi] with lo < hi, got {list(clip)}")
    if not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
        raise ValueError(f"normalisation needs a finite mean and a positive std, got mean={mean}, std={std}")
    out = np.clip(np.asarray(image, dtype=np.float32), np.float32(clip[0]), np.float32(clip[1]))
    out -= np.float32(mean)
    out /= np.float32(std)
    return out
