"""Augmentation: each transform at nnU-Net's probability, the same draws on both paths, nnU-Net's statistics,
the enlarged crop, and the device-agnostic application (CPU tensors here; CUDA where present)."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from fedpsmos.organs import IGNORE_CLASS
from fedpsmos.training.augmentation import (
    DEFAULT_AUGMENTATION,
    EXTENDED_AUGMENTATION,
    AugmentationSettings,
    augment_batch,
    augmentation_settings,
    draw_parameters,
    enlarged_patch_size,
    input_patch_size,
    resolve_extended_augmentation,
)
from fedpsmos.training.transforms import (
    blur,
    contrast,
    covering_crop_size,
    crop_offset,
    gamma,
    low_resolution,
    resample_affine,
    rotation_matrix,
)

torch.set_num_threads(1)

SHAPE = (4, 8, 96)  # long x: a low-resolution zoom below 1 - 0.5 / 96 always changes the sample
DRAWS = 2000
ALL_OFF = {f.name: 0.0 for f in fields(AugmentationSettings) if f.name.startswith("p_")}
# Each transform alone at nnU-Net's probability, and the fraction of samples it must touch.
ALONE = {
    "rotation": ({"p_rotation": 0.2}, 0.2),
    "scaling": ({"p_scaling": 0.2}, 0.2),
    "noise": ({"p_noise": 0.1}, 0.1),
    "blur": ({"p_blur": 0.2, "p_blur_channel": 0.5}, 0.1),
    "brightness": ({"p_brightness": 0.15}, 0.15),
    "contrast": ({"p_contrast": 0.15}, 0.15),
    "low_resolution": ({"p_low_resolution": 0.25, "p_low_resolution_channel": 0.5}, 0.125),
    "gamma_inverted": ({"p_gamma_inverted": 0.1}, 0.1),
    "gamma": ({"p_gamma": 0.3}, 0.3),
    "mirror": ({"p_mirror": 0.5}, 0.75),  # z or y (or both) flipped
}
EXTENDED_ONLY = {"blur", "low_resolution"}


def _image(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> torch.Tensor:
    """A smooth ramp plus noise, ``[1, Z, Y, X]``: every transform changes it."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    ramp = 0.3 * z + 0.2 * y + 0.05 * x + rng.normal(0.0, 1.0, shape)
    return torch.from_numpy(ramp.astype(np.float32))[None]


