"""Benchmark: host memory (peak RSS) of one trainer and of a federated block job with five site workers.

Both run as a child process of this script, on the paper network and patch [80, 160, 128] with paper-sized
cases (``bench_input_pipeline.make_cases`` / ``write_ours``, the project's preprocessing format) and tiny
iteration counts, since peak host memory is reached within the first iterations:

- ``trainer``: :class:`fedpsmos.training.trainer.Trainer` (its batch workers, where the tree's trainer has
  them) for ``--iterations`` iterations, what ``train_model`` runs for M0, the central and site-alone models;
- ``block``: :func:`fedpsmos.federated.blocks.run_block` for one round of ``--iterations`` local iterations
  at five sites, a coordinator and five spawned site workers (the paper config's block job).

Figures, in MiB: ``peak_rss`` of the child itself (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` as it
ends: the trainer, or the block's coordinator); ``largest_descendant`` (its ``RUSAGE_CHILDREN``
``ru_maxrss``, the largest of its finished children: a site worker or a batch worker); ``tree_peak``, the
largest sum of the resident memory of the child and all its descendants, sampled from ``/proc`` every
0.1 s (pages shared between processes count once per process, so this bounds the job's memory from above).
The ratio is the block's tree peak over the trainer's.

Where the training runs matters: on a CUDA device activations live on the GPU and the host holds the
model, the optimiser copy on the host while checkpointing, the batches in flight and the CUDA context; on
the CPU the activations are host memory too (several GiB at the paper patch per process), so a CPU run at
full size measures something else and needs a large machine. ``--quick`` (patch [16, 32, 32], small cases)
is the CPU check that the measurement works.

    python bench/bench_memory.py                     # CUDA if present, paper sizes
    python bench/bench_memory.py --quick --device cpu

Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

PAPER_SHAPE, PAPER_PATCH = (150, 230, 230), (80, 160, 128)
QUICK_SHAPE, QUICK_PATCH = (40, 80, 80), (16, 32, 32)
SITES = 5
PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from the parent ids in ``/proc/*/stat``."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, []))
    return out


def _rss_mib(pid: int) -> float:
    try:
        return int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * PAGE_MIB
    except (OSError, IndexError, ValueError):
        return 0.0  # the process ended between listing and reading


def run_child(command: list[str], timeout_s: float) -> dict[str, Any]:
    """Run a measured child; its own peak RSS (``wait4``), its JSON report and the sampled tree peak."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    tree_peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal tree_peak
        while not done.is_set():
            tree_peak = max(tree_peak, sum(_rss_mib(p) for p in _descendants(proc.pid)))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        stdout, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SystemExit(f"{command[2:4]} did not finish in {timeout_s:.0f} s") from None
    finally:
        done.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"measured child {command[2:4]} failed with exit code {proc.returncode}")
    report = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    report["tree_peak_mib"] = round(tree_peak, 1)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _self_report(extra: dict[str, Any]) -> None:
    """Print this (child) process's peak RSS and its finished children's largest, in MiB, as JSON."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": round(own, 1), "largest_descendant_mib": round(children, 1), **extra}))


def child_trainer(workdir: Path, device: str, patch: tuple[int, ...], iterations: int, workers: int) -> None:
    """The measured trainer (child process)."""
    from bench_gpu_step import make_trainer

    site = json_site(workdir, 0)
    setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer = make_trainer(site, patch, torch.device(device), workers)
    try:
        trainer.train_iterations(iterations)
    finally:
        getattr(trainer, "close", lambda: None)()
    _self_report({"imports_mib": round(setup, 1)})


def child_block(workdir: Path, device: str, patch: tuple[int, ...], iterations: int) -> None:
    """The measured block job: one round at five sites (child process, coordinator)."""
    from bench_gpu_step import TRAINING
    from bench_training import PAPER_LOSS

    from fedpsmos.federated import paths, rounds
    from fedpsmos.federated.blocks import run_block
    from fedpsmos.federated.site_setup import RoundPlan, local_settings
    from fedpsmos.network import build_network, paper_network_spec
    from fedpsmos.organs import ORGANS
    from fedpsmos.training.checkpoint import save_checkpoint

    spec = paper_network_spec(num_classes=6)
    m0 = workdir / "m0.pt"
    meta = {"network": spec.to_dict(), "organs": list(ORGANS)}
    save_checkpoint(m0, {"model": build_network(spec, seed=0).state_dict(), "meta": meta})
    setting = workdir / "federated" / "bench"
    rounds.init_global(m0, paths.global_model_path(setting, 0))
    run_block(
        setting_dir=setting,
        first_round=1,
        last_round=1,
        sites=[json_site(workdir, k) for k in range(SITES)],
        local=local_settings(loss_spec=PAPER_LOSS, training=TRAINING, patch_size=patch, device=device),
        plan=RoundPlan(local_iterations=iterations, seed=0, attempts=1, on_site_failure="fail"),
    )
    _self_report({})


def json_site(workdir: Path, k: int) -> Any:
    """Site ``k`` (all sites share the written cases: memory does not depend on which cases they are)."""
    from fedpsmos.training.site_data import SiteData

    data = json.loads((workdir / "site.json").read_text())
    cases = {c: Path(p) for c, p in data["cases"].items()}
    return SiteData(site=f"site{k + 1}", npz_paths=cases, patches=Path(data["patches"]))


def main() -> None:
    """Write the cases, run both children, print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"patch {list(QUICK_PATCH)}, small cases")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--iterations", type=int, default=2, help="training iterations (block: local ones)")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="batch workers (default 6, CPU 0)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--child", choices=["trainer", "block"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    patch = QUICK_PATCH if args.quick else PAPER_PATCH
    workers = args.workers if args.workers is not None else (0 if device == "cpu" else 6)
    if args.child == "trainer":
        return child_trainer(args.workdir, device, patch, args.iterations, workers)
    if args.child == "block":
        return child_block(args.workdir, device, patch, args.iterations)

    from bench_input_pipeline import make_cases, write_ours

    shape = QUICK_SHAPE if args.quick else PAPER_SHAPE
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        workdir = Path(tmp)
        site = write_ours(workdir / "cases", make_cases(shape, args.cases), patch)
        (workdir / "site.json").write_text(
            json.dumps(
                {"cases": {c: str(p) for c, p in site.npz_paths.items()}, "patches": str(site.patches)}
            )
        )
        common = ["--device", device, "--iterations", str(args.iterations), "--workdir", tmp]
        common += ["--workers", str(workers), *(["--quick"] if args.quick else [])]
        trainer = run_child([sys.executable, script, "--child", "trainer", *common], args.timeout)
        block = run_child([sys.executable, script, "--child", "block", *common], args.timeout)
    result = {
        "benchmark": "host_memory",
        "device": device,
        "patch": list(patch),
        "case_shape": list(shape),
        "iterations": args.iterations,
        "trainer_workers": workers,
        "sites": SITES,
        "trainer": trainer,
        "block": block,
        "baseline": "one trainer (tree peak RSS)",
        "ratio_block_over_trainer": round(block["tree_peak_mib"] / trainer["tree_peak_mib"], 2),
    }
    print(
        f"host memory on {device}: trainer {trainer['tree_peak_mib']:.0f} MiB "
        f"(process {trainer['peak_rss_mib']:.0f}), "
        f"block of {SITES} sites {block['tree_peak_mib']:.0f} MiB (coordinator {block['peak_rss_mib']:.0f}, "
        f"largest worker {block['largest_descendant_mib']:.0f})",
        flush=True,
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
