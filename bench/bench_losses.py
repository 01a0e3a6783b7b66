"""Forward + backward time and peak memory of the paper's loss composition vs nnU-Net v2's DC_and_CE_loss.

Composition: ``{marginal: dice, ce, lovasz; exclusion: dice, ce, lovasz}`` (``fedpsmos.losses.build_loss``)
on a partially labelled batch (sample 0 labels liver, sample 1 labels spleen and both kidneys). Baseline,
measured in the same way on the same logits: ``nnunetv2.training.loss.compound_losses.DC_and_CE_loss`` with
nnU-Net's default 3d_fullres settings (batch Dice, smooth 1e-5, no background, MemoryEfficientSoftDiceLoss).

On CPU each case runs in a fresh spawned process, so ``ru_maxrss`` (a high-water mark) measures that case
alone; on CUDA ``torch.cuda.max_memory_allocated`` is reset between cases. Prints a table and one ``RESULT
{json}`` line.

    python bench/bench_losses.py --quick                 # [2, 6, 24, 48, 40], seconds
    python bench/bench_losses.py                         # [2, 6, 80, 160, 128], the paper's patch
    python bench/bench_losses.py --device cuda
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import statistics
import time
from typing import Any

import torch

FULL_SHAPE = (2, 6, 80, 160, 128)
QUICK_SHAPE = (2, 6, 24, 48, 40)
PAPER = {
    "marginal": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
    "exclusion": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
}


def make_batch(
    shape: tuple[int, ...], device: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits and a partially labelled target/mask of ``shape`` = (B, K, Z, Y, X)."""
    gen = torch.Generator().manual_seed(seed)
    batch, channels, *spatial = shape
    logits = torch.randn(shape, generator=gen)
    target = torch.randint(0, channels, (batch, 1, *spatial), generator=gen)
    labelled = torch.zeros(batch, channels, dtype=torch.bool)
    labelled[:, 0] = True
    labelled[0, 1] = True  # liver only
    labelled[1, [2, 4, 5]] = True  # spleen and kidneys
    for b in range(batch):
        target[b][~labelled[b % 2][target[b]]] = 0  # unlabelled organs read as background
    return logits.to(device), target.to(device), labelled.to(device)


def build(name: str) -> torch.nn.Module:
    """The loss under test (``ours``) or nnU-Net's baseline (``nnunet``)."""
    if name == "ours":
        from fedpsmos.losses import build_loss

        return build_loss(PAPER)
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss(
        {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )


def measure(name: str, shape: tuple[int, ...], device: str, repeats: int, threads: int) -> dict[str, Any]:
    """Median forward + backward seconds and peak extra memory (MiB) of one loss."""
    torch.set_num_threads(threads)
    logits, target, labelled = make_batch(shape, device, seed=0)
    loss = build(name)

    def step() -> None:
        leaf = logits.detach().requires_grad_(True)
        value = loss(leaf, target, labelled) if name == "ours" else loss(leaf, target)
        value.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    step()  # warm-up; also the memory high-water mark
    if device.startswith("cuda"):
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"name": name, "seconds": statistics.median(times), "peak_mib": peak_mib}


def run_case(name: str, shape: tuple[int, ...], device: str, repeats: int, threads: int) -> dict[str, Any]:
    """Run :func:`measure` in a fresh process on CPU (clean maxrss), in-process on CUDA."""
    if device.startswith("cuda"):
        return measure(name, shape, device, repeats, threads)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, name, shape, device, repeats, threads).result()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, time both losses, print the table and the ``RESULT`` line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--quick", action="store_true", help=f"small batch {QUICK_SHAPE} instead of {FULL_SHAPE}"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 2)
    baseline = run_case("nnunet", shape, args.device, repeats, args.threads)
    ours = run_case("ours", shape, args.device, repeats, args.threads)
    result = {
        "shape": list(shape),
        "device": args.device,
        "threads": args.threads,
        "baseline": "nnunetv2 DC_and_CE_loss (MemoryEfficientSoftDiceLoss, batch dice)",
        "baseline_seconds": round(baseline["seconds"], 4),
        "ours_seconds": round(ours["seconds"], 4),
        "time_ratio": round(ours["seconds"] / baseline["seconds"], 2),
        "baseline_peak_mib": round(baseline["peak_mib"], 1),
        "ours_peak_mib": round(ours["peak_mib"], 1),
        "memory_ratio": round(ours["peak_mib"] / max(baseline["peak_mib"], 1e-9), 2),
    }
    print(f"batch {shape} on {args.device}, forward + backward, median of {repeats}")
    for label, case in (("nnU-Net DC_and_CE_loss", baseline), ("marginal+exclusion D+CE+Lov", ours)):
        print(f"  {label:30s}{case['seconds']:8.3f} s   peak +{case['peak_mib']:8.1f} MiB")
    print(f"  ratio ours / nnU-Net: time {result['time_ratio']}x, peak memory {result['memory_ratio']}x")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
