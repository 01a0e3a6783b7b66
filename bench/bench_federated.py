"""Benchmark of the federated round machinery: FedAvg cost and per-round overhead, as ratios.

1. Aggregation of five paper-size models (``paper_network_spec``) against the named baseline "reading the five
   site files from disk" (``load_checkpoint``, which also verifies their SHA-256), measured in this process.
2. Per-round overhead at the default tiny network (config.yaml ``network``, patch [24, 48, 48]): the cost the
   round machinery adds (a Python process start per job, checkpoint writes/reads, the aggregation of five
   sites) against the named baseline "the site's local training of the round" (``local_iterations``
   iterations of the Trainer), for the per-(round, site) rule layout and for a block of rounds.

Prints one ``RESULT {json}`` line. ``--quick``: a small network in part 1, 2 local iterations, one repetition.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedpsmos.federated.fedavg import aggregate, check_states
from fedpsmos.federated.paths import global_model_path
from fedpsmos.federated.rounds import init_global
from fedpsmos.federated.site_round import SiteRunner
from fedpsmos.federated.site_setup import LocalSettings, RoundPlan
from fedpsmos.network import NetworkSpec, build_network, paper_network_spec
from fedpsmos.organs import ORGANS, labelled_mask
from fedpsmos.preprocessing.storage import case_path, write_case
from fedpsmos.training.checkpoint import load_checkpoint, save_checkpoint
from fedpsmos.training.site_data import SiteData
from fedpsmos.training.trainer import TrainSettings

N_SITES = 5
TINY = {
    "features": [8, 16, 32, 64],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "kernel_sizes": [[3, 3, 3]] * 4,
    "conv_per_stage": 2,
    "deep_supervision": True,
}
TRAINING = {
    "patches_per_iteration": 2,
    "iterations_per_epoch": 10,
    "lr": 0.01,
    "momentum": 0.99,
    "weight_decay": 3e-5,
    "plateau": {"window": 10, "min_decrease": 0.001, "factor": 0.8},
    "augmentation": True,
}
LOSS = {
    "marginal": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
    "exclusion": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
}
PATCH = (24, 48, 48)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_aggregation(tmp: Path, quick: bool) -> dict[str, float]:
    """Aggregate five models vs read five model files."""
    spec = (
        paper_network_spec()
        if not quick
        else NetworkSpec.from_config({**TINY, "features": [16, 32, 64, 128]}, 6)
    )
    net = build_network(spec, seed=0)
    base = {key: v.clone() for key, v in net.state_dict().items()}
    paths = []
    for k in range(N_SITES):
        with torch.no_grad():  # perturb the parameters in place: the state dict keeps its shared storages
            for p in net.parameters():
                p.add_(1e-3)
        state = net.state_dict()
        paths.append(tmp / f"site{k}.pt")
        save_checkpoint(paths[-1], {"model": state, "meta": {"site": f"site{k}", "round": 1}})
    repeats = 2 if quick else 3
    read = _best(lambda: [load_checkpoint(p) for p in paths], repeats)
    states = [load_checkpoint(p)["model"] for p in paths]
    aggregate(states, [1, 2, 3, 4, 5])  # warm-up: first float64 allocations
    agg = _best(lambda: aggregate(states, [1, 2, 3, 4, 5]), repeats)
    check = _best(lambda: check_states(states, base, [f"site{k}" for k in range(N_SITES)], 1), repeats)
    n_params = sum(p.numel() for p in build_network(spec).parameters())
    mib = sum(p.stat().st_size for p in paths) / 2**20
    return {
        "params": n_params,
        "files_mib": round(mib, 1),
        "read_s": read,
        "aggregate_s": agg,
        "check_s": check,
        "aggregate_over_read": agg / read,
        "check_over_read": check / read,
    }


def _tiny_site(root: Path, rng: np.random.Generator) -> SiteData:
    folder = root / "site1"
    folder.mkdir(parents=True, exist_ok=True)
    npz, rows = {}, []
    for i in range(2):
        label = np.zeros((32, 64, 64), np.uint8)
        label[8:20, 16:40, 16:40] = 1
        image = (rng.normal(0, 1, label.shape) + 2 * label).astype(np.float32)
        npz[f"c{i}"] = case_path(folder, f"c{i}")
        write_case(npz[f"c{i}"], {"image": image, "label": label, "labelled": labelled_mask(("liver",))})
        rows += [
            {"case": f"c{i}", "z": 4, "y": 8, "x": 8, "organ": "liver", "fraction": 0.9, "site": "site1"}
        ]
    pd.DataFrame(rows).to_parquet(root / "site1.parquet")
    return SiteData(site="site1", npz_paths=npz, patches=root / "site1.parquet")


def bench_round_overhead(tmp: Path, quick: bool, local_iterations: int) -> dict[str, float]:
    """Per-round overhead (process start, file I/O, aggregation) vs the round's local training."""
    spec = NetworkSpec.from_config(TINY, 6)
    m0 = tmp / "m0.pt"
    save_checkpoint(
        m0,
        {
            "model": build_network(spec, seed=0).state_dict(),
            "meta": {"network": spec.to_dict(), "organs": list(ORGANS)},
        },
    )
    setting = tmp / "fed"
    init_global(m0, global_model_path(setting, 0))
    local = LocalSettings(loss_spec=LOSS, settings=TrainSettings.from_config(TRAINING), patch_size=PATCH)
    runner = SiteRunner(site_data=_tiny_site(tmp / "data", np.random.default_rng(0)), local=local)
    kwargs = dict(
        global_path=global_model_path(setting, 0),
        round_index=1,
        plan=RoundPlan(local_iterations=local_iterations, seed=0, attempts=1, on_site_failure="fail"),
    )
    runner.run_round(out_site=tmp / "warm.pt", out_private=tmp / "warm_p.pt", **kwargs)  # warm-up
    runner.trainer_state = None
    repeats = 3  # a round is short here: repeat even in --quick mode, so the differences below are not noise
    site_round = _best(
        lambda: runner.run_round(out_site=tmp / "s.pt", out_private=tmp / "p.pt", **kwargs), repeats
    )
    # the training part alone, measured the same way the runner does it
    model = runner._model_for(spec.to_dict())
    weights = load_checkpoint(global_model_path(setting, 0))["model"]
    train = _best(lambda: runner._train(model, weights, 1, local_iterations, 0), repeats)
    io_site = _best(
        lambda: (
            load_checkpoint(global_model_path(setting, 0)),
            load_checkpoint(tmp / "p.pt"),
            save_checkpoint(tmp / "s2.pt", load_checkpoint(tmp / "s.pt")),
            save_checkpoint(tmp / "p2.pt", load_checkpoint(tmp / "p.pt")),
        ),
        repeats,
    )
    states = [load_checkpoint(tmp / "s.pt")["model"]] * N_SITES
    agg = _best(
        lambda: (
            check_states(states, weights, [f"s{k}" for k in range(N_SITES)], 1),
            save_checkpoint(tmp / "g.pt", {"model": aggregate(states, [1] * N_SITES), "meta": {}}),
        ),
        repeats,
    )
    code = "import fedpsmos.federated.site_round, fedpsmos.training.trainer"
    start = _best(lambda: subprocess.run([sys.executable, "-c", code], check=True), repeats)
    # Rules: every (round, site) job and the aggregation job start a process; sites run in parallel, so a
    # round's critical path is one site job plus the aggregation job.
    # Everything a site's round does besides training (loading the global model, writing its files); best
    # times of two measurements, so clamp a difference lost in timer noise at zero.
    setup = max(0.0, site_round - train)
    rules = 2 * start + setup + io_site + agg
    block = setup + agg  # no process start, the private state is written but not re-read
    return {
        "local_iterations": local_iterations,
        "train_s": train,
        "site_round_s": site_round,
        "process_start_s": start,
        "site_io_s": io_site,
        "aggregate5_s": agg,
        "overhead_rules_over_train": rules / train,
        "overhead_block_over_train": block / train,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run both benchmarks and print ``RESULT {json}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small network, one repetition")
    parser.add_argument(
        "--local-iterations", type=int, default=10, help="local iterations a round (config V2)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "aggregation": bench_aggregation(Path(tmp) / "agg", args.quick),
            "round": bench_round_overhead(
                Path(tmp) / "round",
                args.quick,
                min(args.local_iterations, 2) if args.quick else args.local_iterations,
            ),
            "quick": args.quick,
            "threads": args.threads,
        }
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
