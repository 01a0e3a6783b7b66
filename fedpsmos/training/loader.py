"""Batches off the training thread: background worker processes, prefetch and pinned memory.

nnU-Net v2's trainer on a GPU makes its batches in background processes (batchgenerators'
``NonDetMultiThreadedAugmenter``: ``nnUNet_n_proc_DA`` workers, ``max(6, workers // 2)`` batches cached,
pinned memory when on CUDA) so that reading patches and augmenting them overlaps the GPU steps. This module
does the same with PyTorch's ``DataLoader`` over a :class:`~fedpsmos.training.sampler.PatchSampler`, with
one difference: the batches are deterministic. Batch ``i`` is a function of ``(seed, i)``
(:meth:`PatchSampler.batch`), its key is the pair, and the loader returns batches in key order, so the
batches, and a resumed run, are the same for 0, 1 or any number of workers (tested).

Choices (what nnU-Net v2 does on a GPU, unless said otherwise):

- ``workers`` (config ``training.workers``): ``auto`` takes the job's threads (Snakemake's ``threads``)
  minus one for the training process on a GPU, and none on the CPU (:func:`resolve_workers`: the CPU step
  needs every core); ``0`` makes batches in the training thread.
- Prefetch: :data:`PREFETCH` batches a worker (PyTorch's default); with the paper profile's 7 workers that is
  14 batches ahead, above nnU-Net's 6.
- Workers start with ``spawn`` (nothing is inherited from the training process: no CUDA context, no threads,
  no other site's data) and live as long as the loader (``persistent_workers``), so a federated block's site
  keeps one loader across its rounds (:mod:`fedpsmos.federated.site_round`).
- On CUDA the batches are copied into pinned memory by the loader's pin-memory thread, so the trainer's
  host-to-device copies are asynchronous; targets travel as uint8 (a quarter of int64 on the wire and over
  the bus) and become int64 on the device.
- Augmentation: on the CPU it runs in the worker; on CUDA the batch travels unaugmented and the trainer
  augments it on the device with the same generator :func:`~fedpsmos.training.sampler.augmentation_rng`
  ``(seed, i)`` (:class:`~fedpsmos.training.trainer.Trainer`).

A worker's exception is raised again in the training process with its message, which names the case file
(DataLoader keeps the exception's type); a worker that dies raises a ``RuntimeError``.
:meth:`BatchLoader.close` shuts the workers down, and the trainer calls it on every exit, exceptions
included.
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedpsmos.training.augmentation import augment_batch, augmentation_settings, resolve_extended_augmentation
from fedpsmos.training.sampler import PatchSampler, augmentation_rng
from fedpsmos.training.site_data import SiteData

if TYPE_CHECKING:
    from fedpsmos.training.trainer import TrainSettings

PREFETCH = 2  # batches in flight per worker


class Batch(NamedTuple):
    """One batch as a worker hands it over: ``target`` is uint8 (int64 once on the device)."""

    iteration: int
    image: torch.Tensor  # b, 1, z, y, x float32
    target: torch.Tensor  # b, 1, z, y, x uint8
    labelled: torch.Tensor  # b, k bool
    opened: tuple[str, ...]  # case files the worker opened for this batch (the site boundary, tested)


def resolve_workers(setting: int | str | None, threads: int, device: str | torch.device | None = None) -> int:
    """The number of loader worker processes for a ``training.workers`` setting and a job's threads.

    ``auto`` is what nnU-Net does on a GPU: the job's other threads make batches while the GPU trains. On the
    CPU the training step itself needs every thread, and the CPU path's batches (no blur, no low-resolution
    simulation, no enlarged crop) cost a small part of a CPU step, so ``auto`` makes them in the training
    thread there (a worker process would also cost a start-up per job, seconds for importing torch).

    Parameters
    ----------
    setting:
        ``"auto"`` (or ``None``): ``threads - 1`` on CUDA, one thread left to the training process, and 0
        on the CPU; an int >= 0: that many (0: batches in the training thread).
    threads:
        the job's threads (Snakemake's ``threads``).
    device:
        where training runs; ``None``: CUDA if available.
    """
    if setting is None or setting == "auto":
        on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return max(0, int(threads) - 1) if on_gpu else 0
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"training.workers must be 'auto' or an integer >= 0, got {setting!r}")
    return setting


class _Keys:
    """The keys ``(seed, i)`` for ``i = start, start + 1, ...``; set before each stream."""

    def __init__(self) -> None:
        self.seed, self.start = 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.seed, i) for i in itertools.count(self.start))


class _SamplerBatches(Dataset[Batch]):
    """A sampler as a map-style data set whose keys are ``(seed, iteration)``."""

    def __init__(self, sampler: PatchSampler) -> None:
        self.sampler = sampler

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        seed, iteration = key
        before = set(self.sampler.opened)
        image, target, labelled = self.sampler.batch(iteration, seed=seed)
        opened = tuple(str(p) for p in self.sampler.opened - before)
        return Batch(iteration, image, target.to(torch.uint8), labelled, opened)


def _as_is(batch: Any) -> Any:
    return batch  # batch_size=None: each key already makes a whole batch


def _leave_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one core a worker; blosc2 decodes with one thread too (storage.py)
    # Leave as a forked worker does, without the interpreter's shutdown: a spawned worker stopped while its
    # queue's feeder thread still hands over a batch would otherwise abort ("terminate called without an
    # active exception") as that thread is unwound inside torch's C++ code. Registered last, runs first.
    atexit.register(_leave_now)


class BatchLoader:
    """Batches ``(seed, i), (seed, i + 1), ...`` of a sampler, made by background worker processes."""

    def __init__(self, sampler: PatchSampler, *, workers: int, pin_memory: bool = False) -> None:
        """Set up the loader; the workers start with the first :meth:`stream`.

        Parameters
        ----------
        sampler:
            the sampler each worker gets a copy of (its seed and iteration are not used: every key carries
            them); only its sites' files are opened.
        workers:
            worker processes, >= 1.
        pin_memory:
            copy batches into pinned memory (when training on CUDA).
        """
        if workers < 1:
            raise ValueError(f"a BatchLoader needs at least one worker, got {workers}")
        self.sampler = sampler
        self.workers = int(workers)
        self._keys = _Keys()
        self._loader = DataLoader(
            _SamplerBatches(sampler),
            batch_size=None,
            sampler=self._keys,  # type: ignore[arg-type]
            num_workers=self.workers,
            collate_fn=_as_is,
            pin_memory=pin_memory,
            prefetch_factor=PREFETCH,
            persistent_workers=True,
            worker_init_fn=_init_worker,
            multiprocessing_context="spawn",
            generator=torch.Generator().manual_seed(0),  # not the global generator: training draws from it
        )
        self._generation = 0  # streams started; an older stream stops yielding

    @property
    def signature(self) -> tuple[Any, ...]:
        """The sampler's :attr:`~PatchSampler.signature`: what decides the batches besides the keys."""
        return self.sampler.signature

    def stream(self, seed: int, start: int) -> Iterator[Batch]:
        """Batches of iterations ``start, start + 1, ...`` for ``seed``, in order, without end.

        A new stream ends the previous one (its prefetched batches are dropped).

        Parameters
        ----------
        seed:
            the training run's (or round's) seed.
        start:
            the first iteration.
        """
        self._generation += 1
        self._keys.seed, self._keys.start = int(seed), int(start)
        # The first stream starts the workers; later ones reuse them (DataLoader drops what was in flight).
        # Either way the workers start on the first batches now, before the stream is read.
        return self._ordered(iter(self._loader), self._generation)

    def _ordered(self, batches: Iterator[Batch], generation: int) -> Iterator[Batch]:
        for batch in batches:
            if generation != self._generation:  # a newer stream or close() ended this one
                return
            yield batch

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty before the first stream and after :meth:`close`)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is None or getattr(iterator, "_shutdown", True):
            return []
        return [int(w.pid) for w in iterator._workers if w.pid is not None]

    def close(self) -> None:
        """Shut the worker processes down (idempotent); a later :meth:`stream` starts new ones."""
        self._generation += 1
        iterator = getattr(self._loader, "_iterator", None)
        self._loader._iterator = None
        if iterator is not None:
            iterator._shutdown_workers()  # what the iterator's finaliser calls, done now

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def training_sampler(
    sites: Sequence[SiteData],
    *,
    settings: TrainSettings,
    seed: int,
    device: torch.device,
    patch_size: Sequence[int],
    class_map: np.ndarray | None = None,
) -> PatchSampler:
    """The sampler a trainer draws from; on CUDA it leaves augmentation to the device (:class:`BatchFeed`).

    Parameters
    ----------
    sites:
        the training data.
    settings:
        batch size, augmentation and site sampling.
    seed:
        the run's (or round's) seed.
    device:
        where training runs.
    patch_size:
        (z, y, x) voxels.
    class_map:
        global class -> model class, see :class:`PatchSampler`.
    """
    return PatchSampler(
        sites,
        patch_size=patch_size,
        patches_per_iteration=settings.patches_per_iteration,
        seed=seed,
        augment=settings.augmentation and device.type != "cuda",
        class_map=class_map,
        site_sampling=settings.site_sampling,
        augmentation=(
            augmentation_settings(resolve_extended_augmentation(settings.extended_augmentation, device))
            if settings.augmentation
            else None
        ),
    )


