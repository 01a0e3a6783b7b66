"""Sliding-window inference with Gaussian importance weighting (docs/design.md "Inference").

The volume is covered by patches at nnU-Net v2's tile positions (``compute_steps_for_sliding_window``: at most
``step * patch`` voxels apart, spread evenly so the last tile ends at the border). Each tile's output is
weighted by a Gaussian importance map (``compute_gaussian``: a unit impulse at the patch centre blurred with
sigma = 1/8 of the patch on each axis, scaled to a maximum of 1, zeros replaced by the smallest positive
value so every voxel has weight) and the weighted sum is divided by the summed weights. An image smaller than
the patch is padded with zeros around its centre, as nnU-Net's ``pad_nd_image`` does, and cropped back.

Test-time mirroring (``mirror=True``) averages the flips of the inferior-superior and anterior-posterior axes
only (``mirror_axes=(0, 1)``), never the left-right axis x: after the canonical orientation of preprocessing x
is the patient's right -> left, and a left-right mirrored volume shows kidney_left where kidney_right belongs
(:mod:`fedpsmos.training.augmentation` and docs/orientation.md explain the choice; TotalSegmentator does the
same for its lateralised classes).

Differences from nnU-Net's predictor, on purpose: accumulation is in float32 (nnU-Net uses float16, which is
why its logits differ from ours by about 1e-3) and tiles are batched (two per forward pass by default).

Precision: the network runs under the autocast of ``precision`` (:mod:`fedpsmos.precision`), by default the
rule training uses (``auto``: bf16 on a CUDA GPU that has it, fp16 on older CUDA GPUs - nnU-Net's choice on
every GPU - and float32 on the CPU, bit-identical to inference without autocast). Each tile's output is cast
to float32 before the softmax, the Gaussian weighting and the accumulation, whatever the precision.

Why batches of tiles: on the CPU, PyTorch sends a 3-D convolution whose input has batch 1 and
``N*C*D*H <= 20480`` (every layer of a small patch, the first layers of a paper patch) to the unblocked
``slow_conv3d`` kernel instead of oneDNN; with two or more tiles per pass every convolution takes oneDNN,
measured 5-10x faster per tile (``bench/bench_inference.py``). On the CPU a short last batch is therefore
filled with copies of its last tile, whose outputs are dropped. Instance norm is per sample, so the batch
does not change any tile's logits beyond float rounding.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from fedpsmos.precision import autocast, resolve_precision

# Spatial axes (z, y, x) that test-time mirroring flips: not x, the left-right axis (module docstring).
MIRROR_AXES = (0, 1)


def compute_gaussian(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Gaussian importance map of a patch, maximum 1 and strictly positive (nnU-Net v2 ``compute_gaussian``).

    Parameters
    ----------
    patch_size:
        Patch shape (z, y, x) in voxels.
    sigma_scale:
        Sigma on each axis as a fraction of the patch size (nnU-Net: 1/8).
    """
    impulse = np.zeros(tuple(int(p) for p in patch_size), dtype=np.float64)
    impulse[tuple(int(p) // 2 for p in patch_size)] = 1.0
    gaussian = gaussian_filter(impulse, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    gaussian /= gaussian.max()
    # A zero weight far from the centre would divide by zero where only that tile covers a voxel.
    gaussian[gaussian == 0] = gaussian[gaussian > 0].min()
    return gaussian.astype(np.float32)


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[list[int]]:
    """Tile start positions per axis (nnU-Net v2 ``compute_steps_for_sliding_window``).

    Parameters
    ----------
    image_size:
        Image shape (z, y, x), at least ``patch_size`` on every axis (pad first).
    patch_size:
        Patch shape (z, y, x).
    step:
        Largest distance between tiles as a fraction of the patch, in (0, 1].
    """
    if not 0 < step <= 1:
        raise ValueError(f"tile step must be in (0, 1], got {step}")
    if any(i < p for i, p in zip(image_size, patch_size, strict=True)):
        raise ValueError(
            f"image {tuple(image_size)} is smaller than the patch {tuple(patch_size)}; pad it first"
        )
    steps = []
    for i, p in zip(image_size, patch_size, strict=True):
        n = int(np.ceil((i - p) / (p * step))) + 1
        width = (i - p) / (n - 1) if n > 1 else 0.0
        steps.append([int(np.round(width * k)) for k in range(n)])
    return steps


def _padding(image_size: Sequence[int], patch_size: Sequence[int]) -> list[tuple[int, int]]:
    """Before/after padding per axis centring the image in at least the patch (nnU-Net ``pad_nd_image``)."""
    pads = []
    for i, p in zip(image_size, patch_size, strict=True):
        total = max(0, int(p) - int(i))
        pads.append((total // 2, total - total // 2))
    return pads


@contextlib.contextmanager
def _single_output(net: nn.Module) -> Iterator[None]:
    """Switch deep supervision off for the duration (only the full-resolution head is used), then restore."""
    decoder = getattr(net, "decoder", None)
    previous = getattr(decoder, "deep_supervision", None)
    if previous is not None:
        decoder.deep_supervision = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if previous is not None:
            decoder.deep_supervision = previous  # type: ignore[union-attr]


def _forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Network output at full resolution: element 0 when the network returns deep-supervision outputs."""
    out = net(x)
    if isinstance(out, list | tuple):
        out = out[0]
    return out


def _mirrored_forward(
    net: nn.Module, x: torch.Tensor, mirror: bool, mirror_axes: Sequence[int]
) -> torch.Tensor:
    """Forward, averaged over every combination of flipped ``mirror_axes`` when ``mirror`` (nnU-Net's TTA)."""
    out = _forward(net, x).float()
    if not mirror:
        return out
    axes = tuple(2 + int(a) for a in mirror_axes)  # batch and channel come first
    combos = [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
    for combo in combos:
        out += torch.flip(_forward(net, torch.flip(x, combo)).float(), combo)
    return out / (len(combos) + 1)


def predict_logits(
    net: nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    patch_size: Sequence[int],
    step: float = 0.5,
    mirror: bool = False,
    mirror_axes: Sequence[int] = MIRROR_AXES,
    device: torch.device | str | None = None,
    batch_size: int = 2,
    precision: str = "auto",
) -> torch.Tensor:
    """Gaussian-weighted sliding-window prediction of a whole ``[Z, Y, X]`` volume (module docstring).

    Parameters
    ----------
    net:
        Segmentation network taking ``[B, 1, z, y, x]``; a list output (deep supervision) uses element 0.
    image:
        Normalised image ``[Z, Y, X]`` (float32).
    patch_size:
        Tile shape (z, y, x), the training patch size.
    step:
        Tile step as a fraction of the patch (nnU-Net: 0.5).
    mirror:
        Average over every combination of flips of ``mirror_axes`` as well (test-time augmentation).
    mirror_axes:
        Spatial axes (0 z, 1 y, 2 x) that mirroring flips; default (0, 1), 3 flips besides the identity,
        leaving the left-right axis alone (module docstring). nnU-Net's (0, 1, 2) gives all 7 flips.
    device:
        Where the network runs and the sums accumulate; default: the network's parameters' device.
    batch_size:
        Tiles per forward pass (module docstring: 2 or more keeps CPU convolutions on oneDNN).
    precision:
        ``auto``, ``bf16``, ``fp16`` or ``fp32``: the network's autocast (module docstring).

    Returns
    -------
    ``[C, Z, Y, X]`` float32 on ``device``: weighted mean logits (as nnU-Net); an inference-mode tensor,
    so clone it before modifying it in place outside ``torch.inference_mode``.
    """
    if len(set(mirror_axes)) != len(tuple(mirror_axes)) or not set(mirror_axes) <= {0, 1, 2}:
        raise ValueError(f"mirror_axes must be distinct spatial axes among 0, 1, 2, got {tuple(mirror_axes)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    patch = tuple(int(p) for p in patch_size)
    if image.ndim != 3 or len(patch) != 3:
        raise ValueError(f"expected a [Z, Y, X] image and a 3-D patch, got {tuple(image.shape)} and {patch}")
    if device is None:
        first = next(net.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    data = torch.as_tensor(image, dtype=torch.float32)
    shape = tuple(data.shape)
    pads = _padding(shape, patch)
    if any(before or after for before, after in pads):
        # F.pad takes the last axis first.
        flat = [v for before_after in reversed(pads) for v in before_after]
        data = torch.nn.functional.pad(data, flat, mode="constant", value=0.0)
    data = data.to(device)
    padded = tuple(data.shape)
    starts = list(itertools.product(*compute_steps(padded, patch, step)))
    gaussian = torch.from_numpy(compute_gaussian(patch)).to(device)

    net.eval()
    summed: torch.Tensor | None = None
    weights = torch.zeros(padded, dtype=torch.float32, device=device)
    fill_batches = device.type == "cpu" and batch_size > 1 and len(starts) > 1
    with torch.inference_mode(), _single_output(net):
        for first_tile in range(0, len(starts), batch_size):
            batch_starts = starts[first_tile : first_tile + batch_size]
            slices = [tuple(slice(s, s + p) for s, p in zip(b, patch, strict=True)) for b in batch_starts]
            with torch.inference_mode(False):
                # A normal (not inference-mode) input tensor, as nnU-Net's producer thread makes.
                tiles = torch.stack([data[sl] for sl in slices])[:, None]  # b, 1, z, y, x
            if fill_batches and len(slices) < batch_size:
                # Keep the batch of the other passes so the convolutions stay on oneDNN (module docstring).
                tiles = torch.cat([tiles, tiles[-1:].expand(batch_size - len(slices), *tiles.shape[1:])])
            with autocast(precision, device):
                out = _mirrored_forward(net, tiles, mirror, mirror_axes)  # b, c, z, y, x
            out = out[: len(slices)].float()
            if summed is None:
                summed = torch.zeros((out.shape[1], *padded), dtype=torch.float32, device=device)
            out *= gaussian
            for k, sl in enumerate(slices):
                summed[(slice(None), *sl)] += out[k]
                weights[sl] += gaussian
        assert summed is not None  # at least one tile always exists
        summed /= weights
    crop = tuple(slice(before, before + n) for (before, _), n in zip(pads, shape, strict=True))
    return summed[(slice(None), *crop)]
