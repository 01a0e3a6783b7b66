"""Benchmark: one paper-network training iteration on the GPU, ours against nnU-Net v2's ``train_step``.

Three figures on one card, in one process, at the paper's network
(:func:`fedpsmos.network.paper_network_spec`), patch [80, 160, 128] and batch 2 (one fully labelled sample,
one labelled for the liver only):

- ``ours_step_ms``: the workflow's step (:class:`fedpsmos.training.trainer.Trainer`'s own model, loss,
  optimiser, precision and gradient scaler: forward and loss under its autocast, backward, clipping to norm
  12, SGD) on a fixed batch that starts in pinned host memory;
- ``nnunet_step_ms``: nnU-Net v2's ``nnUNetTrainer.train_step`` itself (float16 autocast and its GradScaler
  on CUDA) with its ``DC_and_CE_loss`` in ``DeepSupervisionWrapper``, nnU-Net's SGD, the same network
  topology and batch, deep-supervision targets made on the host as its data loader does; the ratio
  ours / nnU-Net has the goal <= 1.0;
- ``loop_ms``: :meth:`Trainer.train_iterations` over ``--iterations`` iterations (default 250, an epoch) on
  paper-sized cases written in the project's format (``bench_input_pipeline.write_ours``), batches from the
  trainer's own feed (background workers where the tree has them, augmentation on the GPU on CUDA); the ratio
  loop / bare step has the goal <= 1.10.

Also reported: the extended augmentation of one batch on the device (enlarged crop in, paper patch out) and
each phase's peak GPU memory. Every phase is warmed up (cuDNN benchmark picks its kernels) and timed between
``torch.cuda.synchronize()`` calls.

Without a CUDA device it prints ``no GPU`` (and a RESULT line saying so) and exits 0, unless ``--device cpu``
asks for a CPU run: ``--device cpu --iterations 2 --quick`` runs every phase at patch [16, 32, 32] on small
cases (``--quick`` alone implies those on the CPU), so the script is tested to run.

    python bench/bench_gpu_step.py                         # a CUDA device, paper sizes (a few minutes)
    python bench/bench_gpu_step.py --device cpu --quick    # CPU smoke run, seconds

Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_input_pipeline import make_cases, write_ours
from bench_training import PAPER_LOSS, make_batch

from fedpsmos.losses import deep_supervision_weights
from fedpsmos.network import build_network, paper_network_spec
from fedpsmos.training.augmentation import EXTENDED_AUGMENTATION, augment_batch, input_patch_size
from fedpsmos.training.trainer import GRAD_CLIP_NORM, Trainer, TrainSettings

PAPER_SHAPE, PAPER_PATCH = (150, 230, 230), (80, 160, 128)
QUICK_SHAPE, QUICK_PATCH = (40, 80, 80), (16, 32, 32)
TRAINING = {  # config/paper.yaml's training section (the values a step depends on)
    "patches_per_iteration": 2,
    "iterations_per_epoch": 250,
    "lr": 0.01,
    "momentum": 0.99,
    "weight_decay": 3.0e-5,
    "plateau": {"window": 10, "min_decrease": 0.001, "factor": 0.8},
    "augmentation": True,
}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device, warmup: int, iterations: int) -> float:
    """Milliseconds per call of ``fn`` over ``iterations`` calls after ``warmup`` ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / iterations * 1000


def peak_mib(device: torch.device) -> float | None:
    """Peak GPU memory since the last reset (None on the CPU), and reset it."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 1)


def make_trainer(site: Any, patch: tuple[int, ...], device: torch.device, workers: int) -> Trainer:
    """The workflow's trainer on the paper network (workers where this tree's Trainer takes them)."""
    options: dict[str, Any] = {}
    if "workers" in inspect.signature(Trainer).parameters:
        options["workers"] = workers
    return Trainer(
        model=build_network(paper_network_spec(num_classes=6), seed=0),
        sites=[site],
        loss_spec=PAPER_LOSS,
        settings=TrainSettings.from_config(TRAINING),
        seed=0,
        device=device,
        patch_size=patch,
        **options,
    )


def ours_step(trainer: Trainer, batch: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """The trainer's own step on a fixed host batch (its model, loss, optimiser, precision and scaler)."""
    from contextlib import nullcontext

    try:
        from fedpsmos.precision import autocast
    except ImportError:  # the tree before mixed precision: float32
        autocast = None
    scaler = getattr(trainer, "scaler", None)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def step() -> None:
        image, target, labelled = (t.to(trainer.device, non_blocking=True) for t in batch)
        trainer.optimizer.zero_grad(set_to_none=True)
        context = autocast(trainer.precision, trainer.device) if autocast else nullcontext()
        with context:
            loss = trainer.loss(trainer.model(image), target, labelled)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(trainer.optimizer)
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM)
            scaler.step(trainer.optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM)
            trainer.optimizer.step()

    return step


