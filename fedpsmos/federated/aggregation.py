"""The aggregator's side of a federated round: FedAvg of the sites' round files (paper Alg. 1, server side).

The aggregator reads only ``round_{r}/{site}.pt`` files and the previous global model, never a private state
or a site's data (:func:`~fedpsmos.federated.paths.aggregator_input_violations`). It checks each site file
(readable, the right site and round, weights matching the previous global model), drops sites marked failed
under policy ``skip`` and renormalises ``n_k / n`` over the rest, then writes ``round_{r}/global.pt`` and the
round record ``round_{r}/record.json`` (docs/architecture.md, "Federated rounds"; docs/federated.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from fedpsmos.atomic import write_json
from fedpsmos.federated.fedavg import AggregationError, aggregate, check_states, fedavg_weights
from fedpsmos.federated.rounds import POLICIES, ROUND_KIND, RoundError, apply_meta, load_global
from fedpsmos.io import file_sha256
from fedpsmos.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def read_site_models(
    site_paths: Sequence[str | Path], round_index: int
) -> tuple[list[str], list[dict[str, Tensor]], list[dict[str, Any]]]:
    """Site names, model states and metas of round ``r``'s site files; a bad file raises naming it.

    Each file must load and its meta must name the site of its file name and round ``r``; no site may be
    listed twice. The weights themselves are checked by :func:`~fedpsmos.federated.fedavg.check_states`.

    Parameters
    ----------
    site_paths:
        ``round_{r}/{site}.pt`` of every site.
    round_index:
        ``r``.
    """
    names: list[str] = []
    states: list[dict[str, Tensor]] = []
    metas: list[dict[str, Any]] = []
    for path in site_paths:
        site = Path(path).stem
        try:
            payload = load_checkpoint(path)
        except CheckpointError as exc:
            raise RoundError(
                f"round {round_index}, site {site}: unreadable site model {path}: {exc}"
            ) from exc
        meta = payload.get("meta", {})
        if meta.get("site") != site or meta.get("round") != round_index:
            raise RoundError(
                f"round {round_index}, site {site}: {path} holds site {meta.get('site')!r} "
                f"round {meta.get('round')!r}"
            )
        names.append(site)
        states.append(payload["model"])
        metas.append(meta)
    if len(set(names)) != len(names):
        raise RoundError(f"round {round_index}: a site is listed twice in {names}")
    return names, states, metas


def aggregate_round(
    *,
    previous_global: str | Path,
    site_paths: Sequence[str | Path],
    out_global: str | Path,
    out_record: str | Path,
    round_index: int,
    policy: str,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """FedAvg one round from the site files alone (paper Alg. 1, server side); return the record written.

    Reads only ``round_{r}/{site}.pt`` files and the previous global model (never a private state or data),
    checks each site's weights against the previous global model (keys, shapes, dtypes, finite values), drops
    sites marked failed and renormalises ``n_k / n`` over the rest.

    Parameters
    ----------
    previous_global:
        ``round_{r-1}/global.pt`` (the reference for the checks and the source of the network spec).
    site_paths:
        ``round_{r}/{site}.pt`` of every site.
    out_global, out_record:
        ``round_{r}/global.pt`` and ``round_{r}/record.json``.
    round_index:
        ``r``.
    policy:
        ``fail`` (a failed site is an error) or ``skip`` (it is dropped and recorded).
    provenance:
        Plain values recorded as they are (a block records the digest of its round plan, so a rerun with
        other settings does not take the old rounds for complete).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    reference, prev_meta = load_global(previous_global, round_index)
    names, states, metas = read_site_models(site_paths, round_index)
    try:
        check_states(states, reference, names, round_index)
    except AggregationError as exc:
        raise RoundError(str(exc)) from exc

    failed = [m["site"] for m in metas if m.get("failed")]
    if failed and policy == "fail":
        raise RoundError(f"round {round_index}: site(s) {failed} failed and the policy is 'fail'")
    kept = [i for i, m in enumerate(metas) if not m.get("failed")]
    if not kept:
        raise RoundError(f"round {round_index}: every site failed ({failed}); nothing to aggregate")
    counts = [int(metas[i]["n_cases"]) for i in kept]
    weights = fedavg_weights(counts)
    averaged = aggregate([states[i] for i in kept], counts)
    if failed:
        log.warning(
            "round %d: dropped failed site(s) %s, weights renormalised over %s",
            round_index,
            failed,
            [names[i] for i in kept],
        )

    sites = [names[i] for i in kept]
    weight_map = dict(zip(sites, weights, strict=True))
    global_meta = {
        "kind": ROUND_KIND,
        "round": round_index,
        "network": prev_meta.get("network"),
        "organs": prev_meta.get("organs"),
        "sites": sites,
        "weights": weight_map,
        "failed": failed,
        **apply_meta(prev_meta),
    }
    save_checkpoint(out_global, {"model": averaged, "meta": global_meta})
    record = {
        "round": round_index,
        "policy": policy,
        "sites": sites,
        "weights": weight_map,
        "failed": failed,
        "renormalised": bool(failed),
        "n_cases": {m["site"]: int(m["n_cases"]) for m in metas},
        "local_iterations": {m["site"]: int(m["local_iterations"]) for m in metas},
        "losses": {m["site"]: m.get("mean_loss") for m in metas},
        "val_dice": {m["site"]: dict(m.get("val_dice") or {}) for m in metas},
        "val_dice_local": {m["site"]: dict(m.get("val_dice_local") or {}) for m in metas},
        # The chain of rounds: which global model this round started from.
        "previous_global_sha256": file_sha256(previous_global),
        "provenance": dict(provenance or {}),
    }
    write_json(out_record, record)
    return record
