"""A site's side of a federated round: local training from the global model, on its own data only (Alg. 1).

Round ``r`` at site ``k``: load ``round_{r-1}/global.pt`` and the site's private trainer state, train
``local_iterations`` iterations seeded by :func:`round_seed` ``(seed, site, r)``, and write
``round_{r}/{site}.pt`` (weights and scalar metadata) and ``private/{site}/round_{r}.pt`` (optimiser,
plateau schedule and the site's best model so far; never read by the aggregator). A site gets ``attempts``
tries from the same starting state; the fault policy and the other open choices are in
:mod:`fedpsmos.federated.rounds` and docs/federated.md.

Local validation and best-model selection (paper Sec. 4.2): when the site holds validation cases, it scores
the global model it received and its model after local training on them, reports the per-organ Dice of both
(``val_dice``, ``val_dice_local``) and keeps its running best model in its private state
(:mod:`fedpsmos.federated.site_selection`, which also writes the selected model after the last round).

Batches: with ``workers`` > 0 (:class:`~fedpsmos.federated.site_setup.LocalSettings`, from config
``training.workers`` and the job's threads) a site keeps one :class:`~fedpsmos.training.loader.BatchLoader`
for as long as its runner lives (a block worker: every round of the block), so its worker processes start
once, not every round; each round's trainer draws from it with the round's seed.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedpsmos.federated.rounds import POLICIES, RoundError, load_global
from fedpsmos.federated.site_selection import (
    best_from_private,
    best_into_private,
    score_model,
    site_validation_from_files,
    updated_best,
)
from fedpsmos.federated.site_setup import LocalSettings, RoundPlan, local_settings, site_data_from_files
from fedpsmos.training.checkpoint import (
    load_checkpoint,
    load_model_state,
    model_state_to_cpu,
    save_checkpoint,
)
from fedpsmos.training.loader import BatchLoader, training_sampler
from fedpsmos.training.selection import ValidationCase
from fedpsmos.training.site_data import SiteData

log = logging.getLogger(__name__)


def round_seed(seed: int, site: str, round_index: int) -> int:
    """Seed of one site's local round, a stable hash of ``(seed, site, round)`` (not Python's ``hash``).

    Parameters
    ----------
    seed:
        The experiment's seed.
    site:
        Site name.
    round_index:
        Round number.
    """
    digest = hashlib.sha256(f"fedpsmos:{seed}:{site}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class SiteRunner:
    """One site's side of the federation: its data, its model object and its private trainer state.

    A per-round rule builds one, loads the private state from file and runs one round; a block worker keeps
    one alive across rounds (the state stays in memory and is also written every round). ``best`` is the
    site's running best model (``{"round", "which", "score", "model"}``,
    :func:`~fedpsmos.federated.site_selection.updated_best`), kept privately.
    """

    site_data: SiteData  # this site's data and nothing else
    local: LocalSettings
    validation: tuple[ValidationCase, ...] = ()  # this site's held-out cases; empty: no selection
    trainer_state: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    _model: torch.nn.Module | None = field(default=None, repr=False)
    _network: Any = field(default=None, repr=False)
    _loader: BatchLoader | None = field(default=None, repr=False)

    @property
    def site(self) -> str:
        """This site's name."""
        return str(self.site_data.site)

    @property
    def n_cases(self) -> int:
        """FedAvg weight numerator ``n_k``: this site's training cases."""
        return len(self.site_data.npz_paths)

    def load_private(self, private_in: str | Path | None) -> None:
        """Restore the trainer state from ``private_in`` (``None`` or ``""``: a fresh trainer, round 1)."""
        if private_in is None or str(private_in) == "":
            self.trainer_state, self.best = None, None
            return
        payload = load_checkpoint(private_in)
        site = payload.get("meta", {}).get("site")
        if site != self.site:
            raise RoundError(f"{private_in}: private state of site {site!r}, expected {self.site!r}")
        self.trainer_state = payload.get("trainer") or None
        self.best = best_from_private(payload)

    def run_round(
        self,
        *,
        global_path: str | Path,
        round_index: int,
        plan: RoundPlan,
        out_site: str | Path,
        out_private: str | Path,
    ) -> dict[str, Any]:
        """Train this site for one round from the global model and write its two files; return its meta.

        Parameters
        ----------
        global_path:
            ``round_{r-1}/global.pt``.
        round_index:
            ``r`` (>= 1).
        plan:
            Local iterations, seed, attempts and failure policy
            (:class:`~fedpsmos.federated.site_setup.RoundPlan`).
        out_site, out_private:
            ``round_{r}/{site}.pt`` and ``private/{site}/round_{r}.pt``.
        """
        local_iterations, attempts, on_site_failure = (
            plan.local_iterations,
            plan.attempts,
            plan.on_site_failure,
        )
        if on_site_failure not in POLICIES:
            raise ValueError(f"on_site_failure must be one of {POLICIES}, got {on_site_failure!r}")
        if attempts < 1 or local_iterations < 1 or round_index < 1:
            raise ValueError(f"attempts, local_iterations and round must be >= 1 (site {self.site})")
        global_weights, in_meta = load_global(global_path, round_index)
        if not isinstance(in_meta.get("network"), Mapping):
            raise RoundError(f"{global_path}: meta has no 'network' spec")
        model = self._model_for(in_meta["network"])
        error: BaseException | None = None
        result = None
        used = 0
        for used in range(1, attempts + 1):
            try:  # every attempt starts from the same global weights and private state
                result = self._train(model, global_weights, round_index, local_iterations, plan.seed)
                break
            except Exception as exc:  # any failure of local training is a site failure (fault policy)
                error = exc
                log.warning(
                    "site %s round %d attempt %d/%d failed: %r", self.site, round_index, used, attempts, exc
                )
        if result is None:
            if on_site_failure == "fail":
                raise RoundError(
                    f"site {self.site} round {round_index}: all {attempts} attempt(s) failed: {error!r}"
                ) from error
            log.error(
                "site %s round %d skipped after %d attempt(s): %r", self.site, round_index, attempts, error
            )
            weights, state = global_weights, self.trainer_state
            mean_loss: float | None = None
            val_dice: dict[str, float] = {}
            val_dice_local: dict[str, float] = {}
        else:
            weights, state, mean_loss, scored = result
            val_dice, val_dice_local = scored["global"][0], scored["local"][0]
            self.best = updated_best(self.best, round_index, scored, global_weights, weights)
        meta = {
            "kind": "federated_site",
            "site": self.site,
            "round": round_index,
            "n_cases": self.n_cases,
            "local_iterations": int(local_iterations),
            "mean_loss": mean_loss,
            "val_dice": val_dice,
            "val_dice_local": val_dice_local,
            "failed": result is None,
            "attempts": used,
            # Only the exception's type leaves the site: its message may name the site's case files.
            "error": type(error).__name__ if result is None else None,
        }
        save_checkpoint(out_site, {"model": weights, "meta": meta})
        private_meta: dict[str, Any] = {"site": self.site, "round": round_index, "failed": result is None}
        # "model" stays empty: the round's weights are in the site file; the only weights a private state
        # holds are the site's own best model, which no other party reads.
        trainer = state if state is not None else {}
        private: dict[str, Any] = {"model": {}, "trainer": trainer, "meta": private_meta}
        save_checkpoint(out_private, best_into_private(private, self.best))
        self.trainer_state = state
        return meta

    def _batch_loader(self) -> BatchLoader | None:
        # Started once per runner and shared by its rounds' trainers (module docstring).
        if self.local.workers < 1:
            return None
        if self._loader is None:
            device = torch.device(self.local.device)
            sampler = training_sampler(
                [self.site_data],
                settings=self.local.settings,
                seed=0,
                device=device,
                patch_size=self.local.patch_size,
            )
            self._loader = BatchLoader(sampler, workers=self.local.workers, pin_memory=device.type == "cuda")
        return self._loader

    def close(self) -> None:
        """Shut down the site's batch workers (if any)."""
        if self._loader is not None:
            self._loader.close()
            self._loader = None

    def _model_for(self, network: Mapping[str, Any]) -> torch.nn.Module:
        # Built once per runner: a block worker reuses it across rounds, the weights are reloaded each round.
        if self._model is None or self._network != dict(network):
            from fedpsmos.network import NetworkSpec, build_network

            self._model = build_network(NetworkSpec.from_dict(dict(network))).to(self.local.device)
            self._network = dict(network)
        return self._model

    def _train(
        self,
        model: torch.nn.Module,
        global_weights: Mapping[str, Tensor],
        round_index: int,
        local_iterations: int,
        seed: int,
    ) -> tuple[dict[str, Tensor], dict[str, Any], float, dict[str, tuple[dict[str, float], float | None]]]:
        from fedpsmos.training.trainer import Trainer

        load_model_state(model, global_weights, source=f"global model of round {round_index - 1}")
        scored = {"global": self._score(model)}
        seed_r = round_seed(seed, self.site, round_index)
        trainer = Trainer(
            model=model,
            sites=[self.site_data],
            loss_spec=self.local.loss_spec,
            settings=self.local.settings,
            seed=seed_r,
            device=self.local.device,
            patch_size=self.local.patch_size,
            loader=self._batch_loader(),
        )
        if self.trainer_state:
            # The rng comes from the (site, round) seed, not from history: see the module docstring.
            trainer.load_state_dict({k: v for k, v in self.trainer_state.items() if k != "rng"})
        with torch.random.fork_rng(devices=[]):  # whatever draws from torch's generator draws from seed_r
            torch.manual_seed(seed_r)
            mean_loss = float(trainer.train_iterations(local_iterations))
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"site {self.site} round {round_index}: local loss is {mean_loss}")
        trainer.end_epoch(mean_loss)  # one plateau step per round (module docstring)
        weights = model_state_to_cpu(model.state_dict())
        scored["local"] = self._score(model)
        return weights, trainer.state_dict(), mean_loss, scored

    def _score(self, model: torch.nn.Module) -> tuple[dict[str, float], float | None]:
        """Per-organ validation Dice and selection score of ``model`` (``{}, None`` without validation)."""
        return score_model(
            model,
            self.validation,
            patch_size=self.local.patch_size,
            device=self.local.device,
            precision=self.local.settings.precision,
        )


