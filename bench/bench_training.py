"""Benchmark: seconds per training iteration of the paper's network, against nnU-Net's own loss.

One iteration = forward, loss with deep supervision, backward, gradient clipping and an SGD step on a batch of
two patches (one fully labelled, one labelled for the liver only), the paper's network
(:func:`fedpsmos.network.paper_network_spec`) and patch [80, 160, 128]. Our loss is the paper's best
combination (Dice + CE + Lovasz, marginal and exclusion) through :class:`fedpsmos.losses.DeepSupervisionLoss`.
Baseline, measured in the same process on the same network and batch: nnU-Net v2's ``DC_and_CE_loss`` in its
``DeepSupervisionWrapper`` (what nnU-Net's own trainer runs), so the ratio is the cost of partial supervision.
Also reported: CPU augmentation time per batch and peak resident memory (ru_maxrss).

    python bench/bench_training.py            # paper patch, a warm-up and 1 timed iteration each (minutes)
    python bench/bench_training.py --quick    # patch [16, 32, 32]

Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from fedpsmos.losses import DeepSupervisionLoss, build_loss, deep_supervision_weights
from fedpsmos.network import build_network, paper_network_spec
from fedpsmos.organs import labelled_mask
from fedpsmos.training.augmentation import augment_batch

PAPER_PATCH = (80, 160, 128)
QUICK_PATCH = (16, 32, 32)  # the smallest multiple of the total stride (8, 32, 32) but one
PAPER_LOSS = {
    "marginal": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
    "exclusion": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
}


def make_batch(patch: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two patches with five box organs; sample 1 keeps only the liver (a partially labelled site)."""
    rng = np.random.default_rng(seed)
    target = np.zeros((2, 1, *patch), dtype=np.int64)
    z, y, x = patch
    for c in range(1, 6):
        z0, y0, x0 = rng.integers(0, z // 2), rng.integers(0, y // 2), rng.integers(0, x // 2)
        target[:, :, z0 : z0 + z // 3, y0 : y0 + y // 4, x0 : x0 + x // 4] = c
    target[1][target[1] > 1] = 0
    image = (rng.normal(size=target.shape) + target).astype(np.float32)
    mask = np.stack(
        [
            labelled_mask(["liver", "spleen", "pancreas", "kidney_left", "kidney_right"]),
            labelled_mask(["liver"]),
        ]
    )
    return torch.from_numpy(image), torch.from_numpy(target), torch.from_numpy(mask)


def make_step(net: torch.nn.Module):  # noqa: ANN201
    """A function running one training step with a given loss and returning its seconds."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, weight_decay=3e-5, nesterov=True)

    def step(loss_fn, batch) -> float:  # noqa: ANN001
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(batch[0]), batch[1], batch[2])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        optimizer.step()
        return time.perf_counter() - started

    return step


def main() -> None:
    """Run the benchmark and print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"patch {list(QUICK_PATCH)} instead of the paper's"
    )
    parser.add_argument(
        "--iterations", type=int, default=2, help="timed iterations per loss (after a warm-up)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patch = QUICK_PATCH if args.quick else PAPER_PATCH
    spec = paper_network_spec(num_classes=6)
    batch = make_batch(patch, seed=0)

    ours = DeepSupervisionLoss(build_loss(PAPER_LOSS))
    n_outputs = spec.n_stages - 1
    nnunet = DeepSupervisionWrapper(
        DC_and_CE_loss(
            {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            weight_ce=1,
            weight_dice=1,
            dice_class=MemoryEfficientSoftDiceLoss,
        ),
        deep_supervision_weights(n_outputs),
    )

    def baseline(outputs, target, _labelled):  # noqa: ANN001, ANN202
        # nnU-Net's data loader hands the wrapper nearest-downsampled targets; do the same work here.
        targets = [F.interpolate(target.float(), size=o.shape[2:], mode="nearest") for o in outputs]
        return nnunet(outputs, targets)

    net = build_network(spec, seed=0)
    step = make_step(net)
    step(ours, batch)  # warm-up: allocator, kernels
    step(baseline, batch)
    t_ours, t_base = [], []
    # Alternate the two so drifting machine load affects both alike.
    for _ in range(args.iterations):
        t_ours.append(step(ours, batch))
        t_base.append(step(baseline, batch))
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(5):
        augment_batch(batch[0], batch[1], rng)
    augmentation = (time.perf_counter() - started) / 5
    ours_s, base_s = statistics.median(t_ours), statistics.median(t_base)
    result = {
        "benchmark": "training_iteration",
        "patch": list(patch),
        "batch": 2,
        "threads": args.threads,
        "network_parameters": sum(p.numel() for p in net.parameters()),
        "seconds_per_iteration": round(ours_s, 3),
        "baseline": "nnunetv2 DC_and_CE_loss + DeepSupervisionWrapper, same network and batch",
        "baseline_seconds_per_iteration": round(base_s, 3),
        "ratio_vs_baseline": round(ours_s / base_s, 3),
        "augmentation_seconds_per_batch": round(augmentation, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
