"""Federated rounds: FedAvg (pure), a site's local round, the aggregation of a round, blocks of rounds.

Paper Sec. 4.2 and Alg. 1 (FedAvg, McMahan 2017); layout and choices in docs/federated.md. Submodules:
:mod:`~fedpsmos.federated.fedavg` (the math), :mod:`~fedpsmos.federated.paths` (the round files and who may
read them), :mod:`~fedpsmos.federated.rounds` (the round contract: errors, policies, round 0),
:mod:`~fedpsmos.federated.site_setup` (what a site's round is given), :mod:`~fedpsmos.federated.site_round`
(a site's local round), :mod:`~fedpsmos.federated.aggregation` (the aggregator's round),
:mod:`~fedpsmos.federated.blocks` (K rounds in one job, one process per site) and
:mod:`~fedpsmos.federated.block_resume` (where a block resumes), :mod:`~fedpsmos.federated.jobs` (the jobs
the workflow plans for a setting), :mod:`~fedpsmos.federated.curves` (per-round curves and the final
federated model).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedpsmos.federated.fedavg import AggregationError, aggregate, check_states, fedavg_weights

__all__ = ["AggregationError", "aggregate", "check_states", "fedavg_weights"]


def __getattr__(name: str) -> Any:
    # FedAvg imports torch on first use only: the workflow reads the file layout (paths) while it builds
    # its DAG, and importing torch there took seconds.
    if name in __all__:
        return getattr(importlib.import_module("fedpsmos.federated.fedavg"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
