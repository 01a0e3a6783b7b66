"""The jobs of a federated setting and the files they write, as the workflow plans them (docs/federated.md).

A setting's rounds either run as one job per (round, site) plus an aggregation job per round
(:class:`RoundJobs`, ``federated.rounds_per_job: 1``) or as blocks of rounds, one job each
(:class:`BlockJobs`, :mod:`fedpsmos.federated.blocks`). Both name their files through
:mod:`fedpsmos.federated.paths`; :class:`fedpsmos.planning.Plan` builds one per setting for the rules.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedpsmos.federated.paths import global_model_path, private_state_path, record_path, site_model_path

FEDERATED_DIR = "results/federated"


def _posix(path: Path) -> str:
    return path.as_posix()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Federation:
    """The files of a federated setting's ``rounds`` rounds over ``sites`` (:mod:`~fedpsmos.federated.paths`).

    Subclasses say which jobs write them: :class:`RoundJobs` (one job per round and site plus an
    aggregation job per round) or :class:`BlockJobs` (one job per block of rounds).
    """

    setting: str
    rounds: int
    sites: tuple[str, ...]

    @property
    def setting_dir(self) -> str:
        """``results/federated/{setting}``."""
        return f"{FEDERATED_DIR}/{self.setting}"

    def global_model(self, round_index: int) -> str:
        """``round_{r}/global.pt`` (round 0: M0, written by the federation's first job)."""
        return _posix(global_model_path(self.setting_dir, round_index))

    def site_models(self, round_index: int) -> list[str]:
        """Every site's ``round_{r}/{site}.pt``: what aggregation of round ``r`` reads."""
        return [_posix(site_model_path(self.setting_dir, round_index, s)) for s in self.sites]

    def previous_private(self, site: str, round_index: int) -> str | list[str]:
        """The site's private state of round ``r - 1``; no input (``[]``) before round 1."""
        if round_index == 1:
            return []
        return _posix(private_state_path(self.setting_dir, site, round_index - 1))

    def final_private(self, site: str) -> str:
        """The site's private state after the last round (it holds the site's running best model)."""
        return _posix(private_state_path(self.setting_dir, site, self.rounds))

    def last_global(self) -> str:
        """The global model after the last round."""
        return self.global_model(self.rounds)

    def records(self) -> list[str]:
        """``round_{r}/record.json`` of rounds 1..R."""
        return [_posix(record_path(self.setting_dir, r)) for r in range(1, self.rounds + 1)]

    def end(self) -> list[str]:
        """Rule outputs that must exist before the federated model is final."""
        raise NotImplementedError

    def selection_inputs(self, site: str) -> dict[str, str]:
        """Rule outputs a site's model selection waits for (its last private state exists after them)."""
        raise NotImplementedError

    def benchmarks(self) -> list[str]:
        """Snakemake benchmark files of every federated job of the setting (Table 5's training time)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundJobs(Federation):
    """``federated.rounds_per_job: 1``: rule train_site_round per (round, site), aggregate_round per round."""

    def end(self) -> list[str]:
        """Every round's record and the last global model."""
        return [*self.records(), self.last_global()]

    def selection_inputs(self, site: str) -> dict[str, str]:
        """The site's last private state and the last global model (both rule outputs here)."""
        return {"private": self.final_private(site), "global_model": self.last_global()}

    def benchmarks(self) -> list[str]:
        """One file per (round, site) of train_site_round, then one per round of aggregate_round."""
        rounds = range(1, self.rounds + 1)
        local = f"results/benchmarks/train_site_round/{self.setting}"
        aggregation = f"results/benchmarks/aggregate_round/{self.setting}"
        return [f"{local}/round_{r}/{s}.tsv" for r in rounds for s in self.sites] + [
            f"{aggregation}/round_{r}.tsv" for r in rounds
        ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockJobs(Federation):
    """``federated.rounds_per_job: K > 1``: rule run_round_block runs rounds ``bK+1 .. (b+1)K`` as job ``b``.

    A block writes every round's files (:mod:`fedpsmos.federated.blocks`); its rule output is only
    ``block_{b}.json``, so the round files are not DAG nodes.
    """

    rounds_per_job: int

    @property
    def n_blocks(self) -> int:
        """Blocks of the setting: ``ceil(rounds / rounds_per_job)``."""
        return -(-self.rounds // self.rounds_per_job)

    def block_rounds(self, block: int) -> tuple[int, int]:
        """First and last round (inclusive) of block ``b`` (the last block may be shorter)."""
        first = block * self.rounds_per_job + 1
        return first, min(first + self.rounds_per_job - 1, self.rounds)

    def block_file(self, block: int) -> str:
        """``block_{b}.json``: the rule output of block ``b``."""
        return f"{self.setting_dir}/block_{block}.json"

    def previous(self, block: int) -> str:
        """What block ``b`` waits for: the previous block, or M0 as round 0's global model."""
        return self.global_model(0) if block == 0 else self.block_file(block - 1)

    def round_range(self, block: int) -> dict[str, int]:
        """Block ``b``'s ``first_round`` and ``last_round``, as its job's params."""
        first, last = self.block_rounds(block)
        return {"first_round": first, "last_round": last}

    def first_global(self, block: int) -> str:
        """The global model block ``b`` starts from (round ``first - 1``)."""
        return self.global_model(self.block_rounds(block)[0] - 1)

    def end(self) -> list[str]:
        """Every block's file."""
        return [self.block_file(b) for b in range(self.n_blocks)]

    def selection_inputs(self, site: str) -> dict[str, str]:
        """The last block (it wrote the site's last private state and the last global model)."""
        return {"block": self.block_file(self.n_blocks - 1)}

    def benchmarks(self) -> list[str]:
        """One file per block."""
        return [
            f"results/benchmarks/run_round_block/{self.setting}/block_{b}.tsv" for b in range(self.n_blocks)
        ]
