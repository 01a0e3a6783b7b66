"""What a site's local round is given: its data and how it trains (paper Alg. 1, docs/federated.md).

:class:`LocalSettings` (loss, training settings, patch size, device, batch workers) and :class:`RoundPlan`
(local iterations, seed, attempts, failure policy) are the same for every round;
:func:`site_data_from_files` and :func:`local_settings` build a site's data and settings from the plain
inputs and params of a rule (the per-round rule, :mod:`fedpsmos.federated.site_round`, and a block of rounds,
:mod:`fedpsmos.federated.blocks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpsmos.data.manifest import Manifest, ManifestError
from fedpsmos.federated.rounds import RoundError
from fedpsmos.io import resolve_device
from fedpsmos.preprocessing.storage import case_id
from fedpsmos.training.loader import resolve_workers
from fedpsmos.training.site_data import SiteData


@dataclass
class LocalSettings:
    """How a site trains in a round: everything the Trainer needs except the data and the seed.

    ``settings`` is a :class:`fedpsmos.training.trainer.TrainSettings`; ``loss_spec`` is what
    :func:`fedpsmos.losses.build_loss` takes; ``workers`` the site's batch worker processes (0: batches in
    the training thread; the weights do not depend on it).
    """

    loss_spec: Any
    settings: Any
    patch_size: tuple[int, int, int]
    device: str = "cpu"
    workers: int = 0


@dataclass(frozen=True)
class RoundPlan:
    """How every site trains in every round of a federation: the same for all rounds (paper Alg. 1, Table 5).

    ``local_iterations`` is the paper's 50 (Table 5: 25/50/100); a round's seed is
    :func:`~fedpsmos.federated.site_round.round_seed` ``(seed, site, r)``; ``attempts`` in-process tries
    from the same starting state (>= 1); ``on_site_failure`` is ``fail`` (raise) or ``skip`` (write the
    incoming weights marked failed).
    """

    local_iterations: int
    seed: int
    attempts: int
    on_site_failure: str


def site_data_from_files(
    site: str, manifest: str | Path, cases: Sequence[str | Path], patches: str | Path
) -> SiteData:
    """A site's :class:`SiteData` from the files a rule was given: its manifest, case files and index.

    The rule may hand over every preprocessed case of the site (the split is only known once the manifest
    exists); only the manifest's ``train`` cases are used, and every one of them must be there, so a rule can
    neither train on test cases nor silently miss some.

    Parameters
    ----------
    site:
        Site name; must match the manifest.
    manifest:
        ``results/data/{site}/manifest.json``.
    cases:
        ``results/preprocessed/{site}/{case}.b2zip``, at least the training cases.
    patches:
        ``results/patches/{site}.parquet``.
    """
    try:
        train = sorted(Manifest.load(manifest, site=site).train)
    except ManifestError as exc:
        raise RoundError(str(exc)) from None
    given = {case_id(p): Path(p) for p in cases}
    missing = [case for case in train if case not in given]
    if missing or not train:
        raise RoundError(f"{manifest}: site {site} training cases missing from the rule's inputs: {missing}")
    npz = {case: given[case] for case in train}
    return SiteData(site=site, npz_paths=npz, patches=Path(patches))


def local_settings(
    *,
    loss_spec: Any,
    training: Mapping[str, Any],
    patch_size: Sequence[int],
    device: str | None = None,
    threads: int = 1,
) -> LocalSettings:
    """:class:`LocalSettings` from plain config values (the ``training`` section, the loss combination).

    Parameters
    ----------
    loss_spec:
        The loss combination handed to the Trainer.
    training:
        The config's ``training`` section (:meth:`TrainSettings.from_config`).
    patch_size:
        ``(z, y, x)``.
    device:
        ``cpu``, ``cuda`` or ``cuda:N``; ``None``: :func:`fedpsmos.io.resolve_device` (rules pass no device;
        the hardware decides).
    threads:
        the job's threads: ``training.workers: auto`` gives ``threads - 1`` batch workers on CUDA, none on
        the CPU (:func:`fedpsmos.training.loader.resolve_workers`).
    """
    from fedpsmos.training.trainer import TrainSettings

    size = tuple(int(s) for s in patch_size)
    if len(size) != 3:
        raise ValueError(f"patch_size must have three entries (z, y, x), got {list(patch_size)}")
    device = device or str(resolve_device())
    return LocalSettings(
        loss_spec=loss_spec,
        settings=TrainSettings.from_config(dict(training)),
        patch_size=size,  # type: ignore[arg-type]
        device=device,
        workers=resolve_workers(training.get("workers", "auto"), threads, device),
    )
