"""The paper's Tables 2-6 from the workflow's metrics CSVs: the models each compares, in order, and captions.

Each row is a model's results on the fully and on the partially labelled sites
(:mod:`fedpsmos.paper.results`), with the paired Wilcoxon tests of :mod:`fedpsmos.paper.paired_tests` in
Tables 4 and 6; every table is written as CSV, Markdown and LaTeX (:mod:`fedpsmos.paper.table_format`).

- Table 2: loss-combination ablation of the central model (``central/{losses}``).
- Table 3: the other methods for partially labelled data trained centrally (PaNN, PIPO, the MargExc-style
  Dice+CE combination) against the default combination, federated and adapted.
- Table 4: federated against M0 (pretraining alone), central (upper bound) and site-alone models.
- Table 5: federated settings (client iterations x rounds), total iterations and training time.
- Table 6: the adaptation modes against the federated model they start from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedpsmos.evaluation.metrics import DEFAULT_HD95, check_convention
from fedpsmos.paper.models import loss_label, model_name
from fedpsmos.paper.results import checked_convention, read_metrics, results_row, results_table
from fedpsmos.paper.table_format import write_table


def table2_losses(metrics: pd.DataFrame, central_losses: Sequence[str]) -> pd.DataFrame:
    """Table 2: the central model trained with each loss combination.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    central_losses:
        Loss combination names (config ``losses.central``).
    """
    return results_table(metrics, [(model_name(f"central/{c}"), f"central/{c}") for c in central_losses])


def best_adaptation_mode(metrics: pd.DataFrame, modes: Sequence[str]) -> str | None:
    """The adaptation mode with the highest mean Dice over all its rows, or ``None`` when none has metrics.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    modes:
        Candidate modes (config ``adaptation.modes``).
    """
    means = {m: metrics.loc[metrics["model"] == f"adapted/{m}", "dice"].mean() for m in modes}
    scored = {m: v for m, v in means.items() if not pd.isna(v)}
    return max(scored, key=lambda m: scored[m]) if scored else None


def table3_margexc(
    metrics: pd.DataFrame,
    *,
    margexc: str,
    default_losses: str,
    default_setting: str,
    modes: Sequence[str],
    baselines: Sequence[str] = ("panns", "pipo"),
) -> pd.DataFrame:
    """Table 3: PaNN, PIPO, MargExc-style central models vs the default combination, FL, best adaptation.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    margexc, default_losses:
        Loss combination names (config ``losses.margexc`` and ``losses.default``).
    baselines:
        Baseline methods shown first, in the paper's order (config ``baselines.methods``; a method not run
        gives a row of '-').
    default_setting:
        Federated setting compared (config ``federated.default``).
    modes:
        Adaptation modes; the best by mean Dice is shown.
    """
    best = best_adaptation_mode(metrics, modes)
    rows = [
        *((model_name(f"baseline/{m}"), f"baseline/{m}") for m in baselines),
        (f"MargExc-style losses: {model_name(f'central/{margexc}')}", f"central/{margexc}"),
        (model_name(f"central/{default_losses}"), f"central/{default_losses}"),
        (model_name(f"federated/{default_setting}"), f"federated/{default_setting}"),
        (f"{model_name(f'adapted/{best}')} (best mode)", f"adapted/{best}")
        if best
        else ("FL + adaptation (best mode)", "adapted/none"),
    ]
    return results_table(metrics, rows)


def table4_federated(metrics: pd.DataFrame, *, default_losses: str, default_setting: str) -> pd.DataFrame:
    """Table 4: M0 (pretraining alone), central upper bound and site-alone models vs the federated model.

    M0 and site-alone rows carry the paired Wilcoxon p-values against the federated model, so the table shows
    what federated training adds over pretraining and over training alone.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    default_losses, default_setting:
        The central loss combination and the federated setting compared.
    """
    federated = f"federated/{default_setting}"
    ids = ["pretrain", f"central/{default_losses}", "site_alone", federated]
    comparisons = {"pretrain": federated, "site_alone": federated}
    return results_table(metrics, [(model_name(i), i) for i in ids], comparisons=comparisons)


def benchmark_seconds(paths: Sequence[str | os.PathLike[str]]) -> float:
    """Total wall time ``s`` of Snakemake benchmark files (NaN when any is missing).

    Parameters
    ----------
    paths:
        ``results/benchmarks/...tsv`` files written by the rules' ``benchmark:`` directive.
    """
    if not paths:
        return math.nan
    total = 0.0
    for path in paths:
        if not Path(path).is_file():
            return math.nan
        frame = pd.read_csv(path, sep="\t")
        if "s" not in frame.columns:
            raise ValueError(f"{path}: benchmark file has no 's' column")
        total += float(frame["s"].sum())
    return total


def table5_settings(
    metrics: pd.DataFrame,
    *,
    settings: Mapping[str, Mapping[str, int]],
    default_losses: str,
    benchmarks: Mapping[str, Sequence[str | os.PathLike[str]]],
    pretrain_iterations: int | None = None,
    central_iterations: int | None = None,
) -> pd.DataFrame:
    """Table 5: federated settings at equal total iterations, with their mean results and training time.

    ``total iterations`` counts each site's local iterations after M0 (client iterations x rounds) for a
    federated setting and the central model's iterations after M0 for the non-FL row; ``with M0`` adds M0's
    pretraining iterations, which every row starts from. Training time sums the Snakemake benchmark times of
    the jobs that trained the row's model after M0.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    settings:
        Setting -> ``{local_iterations, rounds}`` (config ``federated.settings``).
    default_losses:
        The central model's loss combination (the non-FL row).
    benchmarks:
        Setting name or model id -> the benchmark files of all jobs that trained it (summed).
    pretrain_iterations, central_iterations:
        M0's iterations and the central model's after M0 (:func:`fedpsmos.budgets.iteration_budgets`);
        ``None`` leaves those cells empty.
    """

    def with_m0(iterations: int | None) -> int | None:
        return None if iterations is None or pretrain_iterations is None else pretrain_iterations + iterations

    all_sites = sorted(metrics["site"].unique())
    records = []
    for setting, values in settings.items():
        local, rounds = int(values["local_iterations"]), int(values["rounds"])
        row = results_row(metrics, f"federated/{setting}", all_sites)
        files = benchmarks.get(setting, benchmarks.get(f"federated/{setting}", []))
        records.append(
            {
                "model": model_name(f"federated/{setting}"),
                "client iterations": local,
                "rounds": rounds,
                "total iterations": local * rounds,
                "with M0": with_m0(local * rounds),
                "mean DC": row["mean DC"],
                "mean HD95": row["mean HD95"],
                "missed": row["missed"],
                "spurious": row["spurious"],
                "training time (h)": benchmark_seconds(files) / 3600,
            }
        )
    central = f"central/{default_losses}"
    row = results_row(metrics, central, all_sites)
    records.append(
        {
            "model": model_name(central),
            "client iterations": None,
            "rounds": None,
            "total iterations": central_iterations,
            "with M0": with_m0(central_iterations),
            "mean DC": row["mean DC"],
            "mean HD95": row["mean HD95"],
            "missed": row["missed"],
            "spurious": row["spurious"],
            "training time (h)": benchmark_seconds(benchmarks.get(central, [])) / 3600,
        }
    )
    return pd.DataFrame(records)


def table6_adaptation(metrics: pd.DataFrame, *, default_setting: str, modes: Sequence[str]) -> pd.DataFrame:
    """Table 6: the federated model and its adaptation to each site with each mode (per-site models).

    Each adaptation row carries the paired Wilcoxon p-values against the federated model.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    default_setting:
        The federated setting adapted.
    modes:
        Adaptation modes (config ``adaptation.modes``).
    """
    federated = f"federated/{default_setting}"
    ids = [federated, *(f"adapted/{m}" for m in modes)]
    comparisons = {f"adapted/{m}": federated for m in modes}
    return results_table(metrics, [(model_name(i), i) for i in ids], comparisons=comparisons)


CONVENTION_TEXT = {
    "max": "the larger of the two directed 95th percentiles of surface distances (MONAI / DeepMind "
    "surface-distance convention)",
    "pooled": "the 95th percentile of both directions' surface distances pooled (medpy convention)",
}


def caption_note(convention: str) -> str:
    """The sentence every caption ends with: what DC and HD95 are, the HD95 convention and the penalty.

    Parameters
    ----------
    convention:
        The HD95 convention of the metrics (``max`` or ``pooled``).
    """
    return (
        "DC: Dice; HD95 (mm, original spacing): "
        f"{CONVENTION_TEXT[check_convention(convention)]}; both averaged over test cases (± sample SD over "
        "cases where shown). A missed organ "
        "(reference present, prediction empty) or a spurious one (reference empty, prediction present) "
        "counts in both means with Dice 0 and HD95 = the image diagonal in mm; 'missed' and 'spurious' "
        "count such (case, organ) pairs per row; an organ absent from both masks has Dice 1 and no HD95. "
        "'-': not run."
    )


def make_tables(
    metrics_csvs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    central_losses: Sequence[str],
    margexc: str,
    default_losses: str,
    settings: Mapping[str, Mapping[str, int]],
    default_setting: str,
    modes: Sequence[str],
    benchmarks: Mapping[str, Sequence[str | os.PathLike[str]]] | None = None,
    hd95_convention: str = DEFAULT_HD95,
    budgets: Mapping[str, Any] | None = None,
    baselines: Sequence[str] = ("panns", "pipo"),
) -> list[Path]:
    """Build Tables 2-6 from the metrics CSVs and write ``{out_dir}/table{2..6}.{csv,md,tex}``.

    Parameters
    ----------
    metrics_csvs:
        All ``results/evaluation/{model}/{site}/metrics.csv`` available (missing ones give '-' rows).
    out_dir:
        ``results/paper``.
    central_losses, margexc, default_losses:
        Config ``losses.central``, ``losses.margexc``, ``losses.default``.
    settings, default_setting:
        Config ``federated.settings`` and ``federated.default``.
    modes:
        Config ``adaptation.modes``.
    benchmarks:
        Setting name or model id -> benchmark files of the jobs that trained it (Table 5's time).
    hd95_convention:
        Config ``evaluation.hd95``; the metrics must have been computed with it
        (:func:`~fedpsmos.paper.results.checked_convention`).
    budgets:
        ``pretrain`` and ``central`` iterations (:class:`fedpsmos.budgets.Budgets` as a dict) for Table 5.
    baselines:
        Config ``baselines.methods`` (Table 3's PaNN and PIPO rows).
    """
    metrics = read_metrics(metrics_csvs, require_flags=True)
    note = caption_note(checked_convention(metrics, hd95_convention))
    out = Path(out_dir)
    ran = ", ".join(loss_label(c) for c in central_losses)
    tables = [
        (
            "table2",
            table2_losses(metrics, central_losses),
            f"Table 2. Loss-combination ablation of the central (non-FL) model; combinations run: {ran}. "
            f"{note}",
        ),
        (
            "table3",
            table3_margexc(
                metrics,
                margexc=margexc,
                default_losses=default_losses,
                default_setting=default_setting,
                modes=modes,
                baselines=baselines,
            ),
            "Table 3. Methods for partially labelled data trained centrally on the pooled sites with the "
            "central model's budget: PaNN (prior-aware KL) and PIPO (pyramid input/output network), "
            f"MargExc-style {loss_label(margexc)}; against {loss_label(default_losses)} (central), "
            f"federated ({default_setting}) and the best adaptation mode. {note}",
        ),
        (
            "table4",
            table4_federated(metrics, default_losses=default_losses, default_setting=default_setting),
            f"Table 4. Federated ({default_setting}) against M0 (pretrained on site 1 only), the central "
            f"upper bound and site-alone models. {note} Under the table: paired Wilcoxon p of M0 and site "
            "alone vs federated.",
        ),
        (
            "table5",
            table5_settings(
                metrics,
                settings=settings,
                default_losses=default_losses,
                benchmarks=benchmarks or {},
                pretrain_iterations=None if budgets is None else int(budgets["pretrain"]),
                central_iterations=None if budgets is None else int(budgets["central"]),
            ),
            "Table 5. Federated settings: client iterations x rounds; total iterations: each site's local "
            "iterations after M0 (the non-FL row: the central model's after M0), with M0: plus M0's; "
            "mean over all sites and organs; training time: sum of the Snakemake benchmark times of the "
            f"jobs that trained the model after M0. {note}",
        ),
        (
            "table6",
            table6_adaptation(metrics, default_setting=default_setting, modes=modes),
            f"Table 6. Site adaptation of the federated model ({default_setting}): all layers, decoder only, "
            f"encoder only, each site's own model on its own test cases. {note} Under the table: paired "
            "Wilcoxon p of each mode vs federated.",
        ),
    ]
    paths: list[Path] = []
    for stem, df, caption in tables:
        paths += write_table(df, out / stem, caption)
    return paths
