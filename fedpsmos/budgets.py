"""Training budgets of the compared models, in iterations, and whether the comparison is fair.

The paper compares models trained with equal work (its Table 5: the central model's 250 x 500 iterations
against the federated settings' client iterations x rounds). This project counts a model's budget as every
training iteration behind it, pretraining included:

- M0 (``pretrain``): ``pretrain_epochs x iterations_per_epoch`` on the fully labelled site;
- central upper bound: M0's iterations plus ``central_epochs x iterations_per_epoch`` on pooled sites;
- site alone: ``site_alone_epochs x iterations_per_epoch`` from scratch on one site;
- federated setting: M0's iterations plus ``local_iterations x rounds`` at every site (each site trains that
  many local iterations; the sites train in parallel, as the paper's five clients do).

A comparison is fair when site-alone models and every federated setting get the central model's budget:
``site_alone == pretrain + central`` and ``local_iterations x rounds == central`` (after M0). The CPU default
is set up that way (tested); the paper config keeps the paper's own numbers (95,000 central iterations after
M0 against 100,000 local iterations of each FL setting), which :func:`budget_mismatches` lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Budgets:
    """Training iterations of each model family (one iteration = one batch of patches)."""

    pretrain: int
    central: int  # after M0
    site_alone: int
    federated: dict[str, int]  # setting -> local iterations of each site after M0
    adaptation: int

    @property
    def central_total(self) -> int:
        """The central model's iterations including M0's."""
        return self.pretrain + self.central

    def federated_total(self, setting: str) -> int:
        """A federated setting's iterations at each site, including M0's.

        Parameters
        ----------
        setting:
            a name from ``federated.settings``.
        """
        return self.pretrain + self.federated[setting]


def iteration_budgets(config: Mapping[str, Any]) -> Budgets:
    """Each model family's budget from a validated configuration.

    Parameters
    ----------
    config:
        the workflow configuration (``training``, ``federated.settings``, ``adaptation``).
    """
    training = config["training"]
    per_epoch = int(training["iterations_per_epoch"])
    return Budgets(
        pretrain=int(training["pretrain_epochs"]) * per_epoch,
        central=int(training["central_epochs"]) * per_epoch,
        site_alone=int(training["site_alone_epochs"]) * per_epoch,
        federated={
            name: int(s["local_iterations"]) * int(s["rounds"])
            for name, s in config["federated"]["settings"].items()
        },
        adaptation=int(config["adaptation"]["epochs"]) * per_epoch,
    )


def budget_mismatches(config: Mapping[str, Any]) -> list[str]:
    """Where the compared models' budgets differ from the central model's; empty when the comparison is fair.

    Parameters
    ----------
    config:
        the workflow configuration.
    """
    b = iteration_budgets(config)
    problems = []
    if b.site_alone != b.central_total:
        problems.append(
            f"site-alone models train {b.site_alone} iterations, the central model {b.central_total} "
            f"(M0 {b.pretrain} + {b.central})"
        )
    for name, local in b.federated.items():
        if local != b.central:
            problems.append(
                f"federated setting {name} trains {local} local iterations a site after M0, "
                f"the central model {b.central}"
            )
    return problems


def baseline_epochs(training: Mapping[str, Any], method: str) -> int:
    """Training epochs of a Table 3 baseline, so that its budget is the central model's.

    PaNN (``panns``) continues from M0 like the central model (``central_epochs``); PIPO (``pipo``) is another
    network, which cannot start from M0's weights, so it trains from scratch for M0's and the central model's
    epochs together.

    Parameters
    ----------
    training:
        the ``training`` section of the configuration.
    method:
        ``panns`` or ``pipo`` (config ``baselines.methods``).
    """
    if method == "panns":
        return int(training["central_epochs"])
    if method == "pipo":
        return int(training["pretrain_epochs"]) + int(training["central_epochs"])
    raise ValueError(f"unknown baseline method {method!r} (known: panns, pipo)")