@pytest.mark.parametrize("extended", [False, True], ids=["cpu_path", "extended_path"])
def test_each_transform_touches_samples_at_its_probability(extended: bool) -> None:
    # Prepare: batches of two samples; one transform on at nnU-Net's p, the others off
    image = _image()[None].repeat(2, 1, 1, 1, 1)  # b, 1, z, y, x
    target = torch.zeros_like(image, dtype=torch.uint8)
    for name, (probabilities, p) in ALONE.items():
        settings = AugmentationSettings(**{**ALL_OFF, **probabilities}, extended=extended)
        rng = np.random.default_rng(sum(map(ord, name)))
        # Execute
        touched = np.zeros((DRAWS // 2, 2), dtype=bool)
        for i in range(DRAWS // 2):
            out, _ = augment_batch(image, target, rng, settings)
            touched[i] = [not torch.equal(out[b], image[b]) for b in range(2)]
        # Assert: samples and batches within 4 binomial standard errors of p and 1 - (1 - p)^2
        if name in EXTENDED_ONLY and not extended:
            assert not touched.any(), name
            continue
        tolerance = 4 * math.sqrt(p * (1 - p) / DRAWS)
        assert abs(touched.mean() - p) < tolerance, (name, touched.mean(), p)
        batch_p = 1 - (1 - p) ** 2
        assert abs(touched.any(axis=1).mean() - batch_p) < 4 * math.sqrt(
            batch_p * (1 - batch_p) / (DRAWS // 2)
        )


def test_both_paths_draw_the_same_shared_transforms() -> None:
    # Prepare
    rng_cpu, rng_ext = np.random.default_rng(11), np.random.default_rng(11)
    # Execute
    cpu = [p for _ in range(300) for p in draw_parameters(rng_cpu, 2, DEFAULT_AUGMENTATION)]
    ext = [p for _ in range(300) for p in draw_parameters(rng_ext, 2, EXTENDED_AUGMENTATION)]
    # Assert: identical draws except blur and low resolution, which only the extended path applies
    for a, b in zip(cpu, ext, strict=True):
        assert (a.matrix is None) == (b.matrix is None) and (
            a.matrix is None or np.array_equal(a.matrix, b.matrix)
        )
        assert replace(a, matrix=None) == replace(b, matrix=None, blur=None, low_resolution=None)
        assert a.blur is None and a.low_resolution is None
    assert rng_cpu.random() == rng_ext.random()
    assert 0.05 < np.mean([p.blur is not None for p in ext]) < 0.15


def _stats(image: torch.Tensor) -> np.ndarray:
    """Mean, standard deviation and mean |x-gradient| of a sample (the last sees blur and low resolution)."""
    return np.array(
        [float(image.mean()), float(image.std()), float(image[..., 1:].sub(image[..., :-1]).abs().mean())]
    )


def _nnunet_transforms() -> dict[str, object]:
    """nnU-Net v2's default intensity transforms (``get_training_transforms``) with the transform applied."""
    pytest.importorskip("batchgeneratorsv2")
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform

    return {
        "noise": GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
        "blur": GaussianBlurTransform(
            blur_sigma=(0.5, 1.0), synchronize_channels=False, synchronize_axes=False, p_per_channel=1
        ),
        "brightness": MultiplicativeBrightnessTransform(BGContrast((0.75, 1.25)), False, p_per_channel=1),
        "contrast": ContrastTransform(BGContrast((0.75, 1.25)), True, False, p_per_channel=1),
        "low_resolution": SimulateLowResolutionTransform(
            scale=(0.5, 1),
            synchronize_channels=False,
            synchronize_axes=True,
            ignore_axes=None,
            p_per_channel=1,
        ),
        "gamma_inverted": GammaTransform(BGContrast((0.7, 1.5)), 1, False, 1, 1),
        "gamma": GammaTransform(BGContrast((0.7, 1.5)), 0, False, 1, 1),
    }


def test_intensity_statistics_match_nnunets_transforms() -> None:
    # Prepare: each intensity transform always applied, ours and nnU-Net's (batchgeneratorsv2, CPU)
    nnunet = _nnunet_transforms()
    image = _image((6, 10, 40), seed=1)
    n = 400
    for name, theirs in nnunet.items():
        probabilities = {f"p_{name}": 1.0, "p_blur_channel": 1.0, "p_low_resolution_channel": 1.0}
        settings = AugmentationSettings(**{**ALL_OFF, **probabilities}, extended=True)
        rng = np.random.default_rng(3)
        np.random.seed(3)
        torch.manual_seed(3)
        # Execute
        ours = np.stack(
            [_stats(augment_batch(image[None], image[None] * 0, rng, settings)[0][0]) for _ in range(n)]
        )
        base = np.stack([_stats(theirs(image=image.clone())["image"]) for _ in range(n)])
        # Assert: the mean of every statistic over the draws agrees within 4 standard errors
        spread = np.sqrt(ours.var(axis=0) / n + base.var(axis=0) / n) + 1e-6
        assert np.all(np.abs(ours.mean(axis=0) - base.mean(axis=0)) < 4 * spread), (
            name,
            ours.mean(0),
            base.mean(0),
        )
        assert ours.std(axis=0).max() > 0, name  # the draws vary


def test_operations_equal_nnunets_for_the_same_parameters() -> None:
    # Prepare
    pytest.importorskip("batchgeneratorsv2")
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import blur_dimension
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform

    image = _image((6, 10, 40), seed=2)
    sigmas = (0.5, 0.8, 1.0)
    low = SimulateLowResolutionTransform(0.6, False, True, None)
    one = {"apply_to_channel": torch.tensor([0])}
    # Execute
    theirs_blur = image
    for axis, sigma in enumerate(sigmas):
        theirs_blur = blur_dimension(theirs_blur, sigma, axis)
    theirs_low = low._apply_to_image(image.clone(), apply_to_channel=[0], scales=torch.tensor([[0.6] * 3]))
    theirs_contrast = ContrastTransform(1, True, False)._apply_to_image(
        image.clone(), **one, multipliers=torch.tensor([1.2])
    )
    theirs_gamma = GammaTransform(1, 1, False, 1, 1)._apply_to_image(
        image.clone(), **one, retain_stats=torch.tensor([True]), invert_image=torch.tensor([True]),
        gamma=torch.tensor([0.8]),
    )  # fmt: skip
    # Assert
    torch.testing.assert_close(blur(image, sigmas), theirs_blur, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low_resolution(image, 0.6), theirs_low, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(contrast(image, 1.2), theirs_contrast, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gamma(image, 0.8, invert=True), theirs_gamma, atol=1e-4, rtol=1e-4)


def test_enlarged_patch_size_is_nnunets_get_patch_size() -> None:
    # Prepare
    pytest.importorskip("nnunetv2")
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    cases = [((80, 160, 128), math.radians(30)), ((16, 32, 48), math.radians(15)), ((40, 20, 100), math.pi)]
    for patch, angle in cases:
        # Execute
        ours = enlarged_patch_size(patch, angle)
        theirs = get_patch_size(patch, (-angle, angle), (-angle, angle), (-angle, angle), (0.85, 1.25))
        # Assert
        assert ours == tuple(int(v) for v in theirs)
    assert enlarged_patch_size((80, 160, 128), math.radians(30)) == (175, 238, 177)
    assert input_patch_size((80, 160, 128), EXTENDED_AUGMENTATION) == (175, 238, 177)
    assert input_patch_size((80, 160, 128), DEFAULT_AUGMENTATION) == (80, 160, 128)


def test_enlarged_crop_rotates_image_content_in_instead_of_border_voxels() -> None:
    # Prepare: a linear ramp, which linear interpolation reproduces exactly wherever it samples the image
    patch, weights = (6, 12, 12), np.array([0.7, -0.4, 0.9])
    big = enlarged_patch_size(patch, math.radians(30))
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in big), indexing="ij"), axis=-1)
    ramp = torch.from_numpy((grid @ weights).astype(np.float32))[None]
    label = torch.from_numpy((grid[..., 2] % 3).astype(np.int64))[None]  # stripes along x
    matrix = rotation_matrix((0.0, 0.0, math.radians(28)))  # in the (z, y) plane, inside nnU-Net's crop
    offset = np.array(crop_offset(big, patch))
    small = ramp[:, offset[0] : offset[0] + 6, offset[1] : offset[1] + 12, offset[2] : offset[2] + 12]
    # Execute
    rotated, rotated_label = resample_affine(ramp, label, matrix, patch)
    rotated_small, _ = resample_affine(small, label[:, :6, :12, :12], matrix)
    unrotated, unrotated_label = resample_affine(ramp, label, np.eye(3), patch)
    # Assert: the exact rotated ramp everywhere from the enlarged crop; border repeats without it
    out = (
        np.stack(np.meshgrid(*(np.arange(s) for s in patch), indexing="ij"), axis=-1)
        + 0.5
        - np.array(patch) / 2
    )
    source = out @ matrix.T + offset + np.array(patch) / 2 - 0.5
    np.testing.assert_allclose(rotated[0].numpy(), source @ weights, atol=1e-3)
    assert np.abs(rotated_small[0].numpy() - (source - offset) @ weights).max() > 0.5
    torch.testing.assert_close(unrotated, small)
    assert torch.equal(
        unrotated_label,
        label[:, offset[0] : offset[0] + 6, offset[1] : offset[1] + 12, offset[2] :][..., :12],
    )
    assert set(rotated_label.unique().tolist()) <= {0, 1, 2}


def test_covering_crop_holds_every_drawn_transform_and_nothing_more() -> None:
    # Prepare: the drawn spatial transforms of 40 batches (rotation and zoom always on), a linear ramp
    patch, weights = (6, 10, 8), np.array([0.7, -0.4, 0.9])
    settings = AugmentationSettings(**{**ALL_OFF, "p_rotation": 1.0, "p_scaling": 1.0})
    rng = np.random.default_rng(4)
    for _ in range(40):
        matrices = [p.matrix for p in draw_parameters(rng, 2, settings)]
        # Execute
        size = covering_crop_size(matrices, patch)
        grid = np.stack(np.meshgrid(*(np.arange(s) for s in size), indexing="ij"), axis=-1)
        ramp = torch.from_numpy((grid @ weights).astype(np.float64))[None]
        label = torch.zeros_like(ramp, dtype=torch.uint8)
        # Assert: every sample is the exact transformed ramp (no border voxel repeated)
        offset = np.array(crop_offset(size, patch))
        out = np.stack(np.meshgrid(*(np.arange(s) for s in patch), indexing="ij"), axis=-1)
        lowest = np.full(3, np.inf)
        for matrix in matrices:
            source = (out + 0.5 - np.array(patch) / 2) @ matrix.T + offset + np.array(patch) / 2 - 0.5
            rotated = resample_affine(ramp.float(), label, matrix, patch)[0][0].numpy()
            np.testing.assert_allclose(rotated, source @ weights, atol=2e-3)
            lowest = np.minimum(lowest, source.reshape(-1, 3).min(axis=0))
        # and one voxel less on each side of an enlarged axis would leave the image
        enlarged = np.array(size) > np.array(patch)
        assert enlarged.any() and np.all(lowest[enlarged] < 1.0)
    assert covering_crop_size([None, None], patch) == patch
    assert covering_crop_size([np.eye(3) * 0.8], patch) == patch


def test_extended_batch_from_the_enlarged_crop_is_a_function_of_the_generator() -> None:
    # Prepare: every transform always on, an enlarged crop with the ignore label inside
    patch = (6, 12, 12)
    always = AugmentationSettings(**{k: 1.0 for k in ALL_OFF if k != "p_mirror"}, extended=True)
    size = input_patch_size(patch, always)
    image = torch.randn(2, 1, *size)
    target = torch.randint(0, 3, (2, 1, *size), dtype=torch.uint8)
    target[:, :, :, : size[1] // 2] = IGNORE_CLASS
    quiet = AugmentationSettings(**ALL_OFF, extended=True)
    # Execute
    a = augment_batch(image, target, np.random.default_rng(5), always, patch_size=patch)
    b = augment_batch(image, target, np.random.default_rng(5), always, patch_size=patch)
    c = augment_batch(image, target, np.random.default_rng(6), always, patch_size=patch)
    cropped = augment_batch(image, target, np.random.default_rng(5), quiet, patch_size=patch)
    # Assert
    assert a[0].shape == (2, 1, *patch) and a[1].dtype == torch.uint8
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert set(a[1].unique().tolist()) <= {0, 1, 2, IGNORE_CLASS}
    assert bool(torch.isfinite(a[0]).all())
    z, y, x = crop_offset(size, patch)
    assert torch.equal(cropped[0], image[:, :, z : z + 6, y : y + 12, x : x + 12])


def test_extended_setting_resolves_per_device() -> None:
    assert resolve_extended_augmentation("auto", "cuda:1") and not resolve_extended_augmentation(
        "auto", "cpu"
    )
    assert resolve_extended_augmentation(True, "cpu") and not resolve_extended_augmentation(False, "cuda")
    assert augmentation_settings(True) == EXTENDED_AUGMENTATION
    with pytest.raises(ValueError, match="training.extended_augmentation"):
        resolve_extended_augmentation("yes", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_equals_the_cpu_batch_without_noise() -> None:
    # Prepare
    patch = (8, 16, 16)
    settings = replace(EXTENDED_AUGMENTATION, p_noise=0.0, p_rotation=1.0, p_blur=1.0, p_low_resolution=1.0)
    size = input_patch_size(patch, settings)
    image, target = torch.randn(2, 1, *size), torch.randint(0, 3, (2, 1, *size))
    # Execute
    cpu = augment_batch(image, target, np.random.default_rng(0), settings, patch_size=patch)
    gpu = augment_batch(image.cuda(), target.cuda(), np.random.default_rng(0), settings, patch_size=patch)
    # Assert: the same draws; nearest-neighbour labels may differ only on exact ties
    assert gpu[0].device.type == "cuda"
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=1e-4)
    assert (gpu[1].cpu() != cpu[1]).float().mean() < 1e-3
