"""nnU-Net-style data augmentation of a patch batch, device-agnostic, driven by the sampler's NumPy generator.

The paper trains with nnU-Net's augmentation (Isensee et al. 2021). This module applies nnU-Net v2's default
training transforms (``nnUNetTrainer.get_training_transforms``, batchgeneratorsv2) with their probabilities
and ranges, per sample, in nnU-Net's order:

1. rotation (p 0.2, +-30 degrees about each axis) and scaling (p 0.2, factor 0.7-1.4, the same on all
   axes) by one affine resampling (image linear, labels nearest), onto the final patch;
2. Gaussian noise (p 0.1, standard deviation 0-0.1: nnU-Net calls the range ``noise_variance`` but draws
   the standard deviation from it, and so does this module);
3. Gaussian blur (p 0.2; the one channel with p 0.5; sigma 0.5-1.0 drawn per axis) *extended*;
4. multiplicative brightness (p 0.15, 0.75-1.25);
5. contrast (p 0.15, 0.75-1.25, range preserved);
6. low-resolution simulation (p 0.25; the channel with p 0.5; zoom 0.5-1.0, nearest down, trilinear up)
   *extended*;
7. inverted gamma (p 0.1) and gamma (p 0.3), 0.7-1.5, statistics retained;
8. mirroring (p 0.5 per axis, of the z and y axes only: see "Laterality" below).

Brightness, contrast and gamma factors are drawn as nnU-Net's ``BGContrast`` draws them: below 1 or above 1
with p 0.5 each, then uniformly on that side (for gamma 0.7-1.5 this puts half the draws below 1, where a
plain uniform draw would put 3/8).

**Extended augmentation** (``AugmentationSettings.extended``, config ``training.extended_augmentation``:
``auto`` = on for CUDA runs, :func:`resolve_extended_augmentation`) adds what costs too much on the CPU:
the blur, the low-resolution simulation and nnU-Net's enlarged crop before rotation. For the last, the
sampler cuts every sample larger than the patch (:func:`input_patch_size`, nnU-Net's ``get_patch_size``:
the box that still covers the patch after a 30-degree rotation about any axis and a 0.85 zoom), centred on
the patch (:func:`~fedpsmos.training.transforms.crop_offset`), and the spatial transform resamples onto the
centred final patch, so regions rotated in come from the image instead of repeating the border voxels; a
sample the spatial transform leaves alone is centre-cropped. nnU-Net's box is 4.5 times the paper patch's
voxels for every sample, and still too small for a fifth of the batches (a zoom above 1 / 0.85, some
rotations); a sampler that draws the batch's transforms first can cut
:func:`~fedpsmos.training.transforms.covering_crop_size` instead, the box those transforms need: the patch
itself for 41% of the batches, 2.0 times its voxels on average at the paper patch (5,000 drawn batches).
On a CPU run the extended transforms are off by default (``auto``) and the batch is augmented in the
data-loading worker; on CUDA the loader moves the (enlarged) batch to the GPU and it is augmented there,
by the same functions on device tensors (``bench/bench_gpu_step.py`` times it at the paper patch).

Every random number comes from the generator passed in, drawn on the host in the same order on every device
and whether or not the extended transforms are on (their parameters are drawn and dropped when off), so a
batch's transforms are a function of the generator and a CPU and a CUDA run of one seed draw the same
patches, rotations and factors. Drawing (:func:`draw_parameters`) and applying (:func:`apply_parameters`)
are separate steps: a loader may draw in its worker, right after the patch rows, and apply on the device.
The noise field alone is drawn on the device, from a torch generator seeded by the NumPy generator
(:func:`~fedpsmos.training.transforms.add_noise`), so on one device type it is reproducible too.

Laterality: preprocessing brings every case to one orientation (:mod:`fedpsmos.preprocessing.orientation`),
so the last array axis x runs from the patient's right to left, and kidney_left and kidney_right differ only
by the side of the body. nnU-Net mirrors x too; a mirrored patch then shows a right kidney where left ones
lie, labelled kidney_right, so the side stops telling the class. ``mirror_axes`` therefore defaults to (0, 1):
z and y are mirrored with nnU-Net's p 0.5 each and x never (TotalSegmentator makes the same choice for its
lateralised classes; :mod:`fedpsmos.inference.sliding_window` mirrors the same axes at test time). The
alternative, mirroring x and swapping the paired labels, would also have to swap the logits channels of
every model's class order and the partial-label masks, and was worse in the measurement
(``bench/laterality_experiment.py``: tiny PlainConvUNet, 600 iterations on a phantom whose two kidneys differ
only by side, Dice kidney_left / kidney_right on held-out cases, mean of 4 seeds): no x mirroring 0.94 / 0.97,
x mirroring with swap 0.90 / 0.91, x mirroring without swap (nnU-Net) 0.87 / 0.86; at 300 iterations the
swap variant lagged most (0.49 / 0.34). docs/orientation.md has the details.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedpsmos.training.transforms import (
    add_noise,
    blur,
    centre_crop,
    contrast,
    enlarged_patch_size,
    gamma,
    low_resolution,
    resample_affine,
    rotation_matrix,
)

EXTENDED_CHOICES = ("auto", True, False)
_spatial = resample_affine  # the spatial transform's short name, used by the tests


@dataclass(frozen=True)
class AugmentationSettings:
    """Probabilities and ranges (nnU-Net v2 defaults); ``extended`` adds blur, low resolution and the
    enlarged crop (module docstring)."""

    p_rotation: float = 0.2
    rotation: float = math.radians(30.0)
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    p_blur_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_low_resolution: float = 0.25
    p_low_resolution_channel: float = 0.5
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1)  # spatial axes (z, y, x) = (0, 1, 2); never x (module docstring)
    extended: bool = False
    crop_scaling: tuple[float, float] = (0.85, 1.25)  # nnU-Net's get_patch_size range (not ``scaling``)


DEFAULT_AUGMENTATION = AugmentationSettings()
EXTENDED_AUGMENTATION = AugmentationSettings(extended=True)


@dataclass(frozen=True)
class SampleAugmentation:
    """The drawn transforms of one sample; ``None`` (or no flips) where a transform is not applied."""

    matrix: np.ndarray | None = None  # 3x3, input = matrix @ output
    noise: tuple[float, int] | None = None  # standard deviation, seed of the field
    blur: tuple[float, float, float] | None = None  # sigma (z, y, x)
    brightness: float | None = None
    contrast: float | None = None
    low_resolution: float | None = None  # zoom
    gamma_inverted: float | None = None
    gamma: float | None = None
    flips: tuple[int, ...] = ()  # spatial axes


def resolve_extended_augmentation(value: str | bool, device: str | torch.device) -> bool:
    """Whether a run augments with the extended transforms (config ``training.extended_augmentation``).

    Parameters
    ----------
    value:
        ``"auto"`` (on when ``device`` is CUDA), ``True`` or ``False``.
    device:
        the device the run trains on.
    """
    if value == "auto":
        return torch.device(device).type == "cuda"
    if isinstance(value, bool):
        return value
    raise ValueError(f"training.extended_augmentation must be one of {EXTENDED_CHOICES}, got {value!r}")


def augmentation_settings(extended: bool) -> AugmentationSettings:
    """nnU-Net's default settings, with or without the extended transforms.

    Parameters
    ----------
    extended:
        add blur, low-resolution simulation and the enlarged crop.
    """
    return replace(DEFAULT_AUGMENTATION, extended=bool(extended))


def input_patch_size(patch_size: Sequence[int], settings: AugmentationSettings) -> tuple[int, int, int]:
    """The crop the sampler cuts per sample: :func:`enlarged_patch_size` with extended augmentation and
    rotation on, else the patch itself.

    Parameters
    ----------
    patch_size:
        the final patch (z, y, x).
    settings:
        the augmentation settings.
    """
    z, y, x = (int(p) for p in patch_size)
    if not settings.extended or (settings.p_rotation <= 0 and settings.p_scaling <= 0):
        return z, y, x
    return enlarged_patch_size((z, y, x), settings.rotation, settings.crop_scaling)


def _two_sided(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """nnU-Net's ``BGContrast`` draw: below or above 1 with p 0.5 each, then uniformly on that side."""
    lo, hi = bounds
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(max(lo, 1.0), hi))


