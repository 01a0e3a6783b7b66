"""The tensor operations of the augmentation, device-agnostic: they run where their input tensor lives.

Each function transforms one sample ``[C, Z, Y, X]`` with parameters already drawn (by
:func:`fedpsmos.training.augmentation.draw_parameters`); nothing here draws a random number except
:func:`add_noise`, whose field comes from a torch generator on the sample's device seeded with a number the
NumPy generator drew. Small constant tensors (the affine matrix, blur kernels) are built on the host and
copied to the sample's device; there is no other host round trip, so on CUDA nothing here synchronises.

Each operation follows the batchgeneratorsv2 transform that nnU-Net v2's
``nnUNetTrainer.get_training_transforms`` uses, named in its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

BLUR_TRUNCATE = 6.0  # batchgeneratorsv2 blur_dimension: kernel of about 6 sigma (odd size)


def crop_offset(size: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Lower corner, inside an enlarged crop of ``size``, of the centred final patch ``patch_size``.

    The sampler cuts the enlarged crop at ``corner - crop_offset(size, patch_size)`` so that a sample the
    spatial transform leaves alone ends up exactly the patch at ``corner``.

    Parameters
    ----------
    size:
        the enlarged crop (z, y, x).
    patch_size:
        the final patch (z, y, x), at most ``size`` on every axis.
    """
    if len(size) != 3 or len(patch_size) != 3 or any(p > s for s, p in zip(size, patch_size, strict=True)):
        raise ValueError(f"patch {list(patch_size)} must be three sizes within the crop {list(size)}")
    z, y, x = ((int(s) - int(p)) // 2 for s, p in zip(size, patch_size, strict=True))
    return z, y, x


def centre_crop(sample: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """The centred ``patch_size`` box of a ``[C, Z, Y, X]`` sample (a view; :func:`crop_offset`).

    Parameters
    ----------
    sample:
        ``[C, Z, Y, X]``.
    patch_size:
        (z, y, x).
    """
    (z, y, x), (dz, dy, dx) = crop_offset(sample.shape[1:], patch_size), patch_size
    return sample[:, z : z + dz, y : y + dy, x : x + dx]


def resample_affine(
    image: torch.Tensor,
    target: torch.Tensor,
    matrix: np.ndarray,
    patch_size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a sample with ``input = matrix @ output`` about the centre of its centred final patch.

    batchgeneratorsv2 ``SpatialTransform`` (rotation and scaling, no elastic deformation). Offsets are in
    voxels; the output is ``patch_size`` (default: the input's size), centred as :func:`centre_crop` is, so
    the identity matrix gives exactly that crop. Given an enlarged input, regions rotated into the patch come
    from the image around it; only points beyond the enlarged crop take the nearest border voxel. The label
    is sampled with nearest neighbour, so every output voxel copies one input label and the ignore label
    (``IGNORE_CLASS``) is never blended with a class; label points outside the input get background.

    Parameters
    ----------
    image:
        ``[1, Z, Y, X]`` float.
    target:
        ``[1, Z, Y, X]`` integer labels.
    matrix:
        3x3 over (z, y, x) offsets from the centre.
    patch_size:
        output (z, y, x), at most the input's size.
    """
    out_shape = [int(s) for s in (image.shape[1:] if patch_size is None else patch_size)]
    size_in = np.array(image.shape[1:], dtype=np.float64)  # z, y, x
    size_out = np.array(out_shape, dtype=np.float64)
    offset = np.array(crop_offset(image.shape[1:], out_shape), dtype=np.float64)
    shift = offset + size_out / 2 - size_in / 2  # the output's centre sits on the centred crop's
    # affine_grid works in normalised (x, y, z) coordinates, u = offset / (n / 2) (align_corners=False).
    half_in, half_out = size_in[::-1] / 2.0, size_out[::-1] / 2.0
    theta = np.zeros((1, 3, 4))
    theta[0, :, :3] = np.asarray(matrix)[::-1, ::-1] * half_out[None, :] / half_in[:, None]
    theta[0, :, 3] = shift[::-1] / half_in
    theta_t = torch.as_tensor(theta, dtype=torch.float32).to(image.device, non_blocking=True)
    grid = F.affine_grid(theta_t, [1, 1, *out_shape], align_corners=False)
    img = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    lab = F.grid_sample(
        target[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[0]
    return img, lab.round().to(target.dtype)


def add_noise(image: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """Add zero-mean Gaussian noise of standard deviation ``std``.

    batchgeneratorsv2 ``GaussianNoiseTransform``, whose ``noise_variance`` is drawn and used as the standard
    deviation.

    The field is drawn on the image's device from a torch generator seeded with ``seed``, so a CUDA sample
    never waits for a host-drawn field (1.6 million numbers a sample at the paper patch); the same seed on
    another device type gives another field of the same distribution.

    Parameters
    ----------
    image:
        ``[C, Z, Y, X]`` float.
    std:
        standard deviation.
    seed:
        seeds the field.
    """
    generator = torch.Generator(device=image.device)
    generator.manual_seed(int(seed))
    noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
    return image + noise * std


def gaussian_kernel(sigma: float) -> np.ndarray:
    """batchgeneratorsv2's 1-D Gaussian kernel: odd size nearest to ``6 sigma + 0.5``, normalised.

    Parameters
    ----------
    sigma:
        standard deviation in voxels.
    """
    raw = sigma * BLUR_TRUNCATE + 0.5
    size = round(raw)
    if size % 2 == 0:
        size = size + 1 if raw - size >= 0 else size - 1
    half = (size - 1) / 2
    x = np.linspace(-half, half, size)
    pdf = np.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def blur(image: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per axis (batchgeneratorsv2 ``GaussianBlurTransform``).

    Each axis is padded by reflection and convolved with :func:`gaussian_kernel`.

    Parameters
    ----------
    image:
        ``[C, Z, Y, X]`` float.
    sigmas:
        (z, y, x) standard deviations in voxels.
    """
    x = image[None]  # 1, c, z, y, x
    channels = image.shape[0]
    for axis, sigma in enumerate(sigmas):
        kernel = torch.as_tensor(gaussian_kernel(float(sigma)), dtype=image.dtype).to(image.device)
        half = kernel.numel() // 2
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = half  # F.pad lists the last axis first
        weight = kernel.reshape(1, 1, *shape).expand(channels, 1, *shape)
        x = F.conv3d(F.pad(x, pad, mode="reflect"), weight, groups=channels)
    return x[0]


def low_resolution(image: torch.Tensor, zoom: float) -> torch.Tensor:
    """Simulate a coarser scan: nearest-neighbour down to ``zoom`` of the size, trilinear back up.

    batchgeneratorsv2 ``SimulateLowResolutionTransform`` (``nearest-exact`` down, ``trilinear`` up, the
    same zoom on every axis).

    Parameters
    ----------
    image:
        ``[C, Z, Y, X]`` float.
    zoom:
        size factor in (0, 1].
    """
    shape = [int(s) for s in image.shape[1:]]
    small = [max(1, round(s * zoom)) for s in shape]
    down = F.interpolate(image[None], size=small, mode="nearest-exact")
    return F.interpolate(down, size=shape, mode="trilinear", align_corners=False)[0]


def contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale deviations from the mean by ``factor``, clipped to the old range (batchgeneratorsv2
    ``ContrastTransform``, ``preserve_range=True``).

    Parameters
    ----------
    image:
        ``[C, Z, Y, X]`` float (one channel: statistics are over the whole sample).
    factor:
        contrast factor.
    """
    lo, hi, mean = image.min(), image.max(), image.mean()
    return ((image - mean) * factor + mean).clamp(lo, hi)


def gamma(image: torch.Tensor, exponent: float, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma transform with retained mean and std, optionally of the inverted image
    (batchgeneratorsv2 ``GammaTransform``, ``p_retain_stats=1``).

    Parameters
    ----------
    image:
        ``[C, Z, Y, X]`` float (one channel).
    exponent:
        gamma.
    invert:
        apply to ``-image`` and negate back.
    """
    x = -image if invert else image
    mean, std = x.mean(), x.std()
    lo, hi = x.min(), x.max()
    span = (hi - lo).clamp_min(1e-7)
    x = ((x - lo) / span).pow(exponent) * span + lo
    x = (x - x.mean()) / x.std().clamp_min(1e-7) * std + mean
    return -x if invert else x


def rotation_matrix(angles: Sequence[float] | np.ndarray) -> np.ndarray:
    """Rotation about the z, y and x axes (in that order) as a 3x3 matrix over (z, y, x) coordinates.

    Parameters
    ----------
    angles:
        radians about z, y, x.
    """
    a, b, c = (float(v) for v in angles)
    rz = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def enlarged_patch_size(
    patch_size: Sequence[int], rotation: float, scale_range: tuple[float, float] = (0.85, 1.25)
) -> tuple[int, int, int]:
    """nnU-Net v2's ``get_patch_size``: the crop that still covers ``patch_size`` after a rotation of up to
    ``rotation`` about each axis in turn and a zoom of ``min(scale_range)``.

    Per axis the largest extent of the patch's diagonal vector rotated about x, about y and about z (each
    angle capped at 90 degrees), divided by the smallest scale and truncated, as nnU-Net computes it (its
    ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` passes (0.85, 1.25)).

    Parameters
    ----------
    patch_size:
        the final patch (z, y, x).
    rotation:
        largest rotation in radians.
    scale_range:
        the zoom range whose minimum enlarges the crop.
    """
    coords = np.asarray(patch_size, dtype=np.float64)
    angle = min(abs(float(rotation)), math.pi / 2)
    shape = coords.copy()
    for axis in range(3):
        angles = [0.0, 0.0, 0.0]
        angles[axis] = angle
        # a row vector times the matrix, as batchgenerators' rotate_coords_3d
        shape = np.maximum(shape, np.abs(coords @ rotation_matrix(angles)))
    z, y, x = (int(v) for v in shape / min(scale_range))
    return z, y, x


def covering_crop_size(
    matrices: Sequence[np.ndarray | None], patch_size: Sequence[int]
) -> tuple[int, int, int]:
    """The smallest crop from which :func:`resample_affine` samples every one of ``matrices`` from image
    voxels only (linear interpolation included): the patch where no sample is resampled.

    An alternative to nnU-Net's fixed :func:`enlarged_patch_size` for a sampler that draws a batch's
    transforms before cutting it: the box grows only for the drawn rotations and zooms, by as much as they
    need (also where nnU-Net's box is too small: a zoom above 1 / 0.85, a rotation whose corner leaves it).
    Per axis ``n = m + 2 k`` with ``k = ceil(e - m / 2 + 1 / 2)``, ``e`` the largest offset of a patch
    voxel centre after the matrix, so the centred patch (:func:`crop_offset`) has ``k`` voxels each side.

    Parameters
    ----------
    matrices:
        each sample's 3x3 matrix (``input = matrix @ output``), ``None`` for a sample not resampled.
    patch_size:
        the final patch (z, y, x).
    """
    size = np.asarray(patch_size, dtype=np.float64)
    margin = np.zeros(3)
    for matrix in matrices:
        if matrix is not None:
            extent = np.abs(np.asarray(matrix)) @ ((size - 1) / 2)  # largest |offset| per axis
            margin = np.maximum(margin, np.ceil(extent - size / 2 + 0.5 - 1e-9))
    z, y, x = (int(v) for v in size + 2 * margin)
    return z, y, x
