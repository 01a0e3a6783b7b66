"""The round contract shared by both sides of paper Alg. 1: errors, policies, round 0, loading a global model.

Round ``r`` (``r >= 1``) starts from ``round_{r-1}/global.pt`` (round 0 is M0's weights,
:func:`init_global`). Each site, on its own data only, loads the global weights and its private trainer
state, trains ``local_iterations`` iterations and writes ``round_{r}/{site}.pt`` (parameter tensors plus
scalar metadata) and ``private/{site}/round_{r}.pt`` (its optimiser and plateau schedule; never read by the
aggregator). The aggregator reads only the site files and the previous global model, checks them
(:func:`~fedpsmos.federated.fedavg.check_states`), drops failed sites, and writes ``round_{r}/global.pt``
and ``round_{r}/record.json`` (docs/architecture.md, "Federated rounds"). The site side is
:mod:`~fedpsmos.federated.site_round`, the aggregator :mod:`~fedpsmos.federated.aggregation`, the file names
:mod:`~fedpsmos.federated.paths`.

Choices the paper leaves open (docs/federated.md):

- **Plateau lr schedule in rounds.** A round is one "epoch" of the site's schedule: after its local
  iterations each site calls ``Trainer.end_epoch(mean local loss)`` once, so the window of the plateau rule
  (10 in the paper) counts rounds. The paper's Table 5 names its global rounds "epochs"; the schedule's
  state is site-private.
- **Randomness per (site, round).** Every local round seeds its trainer with
  :func:`~fedpsmos.federated.site_round.round_seed` ``(seed, site, round)`` and restores only the
  optimiser and schedule from the private state, so a round's result depends on its inputs alone: one job
  per (round, site), a block of rounds in one process, a retried attempt and a resumed block all compute
  the same weights.
- **Fault policy.** A site gets ``attempts`` in-process attempts from the same starting state. If all fail,
  ``fail`` raises (the round fails) and ``skip`` writes the incoming global weights marked ``failed`` and
  the unchanged private state; the aggregator then renormalises the weights over the remaining sites.
- **Local validation and best-model selection** (paper Sec. 4.2). A site with validation cases (manifest
  ``validation``) scores the global model it received and its model after local training on them; only the
  per-organ Dice scalars leave it. It keeps its best model of the two and of earlier rounds privately and
  writes it at the end (:func:`~fedpsmos.federated.site_selection.write_selected_model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from fedpsmos.training.checkpoint import load_checkpoint, save_checkpoint

POLICIES = ("fail", "skip")
ROUND_KIND = "federated_round"
# Meta keys a model needs to be applied to new scans (fedpsmos predict): set at round 0 from M0 and the
# resolved preprocessing settings, then copied from global model to global model and into the final models.
APPLY_META = ("preprocessing", "patch_size")


class RoundError(RuntimeError):
    """A federated round cannot proceed: a site failed under policy ``fail``, or a round file is invalid."""


def weights_only(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensor entries of a model state (what FedAvg averages; paper Alg. 1).

    Parameters
    ----------
    state:
        A checkpoint's ``model`` mapping.
    """
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def load_global(path: str | Path, round_index: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights and meta of ``round_{r-1}/global.pt``, the model round ``r`` starts from (paper Alg. 1).

    Both sides of a round read the previous global model through this, so both refuse one of the wrong round
    with the same message.

    Parameters
    ----------
    path:
        ``round_{r-1}/global.pt``.
    round_index:
        ``r`` (the file must hold round ``r - 1``).
    """
    payload = load_checkpoint(path)
    meta = payload.get("meta", {})
    if meta.get("round") != round_index - 1:
        raise RoundError(f"{path}: global model of round {meta.get('round')}, expected {round_index - 1}")
    return weights_only(payload["model"]), meta


def init_global(
    m0_path: str | Path,
    out_global: str | Path,
    *,
    preprocessing: Mapping[str, Any] | None = None,
    patch_size: Sequence[int] | None = None,
) -> None:
    """Write round 0's global model: M0's weights and network spec (paper Alg. 1, initialisation).

    Parameters
    ----------
    m0_path:
        The pretrained model checkpoint (``results/models/pretrain/model.pt``).
    out_global:
        ``round_0/global.pt``.
    preprocessing, patch_size:
        The resolved preprocessing settings and the patch size, recorded in the meta (:data:`APPLY_META`);
        default: M0's.
    """
    payload = load_checkpoint(m0_path)
    meta = dict(payload.get("meta", {}))
    if "network" not in meta:
        raise RoundError(f"{m0_path}: meta has no 'network' spec; cannot start a federation from it")
    global_meta = {
        "kind": ROUND_KIND,
        "round": 0,
        "network": meta["network"],
        "organs": meta.get("organs"),
        "sites": [],
        "weights": {},
        "initialised_from": str(m0_path),
        **apply_meta(meta, preprocessing=preprocessing, patch_size=patch_size),
    }
    save_checkpoint(out_global, {"model": weights_only(payload["model"]), "meta": global_meta})


def apply_meta(
    meta: Mapping[str, Any],
    *,
    preprocessing: Mapping[str, Any] | None = None,
    patch_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The :data:`APPLY_META` entries of ``meta``, replaced by the values given; absent ones left out.

    Parameters
    ----------
    meta:
        The meta of the model the new one comes from.
    preprocessing, patch_size:
        The resolved preprocessing settings and training patch size, when the rule knows them.
    """
    carried = {k: meta[k] for k in APPLY_META if meta.get(k) is not None}
    if preprocessing is not None:
        carried["preprocessing"] = dict(preprocessing)
    if patch_size is not None:
        carried["patch_size"] = [int(p) for p in patch_size]
    return carried