def nnunet_step(batch: tuple[torch.Tensor, ...], device: torch.device) -> Callable[[], object]:
    """nnU-Net v2's ``nnUNetTrainer.train_step`` with its loss, optimiser and scaler on the same batch."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    spec = paper_network_spec(num_classes=6)
    # train_step reads only these attributes; the constructor would want plans, dataset and result folders.
    trainer = nnUNetTrainer.__new__(nnUNetTrainer)
    trainer.device = device
    trainer.network = build_network(spec, seed=0).to(device)
    trainer.optimizer = torch.optim.SGD(
        trainer.network.parameters(), lr=0.01, weight_decay=3e-5, momentum=0.99, nesterov=True
    )
    trainer.grad_scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    dice = {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}
    trainer.loss = DeepSupervisionWrapper(
        DC_and_CE_loss(dice, {}, weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss),
        deep_supervision_weights(spec.n_stages - 1),
    )
    image, target = batch[0], batch[1]
    with torch.no_grad():
        shapes = [o.shape[2:] for o in trainer.network(image.to(device))]
    # nnU-Net's data loader makes the deep-supervision targets on the host (int16, nearest)
    targets = [F.interpolate(target.float(), size=s, mode="nearest").to(torch.int16) for s in shapes]
    if device.type == "cuda":
        image, targets = image.pin_memory(), [t.pin_memory() for t in targets]
    return lambda: trainer.train_step({"data": image, "target": targets})


def main() -> None:
    """Run the benchmark and print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda, else no run")
    parser.add_argument("--quick", action="store_true", help=f"patch {list(QUICK_PATCH)}, small cases")
    parser.add_argument("--iterations", type=int, default=250, help="timed iterations of every phase")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed iterations first (default 10, CPU 1)"
    )
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument(
        "--workers", type=int, default=None, help="trainer's batch workers (default 6, CPU 0)"
    )
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        print("no GPU: a CUDA device is needed (or --device cpu for a small CPU run)", flush=True)
        print("RESULT " + json.dumps({"benchmark": "gpu_step", "skipped": "no GPU"}), flush=True)
        return
    device = torch.device(args.device or "cuda")
    quick = args.quick or device.type == "cpu"
    shape, patch = (QUICK_SHAPE, QUICK_PATCH) if quick else (PAPER_SHAPE, PAPER_PATCH)
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 10)
    iterations = 2 if device.type == "cpu" and args.iterations == 250 else args.iterations
    batch = make_batch(patch, seed=0)
    if device.type == "cuda":
        batch = tuple(t.pin_memory() for t in batch)

    result: dict[str, Any] = {
        "benchmark": "gpu_step",
        "device": str(device),
        "patch": list(patch),
        "batch": 2,
    }
    workers = args.workers if args.workers is not None else (0 if device.type == "cpu" else 6)
    result["workers"] = workers
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="bench_gpu_step_") as tmp:
        site = write_ours(Path(tmp) / "cases", make_cases(shape, args.cases), patch)
        trainer = make_trainer(site, patch, device, workers)
        try:
            result["precision"] = getattr(trainer, "precision", "fp32")
            peak_mib(device)
            ours_ms = timed_ms(ours_step(trainer, batch), device, warmup, iterations)
            result["ours_peak_mib"] = peak_mib(device)
            if warmup:  # the trainer refuses a run of 0 iterations
                trainer.train_iterations(warmup)
            synchronize(device)
            started = time.perf_counter()
            trainer.train_iterations(iterations)
            synchronize(device)
            loop_ms = (time.perf_counter() - started) / iterations * 1000
            result["loop_peak_mib"] = peak_mib(device)
        finally:
            getattr(trainer, "close", lambda: None)()
        del trainer
    nnunet_ms = timed_ms(nnunet_step(batch, device), device, warmup, iterations)
    result["nnunet_peak_mib"] = peak_mib(device)

    size = input_patch_size(patch, EXTENDED_AUGMENTATION)
    image = torch.randn(2, 1, *size, device=device)
    target = torch.randint(0, 6, (2, 1, *size), dtype=torch.uint8, device=device)
    rng = np.random.default_rng(0)
    augment_ms = timed_ms(
        lambda: augment_batch(image, target, rng, EXTENDED_AUGMENTATION, patch_size=patch), device, 2, 20
    )
    result.update(
        iterations=iterations,
        ours_step_ms=round(ours_ms, 2),
        nnunet_step_ms=round(nnunet_ms, 2),
        loop_ms=round(loop_ms, 2),
        augment_on_device_ms=round(augment_ms, 2),
        enlarged_patch=list(size),
        baseline="nnunetv2 nnUNetTrainer.train_step (fp16 autocast + GradScaler on CUDA), same net and batch",
        ratio_ours_over_nnunet=round(ours_ms / nnunet_ms, 3),
        ratio_loop_over_step=round(loop_ms / ours_ms, 3),
        loop_within_10_percent=bool(loop_ms <= 1.10 * ours_ms),
    )
    print(
        f"{device}: ours {ours_ms:.1f} ms, nnU-Net train_step {nnunet_ms:.1f} ms "
        f"(ratio {result['ratio_ours_over_nnunet']}), training loop {loop_ms:.1f} ms an iteration "
        f"({result['ratio_loop_over_step']} of the bare step), augmentation on {device} {augment_ms:.1f} ms",
        flush=True,
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
