"""The training-curves figure: one panel per model family, training loss per epoch of every trained model.

Families in order: M0, central per loss combination, the central baselines (PaNN, PIPO), site alone per site,
and the adapted models with colour per site and line style per mode. The input is every
``results/models/.../curve.csv`` (:mod:`fedpsmos.training.curves`), read into one tidy table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

from fedpsmos.paper.models import loss_label
from fedpsmos.paper.plotting import empty_panel, natural_key, plt, site_colours

TRAINING_FAMILIES = {
    "pretrain": "M0 (pretraining)",
    "central": "central, per loss",
    "baseline": "Table 3 baselines (central)",
    "site_alone": "site alone",
    "adapted": "FL + adaptation",
}
MODE_STYLES = {"full": "-", "decoder": "--", "encoder": ":"}
TRAINING_COLUMNS = ("family", "label", "site", "mode", "epoch", "loss")


def curve_key(path: str | os.PathLike[str]) -> dict[str, str]:
    """Family, line label, site and mode of ``results/models/{model id}[/{site}]/curve.csv``.

    Parameters
    ----------
    path:
        A training curve CSV: ``pretrain``, ``central/{losses}``, ``baseline/{method}``,
        ``site_alone/{site}`` or ``adapted/{mode}/{site}`` under ``results/models``.
    """
    parts = Path(path).parent.parts
    rest = list(parts[parts.index("models") + 1 :]) if "models" in parts else [Path(path).parent.name]
    family = rest[0]
    key = {"family": family, "label": "/".join(rest), "site": "", "mode": ""}
    if family == "pretrain":
        key["label"] = "M0"
    elif family == "central" and len(rest) == 2:
        key["label"] = loss_label(rest[1])
    elif family == "baseline" and len(rest) == 2:
        key["label"] = {"panns": "PaNN", "pipo": "PIPO"}.get(rest[1], rest[1])
    elif family == "site_alone" and len(rest) == 2:
        key.update(label=rest[1], site=rest[1])
    elif family == "adapted" and len(rest) == 3:
        key.update(label=f"{rest[2]}, {rest[1]}", site=rest[2], mode=rest[1])
    return key


def read_training_curves(paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """Tidy table of training curves: one row per (model, epoch); missing files are skipped.

    Parameters
    ----------
    paths:
        ``results/models/.../curve.csv`` files (columns ``epoch``, ``loss``, ...).
    """
    frames = []
    for path in paths:
        if not Path(path).is_file():
            continue
        curve = pd.read_csv(path)
        missing = {"epoch", "loss"} - set(curve.columns)
        if missing:
            raise ValueError(f"{path}: training curve lacks the columns {sorted(missing)}")
        frames.append(curve[["epoch", "loss"]].assign(**curve_key(path)))
    if not frames:
        return pd.DataFrame(columns=list(TRAINING_COLUMNS))
    return pd.concat(frames, ignore_index=True).reindex(columns=list(TRAINING_COLUMNS))


def training_curves_figure(curves: pd.DataFrame) -> Figure:
    """One panel per model family, one line per model: training loss per epoch, legend below each panel.

    Parameters
    ----------
    curves:
        :func:`read_training_curves` output. Site-alone lines are coloured by site; adapted lines by site with
        a line style per mode (legend: sites, then modes); central lines get one qualitative colour each.
    """
    known = list(TRAINING_FAMILIES)
    families = sorted(
        curves["family"].unique(), key=lambda f: (known.index(f) if f in known else len(known), f)
    )
    colours = site_colours([s for s in curves["site"].unique() if s])
    n_panels = max(1, len(families))
    fig, axes = plt.subplots(
        1, n_panels, figsize=(0.4 + 3.4 * n_panels, 3.9), squeeze=False, layout="constrained"
    )
    cycle = plt.get_cmap("tab10")
    for ax, family in zip(axes[0], families, strict=False):
        rows = curves[curves["family"] == family]
        labels = sorted(rows["label"].unique(), key=natural_key)
        handles, names = [], []
        for i, label in enumerate(labels):
            line = rows[rows["label"] == label].sort_values("epoch")
            site, mode = line["site"].iloc[0], line["mode"].iloc[0]
            colour = colours[site] if site else cycle(i % cycle.N)
            style = MODE_STYLES.get(mode, "-") if mode else "-"
            (drawn,) = ax.plot(line["epoch"], line["loss"], color=colour, ls=style, lw=1.3, label=label)
            if not mode:
                handles.append(drawn)
                names.append(label)
        if family == "adapted":
            sites = sorted({s for s in rows["site"] if s}, key=natural_key)
            modes = [m for m in MODE_STYLES if m in set(rows["mode"])]
            modes += sorted(set(rows["mode"]) - set(modes) - {""})
            handles = [Line2D([], [], color=colours[s], lw=2) for s in sites]
            handles += [Line2D([], [], color="0.2", ls=MODE_STYLES.get(m, "-"), lw=1.3) for m in modes]
            names = [*sites, *modes]
        ax.set_title(TRAINING_FAMILIES.get(family, family))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if (rows["loss"] > 0).all():
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(
            handles,
            names,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=min(3, max(1, len(names))),
            fontsize=7,
            frameon=False,
        )
    axes[0, 0].set_ylabel("training loss")
    if not families:
        empty_panel(axes[0, 0], "no training curves yet")
    return fig
