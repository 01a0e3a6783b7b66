"""From the network's grid back to a scan's grid: resample class probabilities, then take the argmax.

A prediction is made on the preprocessed grid (the target spacing), but the label map is wanted on the scan's
own grid, usually finer. Two ways to get there:

``"probabilities"`` (the default, what nnU-Net v2 does in ``convert_predicted_logits_to_segmentation_with_
correct_shape``): resample every class's softmax probability to the scan's grid by linear interpolation and
take the argmax there. Organ borders then fall between the coarse voxels, where the interpolated
probabilities cross, instead of on the coarse voxels' staircase.

``"labels"``: take the argmax on the preprocessed grid and resample the label map by nearest neighbour.
Cheaper, and what the workflow did first; kept for comparison (``bench/bench_resampling.py``).

Memory: the probabilities are resampled one class at a time, keeping a running maximum and the class that
holds it, so the scan-sized arrays are the maximum, the current class and the argmax (not C of them).
Linear interpolation weights sum to 1, so the resampled probabilities still sum to 1 over the classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedpsmos.preprocessing.resample import resample_to_shape

RESAMPLE_MODES = ("probabilities", "labels")


def check_resample(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`RESAMPLE_MODES`, else raise ``ValueError``."""
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLE_MODES)}, got {mode!r}")
    return mode


def _channel(probabilities: np.ndarray | torch.Tensor, c: int) -> np.ndarray:
    """Channel ``c`` as a float32 NumPy array on the CPU."""
    if isinstance(probabilities, torch.Tensor):
        return probabilities[c].float().cpu().numpy()
    return np.asarray(probabilities[c], dtype=np.float32)


def argmax_on_grid(
    probabilities: np.ndarray | torch.Tensor,
    *,
    from_spacing_zyx: Sequence[float],
    to_spacing_zyx: Sequence[float],
    shape_zyx: Sequence[int],
    mode: str = "probabilities",
    keep: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Channel index (uint8) of the most probable class on a target grid sharing the input's origin.

    Parameters
    ----------
    probabilities:
        ``[C, Z, Y, X]`` class probabilities (or logits, for ``mode="labels"``) at ``from_spacing_zyx``.
    from_spacing_zyx, to_spacing_zyx, shape_zyx:
        The input spacing, and the target grid's spacing and shape ((z, y, x), mm); the grids share origin
        and direction (:mod:`fedpsmos.preprocessing.resample`).
    mode:
        ``"probabilities"`` or ``"labels"`` (module docstring).
    keep:
        With ``mode="probabilities"``: called as ``keep(c, p)`` with each class's resampled probabilities
        ``p`` (float32, target shape) before the next class is computed, e.g. to save them.
    """
    check_resample(mode)
    n_classes = int(probabilities.shape[0])
    if probabilities.ndim != 4 or not 0 < n_classes <= 256:
        raise ValueError(
            f"expected [C, Z, Y, X] probabilities with 1..256 classes, got {probabilities.shape}"
        )
    shape = tuple(int(v) for v in shape_zyx)
    if mode == "labels":
        if keep is not None:
            raise ValueError("keep needs mode='probabilities' (labels are resampled, not probabilities)")
        if isinstance(probabilities, torch.Tensor):
            coarse = probabilities.argmax(dim=0).to(torch.uint8).cpu().numpy()
        else:
            coarse = np.asarray(probabilities).argmax(axis=0).astype(np.uint8)
        return resample_to_shape(coarse, from_spacing_zyx, to_spacing_zyx, shape, order=0)
    best = np.empty(shape, dtype=np.float32)
    argmax = np.zeros(shape, dtype=np.uint8)
    for c in range(n_classes):
        p = resample_to_shape(_channel(probabilities, c), from_spacing_zyx, to_spacing_zyx, shape, order=1)
        if keep is not None:
            keep(c, p)
        if c == 0:
            np.copyto(best, p)
            continue
        better = p > best  # strict: on a tie the lower class wins, as argmax does
        argmax[better] = c
        np.copyto(best, p, where=better)
    return argmax
