"""Batches off the training thread: the same batches and weights for 0, 1 and 2 workers, errors, shutdown."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpsmos.federated import blocks, paths, rounds
from fedpsmos.federated.site_setup import RoundPlan
from fedpsmos.network import NetworkSpec
from fedpsmos.training.checkpoint import load_checkpoint
from fedpsmos.training.epochs import train_model
from fedpsmos.training.loader import BatchFeed, BatchLoader, resolve_workers
from fedpsmos.training.sampler import PatchSampler
from fedpsmos.training.site_data import SamplerError
from fedpsmos.training.trainer import TrainSettings
from tests.test_rounds import ITERS, SEED, local, make_m0, make_sites, run_rounds, validation_of
from tests.test_sampler import PATCH, write_site
from tests.test_trainer import LOSS, NETWORK, TRAINING

torch.set_num_threads(1)

# Workers start with "spawn" and import torch: seconds each on a busy machine, so a few loaders serve many
# checks. PyTorch warns when the workers outnumber the cores; here that is on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _sites(root: Path) -> list:
    return [
        write_site(root, "site1", ("liver", "spleen", "pancreas", "kidney_left", "kidney_right"), cases=3),
        write_site(root, "site2", ("liver",), seed=1),
    ]


def _sampler(sites: list, *, augment: bool = True, seed: int = 11) -> PatchSampler:
    return PatchSampler(sites, patch_size=PATCH, patches_per_iteration=2, seed=seed, augment=augment)


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _children() -> list[int]:
    return [int(p.pid) for p in mp.active_children() if p.pid is not None]


def test_workers_setting_follows_the_jobs_threads_on_a_gpu_and_is_none_on_the_cpu() -> None:
    assert resolve_workers("auto", 8, "cuda") == 7 and resolve_workers("auto", 1, "cuda:1") == 0
    assert resolve_workers(None, 3, "cuda") == 2
    assert resolve_workers("auto", 8, "cpu") == 0 and resolve_workers(None, 3, torch.device("cpu")) == 0
    assert resolve_workers(0, 8, "cuda") == 0 and resolve_workers(3, 1, "cpu") == 3
    for bad in (-1, "two", 1.5, True):
        with pytest.raises(ValueError, match="training.workers"):
            resolve_workers(bad, 4)  # type: ignore[arg-type]


def test_batches_are_equal_for_0_1_and_2_workers_and_streams_reuse_the_workers(tmp_path: Path) -> None:
    # Prepare: the training thread's batches (0 workers), from the middle of a run too
    sites = _sites(tmp_path)
    reference = [_sampler(sites).batch(i) for i in range(12)]
    feed = BatchFeed(_sampler(sites), device=torch.device("cpu"), augment_on_device=False)
    in_thread = [feed.next() for _ in range(12)]
    got = {}
    pids = {}
    # Execute: the same iterations from 1 and 2 workers (2: batches alternate between them); then a second
    # stream (another seed, from i = 5)
    for workers in (1, 2):
        with BatchLoader(_sampler(sites), workers=workers) as loader:
            stream = loader.stream(11, 0)
            got[workers] = [next(stream) for _ in range(12)]
            pids[workers] = loader.worker_pids
            again = loader.stream(12, 5)
            other_seed = [next(again) for _ in range(3)]
            assert loader.worker_pids == pids[workers]  # started once, reused by the next stream
            processes = list(loader._loader._iterator._workers)
        # closed with batches in flight: every worker has left, and left cleanly
        assert loader.worker_pids == [] and not set(pids[workers]) & set(_children())
        assert [p.exitcode for p in processes] == [0] * workers
    # Assert: every worker count gives the training thread's batches, in iteration order
    for i in range(12):
        assert _same(in_thread[i], reference[i])
        for workers in (1, 2):
            batch = got[workers][i]
            assert batch.iteration == i and batch.target.dtype == torch.uint8
            assert _same((batch.image, batch.target.long(), batch.labelled), reference[i]), (workers, i)
    other = _sampler(sites, seed=12)
    assert all(
        _same((b.image, b.target.long(), b.labelled), other.batch(5 + k)) for k, b in enumerate(other_seed)
    )
    assert len(pids[1]) == 1 and len(pids[2]) == 2
    # the workers report the files they opened: all of them the sites' own
    opened = {Path(p) for b in got[2] for p in b.opened}
    assert opened and opened <= {Path(p) for s in sites for p in s.npz_paths.values()}


def test_device_augmentation_branch_draws_what_the_worker_would(tmp_path: Path) -> None:
    # Prepare: the sampler leaves augmentation to the feed, as on CUDA (here on CPU tensors)
    sites = _sites(tmp_path)
    in_worker = _sampler(sites, augment=True)
    feed = BatchFeed(_sampler(sites, augment=False), device=torch.device("cpu"), augment_on_device=True)
    plain = _sampler(sites, augment=False)
    # Execute
    batches = [feed.next() for _ in range(6)]
    # Assert: same generator (seed, i) -> the same augmented batch; and augmentation did change something
    assert all(_same(b, in_worker.batch(i)) for i, b in enumerate(batches))
    assert any(not torch.equal(b[0], plain.batch(i)[0]) for i, b in enumerate(batches))


def test_a_shared_loader_must_draw_from_the_trainers_data(tmp_path: Path) -> None:
    sites = _sites(tmp_path)
    loader = BatchLoader(_sampler(sites[:1]), workers=1)  # never started
    with pytest.raises(ValueError, match="other data or settings"):
        BatchFeed(_sampler(sites), device=torch.device("cpu"), augment_on_device=False, loader=loader)


def test_a_workers_error_names_the_file_and_the_workers_shut_down(tmp_path: Path) -> None:
    # Prepare: one of site2's cases is not a case file
    sites = _sites(tmp_path)
    bad = next(iter(sites[1].npz_paths.values()))
    bad.write_bytes(b"garbage")
    loader = BatchLoader(_sampler(sites), workers=1)
    # Execute / Assert: the SamplerError crosses the process boundary with the file's name
    with pytest.raises(SamplerError, match=rf"{bad.name}: cannot read preprocessed case"):
        stream = loader.stream(11, 0)
        for _ in range(40):
            next(stream)
    pids = loader.worker_pids
    loader.close()
    assert pids and not set(pids) & set(_children())


def _train(root: Path, name: str, workers: int, hook=None) -> Path:  # noqa: ANN001
    out = root / name / "model.pt"
    train_model(
        network=NetworkSpec.from_config(NETWORK, num_classes=6),
        init=None,
        sites=_sites(root),
        loss_spec=LOSS,
        settings=TrainSettings.from_config(TRAINING),
        epochs=3,
        seed=5,
        out_model=out,
        out_curve_csv=out.parent / "curve.csv",
        out_curve_png=out.parent / "curve.png",
        meta={"kind": "test"},
        patch_size=PATCH,
        device="cpu",
        on_epoch_end=hook,
        workers=workers,
    )
    return out


class Stopped(Exception):
    """Stands for the job being killed between epochs."""


def test_training_stopped_with_1_worker_and_resumed_with_2_matches_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    # Prepare: the uninterrupted run makes its batches in the training thread
    straight = _train(tmp_path, "straight", workers=0)
    seen: list[list[int]] = []

    def stop_after_first(epoch: int) -> None:
        seen.append(_children())
        raise Stopped

    # Execute: killed after epoch 1 (1 worker), resumed (2 workers)
    with pytest.raises(Stopped):
        _train(tmp_path, "resumed", workers=1, hook=stop_after_first)
    left_over = set(seen[0]) & set(_children())
    resume = load_checkpoint(tmp_path / "resumed" / "resume.pt")
    resumed = _train(tmp_path, "resumed", workers=2)
    # Assert: the state holds the iteration counter; the weights are bit-identical; no worker outlived its run
    assert resume["trainer"]["rng"]["sampler"] == {"iteration": TRAINING["iterations_per_epoch"]}
    a, b = load_checkpoint(straight)["model"], load_checkpoint(resumed)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert seen[0] and not left_over and not _children()
    assert np.isfinite([h["loss"] for h in load_checkpoint(resumed)["history"]]).all()


def test_a_block_whose_sites_make_batches_in_workers_equals_the_rules_without(tmp_path: Path) -> None:
    # Prepare: two rounds of the per-round rules (no batch workers, 1 thread), and a block of the same rounds
    # whose site workers each keep one batch worker across the rounds (2 threads a site: 1 trains)
    sites = make_sites(tmp_path)
    make_m0(tmp_path / "m0.pt")
    rules, setting = tmp_path / "rules", tmp_path / "block"
    for folder in (rules, setting):
        rounds.init_global(tmp_path / "m0.pt", paths.global_model_path(folder, 0))
    run_rounds(rules, sites, 2)
    with_workers = dataclasses.replace(local(), workers=4)  # bounded to threads_per_worker - 1 = 1
    # Execute
    blocks.run_block(
        setting_dir=setting,
        first_round=1,
        last_round=2,
        sites=list(sites.values()),
        local=with_workers,
        plan=RoundPlan(local_iterations=ITERS, seed=SEED, attempts=1, on_site_failure="fail"),
        threads_per_worker=2,
        validation={s: validation_of(d) for s, d in sites.items()},
    )
    # Assert: the same global model, bit for bit, and no process left behind
    ours = load_checkpoint(paths.global_model_path(setting, 2))["model"]
    theirs = load_checkpoint(paths.global_model_path(rules, 2))["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not _children()
