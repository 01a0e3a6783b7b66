"""The workflow's plan: which files each rule reads, which rounds a federated job runs, what is evaluated.

Everything Snakemake needs to build the DAG from the validated configuration lives here, so it can be
tested without Snakemake; ``workflow/rules/common.smk`` builds one :class:`Plan` and its helpers are one line
each. Layout (docs/architecture.md): ``results/data/{site}/manifest.json``,
``results/preprocessed/{site}/{case}.b2zip``, ``results/patches/{site}.parquet``, models under
``results/models/{model id}/``, the federation's files under ``results/federated/{setting}/``
(:mod:`fedpsmos.federated.paths`; the jobs that write them: :mod:`fedpsmos.federated.jobs`) and each
evaluated (model, site) pair under ``results/evaluation/{model id}/{site}/`` (``predictions/`` and
``metrics.csv``).

What a plan computes per site (case ids, case files) is computed once and shared by every job that asks: a
federated block job's params list every site's cases, and the paper config has 350 block jobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedpsmos.budgets import baseline_epochs, iteration_budgets
from fedpsmos.data.sources import case_ids
from fedpsmos.federated.jobs import BlockJobs, Federation, RoundJobs
from fedpsmos.organs import ORGANS, labelled_organs
from fedpsmos.paper.models import KINDS
from fedpsmos.preprocessing.fingerprint import needs_fingerprint

EVALUATION_DIR = "results/evaluation"
PAPER_TABLES = tuple(f"results/paper/table{n}.{ext}" for n in (2, 3, 4, 5, 6) for ext in ("csv", "md", "tex"))
PAPER_FIGURES = (
    "results/paper/fig_dice_per_organ.png",
    "results/paper/fig_qualitative.png",
    "results/paper/fig_federated_curves.png",
    "results/paper/fig_training_curves.png",
)


def one_of(names: Iterable[str]) -> str:
    """A regular expression matching exactly one of ``names`` (longest first, so no name hides another).

    Parameters
    ----------
    names:
        Literal names (sites, settings, loss combinations) used as a wildcard constraint.
    """
    return "|".join(sorted(names, key=len, reverse=True))


def predictions_dir(model: str, site: str) -> str:
    """``results/evaluation/{model}/{site}/predictions``: a model's test-case predictions at a site.

    Parameters
    ----------
    model:
        A model id (:mod:`fedpsmos.paper.models`), e.g. ``federated/V2``.
    site:
        The evaluated site.
    """
    return f"{EVALUATION_DIR}/{model}/{site}/predictions"


def metrics_path(model: str, site: str) -> str:
    """``results/evaluation/{model}/{site}/metrics.csv``: Dice and HD95 per test case and organ.

    Parameters
    ----------
    model, site:
        See :func:`predictions_dir`.
    """
    return f"{EVALUATION_DIR}/{model}/{site}/metrics.csv"


class Plan:
    """Paths and jobs of the workflow for one validated configuration.

    Parameters
    ----------
    config:
        The configuration after :func:`fedpsmos.config.drop_unset` and
        :func:`fedpsmos.config.validate_config`; it is read, not copied, so it must not change while the
        plan is used.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.sites: list[str] = list(config["sites"])
        self.full_sites: list[str] = [s for s in self.sites if set(self.site_organs(s)) == set(ORGANS)]
        losses = config["losses"]
        self.combinations: dict[str, Any] = losses["combinations"]
        self.central_losses: list[str] = list(losses["central"])
        self.default_losses: str = losses["default"]
        self.settings: dict[str, Any] = config["federated"]["settings"]
        self.default_setting: str = config["federated"]["default"]
        self.rounds_per_job: int = int(config["federated"]["rounds_per_job"])
        self.modes: list[str] = list(config["adaptation"]["modes"])
        self.evaluated: list[str] = list(config.get("evaluation", {}).get("models", KINDS))
        self.baselines: list[str] = list(config.get("baselines", {}).get("methods", []))
        self._case_files: dict[str, tuple[str, ...]] = {}
        self._federations: dict[str, Federation] = {}

    # ------------------------------------------------------------ data

    def is_synthetic(self, site: str) -> bool:
        """Whether the site's raw data is generated (``source: synthetic``)."""
        return self.config["sites"][site]["source"] == "synthetic"

    def site_root(self, site: str) -> str:
        """The raw folder of a site: generated for synthetic sites, the user's folder otherwise."""
        return f"results/raw/{site}" if self.is_synthetic(site) else self.config["sites"][site]["path"]

    def raw_inputs(self, site: str) -> list[str]:
        """Synthetic sites depend on their generator rule; real folders are read where they are."""
        return [self.site_root(site)] if self.is_synthetic(site) else []

    def case_files(self, site: str) -> list[str]:
        """``results/preprocessed/{site}/{case}.b2zip`` of every case of the site, listed once per plan.

        Raises :class:`~fedpsmos.data.sources.DataError` naming the folder when a real site's cases cannot
        be listed.
        """
        if site not in self._case_files:
            spec = self.config["sites"][site]
            ids = case_ids(
                spec["source"],
                self.site_root(site),
                site=site,
                spec=spec.get("synthetic"),
                files=spec.get("files"),
            )
            self._case_files[site] = tuple(f"results/preprocessed/{site}/{case}.b2zip" for case in ids)
        return list(self._case_files[site])

    def all_case_files(self) -> list[str]:
        """Every site's case files, site by site (a block job's workers each take their own site's)."""
        return [c for s in self.sites for c in self.case_files(s)]

    def fingerprint_input(self) -> dict[str, str]:
        """The federated fingerprint, only when a preprocessing setting is ``auto`` (else no such job)."""
        if needs_fingerprint(self.config["preprocessing"]):
            return {"fingerprint": "results/data/fingerprint.json"}
        return {}

    def site_descriptor(self, site: str) -> dict[str, str]:
        """How a training script finds one site's data (paths only)."""
        return {
            "site": site,
            "manifest": f"results/data/{site}/manifest.json",
            "npz_dir": f"results/preprocessed/{site}",
            "patches": f"results/patches/{site}.parquet",
        }

    def site_inputs(self, site: str) -> dict[str, Any]:
        """Everything one site's training reads: its manifest, its preprocessed cases and its patch index."""
        descriptor = self.site_descriptor(site)
        return {
            "manifest": descriptor["manifest"],
            "cases": self.case_files(site),
            "patches": descriptor["patches"],
        }

    def prediction_inputs(self, site: str) -> dict[str, str]:
        """What a site's prediction job waits for: its manifest (the test split) and its patch index.

        The job reads the site's preprocessed test cases from :meth:`site_descriptor`'s ``npz_dir`` (a param);
        the patch index is built from every preprocessed case of the site, so it orders the job after them
        without listing the cases: as inputs of every prediction job they were 12,000 paper DAG edges.
        """
        descriptor = self.site_descriptor(site)
        return {"manifest": descriptor["manifest"], "patches": descriptor["patches"]}

    def sites_inputs(self, sites: Sequence[str]) -> list[str]:
        """The training inputs of several sites in one list (central models, M0)."""
        files: list[str] = []
        for site in sites:
            one = self.site_inputs(site)
            files += [one["manifest"], one["patches"], *one["cases"]]
        return files

    def site_organs(self, site: str) -> list[str]:
        """The organs a site labels."""
        return list(labelled_organs(self.config["sites"][site]["labels"]))

    def site_split(self, site: str) -> dict[str, Any]:
        """A site's split settings: config ``split``, overridden key by key by ``sites.{site}.split``."""
        return {**self.config["split"], **self.config["sites"][site].get("split", {})}

    def site_validates(self, site: str) -> bool:
        """Whether a site holds out validation cases (then federated evaluation uses its selected model)."""
        return int(self.site_split(site).get("validation_cases", 0)) > 0

    # ------------------------------------------------------------ models

    def model_file(self, model: str, site: str) -> str:
        """The checkpoint behind a model id at a site (docs/federated.md).

        Site-alone and adapted models are one per site; a federated model is, with local validation on, the
        model the site selected.

        Parameters
        ----------
        model:
            A model id, e.g. ``pretrain``, ``federated/V2``, ``adapted/decoder``.
        site:
            The site it is applied to.
        """
        if model == "site_alone":
            return f"results/models/site_alone/{site}/model.pt"
        if model.startswith("adapted/"):
            return f"results/models/{model}/{site}/model.pt"
        if model.startswith("federated/") and self.site_validates(site):
            return f"results/models/{model}/selected/{site}.pt"
        return f"results/models/{model}/model.pt"

    @property
    def default_combination(self) -> dict[str, Any]:
        """The term weights of ``losses.default`` (M0, federated rounds, adaptation)."""
        return self.combinations[self.default_losses]

    def site_alone_loss(self) -> dict[str, Any]:
        """Site-alone models use the conventional form of the default combination (their labels are complete
        for the organs they output)."""
        return {"marginal": self.default_combination["marginal"]}

    def baseline_inputs(self, method: str) -> dict[str, str]:
        """PaNN starts from M0 and reads the organ-size prior; PIPO (another network) trains from scratch."""
        if method == "panns":
            return {
                "init": "results/models/pretrain/model.pt",
                "prior": "results/models/baseline/panns/prior.json",
            }
        return {}

    def baseline_loss(self, method: str) -> dict[str, Any]:
        """The marginal side of ``baselines.losses``, plus PaNN's prior-aware term (its prior is an input)."""
        baselines = self.config["baselines"]
        spec: dict[str, Any] = {"marginal": dict(self.combinations[baselines["losses"]]["marginal"])}
        if method == "panns":
            spec["prior_aware"] = {"weight": float(baselines.get("panns", {}).get("weight", 1.0))}
        return spec

    def baseline_epochs(self, method: str) -> int:
        """The central model's budget (:func:`fedpsmos.budgets.baseline_epochs`)."""
        return baseline_epochs(self.config["training"], method)

    def baseline_network(self, method: str) -> dict[str, Any]:
        """The configured network, as PIPO's pyramid network for ``pipo``."""
        return {**self.config["network"], "architecture": "pipo" if method == "pipo" else "plain"}

    # ------------------------------------------------------------ federated rounds

    @property
    def per_round(self) -> bool:
        """Whether every federated round is its own jobs (``rounds_per_job: 1``) rather than blocks."""
        return self.rounds_per_job == 1

    def federation(self, setting: str) -> Federation:
        """The files and jobs of one federated setting (per-round jobs or blocks of rounds).

        Parameters
        ----------
        setting:
            A key of ``federated.settings``.
        """
        if setting not in self._federations:
            rounds, sites = int(self.settings[setting]["rounds"]), tuple(self.sites)
            self._federations[setting] = (
                RoundJobs(setting=setting, rounds=rounds, sites=sites)
                if self.per_round
                else BlockJobs(
                    setting=setting, rounds=rounds, sites=sites, rounds_per_job=self.rounds_per_job
                )
            )
        return self._federations[setting]

    def blocks(self, setting: str) -> BlockJobs:
        """The setting's blocks of rounds; an error when the configuration runs per-round jobs."""
        federation = self.federation(setting)
        if not isinstance(federation, BlockJobs):
            raise ValueError(f"federated.rounds_per_job is 1: setting {setting} runs no blocks of rounds")
        return federation

    def block_inputs(self, setting: str, block: int) -> dict[str, Any]:
        """A block job's inputs: the previous block's file and every site's manifest and patch index.

        A site's patch index is built from all of its preprocessed cases, so it orders the block after them;
        the case paths themselves go to the job as params (:meth:`all_case_files`): as inputs of every block
        job they were 350 x 693 DAG edges in the paper config.
        """
        return {
            "previous": self.blocks(setting).previous(block),
            "manifests": [self.site_descriptor(s)["manifest"] for s in self.sites],
            "patches": [self.site_descriptor(s)["patches"] for s in self.sites],
        }

    # ------------------------------------------------------------ evaluation and paper

    def evaluated_pairs(self) -> list[tuple[str, str]]:
        """(model id, site) pairs that are predicted and evaluated, in ``evaluation.models`` order."""
        variants = {
            "pretrain": ["pretrain"],
            "central": [f"central/{c}" for c in self.central_losses],
            "baseline": [f"baseline/{m}" for m in self.baselines],
            "federated": [f"federated/{g}" for g in self.settings],
            "site_alone": ["site_alone"],
            "adapted": [f"adapted/{m}" for m in self.modes],
        }
        return [
            (model, site) for family in self.evaluated for model in variants[family] for site in self.sites
        ]

    def all_metrics(self) -> list[str]:
        """``metrics.csv`` of every evaluated pair."""
        return [metrics_path(model, site) for model, site in self.evaluated_pairs()]

    def all_predictions(self) -> list[str]:
        """``predictions/`` of every evaluated pair."""
        return [predictions_dir(model, site) for model, site in self.evaluated_pairs()]

    def trained_model_dirs(self) -> list[str]:
        """Model folders holding a training curve (M0 always: every other model starts from it)."""
        dirs = ["results/models/pretrain"]
        if "central" in self.evaluated:
            dirs += [f"results/models/central/{c}" for c in self.central_losses]
        if "baseline" in self.evaluated:
            dirs += [f"results/models/baseline/{m}" for m in self.baselines]
        if "site_alone" in self.evaluated:
            dirs += [f"results/models/site_alone/{s}" for s in self.sites]
        if "adapted" in self.evaluated:
            dirs += [f"results/models/adapted/{m}/{s}" for m in self.modes for s in self.sites]
        return dirs

    def training_curves(self) -> list[str]:
        """``curve.csv`` of every trained model folder."""
        return [f"{d}/curve.csv" for d in self.trained_model_dirs()]

    def federated_curves(self) -> list[str]:
        """Every setting's ``rounds.csv`` when federated or adapted models are evaluated."""
        if "federated" not in self.evaluated and "adapted" not in self.evaluated:
            return []
        return [f"results/models/federated/{s}/rounds.csv" for s in self.settings]

    def table5_benchmarks(self) -> dict[str, list[str]]:
        """Benchmark files behind Table 5's rows: every federated setting and the central model."""
        files = {}
        if "federated" in self.evaluated:
            files = {setting: self.federation(setting).benchmarks() for setting in self.settings}
        if "central" in self.evaluated and self.default_losses in self.central_losses:
            files[f"central/{self.default_losses}"] = [
                f"results/benchmarks/train_central/{self.default_losses}.tsv"
            ]
        return files

    def table5_benchmark_list(self) -> list[str]:
        """:meth:`table5_benchmarks` in one list."""
        return [f for files in self.table5_benchmarks().values() for f in files]

    def qualitative_models(self) -> list[str]:
        """Candidate columns of the qualitative figure: M0, site alone, the default federated setting, every
        adaptation mode (the figure keeps the best by mean Dice) and the central model of the default losses.
        """
        central = self.default_losses if self.default_losses in self.central_losses else None
        if central is None and self.central_losses:
            central = self.central_losses[0]
        candidates = {
            "pretrain": ["pretrain"],
            "site_alone": ["site_alone"],
            "federated": [f"federated/{self.default_setting}"],
            "adapted": [f"adapted/{m}" for m in self.modes],
            "central": [f"central/{central}"] if central else [],
        }
        return [m for family, models in candidates.items() if family in self.evaluated for m in models]

    def budgets(self) -> dict[str, Any]:
        """Each model family's training iterations (Table 5's iteration columns)."""
        return dataclasses.asdict(iteration_budgets(self.config))

    def paper_outputs(self) -> list[str]:
        """The paper's tables (2-6, as CSV, Markdown and LaTeX) and figures."""
        return [*PAPER_TABLES, *PAPER_FIGURES]

    def final_output(self) -> list[str]:
        """What ``snakemake all`` builds: the paper's tables and figures and every site's data preview."""
        return [*self.paper_outputs(), *(f"results/data/{s}/preview.png" for s in self.sites)]
