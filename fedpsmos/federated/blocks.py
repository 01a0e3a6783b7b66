"""K federated rounds in one job: one worker process per site, FedAvg in the coordinating process.

docs/design.md "Scale": 2000 rounds x 5 sites is too many jobs for Snakemake and a SLURM queue, so the paper
config runs blocks of rounds per cluster job. A block keeps the per-round contract of
:mod:`fedpsmos.federated.rounds` exactly: every round still writes ``round_{r}/{site}.pt``,
``private/{site}/round_{r}.pt``, ``round_{r}/global.pt`` and ``round_{r}/record.json``, the site files are
written by the site's worker, and the coordinator reads them with
:func:`~fedpsmos.federated.aggregation.aggregate_round`, the function the per-round aggregation rule calls.

The privacy boundary is the process boundary: each worker (``spawn`` context, so nothing is inherited from
the coordinator's memory) is given only its own site's ``SiteData`` and reads only its own files and the
global model. It keeps its trainer state (and, with validation cases, its running best model) in memory
between rounds and writes it every round. On CUDA worker ``i`` takes ``cuda:{i % n_gpus}``.

Batch workers: the job's threads are split evenly among the sites (``threads_per_worker``), and each site
worker on a GPU makes its batches with ``threads_per_worker - 1`` background processes
(:mod:`fedpsmos.training.loader`; none on the CPU under ``training.workers: auto``; with an integer, at most
that many), started once
for the whole block, and trains with the remaining torch thread(s). A block of K sites therefore runs at
most ``threads`` processes in all (the paper profile: 4 GPUs x 8 cores = 32 threads, 5 sites: 6 each, 5
batch workers a site), never K x N without bound.
Site workers are not daemonic processes, since those may not have children; the coordinator joins, and if
need be terminates, every one of them on any exit.

Resume (:mod:`fedpsmos.federated.block_resume`): a block restarts from the first round in ``first..last``
that is not complete (all of its files exist and verify), reloading each site's private state of the round
before. Since every local round's randomness is seeded by ``(seed, site, round)`` (site_round.py), a resumed
block and the per-round rules compute the same weights as an uninterrupted block (CPU, same thread count).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from fedpsmos.federated.aggregation import aggregate_round
from fedpsmos.federated.block_resume import block_provenance, resume_round
from fedpsmos.federated.paths import global_model_path, private_state_path, record_path, site_model_path
from fedpsmos.federated.rounds import RoundError
from fedpsmos.federated.site_round import SiteRunner
from fedpsmos.federated.site_selection import site_validation_from_files
from fedpsmos.federated.site_setup import LocalSettings, RoundPlan, local_settings, site_data_from_files
from fedpsmos.training.selection import ValidationCase
from fedpsmos.training.site_data import SiteData

log = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 30.0


def worker_devices(device: str, n_workers: int) -> list[str]:
    """Device of each site worker: ``cuda:{i % n_gpus}`` when ``device`` is CUDA, else ``device``.

    Parameters
    ----------
    device:
        ``cpu``, ``cuda`` or ``cuda:N`` (an explicit index pins every worker to that GPU).
    n_workers:
        Number of site workers.
    """
    if device == "cuda":
        n_gpus = torch.cuda.device_count()
        if n_gpus == 0:
            raise RuntimeError("device 'cuda' requested but no CUDA device is visible")
        return [f"cuda:{i % n_gpus}" for i in range(n_workers)]
    return [device] * n_workers


def run_block(
    *,
    setting_dir: str | Path,
    first_round: int,
    last_round: int,
    sites: Sequence[SiteData],
    local: LocalSettings,
    plan: RoundPlan,
    threads_per_worker: int = 1,
    validation: Mapping[str, Sequence[ValidationCase]] | None = None,
) -> list[dict[str, Any]]:
    """Run rounds ``first..last`` in one job, resuming after the last complete round; return their records.

    Parameters
    ----------
    setting_dir:
        ``results/federated/{setting}``; ``round_{first-1}/global.pt`` must exist, and, when ``first > 1``,
        every site's ``private/{site}/round_{first-1}.pt``.
    first_round, last_round:
        The block's rounds, inclusive (``1 <= first <= last``).
    sites:
        One :class:`~fedpsmos.training.site_data.SiteData` per site; worker ``i`` receives ``sites[i]`` only.
    local:
        Loss, training settings, patch size and device (``cpu``, ``cuda`` = one GPU per worker round-robin).
    plan:
        Local iterations, seed, attempts, failure policy (:class:`~fedpsmos.federated.site_setup.RoundPlan`).
    threads_per_worker:
        Threads of each site worker: at most ``threads_per_worker - 1`` batch workers, the rest torch
        threads (module docstring).
    validation:
        ``{site: validation cases}``; worker ``i`` receives only its own site's (none: no selection).
    """
    if not 1 <= first_round <= last_round:
        raise ValueError(f"block rounds must satisfy 1 <= first <= last, got {first_round}..{last_round}")
    names = [str(s.site) for s in sites]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"block sites must be distinct and non-empty, got {names}")
    own: dict[str, tuple[ValidationCase, ...]] = {n: tuple((validation or {}).get(n, ())) for n in names}
    provenance = block_provenance(local, plan, names, own)
    start = resume_round(setting_dir, first_round, last_round, names, provenance)
    if start > first_round:
        log.info(
            "block %d..%d: rounds %d..%d complete, resuming at %d",
            first_round,
            last_round,
            first_round,
            start - 1,
            start,
        )
    if start <= last_round:
        _run_rounds(setting_dir, start, last_round, sites, local, plan, threads_per_worker, provenance, own)
    return [json.loads(record_path(setting_dir, r).read_text()) for r in range(first_round, last_round + 1)]


def run_block_job(
    *,
    previous_global: str | Path,
    sites: Sequence[str],
    manifests: Sequence[str | Path],
    cases: Sequence[str | Path],
    patches: Sequence[str | Path],
    first_round: int,
    last_round: int,
    local_iterations: int,
    loss_spec: Any,
    training: dict[str, Any],
    patch_size: Sequence[int],
    seed: int,
    attempts: int,
    on_site_failure: str,
    device: str | None = None,
    threads_per_worker: int = 1,
) -> list[dict[str, Any]]:
    """The block rule's entry point: plain rule inputs and params -> :func:`run_block`.

    Parameters
    ----------
    previous_global:
        ``results/federated/{setting}/round_{first-1}/global.pt``; the setting folder is its grandparent.
    sites:
        Site names; ``manifests`` and ``patches`` are in the same order.
    manifests, patches:
        Per-site ``manifest.json`` and patch index.
    cases:
        Every site's training case files in one list; each is assigned to the site named by its folder
        (``results/preprocessed/{site}/{case}.b2zip``).
    first_round, last_round, local_iterations, seed, attempts, on_site_failure:
        See :func:`run_block`.
    loss_spec, training, patch_size, device:
        See :func:`~fedpsmos.federated.site_setup.local_settings`.
    threads_per_worker:
        Threads of each site worker, see :func:`run_block`.
    """
    previous_global = Path(previous_global)
    if previous_global.parent.name != f"round_{first_round - 1}":
        raise ValueError(f"{previous_global}: expected the global model of round {first_round - 1}")
    if not len(sites) == len(manifests) == len(patches):
        raise ValueError(f"{len(sites)} sites, {len(manifests)} manifests and {len(patches)} patch indices")
    by_site: dict[str, list[Path]] = {site: [] for site in sites}
    for path in map(Path, cases):
        if path.parent.name not in by_site:
            raise ValueError(f"{path}: case file of no block site (its folder must be the site name)")
        by_site[path.parent.name].append(path)
    data = [
        site_data_from_files(site, manifest, by_site[site], index)
        for site, manifest, index in zip(sites, manifests, patches, strict=True)
    ]
    validation = {
        site: site_validation_from_files(site, manifest, by_site[site])
        for site, manifest in zip(sites, manifests, strict=True)
    }
    return run_block(
        setting_dir=previous_global.parent.parent,
        first_round=first_round,
        last_round=last_round,
        sites=data,
        local=local_settings(
            loss_spec=loss_spec,
            training=training,
            patch_size=patch_size,
            device=device,
            threads=threads_per_worker,
        ),
        plan=RoundPlan(
            local_iterations=local_iterations, seed=seed, attempts=attempts, on_site_failure=on_site_failure
        ),
        threads_per_worker=threads_per_worker,
        validation=validation,
    )


def _run_rounds(
    setting_dir: str | Path,
    start: int,
    last_round: int,
    sites: Sequence[SiteData],
    local: LocalSettings,
    plan: RoundPlan,
    threads_per_worker: int,
    provenance: Mapping[str, Any],
    validation: Mapping[str, tuple[ValidationCase, ...]],
) -> None:
    devices = worker_devices(local.device, len(sites))
    batch_workers = min(local.workers, max(0, int(threads_per_worker) - 1))  # bounded: module docstring
    ctx = mp.get_context("spawn")
    workers: list[tuple[str, Any, Connection]] = []
    try:
        for site_data, device in zip(sites, devices, strict=True):
            site = str(site_data.site)
            private_in = private_state_path(setting_dir, site, start - 1) if start > 1 else None
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_site_worker,
                args=(
                    theirs,
                    site_data,
                    dataclasses.replace(local, device=device, workers=batch_workers),
                    private_in,
                    threads_per_worker,
                    validation.get(site, ()),
                ),
                name=f"fedpsmos-site-{site}",
                daemon=False,  # it starts batch workers; the finally below joins or terminates it
            )
            proc.start()
            theirs.close()
            workers.append((site, proc, ours))
        for r in range(start, last_round + 1):
            for site, _, conn in workers:
                conn.send(
                    {
                        "global_path": global_model_path(setting_dir, r - 1),
                        "round_index": r,
                        "plan": plan,
                        "out_site": site_model_path(setting_dir, r, site),
                        "out_private": private_state_path(setting_dir, site, r),
                    }
                )
            errors = []
            for site, _, conn in workers:
                try:
                    status, message = conn.recv()
                except EOFError:
                    status, message = "error", "worker process died"
                if status != "ok":
                    errors.append(f"site {site}: {message}")
            if errors:
                raise RoundError(f"round {r}: " + "; ".join(errors))
            aggregate_round(
                previous_global=global_model_path(setting_dir, r - 1),
                site_paths=[site_model_path(setting_dir, r, site) for site, _, _ in workers],
                out_global=global_model_path(setting_dir, r),
                out_record=record_path(setting_dir, r),
                round_index=r,
                policy=plan.on_site_failure,
                provenance=provenance,
            )
            log.info("round %d aggregated over %d site(s)", r, len(workers))
    finally:
        for _, _proc, conn in workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            conn.close()
        for _, proc, _ in workers:
            proc.join(_JOIN_TIMEOUT_S)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _site_worker(
    conn: Connection,
    site_data: SiteData,
    local: LocalSettings,
    private_in: Path | None,
    threads: int,
    validation: tuple[ValidationCase, ...] = (),
) -> None:
    """A site's process: load its private state once, then run each round the coordinator asks for."""
    torch.set_num_threads(max(1, threads - local.workers))  # the site's other threads make its batches
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {site_data.site} %(levelname)s %(message)s")
    runner = SiteRunner(site_data=site_data, local=local, validation=validation)
    try:
        runner.load_private(private_in)
    except Exception as exc:  # reported to the coordinator on the first round request
        startup_error: Exception | None = exc
    else:
        startup_error = None
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:
                return
            if request is None:
                return
            if startup_error is not None:
                conn.send(("error", f"{startup_error}"))
                continue
            try:
                meta = runner.run_round(**request)
            except Exception as exc:
                conn.send(("error", f"{exc}"))
            else:
                conn.send(("ok", meta))
    finally:
        runner.close()  # the site's batch workers
