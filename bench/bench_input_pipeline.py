"""Benchmark: training batches a second at the paper patch, ours against nnU-Net v2's own data loader.

Data: ``--cases`` paper-sized preprocessed cases (150 x 230 x 230, the CT phantom of
``bench_preprocessing.make_ct`` normalised as preprocessing does, five organs), written twice into a temporary
folder from the same arrays: in the project's preprocessing output format (whatever
:mod:`fedpsmos.preprocessing` writes: ``storage.write_case`` when the tree has it, else the ``.npz``) with the
project's patch index (:func:`fedpsmos.patches.index_case`), and as an nnU-Net v2 ``nnUNetDatasetBlosc2``
(``save_case`` with the chunks and blocks its preprocessor derives from the patch, foreground locations as
its preprocessor samples them).

Pipelines, batch 2 at patch [80, 160, 128], each with ``--workers`` background workers (0: in this thread):

- ``ours_cpu``: :class:`~fedpsmos.training.sampler.PatchSampler` with augmentation in the worker (the CPU
  path: nnU-Net's transforms without blur, low resolution and the enlarged crop), through
  :class:`fedpsmos.training.loader.BatchLoader` when the tree has it;
- ``ours_cuda_worker``: what a worker does on a CUDA run, where the batch is augmented on the GPU: the
  enlarged crop (:func:`fedpsmos.training.augmentation.input_patch_size`, cut here at the patch index's
  corner) without augmentation;
- ``nnunet``: ``nnUNetDataLoader`` (initial patch from ``get_patch_size``, 33% foreground oversampling) with
  ``nnUNetTrainer.get_training_transforms`` at the same patch, rotation range (+-30 degrees) and mirror axes
  (z, y; see fedpsmos.training.augmentation "Laterality"), without deep-supervision target downsampling
  (our losses downsample on the device), in ``NonDetMultiThreadedAugmenter`` (``SingleThreadedAugmenter``
  for 0 workers) as ``nnUNetTrainer.get_dataloaders`` sets it up.

Each pipeline is warmed up (workers started, ``--warmup`` batches) and then timed over ``--batches``
batches; the pipelines take turns for ``--rounds`` rounds and the best round counts (a shared machine only
ever slows a round down). Printed: batches a second of each, the ratios ours / nnU-Net (goal >= 1.0), and
whether each feeds one paper-network step of 0.1 s (>= 10 batches a second; with more workers the rate grows
about linearly until the cores run out).

    python bench/bench_input_pipeline.py                  # paper sizes, 8 cases (a few minutes)
    python bench/bench_input_pipeline.py --quick          # small cases and patch, seconds

Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from bench_preprocessing import CLIP, MEAN, PAPER_SPACING, STD, make_ct

from fedpsmos.organs import CLASSES, labelled_mask
from fedpsmos.patches import index_case
from fedpsmos.preprocessing import normalise_ct
from fedpsmos.training.augmentation import EXTENDED_AUGMENTATION, input_patch_size
from fedpsmos.training.sampler import PatchSampler
from fedpsmos.training.site_data import SiteData

PAPER_SHAPE, PAPER_PATCH = (150, 230, 230), (80, 160, 128)
QUICK_SHAPE, QUICK_PATCH = (40, 80, 80), (16, 32, 32)
BATCH = 2
STEP_S = 0.1  # a paper-network training step at nnU-Net's speed on a modern GPU
ROTATION = math.radians(30.0)
MIRROR_AXES = (0, 1)


def make_cases(shape: tuple[int, int, int], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` normalised CT-like images (float32) with their label maps (uint8)."""
    out = []
    for seed in range(n):
        ct, label = make_ct(shape, PAPER_SPACING, seed=seed)
        out.append((normalise_ct(ct, clip=CLIP, mean=MEAN, std=STD).astype(np.float32), label))
    return out


def write_ours(folder: Path, cases: list[tuple[np.ndarray, np.ndarray]], patch: tuple[int, ...]) -> SiteData:
    """The cases in the project's preprocessing output format, with the project's patch index."""
    folder.mkdir(parents=True)
    labelled = labelled_mask(CLASSES[1:])
    paths, frames = {}, []
    for i, (image, label) in enumerate(cases):
        case = f"bench_{i:03d}"
        arrays = {"image": image, "label": label, "labelled": labelled}
        try:
            from fedpsmos.preprocessing.storage import case_path, write_case  # the current format
        except ImportError:  # the tree before the storage module: one compressed .npz per case
            paths[case] = folder / f"{case}.npz"
            np.savez_compressed(paths[case], **arrays)
        else:
            paths[case] = case_path(folder, case)
            write_case(paths[case], arrays)
        frames.append(
            index_case(
                label,
                labelled,
                case=case,
                patch_size=patch,
                min_fraction=0.33,
                candidates_per_case=64,
                seed=0,
            )
        )
    index = folder / "patches.parquet"
    pd.concat(frames).to_parquet(index)
    return SiteData(site="bench", npz_paths=paths, patches=index)


