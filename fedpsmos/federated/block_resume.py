"""Where a block of rounds resumes: the rounds already complete, for the same block settings.

A block (:mod:`fedpsmos.federated.blocks`) restarts from the first round in ``first..last`` that is not
complete: all of its files exist and verify, it started from the global model now on disk for the round
before, and its record carries the block's :func:`block_provenance` (a digest of its settings), so a block
rerun with other settings redoes its rounds instead of keeping them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpsmos.federated.paths import global_model_path, private_state_path, record_path, site_model_path
from fedpsmos.federated.site_setup import LocalSettings, RoundPlan
from fedpsmos.io import file_sha256
from fedpsmos.training.checkpoint import CheckpointError, load_checkpoint
from fedpsmos.training.selection import ValidationCase


def round_complete(
    setting_dir: str | Path,
    round_index: int,
    sites: Sequence[str],
    provenance: Mapping[str, Any] | None = None,
) -> bool:
    """Whether round ``r`` is done for this block: every file exists and verifies (global, record, site
    models, private states), the round started from the global model now on disk for ``r - 1``, and its
    record carries the block's ``provenance`` (the digest of its settings).

    Parameters
    ----------
    setting_dir:
        ``results/federated/{setting}``.
    round_index:
        ``r``.
    sites:
        Site names.
    provenance:
        What the block records in every round (see :func:`block_provenance`); ``None`` skips that check.
    """
    try:
        record = json.loads(record_path(setting_dir, round_index).read_text())
        if record.get("round") != round_index:
            return False
        if provenance is not None and record.get("provenance") != dict(provenance):
            return False
        started_from = file_sha256(global_model_path(setting_dir, round_index - 1))
        if record.get("previous_global_sha256") != started_from:
            return False
        paths = [global_model_path(setting_dir, round_index)]
        paths += [site_model_path(setting_dir, round_index, s) for s in sites]
        paths += [private_state_path(setting_dir, s, round_index) for s in sites]
        for path in paths:
            load_checkpoint(path)
    except (OSError, ValueError, CheckpointError):
        return False
    return True


def block_provenance(
    local: LocalSettings,
    plan: RoundPlan,
    sites: Sequence[str],
    validation: Mapping[str, Sequence[ValidationCase]] | None = None,
) -> dict[str, str]:
    """A digest of everything that shapes a block's rounds besides their input models (loss, training
    settings, patch size, local iterations, seed, attempts, policy, sites, validation cases), recorded in
    every round's record.

    Parameters
    ----------
    local, plan:
        The block's settings.
    sites:
        Site names, in worker order.
    validation:
        Each site's validation cases (only their names enter the digest).
    """
    described = {
        "loss": local.loss_spec,
        "settings": repr(local.settings),
        "patch_size": list(local.patch_size),
        "plan": dataclasses.asdict(plan),
        "sites": list(sites),
        "validation": {s: [c.case for c in (validation or {}).get(s, ())] for s in sites},
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return {"block_settings_sha256": hashlib.sha256(text.encode()).hexdigest()}


def resume_round(
    setting_dir: str | Path,
    first_round: int,
    last_round: int,
    sites: Sequence[str],
    provenance: Mapping[str, Any] | None = None,
) -> int:
    """The first round of ``first..last`` that is not complete (``last + 1`` if all are).

    Parameters
    ----------
    setting_dir:
        ``results/federated/{setting}``.
    first_round, last_round:
        The block's rounds, inclusive.
    sites:
        Site names.
    provenance:
        See :func:`round_complete`.
    """
    for r in range(first_round, last_round + 1):
        if not round_complete(setting_dir, r, sites, provenance):
            return r
    return last_round + 1
