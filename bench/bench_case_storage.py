"""Benchmark: reading one training patch from a preprocessed case, per storage format, cold and warm.

At the paper's patch [80, 160, 128] from CT-like cases of 150 x 230 x 230 voxels (the paper's spacing; the
CT phantom of ``bench_preprocessing.make_ct``, clipped and normalised as preprocessing does), each format
stores image (float32) and label (uint8) and a patch of both is read at random corners:

- ``npz``: the previous format, ``np.savez_compressed`` (the baseline). Any read inflates the whole volume.
- ``npy``: uncompressed ``.npy`` files memory-mapped (``np.load(mmap_mode="r")``), nnU-Net v2 before 2.5.
- ``b2zip``: this project's format (:mod:`fedpsmos.preprocessing.storage`: blosc2 members mapped in place,
  as nnU-Net v2's ``nnUNetDatasetBlosc2``), opened with :func:`~fedpsmos.preprocessing.storage.open_case`.
- ``b2zip_small_chunks``: the same with smaller chunks (48, 96, 96) and blocks (16, 32, 32), against the
  project's chunks and blocks (those nnU-Net v2's ``comp_blosc2_params`` derives from the paper patch,
  reported as ``nnunet_chunks`` and ``nnunet_blocks`` for the measured shape and patch).

Figures per format (medians over corners and cases): ``cold_ms``, the file's pages evicted from the page
cache (``posix_fadvise(DONTNEED)``) and the file opened again (``b2zip``: its checksums were checked at the
first open, as in a process that read the case before); ``warm_ms``, the file opened again with its pages
cached; ``open_case_ms``, a patch from a case held open (the sampler keeps recently used cases open; for
``npz`` this is the old sampler's cache of decoded volumes); ``first_open_ms``, the first open in a
process (``b2zip``: with the SHA-256 check of every member); ``disk_mb`` and ``write_s`` per case. Ratios
are over the ``npz`` read (``cold_ms``).

Run: ``python bench/bench_case_storage.py [--quick] [--cases N] [--corners N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_preprocessing import CLIP, MEAN, PAPER_SPACING, STD, make_ct

from fedpsmos.preprocessing import normalise_ct, storage
from fedpsmos.training.sampler import crop_patch

PAPER_SHAPE, PAPER_PATCH = (150, 230, 230), (80, 160, 128)
QUICK_SHAPE, QUICK_PATCH = (60, 96, 96), (32, 64, 64)


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache, so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A normalised CT-like image (float32) and its label map (uint8) of ``shape``."""
    ct, label = make_ct(shape, PAPER_SPACING, seed=seed)
    return normalise_ct(ct, clip=CLIP, mean=MEAN, std=STD).astype(np.float32), label


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


class Format:
    """One storage format: write a case, open it, read a patch (image and label) from the open case."""

    suffixes: tuple[str, ...] = ()

    def write(self, stem: Path, image: np.ndarray, label: np.ndarray) -> None:
        raise NotImplementedError

    def files(self, stem: Path) -> list[Path]:
        return [stem.with_name(stem.name + s) for s in self.suffixes]

    def open(self, stem: Path) -> tuple[Any, Any]:
        """(image, label) as the format gives them: arrays in memory, memory maps or blosc2 arrays."""
        raise NotImplementedError

    def read_patch(self, stem: Path, corner: tuple[int, ...], size: tuple[int, ...]) -> tuple[Any, Any]:
        return self.crop(self.open(stem), corner, size)

    @staticmethod
    def crop(case: tuple[Any, Any], corner: tuple[int, ...], size: tuple[int, ...]) -> tuple[Any, Any]:
        return crop_patch(case[0], corner, size, 0.0), crop_patch(case[1], corner, size, 0)


class Npz(Format):
    suffixes = (".npz",)

    def write(self, stem: Path, image: np.ndarray, label: np.ndarray) -> None:
        np.savez_compressed(self.files(stem)[0], image=image, label=label)

    def open(self, stem: Path) -> tuple[Any, Any]:
        with np.load(self.files(stem)[0]) as data:  # inflates both volumes whole
            return data["image"], data["label"]


class Npy(Format):
    suffixes = (".image.npy", ".label.npy")

    def write(self, stem: Path, image: np.ndarray, label: np.ndarray) -> None:
        np.save(self.files(stem)[0], image)
        np.save(self.files(stem)[1], label)

    def open(self, stem: Path) -> tuple[Any, Any]:
        return np.load(self.files(stem)[0], mmap_mode="r"), np.load(self.files(stem)[1], mmap_mode="r")


