"""Federated rounds: FedAvg (pure), a site's local round, the aggregation of a round, blocks of rounds.

Paper Sec. 4.2 and Alg. 1 (FedAvg, McMahan 2017); layout and choices in docs/federated.md. Submodules:
:mod:`~fedpsmos.federated.fedavg` (the math), :mod:`~fedpsmos.federated.paths` (the round files and who may
read them), :mod:`~fedpsmos.federated.rounds` (the round contract: errors, policies, round 0),
:mod:`~fedpsmos.federated.site_round` (a site's local round), :mod:`~fedpsmos.federated.aggregation` (the
aggregator's round), :mod:`~fedpsmos.federated.blocks` (K rounds in one job, one process per site),
:mod:`~fedpsmos.federated.curves` (per-round curves and the final federated model).
"""

from fedpsmos.federated.fedavg import AggregationError, aggregate, check_states, fedavg_weights

__all__ = ["AggregationError", "aggregate", "check_states", "fedavg_weights"]