def draw_sample(rng: np.random.Generator, settings: AugmentationSettings) -> SampleAugmentation:
    """Draw one sample's transforms (module docstring: order, probabilities; host only).

    Parameters
    ----------
    rng:
        the generator, advanced by this call by the same draws whatever ``settings.extended``.
    settings:
        probabilities and ranges.
    """
    s = settings
    matrix = None
    do_rotation, do_scaling = rng.random() < s.p_rotation, rng.random() < s.p_scaling
    if do_rotation or do_scaling:
        matrix = np.eye(3)
        if do_rotation:
            matrix = rotation_matrix(rng.uniform(-s.rotation, s.rotation, size=3))
        if do_scaling:
            matrix = matrix * rng.uniform(*s.scaling)
    noise = None
    if rng.random() < s.p_noise:
        noise = (float(rng.uniform(*s.noise_std)), int(rng.integers(2**63 - 1)))
    sigmas = None
    if rng.random() < s.p_blur and rng.random() < s.p_blur_channel:
        z, y, x = (float(v) for v in rng.uniform(*s.blur_sigma, size=3))
        sigmas = (z, y, x)
    brightness = _two_sided(rng, s.brightness) if rng.random() < s.p_brightness else None
    contrast_factor = _two_sided(rng, s.contrast) if rng.random() < s.p_contrast else None
    zoom = None
    if rng.random() < s.p_low_resolution and rng.random() < s.p_low_resolution_channel:
        zoom = float(rng.uniform(*s.low_resolution_zoom))
    inverted = _two_sided(rng, s.gamma) if rng.random() < s.p_gamma_inverted else None
    plain = _two_sided(rng, s.gamma) if rng.random() < s.p_gamma else None
    flips = tuple(d for d in s.mirror_axes if rng.random() < s.p_mirror)
    return SampleAugmentation(
        matrix=matrix,
        noise=noise,
        blur=sigmas if s.extended else None,
        brightness=brightness,
        contrast=contrast_factor,
        low_resolution=zoom if s.extended else None,
        gamma_inverted=inverted,
        gamma=plain,
        flips=flips,
    )


