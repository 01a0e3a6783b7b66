"""Batched sliding-window passes (and the CPU's filled last batch) give the same logits as one tile a pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpsmos.inference.sliding_window import compute_steps, predict_logits
from fedpsmos.network import NetworkSpec, build_network

torch.set_num_threads(2)


@pytest.mark.parametrize("batch_size", [4, 5, 7])
def test_batched_tiles_match_one_tile_per_pass(batch_size):
    # Prepare: a real PlainConvUNet (instance norm: per-sample statistics) and an odd number of tiles, so
    # the last batch is short and, on the CPU, filled with copies whose outputs must be dropped
    spec = NetworkSpec(
        features=(4, 8),
        strides=((1, 1, 1), (2, 2, 2)),
        kernel_sizes=((3, 3, 3), (3, 3, 3)),
        conv_per_stage=1,
        deep_supervision=False,
        num_classes=3,
    )
    net = build_network(spec, seed=0).eval()
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
