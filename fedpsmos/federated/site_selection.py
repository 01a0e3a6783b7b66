"""A site's local validation and best-model selection across the rounds of a federation (paper Sec. 4.2).

When a site holds validation cases (:func:`site_validation_from_files`), it scores every round the global
model it received and its model after local training on them (:func:`score_model`,
:mod:`fedpsmos.training.selection`), and keeps the better of them and its running best (weights, round,
``global``/``local``, score) in its private state (:func:`updated_best`, :func:`best_into_private`,
:func:`best_from_private`), which no other party reads. :func:`write_selected_model` writes that model after
the last round (docs/federated.md, "Local validation and best-model selection"). The round itself is
:mod:`fedpsmos.federated.site_round`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedpsmos.data.manifest import ManifestError
from fedpsmos.federated.rounds import RoundError, apply_meta
from fedpsmos.organs import ORGANS
from fedpsmos.training.checkpoint import load_checkpoint, save_checkpoint
from fedpsmos.training.selection import (
    SelectionError,
    ValidationCase,
    case_dice,
    mean_score,
    organ_means,
    validation_cases_from_manifest,
)

# What a running best records besides its weights (the private meta's "best" and the selected model's meta).
BEST_FIELDS = ("round", "which", "score")


def site_validation_from_files(
    site: str, manifest: str | Path, cases: Sequence[str | Path]
) -> tuple[ValidationCase, ...]:
    """A site's validation cases from the files a rule was given (every one must be among ``cases``).

    Parameters
    ----------
    site:
        Site name; must match the manifest.
    manifest:
        ``results/data/{site}/manifest.json``; its ``validation`` list (absent or empty: no validation).
    cases:
        ``results/preprocessed/{site}/{case}.b2zip`` handed to the rule.
    """
    try:
        return validation_cases_from_manifest(site, manifest, list(cases))
    except (SelectionError, ManifestError) as error:
        raise RoundError(str(error)) from None


def score_model(
    model: torch.nn.Module,
    validation: Sequence[ValidationCase],
    *,
    patch_size: tuple[int, int, int],
    device: str,
    precision: str = "auto",
) -> tuple[dict[str, float], float | None]:
    """Per-organ validation Dice and selection score of ``model`` (``{}, None`` without validation cases).

    Parameters
    ----------
    model:
        The network, with the weights to score loaded.
    validation:
        The site's own validation cases.
    patch_size, device:
        Sliding-window patch ``(z, y, x)`` and the device the model runs on.
    precision:
        The training precision (:mod:`fedpsmos.precision`), so the site scores the model as it trains.
    """
    if not validation:
        return {}, None
    per_case = case_dice(
        model, validation, organs=ORGANS, patch_size=patch_size, device=device, precision=precision
    )
    return organ_means(per_case), mean_score(per_case)


def updated_best(
    best: Mapping[str, Any] | None,
    round_index: int,
    scored: Mapping[str, tuple[dict[str, float], float | None]],
    global_weights: Mapping[str, Tensor],
    local_weights: Mapping[str, Tensor],
) -> dict[str, Any] | None:
    """The running best after round ``r``: the previous best, or this round's global, then local model.

    A strictly better score replaces the best, so the earlier model wins a tie; the global model of round
    ``r - 1`` (received in round ``r``) counts before the local model of round ``r``.

    Parameters
    ----------
    best:
        ``{"round", "which", "score", "model"}`` so far, or ``None``.
    round_index:
        ``r``.
    scored:
        ``{"global": (organ Dice, score), "local": (organ Dice, score)}`` of this round (:func:`score_model`).
    global_weights, local_weights:
        The received global weights and the site's weights after local training.
    """
    out = dict(best) if best is not None else None
    for which, weights, file_round in (
        ("global", global_weights, round_index - 1),
        ("local", local_weights, round_index),
    ):
        score = scored[which][1]
        if score is not None and (out is None or score > out["score"]):
            out = {
                "round": file_round,
                "which": which,
                "score": score,
                "model": {k: v.detach().to("cpu", copy=True) for k, v in weights.items()},
            }
    return out


def best_into_private(private: dict[str, Any], best: Mapping[str, Any] | None) -> dict[str, Any]:
    """Add the running best to a private state: its fields to ``meta["best"]``, its weights as ``best_model``.

    Parameters
    ----------
    private:
        ``{"model", "trainer", "meta"}`` of ``private/{site}/round_{r}.pt``; changed in place and returned.
    best:
        The running best (:func:`updated_best`), or ``None`` (nothing added).
    """
    if best is not None:
        private["meta"]["best"] = {k: best[k] for k in BEST_FIELDS}
        private["best_model"] = best["model"]
    return private


def best_from_private(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The running best model a private state holds, or ``None``.

    Parameters
    ----------
    payload:
        A loaded ``private/{site}/round_{r}.pt``.
    """
    meta = payload.get("meta", {}).get("best")
    if not meta:
        return None
    return {**meta, "model": dict(payload["best_model"])}


def write_selected_model(
    *,
    private_state: str | Path,
    last_global: str | Path,
    out_model: str | Path,
    site: str,
    setting: str,
    preprocessing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a site's locally selected model after the last round; return its meta.

    The model is the best the site kept in its private state (meta ``round``, ``which`` = ``global`` or
    ``local``, ``score``: it is bit-identical to ``round_{round}/global.pt`` or ``round_{round}/{site}.pt``).
    A site that never scored a model (no validation cases) gets the final global model, ``which = "final"``.

    Parameters
    ----------
    private_state:
        ``private/{site}/round_{R}.pt`` of the last round ``R`` (the site's own file).
    last_global:
        ``round_{R}/global.pt``.
    out_model:
        ``results/models/federated/{setting}/selected/{site}.pt``.
    site, setting:
        Names recorded in the meta.
    preprocessing:
        The resolved preprocessing settings recorded in the meta (default: the last global model's).
    """
    private = load_checkpoint(private_state)
    if private.get("meta", {}).get("site") != site:
        raise RoundError(f"{private_state}: private state of site {private.get('meta', {}).get('site')!r}")
    last = int(private["meta"].get("round", -1))
    final = load_checkpoint(last_global)
    final_meta = final.get("meta", {})
    if int(final_meta.get("round", -2)) != last:
        raise RoundError(f"{last_global}: global model of round {final_meta.get('round')}, expected {last}")
    best = best_from_private(private)
    if best is None:
        weights, chosen = final["model"], {"round": last, "which": "final", "score": None}
    else:
        weights, chosen = best["model"], {k: best[k] for k in BEST_FIELDS}
    meta = {
        "kind": "federated_selected",
        "setting": setting,
        "site": site,
        "network": final_meta.get("network"),
        "organs": list(final_meta.get("organs") or ORGANS),
        "rounds": last,
        "selected": chosen,
        **apply_meta(final_meta, preprocessing=preprocessing),
    }
    save_checkpoint(out_model, {"model": weights, "meta": meta})
    return meta
