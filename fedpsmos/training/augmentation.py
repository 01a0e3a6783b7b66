"""nnU-Net-style data augmentation of a patch batch on the CPU, driven by the sampler's NumPy generator.

The paper trains with nnU-Net's augmentation (Isensee et al. 2021). This module applies the same kinds of
transform with nnU-Net v2's default probabilities and ranges (``nnUNetTrainer.get_training_transforms``):
rotation (p 0.2, +-30 degrees about each axis) and scaling (p 0.2, factor 0.7-1.4, same on all axes) by one
affine resampling (image linear, labels nearest), Gaussian noise (p 0.1, variance up to 0.1), multiplicative
brightness (p 0.15, 0.75-1.25), contrast (p 0.15, 0.75-1.25, range preserved), inverted gamma (p 0.1) and
gamma (p 0.3, 0.7-1.5, statistics retained), mirroring (p 0.5 per axis, of the z and y axes only: see
"Laterality" below). Left out: Gaussian blur and
low-resolution simulation (cheap on a GPU pipeline, slow on the CPU here) and nnU-Net's enlarged crop before
rotation (regions rotated in from outside the patch repeat the border voxels instead).

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

batchgeneratorsv2 draws from NumPy's and torch's global generators; every random number here comes from the
generator passed in, so a batch is a function of the sampler's state and training resumes bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentationSettings:
    """Probabilities and ranges (nnU-Net v2 defaults)."""

    p_rotation: float = 0.2
    rotation: float = math.radians(30.0)
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1)  # spatial axes (z, y, x) = (0, 1, 2); never x (module docstring)


DEFAULT_AUGMENTATION = AugmentationSettings()


def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """Rotation about the z, y and x axes (in that order) as a 3x3 matrix over (z, y, x) coordinates."""
    a, b, c = angles
    rz = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _spatial(
    image: torch.Tensor, target: torch.Tensor, matrix: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a ``[1, Z, Y, X]`` sample with ``input = matrix @ output`` about the patch centre (voxels).

    The label is sampled with nearest neighbour, so every output voxel copies one input label and the ignore
    label (``IGNORE_CLASS``) is never blended with a class; voxels mapped from outside the patch get
    background.
    """
    size = np.array(image.shape[1:], dtype=np.float64)  # z, y, x
    # affine_grid works in normalised (x, y, z) coordinates, u = offset / (n / 2) (align_corners=False).
    half = size[::-1] / 2.0
    m_xyz = matrix[::-1, ::-1]
    theta = (m_xyz * half[None, :]) / half[:, None]
    theta_t = torch.zeros(1, 3, 4, dtype=torch.float32)
    theta_t[0, :, :3] = torch.from_numpy(theta.astype(np.float32))
    grid = F.affine_grid(theta_t, [1, 1, *image.shape[1:]], align_corners=False)
    img = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    lab = F.grid_sample(
        target[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[0]
    return img, lab.round().to(target.dtype)


def _gamma(image: torch.Tensor, gamma: float, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma transform with retained mean and std (optionally on the inverted image)."""
    x = -image if invert else image
    mean, std = x.mean(), x.std()
    lo, hi = x.min(), x.max()
    span = (hi - lo).clamp_min(1e-7)
    x = ((x - lo) / span).pow(gamma) * span + lo
    x = (x - x.mean()) / x.std().clamp_min(1e-7) * std + mean
    return -x if invert else x


def augment_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    rng: np.random.Generator,
    settings: AugmentationSettings = DEFAULT_AUGMENTATION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch sample by sample; every random choice is drawn from ``rng``.

    Parameters
    ----------
    image:
        ``[B, 1, Z, Y, X]`` float32.
    target:
        ``[B, 1, Z, Y, X]`` int64 class labels (resampled with nearest neighbour).
    rng:
        the generator (the sampler's), advanced by this call.
    settings:
        probabilities and ranges.
    """
    images, targets = [], []
    for b in range(image.shape[0]):
        img, lab = image[b], target[b]  # 1, z, y, x
        do_rot = rng.random() < settings.p_rotation
        do_scale = rng.random() < settings.p_scaling
        if do_rot or do_scale:
            matrix = np.eye(3)
            if do_rot:
                matrix = _rotation_matrix(rng.uniform(-settings.rotation, settings.rotation, size=3))
            if do_scale:
                matrix = matrix * rng.uniform(*settings.scaling)
            img, lab = _spatial(img, lab, matrix)
        if rng.random() < settings.p_noise:
            sigma = math.sqrt(rng.uniform(*settings.noise_variance))
            noise = rng.standard_normal(tuple(img.shape), dtype=np.float32)
            img = img + torch.from_numpy(noise) * sigma
        if rng.random() < settings.p_brightness:
            img = img * float(rng.uniform(*settings.brightness))
        if rng.random() < settings.p_contrast:
            factor = float(rng.uniform(*settings.contrast))
            lo, hi, mean = img.min(), img.max(), img.mean()
            img = ((img - mean) * factor + mean).clamp(lo, hi)
        if rng.random() < settings.p_gamma_inverted:
            img = _gamma(img, float(rng.uniform(*settings.gamma)), invert=True)
        if rng.random() < settings.p_gamma:
            img = _gamma(img, float(rng.uniform(*settings.gamma)), invert=False)
        flips = [d + 1 for d in settings.mirror_axes if rng.random() < settings.p_mirror]
        if flips:
            img, lab = torch.flip(img, flips), torch.flip(lab, flips)
        images.append(img.contiguous())
        targets.append(lab.contiguous())
    return torch.stack(images), torch.stack(targets)