def draw_parameters(
    rng: np.random.Generator, batch_size: int, settings: AugmentationSettings = DEFAULT_AUGMENTATION
) -> list[SampleAugmentation]:
    """Draw the transforms of a batch, sample after sample (:func:`draw_sample`).

    Parameters
    ----------
    rng:
        the generator (the sampler's), advanced by this call.
    batch_size:
        samples.
    settings:
        probabilities and ranges.
    """
    return [draw_sample(rng, settings) for _ in range(batch_size)]


def apply_sample(
    image: torch.Tensor,
    target: torch.Tensor,
    params: SampleAugmentation,
    patch_size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one sample's drawn transforms on the sample's device.

    Parameters
    ----------
    image:
        ``[1, Z, Y, X]`` float (the enlarged crop when ``patch_size`` is smaller).
    target:
        ``[1, Z, Y, X]`` integer labels.
    params:
        from :func:`draw_sample`.
    patch_size:
        the output (z, y, x); default the input's size.
    """
    size = tuple(image.shape[1:]) if patch_size is None else tuple(int(p) for p in patch_size)
    img, lab = image, target
    if params.matrix is not None:
        img, lab = resample_affine(img, lab, params.matrix, size)
    elif size != tuple(image.shape[1:]):
        img, lab = centre_crop(img, size), centre_crop(lab, size)
    if params.noise is not None:
        img = add_noise(img, *params.noise)
    if params.blur is not None:
        img = blur(img, params.blur)
    if params.brightness is not None:
        img = img * params.brightness
    if params.contrast is not None:
        img = contrast(img, params.contrast)
    if params.low_resolution is not None:
        img = low_resolution(img, params.low_resolution)
    if params.gamma_inverted is not None:
        img = gamma(img, params.gamma_inverted, invert=True)
    if params.gamma is not None:
        img = gamma(img, params.gamma, invert=False)
    if params.flips:
        dims = [d + 1 for d in params.flips]
        img, lab = torch.flip(img, dims), torch.flip(lab, dims)
    return img, lab


def apply_parameters(
    image: torch.Tensor,
    target: torch.Tensor,
    params: Sequence[SampleAugmentation],
    patch_size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a batch's drawn transforms where the batch lives (CPU worker or GPU).

    Parameters
    ----------
    image:
        ``[B, 1, Z, Y, X]`` float32.
    target:
        ``[B, 1, Z, Y, X]`` integer labels (the dtype is kept: uint8 labels move to a GPU 8x cheaper).
    params:
        one :class:`SampleAugmentation` per sample.
    patch_size:
        the output (z, y, x) when the input is the enlarged crop (:func:`input_patch_size`).
    """
    if len(params) != image.shape[0] or target.shape != image.shape:
        raise ValueError(
            f"{len(params)} parameter sets for image {list(image.shape)} and target {list(target.shape)}"
        )
    samples = [apply_sample(image[b], target[b], p, patch_size) for b, p in enumerate(params)]
    return (
        torch.stack([img.contiguous() for img, _ in samples]),  # b, 1, z, y, x
        torch.stack([lab.contiguous() for _, lab in samples]),
    )


def augment_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    rng: np.random.Generator,
    settings: AugmentationSettings = DEFAULT_AUGMENTATION,
    *,
    patch_size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch sample by sample on its device; every random choice is drawn from ``rng``.

    Parameters
    ----------
    image:
        ``[B, 1, Z, Y, X]`` float32, on any device.
    target:
        ``[B, 1, Z, Y, X]`` integer class labels (resampled with nearest neighbour), on the same device.
    rng:
        the generator (the sampler's), advanced by this call.
    settings:
        probabilities and ranges.
    patch_size:
        the output (z, y, x) when the input is the enlarged crop (:func:`input_patch_size`); default the
        input's size.
    """
    params = draw_parameters(rng, image.shape[0], settings)
    return apply_parameters(image, target, params, patch_size)