def write_nnunet(folder: Path, cases: list[tuple[np.ndarray, np.ndarray]], patch: tuple[int, ...]) -> Any:
    """The cases as an nnU-Net v2 ``nnUNetDatasetBlosc2``, written as its preprocessor writes them."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    folder.mkdir(parents=True)
    for i, (image, label) in enumerate(cases):
        data, seg = image[None], label[None].astype(np.int16)
        blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
        locations = DefaultPreprocessor._sample_foreground_locations(seg, list(range(1, len(CLASSES))))
        properties = {"class_locations": locations, "shape_after_cropping_and_before_resampling": label.shape}
        nnUNetDatasetBlosc2.save_case(
            data, seg, properties, str(folder / f"bench_{i:03d}"),
            chunks=chunks, blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg,
        )  # fmt: skip
    return nnUNetDatasetBlosc2(str(folder))


def ours_stream(
    site: SiteData, patch: tuple[int, ...], augment: bool, workers: int
) -> tuple[Iterator, Callable]:
    """Batches of our sampler (through the background loader when ``workers`` > 0); and a closer."""
    sampler = PatchSampler([site], patch_size=patch, patches_per_iteration=BATCH, seed=0, augment=augment)
    try:
        from fedpsmos.training.loader import BatchLoader
    except ImportError:
        BatchLoader = None  # noqa: N806 - the tree before the background loader
    if workers > 0 and BatchLoader is not None:
        loader = BatchLoader(sampler, workers=workers)
        return iter(loader.stream(0, 0)), loader.close
    if workers > 0:
        raise SystemExit("this tree has no fedpsmos.training.loader: run with --workers 0")
    if hasattr(sampler, "batch"):
        return (sampler.batch(i) for i in range(10**9)), lambda: None
    return (sampler.next_batch() for _ in range(10**9)), lambda: None


def nnunet_stream(dataset: Any, patch: tuple[int, ...], workers: int) -> tuple[Iterator, Callable]:
    """nnU-Net v2's training batches, set up as ``nnUNetTrainer.get_dataloaders`` does; and a closer."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    rotation = (-ROTATION, ROTATION)
    initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
    transforms = nnUNetTrainer.get_training_transforms(patch, rotation, None, MIRROR_AXES, False)
    labels = LabelManager({name: i for i, name in enumerate(CLASSES)}, regions_class_order=None)
    loader = nnUNetDataLoader(
        dataset, BATCH, initial, patch, labels, oversample_foreground_percent=0.33, transforms=transforms
    )
    if workers == 0:
        return SingleThreadedAugmenter(loader, None), lambda: None
    augmenter = NonDetMultiThreadedAugmenter(
        loader, None, num_processes=workers, num_cached=max(6, workers // 2), seeds=None, pin_memory=False,
        wait_time=0.002,
    )  # fmt: skip
    return augmenter, augmenter._finish


def batches_per_second(stream: Iterator, warmup: int, batches: int) -> float:
    """Batches a second over ``batches`` batches after ``warmup`` ones."""
    for _ in range(warmup):
        next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches / (time.perf_counter() - started)


def main() -> None:
    """Run the benchmark and print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"cases {QUICK_SHAPE}, patch {list(QUICK_PATCH)}"
    )
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument(
        "--workers", type=int, default=1, help="background workers of every pipeline (0: none)"
    )
    parser.add_argument(
        "--batches", type=int, default=None, help="timed batches a round (default 20, quick 5)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # each pipeline decodes and augments on one core a worker
    shape, patch = (QUICK_SHAPE, QUICK_PATCH) if args.quick else (PAPER_SHAPE, PAPER_PATCH)
    timed = args.batches or (5 if args.quick else 20)
    enlarged = input_patch_size(patch, EXTENDED_AUGMENTATION)

    with tempfile.TemporaryDirectory(prefix="bench_input_pipeline_") as tmp:
        cases = make_cases(shape, args.cases)
        site = write_ours(Path(tmp) / "ours", cases, patch)
        dataset = write_nnunet(Path(tmp) / "nnunet", cases, patch)
        del cases
        pipelines: dict[str, Callable[[], tuple[Iterator, Callable]]] = {
            "ours_cpu": lambda: ours_stream(site, patch, True, args.workers),
            "ours_cuda_worker": lambda: ours_stream(site, enlarged, False, args.workers),
            "nnunet": lambda: nnunet_stream(dataset, patch, args.workers),
        }
        rates: dict[str, list[float]] = {name: [] for name in pipelines}
        shutdown_errors: list[str] = []
        for _ in range(args.rounds):
            for name, start in pipelines.items():
                stream, close = start()
                try:
                    rates[name].append(batches_per_second(stream, args.warmup, timed))
                finally:
                    try:
                        close()
                    except RuntimeError as error:  # a worker dying at shutdown: measured, but say so
                        shutdown_errors.append(f"{name}: {error}")
                print(f"{name}: {rates[name][-1]:.2f} batches/s", file=sys.stderr, flush=True)
        storage = sorted({Path(p).suffix for p in site.npz_paths.values()})

    best = {name: max(values) for name, values in rates.items()}
    result = {
        "benchmark": "input_pipeline",
        "case_shape": list(shape),
        "cases": args.cases,
        "patch": list(patch),
        "enlarged_patch": list(enlarged),
        "batch": BATCH,
        "workers": args.workers,
        "storage": storage,
        "batches_per_second": {k: round(v, 2) for k, v in best.items()},
        "rounds": {k: [round(v, 2) for v in values] for k, values in rates.items()},
        "baseline": "nnunetv2 nnUNetDataLoader + get_training_transforms, same cases and workers",
        "ratio_ours_cpu_over_nnunet": round(best["ours_cpu"] / best["nnunet"], 2),
        "ratio_ours_cuda_worker_over_nnunet": round(best["ours_cuda_worker"] / best["nnunet"], 2),
        "shutdown_errors": shutdown_errors,
        "feeds_paper_step": {k: bool(v * STEP_S >= 1.0) for k, v in best.items()},
        "workers_for_paper_step": {
            k: math.ceil(max(args.workers, 1) / (v * STEP_S)) for k, v in best.items()
        },
    }
    print(
        f"batches/s with {args.workers} worker(s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in best.items())
        + f"; ours/nnU-Net {result['ratio_ours_cpu_over_nnunet']} (CPU path), "
        f"{result['ratio_ours_cuda_worker_over_nnunet']} (CUDA worker); feeds a 0.1 s step: "
        f"{result['feeds_paper_step']}",
        flush=True,
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