class BatchFeed:
    """A trainer's batches on its device: made in the training thread (no workers) or by a
    :class:`BatchLoader`, then augmented on the device when the sampler leaves augmentation to it."""

    def __init__(
        self,
        sampler: PatchSampler,
        *,
        device: torch.device,
        augment_on_device: bool,
        workers: int = 0,
        loader: BatchLoader | None = None,
    ) -> None:
        """Set up the feed.

        Parameters
        ----------
        sampler:
            the trainer's sampler; its ``seed`` and ``iteration`` say which batch comes next.
        device:
            where the batches go.
        augment_on_device:
            augment on ``device`` with :func:`augmentation_rng` ``(seed, iteration)`` (CUDA).
        workers:
            worker processes of a loader this feed starts and owns (0: batches in the training thread).
        loader:
            a running loader to share (a federated site's, across its rounds); ``workers`` is then unused.
        """
        if loader is not None and loader.signature != sampler.signature:
            raise ValueError(
                "the shared BatchLoader draws from other data or settings than the trainer's sampler"
            )
        self.sampler = sampler
        self.device = device
        self.augment_on_device = bool(augment_on_device)
        self._owned = loader is None and workers > 0
        pin = device.type == "cuda"
        self.loader = (
            loader
            if loader is not None
            else (BatchLoader(sampler, workers=workers, pin_memory=pin) if workers > 0 else None)
        )
        self._stream: Iterator[Batch] | None = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next batch on the device: image float32, target int64, labelled bool; advances the sampler."""
        iteration = self.sampler.iteration
        if self.loader is None:
            image, target, labelled = self.sampler.next_batch()
        else:
            if self._stream is None:
                self._stream = self.loader.stream(self.sampler.seed, iteration)
            batch = next(self._stream)
            if batch.iteration != iteration:  # a stream is ordered; anything else is a bug
                raise RuntimeError(f"loader returned batch {batch.iteration}, expected {iteration}")
            self.sampler.opened.update(Path(p) for p in batch.opened)
            self.sampler.iteration += 1
            image, target, labelled = batch.image, batch.target, batch.labelled
        non_blocking = self.device.type == "cuda"  # pinned batches: asynchronous copies
        image = image.to(self.device, non_blocking=non_blocking)
        target = target.to(self.device, non_blocking=non_blocking).long()
        labelled = labelled.to(self.device, non_blocking=non_blocking)
        if self.augment_on_device:
            image, target = augment_batch(
                image,
                target,
                augmentation_rng(self.sampler.seed, iteration),
                self.sampler.augmentation,
                patch_size=self.sampler.patch_size,
            )
        return image, target, labelled

    def restart(self) -> None:
        """Drop the running stream (after the sampler's iteration changed, e.g. a restored state)."""
        self._stream = None

    def close(self) -> None:
        """End the stream and shut down the loader this feed owns (a shared one stays up)."""
        self._stream = None
        if self._owned and self.loader is not None:
            self.loader.close()
