"""Benchmark: one training iteration of the Table 3 baselines (PIPO, PaNN) against the plain net's.

One iteration = forward, loss with deep supervision, backward, gradient clipping and an SGD step (nesterov,
momentum 0.99) on a batch of two patches (one fully labelled, one labelled for the liver only), at the default
config's patch [16, 32, 48] and network (``config.yaml``'s ``network`` section, six output classes). Cases,
measured in the same process on the same batch, each with its own network (same seed) and optimiser:

- ``plain``: PlainConvUNet + the default loss (``losses.default`` of config.yaml, built by ``build_loss``),
  the baseline every ratio is against;
- ``pipo``: PIPO (:mod:`fedpsmos.pipo`) + its target adaptive loss, marginal Dice + CE;
- ``panns``: PlainConvUNet + PaNN's prior-aware loss (marginal Dice + CE and the prior KL term, weight 1),
  the prior being the class fractions of the fully labelled patch. Skipped with a message when
  ``fedpsmos.losses`` cannot build it;
- ``plain_marginal``: PlainConvUNet + marginal Dice + CE, PIPO's loss on the plain net, so
  ``ratio_pipo_over_plain_marginal`` is the cost of the architecture alone (the default loss's Lovasz and
  exclusion terms weigh much more than the network at this size).

The cases alternate within each round so drifting machine load affects all alike; the figure is the median
over ``--iterations`` rounds after a warm-up round.

    python bench/bench_baselines.py              # 5 timed rounds
    python bench/bench_baselines.py --quick      # 3 timed rounds
    python bench/bench_baselines.py --device cuda

Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from bench_training import make_batch

from fedpsmos.losses import DeepSupervisionLoss, build_loss
from fedpsmos.network import NetworkSpec, build_network

REPO = Path(__file__).resolve().parent.parent
PATCH = (16, 32, 48)  # config.yaml patches.size
MARGINAL_DICE_CE = {"marginal": {"dice": 1.0, "ce": 1.0}}
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def default_config() -> tuple[dict[str, Any], str, dict[str, Any]]:
    """config.yaml's network section, the name of its default loss combination and that combination."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    name = config["losses"]["default"]
    return config["network"], name, config["losses"]["combinations"][name]


def class_fractions(target: torch.Tensor, classes: int) -> list[float]:
    """Fraction of each class among the voxels of a label map (the prior of PaNN's loss)."""
    counts = torch.bincount(target.flatten(), minlength=classes)[:classes].double()
    counts = counts.clamp_min(1.0)  # a class absent from the patch keeps a tiny positive prior
    return [float(c) for c in counts / counts.sum()]


def make_step(net: torch.nn.Module, loss: torch.nn.Module) -> Callable[[Batch], float]:
    """A function running one training step of ``net`` with ``loss`` and returning its seconds."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, weight_decay=3e-5, nesterov=True)
    wrapped = DeepSupervisionLoss(loss)
    cuda = next(net.parameters()).device.type == "cuda"

    def step(batch: Batch) -> float:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        value = wrapped(net(batch[0]), batch[1], batch[2])
        value.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return step


def main() -> None:
    """Run the benchmark and print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed rounds instead of --iterations")
    parser.add_argument("--iterations", type=int, default=5, help="timed rounds (after a warm-up round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds = 3 if args.quick else args.iterations
    network, default_name, default_loss = default_config()
    batch: Batch = tuple(t.to(device) for t in make_batch(PATCH, seed=0))  # type: ignore[assignment]

    nets = {
        "plain": build_network(NetworkSpec.from_config(network, 6), seed=0),
        "pipo": build_network(NetworkSpec.from_config({**network, "architecture": "pipo"}, 6), seed=0),
        "plain_marginal": build_network(NetworkSpec.from_config(network, 6), seed=0),
    }
    losses: dict[str, torch.nn.Module] = {
        "plain": build_loss(default_loss),
        "pipo": build_loss(MARGINAL_DICE_CE),
        "plain_marginal": build_loss(MARGINAL_DICE_CE),
    }
    notes: dict[str, str] = {}
    try:
        prior = class_fractions(batch[1][0], 6)
        losses["panns"] = build_loss({**MARGINAL_DICE_CE, "prior_aware": {"prior": prior, "weight": 1.0}})
        nets["panns"] = build_network(NetworkSpec.from_config(network, 6), seed=0)
    except (ImportError, ValueError, TypeError) as error:
        notes["panns"] = f"skipped: PaNN's prior-aware loss is not available ({error})"
        print(notes["panns"], flush=True)
    steps = {name: make_step(net.to(device), losses[name]) for name, net in nets.items()}
    for step in steps.values():  # warm-up: allocator, kernels
        step(batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(step(batch))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    params = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    for name in steps:
        print(
            f"{name:14s} {seconds[name]:.3f} s/iteration ({seconds[name] / seconds['plain']:.2f}x plain), "
            f"{params[name]} parameters",
            flush=True,
        )
    result: dict[str, Any] = {
        "benchmark": "baseline_training_iteration",
        "device": str(device),
        "patch": list(PATCH),
        "batch": 2,
        "threads": args.threads,
        "rounds": rounds,
        "network": network,
        "baseline": f"PlainConvUNet + {default_name} (losses.default), same batch",
        "seconds_plain": round(seconds["plain"], 4),
        "parameters_plain": params["plain"],
        "seconds_pipo": round(seconds["pipo"], 4),
        "parameters_pipo": params["pipo"],
        "ratio_pipo_over_plain": round(seconds["pipo"] / seconds["plain"], 3),
        "parameter_ratio_pipo_over_plain": round(params["pipo"] / params["plain"], 3),
        "seconds_plain_marginal": round(seconds["plain_marginal"], 4),
        "ratio_pipo_over_plain_marginal": round(seconds["pipo"] / seconds["plain_marginal"], 3),
        "spread_seconds": {name: [round(min(t), 4), round(max(t), 4)] for name, t in times.items()},
    }
    if "panns" in seconds:
        result["seconds_panns"] = round(seconds["panns"], 4)
        result["ratio_panns_over_plain"] = round(seconds["panns"] / seconds["plain"], 3)
    else:
        result["note"] = notes["panns"]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