def run_site_round(
    *,
    global_path: str | Path,
    private_in: str | Path | None,
    site_data: SiteData,
    local: LocalSettings,
    plan: RoundPlan,
    round_index: int,
    out_site: str | Path,
    out_private: str | Path,
    validation: Sequence[ValidationCase] = (),
) -> dict[str, Any]:
    """Run one site's local round (the per-(round, site) rule); return the site meta written.

    Parameters
    ----------
    global_path:
        ``round_{r-1}/global.pt``; its meta carries the network spec.
    private_in:
        ``private/{site}/round_{r-1}.pt``, or ``None``/``""`` in round 1.
    site_data:
        This site's :class:`~fedpsmos.training.site_data.SiteData` (its own files only).
    local:
        Loss, training settings, patch size, device.
    plan, round_index, out_site, out_private:
        See :meth:`SiteRunner.run_round`.
    validation:
        This site's validation cases (empty: no scoring, no selection).
    """
    runner = SiteRunner(site_data=site_data, local=local, validation=tuple(validation))
    try:
        runner.load_private(private_in)
        return runner.run_round(
            global_path=global_path,
            round_index=round_index,
            plan=plan,
            out_site=out_site,
            out_private=out_private,
        )
    finally:
        runner.close()


def run_site_round_job(
    *,
    global_path: str | Path,
    private_in: str | Path | None,
    site: str,
    manifest: str | Path,
    cases: Sequence[str | Path],
    patches: str | Path,
    loss_spec: Any,
    training: Mapping[str, Any],
    patch_size: Sequence[int],
    local_iterations: int,
    round_index: int,
    seed: int,
    attempts: int,
    on_site_failure: str,
    out_site: str | Path,
    out_private: str | Path,
    device: str | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """The per-(round, site) rule's entry point: plain rule inputs and params -> :func:`run_site_round`.

    Parameters
    ----------
    global_path, private_in, local_iterations, round_index, seed, attempts, on_site_failure:
        See :func:`run_site_round` (``private_in`` ``""`` in round 1).
    out_site, out_private:
        See :func:`run_site_round`.
    site, manifest, cases, patches:
        See :func:`~fedpsmos.federated.site_setup.site_data_from_files`.
    loss_spec, training, patch_size, device, threads:
        See :func:`~fedpsmos.federated.site_setup.local_settings`.
    """
    plan = RoundPlan(
        local_iterations=local_iterations, seed=seed, attempts=attempts, on_site_failure=on_site_failure
    )
    return run_site_round(
        global_path=global_path,
        private_in=private_in,
        site_data=site_data_from_files(site, manifest, cases, patches),
        local=local_settings(
            loss_spec=loss_spec, training=training, patch_size=patch_size, device=device, threads=threads
        ),
        plan=plan,
        round_index=round_index,
        out_site=out_site,
        out_private=out_private,
        validation=site_validation_from_files(site, manifest, cases),
    )
