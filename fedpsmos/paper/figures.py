"""The paper's figures: Dice per organ and model, federated curves, and :func:`make_figures` writing them all.

Every figure is built from a tidy (long) table by grouping, one line per group, returned as a
:class:`matplotlib.figure.Figure` and written as PNG (and PDF for the main ones) by
:func:`fedpsmos.paper.plotting.save_figure`. Inputs that have not been produced yet are skipped or drawn as
an empty panel that says so, never an error.

- Dice per organ: one panel per organ, one box per model, all sites pooled;
- federated curves: one column of panels per setting, one line per site (local training loss per round; the
  mean validation Dice of the incoming global model in a second row when the rounds CSV has it); the same
  plotter draws each federation's own ``rounds.png`` (:mod:`fedpsmos.federated.curves`);
- training curves: :mod:`fedpsmos.paper.training_curves`;
- qualitative results (paper Fig. 2): :mod:`fedpsmos.paper.qualitative`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from fedpsmos.organs import ORGANS
from fedpsmos.paper.models import model_name, model_order
from fedpsmos.paper.plotting import empty_panel, natural_key, plt, save_figure, site_colours
from fedpsmos.paper.qualitative import (
    PREDICTION_PATTERN,
    qualitative_columns,
    qualitative_figure,
    qualitative_rows,
)
from fedpsmos.paper.results import read_metrics
from fedpsmos.paper.training_curves import read_training_curves, training_curves_figure


def dice_figure(metrics: pd.DataFrame) -> Figure:
    """Box plot of per-case Dice for each organ (panel) and model (box), all sites pooled.

    Parameters
    ----------
    metrics:
        Concatenated metrics (:func:`fedpsmos.paper.results.read_metrics`).
    """
    models = sorted(metrics["model"].unique(), key=model_order)
    fig, axes = plt.subplots(1, len(ORGANS), figsize=(3.2 * len(ORGANS), 4.2), sharey=True)
    for ax, organ in zip(axes, ORGANS, strict=True):
        rows = metrics[metrics["organ"] == organ]
        data = [rows.loc[rows["model"] == m, "dice"].dropna().to_numpy() for m in models]
        if models:
            ax.boxplot(data, showmeans=True)
            ax.set_xticks(range(1, len(models) + 1), [model_name(m) for m in models], rotation=75, fontsize=7)
        else:
            ax.text(0.5, 0.5, "no metrics yet", ha="center", transform=ax.transAxes)
        ax.set_title(organ.replace("_", " "))
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Dice (per test case)")
    return fig


# Validation scores of a rounds CSV (mean over the site's organs) -> the y label of their row of panels:
# the incoming global model's Dice and, where recorded, the site model's Dice after its local training.
VALIDATION_COLUMNS = {"val_dice": "validation Dice", "val_dice_local": "val. Dice after local"}
ROUNDS_COLUMNS = ("setting", "round", "site", "loss", *VALIDATION_COLUMNS)


def per_site_rounds(raw: pd.DataFrame, setting: str) -> pd.DataFrame:
    """Collapse a rounds CSV (one row per round, site and organ) to one row per round and site.

    Parameters
    ----------
    raw:
        :func:`fedpsmos.federated.curves.curve_frame` output (or the ``rounds.csv`` it wrote): columns
        ``round``, ``site``, ``loss`` and optionally the :data:`VALIDATION_COLUMNS` (one value per organ).
    setting:
        The federated setting, written into a ``setting`` column.
    """
    missing = {"round", "site", "loss"} - set(raw.columns)
    if missing:
        raise ValueError(
            f"rounds table of {setting!r} lacks the columns {sorted(missing)} "
            "(expected one row per round, site and organ, as fedpsmos.federated.curves writes)"
        )
    frame = raw.assign(site=raw["site"].astype(str))
    frame = frame.assign(**{c: math.nan for c in VALIDATION_COLUMNS if c not in frame.columns})
    scores = {c: (c, "mean") for c in VALIDATION_COLUMNS}
    out = frame.groupby(["round", "site"], as_index=False, sort=True).agg(loss=("loss", "first"), **scores)
    out.insert(0, "setting", setting)
    return out.reindex(columns=list(ROUNDS_COLUMNS))


def read_federated_curves(paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """Tidy table of the settings' per-round curves, a row per (setting, round, site); missing files skipped.

    Parameters
    ----------
    paths:
        ``results/models/federated/{setting}/rounds.csv`` files; the setting is the folder name.
    """
    frames = []
    for path in paths:
        if not Path(path).is_file():
            continue
        try:
            frames.append(per_site_rounds(pd.read_csv(path), Path(path).parent.name))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    if not frames:
        return pd.DataFrame(columns=list(ROUNDS_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def federated_curves_figure(rounds: pd.DataFrame) -> Figure:
    """One column of panels per setting, one line per site: local loss per round (and validation Dice below).

    Parameters
    ----------
    rounds:
        :func:`read_federated_curves` (or :func:`per_site_rounds`) output. A further row of panels is drawn
        for each of the :data:`VALIDATION_COLUMNS` that has any value. Rows share their y axis; the site
        legend sits right of the panels.
    """
    settings = list(dict.fromkeys(rounds["setting"]))
    sites = sorted(rounds["site"].unique(), key=natural_key)
    colours = site_colours(sites)
    rows = [("loss", "local training loss")]
    rows += [(c, name) for c, name in VALIDATION_COLUMNS.items() if c in rounds and rounds[c].notna().any()]
    n_cols = max(1, len(settings))
    fig, axes = plt.subplots(
        len(rows),
        n_cols,
        figsize=(1.2 + 2.8 * n_cols, 0.6 + 2.4 * len(rows)),
        sharex="col",
        sharey="row",
        squeeze=False,
        layout="constrained",
    )
    for col, setting in enumerate(settings):
        per_setting = rounds[rounds["setting"] == setting]
        for r, (column, _) in enumerate(rows):
            ax = axes[r, col]
            for site in sites:
                line = per_setting[per_setting["site"] == site].sort_values("round")
                if not line.empty:
                    ax.plot(
                        line["round"], line[column], marker="o", ms=3, lw=1.3, color=colours[site], label=site
                    )
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, col].set_title(str(setting))
    for r, (column, ylabel) in enumerate(rows):
        axes[r, 0].set_ylabel(ylabel)
        if column in VALIDATION_COLUMNS:
            axes[r, 0].set_ylim(0, 1.02)
    for ax in axes[-1]:
        ax.set_xlabel("round")
    if not settings:
        empty_panel(axes[0, 0], "no federated curves yet")
    else:
        handles = [Line2D([], [], color=colours[s], marker="o", ms=3, lw=1.3) for s in sites]
        fig.legend(handles, sites, loc="outside right upper", title="site", fontsize=8, frameon=False)
    return fig


FIGURES = {
    "dice": "fig_dice_per_organ.png",
    "qualitative": "fig_qualitative.png",
    "federated": "fig_federated_curves.png",
    "training": "fig_training_curves.png",
}


def make_figures(
    metrics_csvs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    curves: Sequence[str | os.PathLike[str]],
    federated_curves: Sequence[str | os.PathLike[str]],
    manifests: Sequence[str | os.PathLike[str]],
    qualitative_models: Sequence[str],
    prediction_pattern: str = PREDICTION_PATTERN,
) -> list[Path]:
    """Write the figures of :data:`FIGURES` into ``out_dir`` (PNG; PDF too for the Dice and qualitative ones).

    Parameters
    ----------
    metrics_csvs:
        All metrics CSVs available.
    out_dir:
        ``results/paper``.
    curves:
        ``results/models/.../curve.csv`` files (epoch, loss, lr); missing ones are skipped.
    federated_curves:
        ``results/models/federated/{setting}/rounds.csv`` files (one row per round, site and organ).
    manifests:
        Site manifests; each organ family's row of the qualitative figure comes from one of them.
    qualitative_models:
        Candidate model ids for the qualitative figure's columns (:func:`qualitative_columns` keeps one per
        kind, the best adaptation mode by mean Dice).
    prediction_pattern:
        Prediction path with ``{model}``, ``{site}``, ``{case}``.
    """
    out = Path(out_dir)
    metrics = read_metrics(metrics_csvs)
    paths = save_figure(dice_figure(metrics), out / FIGURES["dice"], pdf=True)
    qualitative = qualitative_figure(
        qualitative_rows(manifests),
        qualitative_columns(qualitative_models, metrics),
        prediction_pattern=prediction_pattern,
    )
    paths += save_figure(qualitative, out / FIGURES["qualitative"], pdf=True)
    paths += save_figure(training_curves_figure(read_training_curves(curves)), out / FIGURES["training"])
    paths += save_figure(
        federated_curves_figure(read_federated_curves(federated_curves)), out / FIGURES["federated"]
    )
    return paths
