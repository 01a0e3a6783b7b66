"""The file layout of a federation and which of its files each side may read (docs/architecture.md).

``{setting_dir}/round_{r}/{site}.pt`` (a site's model after round ``r``), ``round_{r}/global.pt`` (the
aggregate; round 0 is M0), ``round_{r}/record.json`` (what round ``r`` aggregated) and
``private/{site}/round_{r}.pt`` (a site's optimiser and schedule, never read by the aggregator). The site
side (:mod:`~fedpsmos.federated.site_round`), the aggregator (:mod:`~fedpsmos.federated.aggregation`) and a
block of rounds (:mod:`~fedpsmos.federated.blocks`) all name files through these helpers; the two
``*_input_violations`` checks state the privacy boundary of paper Sec. 4.2 in terms of those paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def round_dir(setting_dir: str | Path, round_index: int) -> Path:
    """``{setting_dir}/round_{r}`` (docs/architecture.md, "Federated rounds")."""
    return Path(setting_dir) / f"round_{round_index}"


def site_model_path(setting_dir: str | Path, round_index: int, site: str) -> Path:
    """``round_{r}/{site}.pt``: the site's local model after round ``r``."""
    return round_dir(setting_dir, round_index) / f"{site}.pt"


def global_model_path(setting_dir: str | Path, round_index: int) -> Path:
    """``round_{r}/global.pt``: the aggregated model after round ``r`` (round 0: M0)."""
    return round_dir(setting_dir, round_index) / "global.pt"


def record_path(setting_dir: str | Path, round_index: int) -> Path:
    """``round_{r}/record.json``: what round ``r`` aggregated."""
    return round_dir(setting_dir, round_index) / "record.json"


def private_state_path(setting_dir: str | Path, site: str, round_index: int) -> Path:
    """``private/{site}/round_{r}.pt``: the site's optimiser and schedule after round ``r``."""
    return Path(setting_dir) / "private" / site / f"round_{round_index}.pt"


def aggregator_input_violations(paths: Sequence[str | Path]) -> list[str]:
    """Inputs an aggregation step must not have: anything but ``round_{r}/{site}.pt`` and ``global.pt``.

    For rule-level privacy tests: the aggregator may read the sites' round models and the previous global
    model, never a private state (``private/``), a manifest, a preprocessed case or a patch index.

    Parameters
    ----------
    paths:
        The aggregation step's input paths.
    """
    bad = []
    for raw in paths:
        path = Path(raw)
        if path.suffix != ".pt" or not path.parent.name.startswith("round_") or "private" in path.parts:
            bad.append(str(raw))
    return bad


def site_input_violations(paths: Sequence[str | Path], site: str, sites: Sequence[str]) -> list[str]:
    """Inputs of ``site``'s local step that belong to another site (a path component naming it).

    Global models (``round_{r}/global.pt``) are shared and allowed; another site's round model, private
    state, manifest, cases or patch index are not.

    Parameters
    ----------
    paths:
        The site step's input paths.
    site:
        The site the step runs for.
    sites:
        Every site of the federation.
    """
    others = {s for s in sites if s != site}
    bad = []
    for raw in paths:
        parts = Path(raw).parts
        names = set(parts) | {Path(raw).stem}
        if names & others:
            bad.append(str(raw))
    return bad
