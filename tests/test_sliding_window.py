"""Sliding-window inference: tiling, Gaussian weights, padding, and agreement with nnU-Net v2's predictor."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian as nnunet_gaussian
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from torch import nn

from fedpsmos.inference.sliding_window import compute_gaussian, compute_steps, predict_logits
from fedpsmos.network import build_network
from tests.conftest import tiny_spec


def tiny_unet() -> nn.Module:
    """A real two-stage PlainConvUNet (instance norm: per-sample statistics), in eval mode."""
    spec = tiny_spec(3, deep_supervision=False)
    return build_network(spec, seed=0).eval()


def nnunet_coverage(shape: tuple[int, ...], patch: tuple[int, ...], step: float = 0.5) -> torch.Tensor:
    """The summed Gaussian weight nnU-Net's predictor divides each voxel by (its tiles and its Gaussian)."""
    gaussian = nnunet_gaussian(patch, 1.0 / 8, 1, dtype=torch.float64, device=torch.device("cpu"))
    weights = torch.zeros(shape, dtype=torch.float64)
    for start in itertools.product(*compute_steps_for_sliding_window(shape, patch, step)):
        weights[tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))] += gaussian
    return weights


class ConstantNet(nn.Module):
    """Returns the same logits at every voxel."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.values = nn.Parameter(torch.tensor(values), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values[None, :, None, None, None].expand(x.shape[0], -1, *x.shape[2:]).clone()


class EchoNet(nn.Module):
    """Echoes its input as channel 0 and its negation as channel 1: any misplaced tile shows in the output."""

    def __init__(self, deep_supervision: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.deep_supervision = deep_supervision

    def forward(self, x: torch.Tensor):
        out = torch.cat([x, -x], dim=1) * self.scale
        return [out, out[:, :, ::2, ::2, ::2]] if self.deep_supervision else out


@pytest.mark.parametrize("shape", [(5, 9, 13), (8, 16, 16), (17, 23, 31), (9, 40, 7)])
def test_constant_model_covers_every_voxel(shape):
    # Prepare
    net = ConstantNet([0.5, -1.0, 2.0])
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    # Execute
    logits = predict_logits(net, image, patch_size=(8, 16, 16), step=0.5, device="cpu")
    # Assert: a weighted mean of one constant is that constant wherever the summed weight is positive
    assert tuple(logits.shape) == (3, *shape)
    expected = torch.tensor([0.5, -1.0, 2.0])[:, None, None, None].expand_as(logits)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("shape", [(6, 11, 9), (19, 37, 29)])
def test_tiles_are_placed_where_they_were_cut(shape, mirror):
    # Prepare
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    # Execute
    logits = predict_logits(EchoNet(), image, patch_size=(8, 12, 10), step=0.5, mirror=mirror, device="cpu")
    # Assert
    torch.testing.assert_close(logits[0], torch.from_numpy(image), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], -torch.from_numpy(image), rtol=0, atol=1e-5)


def test_constant_logits_survive_batches_of_three_tiles():
    # Prepare
    image = np.zeros((10, 20, 20), dtype=np.float32)
    net = ConstantNet([0.0, np.log(3.0)])
    # Execute
    logits = predict_logits(net, image, patch_size=(6, 8, 8), batch_size=3, device="cpu")
    # Assert
    torch.testing.assert_close(logits[1], torch.full((10, 20, 20), float(np.log(3.0))), rtol=0, atol=1e-6)


def test_deep_supervision_output_uses_full_resolution_and_is_restored():
    # Prepare
    net = EchoNet(deep_supervision=True)
    net.decoder = SimpleNamespace(deep_supervision=True)  # type: ignore[assignment]
    image = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    # Execute
    logits = predict_logits(net, image, patch_size=(8, 8, 8), device="cpu")
    # Assert
    torch.testing.assert_close(logits[0], torch.from_numpy(image))
    assert net.decoder.deep_supervision is True


@pytest.mark.parametrize("image_size", [(8, 16, 16), (9, 31, 50), (110, 64, 65), (200, 160, 128)])
def test_steps_match_nnunet(image_size):
    patch = (8, 16, 16) if image_size[0] < 100 else (80, 64, 64)
    assert compute_steps(image_size, patch, 0.5) == compute_steps_for_sliding_window(image_size, patch, 0.5)


def test_gaussian_matches_nnunet_and_is_positive():
    # Execute
    ours = compute_gaussian((7, 12, 10))
    theirs = nnunet_gaussian((7, 12, 10), 1.0 / 8, 1, dtype=torch.float32, device=torch.device("cpu"))
    # Assert
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert ours.min() > 0 and ours.max() == 1.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tile step"):
        compute_steps((10, 10, 10), (4, 4, 4), 0.0)
    with pytest.raises(ValueError, match="Z, Y, X"):
        predict_logits(ConstantNet([0.0]), np.zeros((4, 4), np.float32), patch_size=(4, 4, 4), device="cpu")


def test_agrees_with_nnunet_predictor():
    # Prepare: a real (tiny) PlainConvUNet and nnU-Net's own predictor with the same settings
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    net = tiny_unet()
    image = np.random.default_rng(2).normal(size=(13, 21, 18)).astype(np.float32)
    patch = (8, 12, 12)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.network = net
    predictor.configuration_manager = SimpleNamespace(patch_size=list(patch))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=3)
    # Execute
    ours = predict_logits(net, image, patch_size=patch, step=0.5, device="cpu")
    theirs = predictor.predict_sliding_window_return_logits(torch.from_numpy(image)[None]).float()
    # Assert: nnU-Net accumulates in float16, which underflows in image corners covered only by a tile's
    # corner (weight ~1e-10); compare where the summed weight is representable, to float16 precision
    # (logits of a few units carry ~4e-3 of float16 rounding).
    assert tuple(theirs.shape) == tuple(ours.shape)
    trusted = nnunet_coverage(image.shape, patch) > 1e-3
    assert trusted.float().mean() > 0.5
    assert float((ours - theirs).abs()[:, trusted].max()) < 1e-2


@pytest.mark.parametrize("batch_size", [4, 5, 7])
def test_batched_tiles_match_one_tile_per_pass(batch_size):
    # Prepare: a real PlainConvUNet (instance norm: per-sample statistics) and an odd number of tiles, so
    # the last batch is short and, on the CPU, filled with copies whose outputs must be dropped
    net = tiny_unet()
    image = np.random.default_rng(3).normal(size=(13, 21, 18)).astype(np.float32)
    patch = (8, 12, 12)
    n_tiles = int(np.prod([len(s) for s in compute_steps(image.shape, patch, 0.5)]))
    assert n_tiles % batch_size != 0
    # Execute
    single = predict_logits(net, image, patch_size=patch, batch_size=1, device="cpu")
    batched = predict_logits(net, image, patch_size=patch, batch_size=batch_size, device="cpu")
    # Assert: equal up to the rounding of a different convolution kernel
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_bad_batch_size_raises():
    with pytest.raises(ValueError, match="batch_size"):
        predict_logits(
            torch.nn.Identity(), np.zeros((4, 4, 4), np.float32), patch_size=(4, 4, 4), batch_size=0
        )