class B2zip(Format):
    suffixes = (storage.CASE_SUFFIX,)

    def __init__(self, chunks: tuple[int, ...] = storage.CHUNKS, blocks: tuple[int, ...] = storage.BLOCKS):
        self.chunks, self.blocks = chunks, blocks

    def write(self, stem: Path, image: np.ndarray, label: np.ndarray) -> None:
        arrays = {"image": image, "label": label}
        storage.write_case(self.files(stem)[0], arrays, chunks=self.chunks, blocks=self.blocks)

    def open(self, stem: Path) -> tuple[Any, Any]:
        case = storage.open_case(self.files(stem)[0])
        return case.image, case.label


def nnunet_chunks(shape: tuple[int, ...], patch: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """nnU-Net v2's blosc2 (chunks, blocks) for a float32 case of ``shape`` and a training ``patch``."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    blocks, chunks = comp_blosc2_params((1, *shape), patch)
    return tuple(chunks[1:]), tuple(blocks[1:])


def measure(
    fmt: Format,
    stems: list[Path],
    cases: list[tuple[np.ndarray, np.ndarray]],
    corners: list[list[tuple[int, ...]]],
    patch: tuple[int, ...],
) -> dict[str, float]:
    """Write every case in ``fmt`` and time first-open, cold and warm patch reads."""
    write = [_ms(lambda s=s, c=c: fmt.write(s, *c)) / 1e3 for s, c in zip(stems, cases, strict=True)]
    first, cold, warm, held = [], [], [], []
    for stem, case_corners in zip(stems, corners, strict=True):
        first.append(_ms(lambda stem=stem, c=case_corners[0]: fmt.read_patch(stem, c, patch)))
        for corner in case_corners:
            for path in fmt.files(stem):
                evict(path)
            cold.append(_ms(lambda stem=stem, corner=corner: fmt.read_patch(stem, corner, patch)))
        for corner in case_corners:
            warm.append(_ms(lambda stem=stem, corner=corner: fmt.read_patch(stem, corner, patch)))
        case = fmt.open(stem)
        for corner in case_corners:
            held.append(_ms(lambda case=case, corner=corner: fmt.crop(case, corner, patch)))
    disk = [sum(p.stat().st_size for p in fmt.files(s)) / 1e6 for s in stems]
    return {
        "first_open_ms": float(np.median(first)),
        "cold_ms": float(np.median(cold)),
        "warm_ms": float(np.median(warm)),
        "open_case_ms": float(np.median(held)),
        "disk_mb": float(np.mean(disk)),
        "write_s": float(np.median(write)),
    }


def run(quick: bool, n_cases: int, n_corners: int) -> dict[str, object]:
    """Write ``n_cases`` cases in every format and time patch reads at ``n_corners`` corners each."""
    shape, patch = (QUICK_SHAPE, QUICK_PATCH) if quick else (PAPER_SHAPE, PAPER_PATCH)
    rng = np.random.default_rng(0)
    cases = [make_case(shape, seed) for seed in range(n_cases)]
    corners = [
        [
            tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch, strict=True))
            for _ in range(n_corners)
        ]
        for _ in cases
    ]
    chunks, blocks = nnunet_chunks(shape, patch)
    formats: dict[str, Format] = {
        "npz": Npz(),
        "npy": Npy(),
        "b2zip": B2zip(),
        "b2zip_small_chunks": B2zip((48, 96, 96), (16, 32, 32)),
    }
    folder = Path(tempfile.mkdtemp(prefix="bench_case_storage_", dir=os.environ.get("BENCH_TMP")))
    try:
        figures = {}
        for name, fmt in formats.items():
            stems = [folder / f"{name}_{i}" for i in range(n_cases)]
            figures[name] = measure(fmt, stems, cases, corners, patch)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    baseline = figures["npz"]["cold_ms"]
    return {
        "shape": list(shape),
        "patch": list(patch),
        "cases": n_cases,
        "corners_per_case": n_corners,
        "chunks": list(storage.CHUNKS),
        "blocks": list(storage.BLOCKS),
        "nnunet_chunks": list(chunks),
        "nnunet_blocks": list(blocks),
        "formats": figures,
        "ratio_b2zip_cold_over_npz": figures["b2zip"]["cold_ms"] / baseline,
        "ratio_b2zip_warm_over_npz": figures["b2zip"]["warm_ms"] / baseline,
        "ratio_npy_cold_over_npz": figures["npy"]["cold_ms"] / baseline,
        "ratio_b2zip_disk_over_npy": figures["b2zip"]["disk_mb"] / figures["npy"]["disk_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 x 96 x 96 cases, patch [32, 64, 64]")
    parser.add_argument("--cases", type=int, default=None, help="cases per format (default 4, quick 2)")
    parser.add_argument("--corners", type=int, default=None, help="corners per case (default 8, quick 4)")
    args = parser.parse_args()
    n_cases = args.cases or (2 if args.quick else 4)
    n_corners = args.corners or (4 if args.quick else 8)
    result = run(args.quick, n_cases, n_corners)
    for name, row in result["formats"].items():  # type: ignore[union-attr]
        print(f"{name:>22}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
