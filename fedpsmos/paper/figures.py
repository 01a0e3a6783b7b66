"""The paper's figures: Dice per organ and model, qualitative overlays (paper Fig. 2), training curves.

Every figure is built from a tidy (long) table by grouping, one line per group, returned as a
:class:`matplotlib.figure.Figure` (so tests read its axes, lines and labels) and written as PNG (and PDF for
the main ones) through :func:`fedpsmos.atomic.atomic_path`, with the Agg backend so it runs without a display.
Inputs that have not been produced yet are skipped or drawn as an empty panel that says so, never an error.

- federated curves: one column of panels per setting, one line per site (local training loss per round; the
  mean validation Dice of the incoming global model in a second row when the rounds CSV has it);
- training curves: one panel per model family (M0, central per loss combination, site alone per site, adapted
  with colour per site and line style per mode), loss per epoch;
- qualitative results: one row per organ family (liver, spleen, pancreas, kidneys), each from the site that
  labels it (a partially labelled one first), columns CT, reference and a few models.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from fedpsmos.atomic import atomic_path  # noqa: E402
from fedpsmos.data.label_map import LabelMap, apply_label_map_image  # noqa: E402
from fedpsmos.organs import CLASS_INDEX, IGNORE_CLASS, ORGANS, labelled_organs  # noqa: E402
from fedpsmos.paper.models import loss_label, model_name, model_order, parse_model_id  # noqa: E402
from fedpsmos.paper.tables import read_metrics  # noqa: E402
from fedpsmos.preprocessing.orientation import reorient

ORGAN_COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231"]  # liver..kidney_right
PREDICTION_PATTERN = "results/{model}/{site}/predictions/{case}.nii.gz"


def save_figure(fig: plt.Figure, path: str | os.PathLike[str], *, pdf: bool = False) -> list[Path]:
    """Save a figure as PNG (and a PDF beside it), atomically, and close it.

    Parameters
    ----------
    fig:
        The figure.
    path:
        ``.png`` target.
    pdf:
        Also write ``.pdf`` with the same stem.
    """
    targets = [Path(path)] + ([Path(path).with_suffix(".pdf")] if pdf else [])
    for target in targets:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format=target.suffix[1:])
    plt.close(fig)
    return targets


def dice_figure(metrics: pd.DataFrame, path: str | os.PathLike[str]) -> list[Path]:
    """Box plot of per-case Dice for each organ (panel) and model (box), all sites pooled.

    Parameters
    ----------
    metrics:
        Concatenated metrics (:func:`fedpsmos.paper.tables.read_metrics`).
    path:
        ``results/paper/fig_dice.png`` (a PDF is written beside it).
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
    return save_figure(fig, path, pdf=True)


ORGAN_FAMILIES: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "pancreas": ("pancreas",),
    "kidneys": ("kidney_left", "kidney_right"),
}
TRAINING_FAMILIES = {
    "pretrain": "M0 (pretraining)",
    "central": "central, per loss",
    "baseline": "Table 3 baselines (central)",
    "site_alone": "site alone",
    "adapted": "FL + adaptation",
}
MODE_STYLES = {"full": "-", "decoder": "--", "encoder": ":"}
# Validation scores of a rounds CSV (mean over the site's organs) -> the y label of their row of panels:
# the incoming global model's Dice and, where recorded, the site model's Dice after its local training.
VALIDATION_COLUMNS = {"val_dice": "validation Dice", "val_dice_local": "val. Dice after local"}
ROUNDS_COLUMNS = ("setting", "round", "site", "loss", *VALIDATION_COLUMNS)
TRAINING_COLUMNS = ("family", "label", "site", "mode", "epoch", "loss")


def natural_key(text: str) -> tuple[object, ...]:
    """Sort key that orders ``site2`` before ``site10``.

    Parameters
    ----------
    text:
        A name with embedded numbers.
    """
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(text)))


def site_colours(sites: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One distinct qualitative colour per site (tab10, tab20 beyond ten), the same in every figure.

    Parameters
    ----------
    sites:
        Site names; they are coloured in natural order, so a site keeps its colour whatever subset is drawn.
    """
    ordered = sorted(set(sites), key=natural_key)
    cmap = plt.get_cmap("tab10" if len(ordered) <= 10 else "tab20")
    return {site: cmap(i % cmap.N) for i, site in enumerate(ordered)}


def _empty(ax: plt.Axes, text: str) -> None:
    """Mark a panel that has nothing to draw yet."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


# ---------------------------------------------------------------- federated curves


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
        _empty(axes[0, 0], "no federated curves yet")
    else:
        handles = [Line2D([], [], color=colours[s], marker="o", ms=3, lw=1.3) for s in sites]
        fig.legend(handles, sites, loc="outside right upper", title="site", fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------- training curves


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
        _empty(axes[0, 0], "no training curves yet")
    return fig


# ---------------------------------------------------------------- qualitative results


def short_model_name(model_id: str) -> str:
    """A column title short enough for a small panel: ``M0``, ``site alone``, ``FL V2``, ``central`` ...

    Parameters
    ----------
    model_id:
        A workflow model id.
    """
    kind, variant = parse_model_id(model_id)
    if kind == "pretrain":
        return "M0"
    if kind == "federated":
        return f"FL {variant}"
    if kind == "adapted":
        return "FL + adapt. ({})".format({"full": "all"}.get(variant or "", variant))
    return kind.replace("_", " ")


def qualitative_columns(models: Sequence[str], metrics: pd.DataFrame) -> dict[str, str]:
    """At most one model of each kind, in the order M0, site alone, FL, adapted, central, with column titles.

    The first model given of a kind is kept, except for adapted models: the mode with the best mean Dice in
    ``metrics`` (the first given when none has metrics) is kept and its title says "best".

    Parameters
    ----------
    models:
        Candidate model ids (e.g. ``get_qualitative_models()`` of the workflow).
    metrics:
        Concatenated metrics (columns ``model``, ``dice``), possibly empty.
    """
    by_kind: dict[str, list[str]] = {}
    for model in models:
        by_kind.setdefault(parse_model_id(model)[0], []).append(model)
    columns: dict[str, str] = {}
    for kind in ("pretrain", "site_alone", "federated", "adapted", "central"):
        candidates = by_kind.get(kind, [])
        if not candidates:
            continue
        chosen, title = candidates[0], short_model_name(candidates[0])
        if kind == "adapted" and len(candidates) > 1:
            means = metrics.groupby("model")["dice"].mean() if len(metrics) else pd.Series(dtype=float)
            scored = [m for m in candidates if not math.isnan(float(means.get(m, math.nan)))]
            if scored:
                chosen = max(scored, key=lambda m: float(means[m]))
                mode = {"full": "all"}.get(parse_model_id(chosen)[1] or "", parse_model_id(chosen)[1])
                title = f"FL + adapt.\n(best: {mode})"
            else:
                title = short_model_name(chosen)
        columns[chosen] = title
    return columns


def qualitative_rows(manifests: Sequence[str | os.PathLike[str]]) -> list[dict[str, object]]:
    """One row per organ family: the first test case of the site labelling it, for :func:`qualitative_figure`.

    For each family of :data:`ORGAN_FAMILIES` the site is the one that labels all of its organs with the
    fewest labelled organs in all (so a partially labelled site before the fully labelled one), the first in
    manifest order on a tie; a family no site labels, or whose sites have no test case, gets no row.

    Parameters
    ----------
    manifests:
        ``results/data/{site}/manifest.json`` files, in site order; ``organs`` (or else ``labels``) says what
        each site labels.
    """
    sites = []
    for manifest_path in manifests:
        manifest = json.loads(Path(manifest_path).read_text())
        entries = {c["case"]: c for c in manifest.get("cases", [])}
        test = [c for c in manifest.get("test", []) if c in entries]
        if not test:
            continue
        entry, root = entries[test[0]], Path(manifest.get("root", "."))

        def where(p: str, root: Path = root) -> str:
            return p if Path(p).is_file() or not (root / p).is_file() else str(root / p)

        organs = manifest.get("organs") or list(labelled_organs(manifest["labels"]))
        sites.append(
            {
                "site": manifest["site"],
                "organs": list(organs),
                "case": test[0],
                "image": where(entry["image"]),
                "label": where(entry["label"]),
                "labels": LabelMap.from_manifest(manifest),
            }
        )
    rows: list[dict[str, object]] = []
    for family, organs in ORGAN_FAMILIES.items():
        candidates = [s for s in sites if set(organs) & set(s["organs"])]
        if candidates:
            best = min(candidates, key=lambda s: (not set(organs) <= set(s["organs"]), len(s["organs"])))
            rows.append({"family": family, "family_organs": list(organs), **best})
    return rows


def _slice_with_most(label: np.ndarray, classes: Sequence[int]) -> int:
    """Axial slice holding the most voxels of ``classes`` (the middle slice when there are none)."""
    counts = np.isin(label, list(classes)).sum(axis=(1, 2))
    return int(np.argmax(counts)) if counts.any() else label.shape[0] // 2


def _show(ax: plt.Axes, image: np.ndarray, label: np.ndarray | None, aspect: float) -> None:
    """One panel: a CT slice in a soft-tissue window with an organ overlay, axes frame and ticks hidden."""
    ax.imshow(image, cmap="gray", vmin=-160, vmax=240, aspect=aspect, origin="upper")
    if label is not None:
        overlay = np.ma.masked_where((label == 0) | (label == IGNORE_CLASS), label)
        ax.imshow(
            overlay,
            cmap=ListedColormap(ORGAN_COLOURS),
            vmin=1,
            vmax=len(ORGANS),
            alpha=0.5,
            aspect=aspect,
            interpolation="nearest",
            origin="upper",
        )
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def qualitative_figure(
    rows: Sequence[Mapping[str, object]],
    columns: Mapping[str, str],
    *,
    prediction_pattern: str = PREDICTION_PATTERN,
) -> Figure:
    """Rows: one organ family each (its site's test case, on the slice with most of that organ); columns: CT,
    reference, then each model's prediction (paper Fig. 2). One legend of organ colours below.

    Parameters
    ----------
    rows:
        :func:`qualitative_rows` output: ``family``, ``family_organs``, ``site``, ``case``, ``image``,
        ``label``, ``labels``.
    columns:
        Model id -> column title (:func:`qualitative_columns`).
    prediction_pattern:
        Path of a prediction with ``{model}``, ``{site}``, ``{case}`` placeholders; a missing one is drawn
        as the CT with "not run".
    """
    titles = ["CT", "reference", *columns.values()]
    n_rows, n_cols = max(1, len(rows)), len(titles)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.45 * n_cols, 0.5 + 1.5 * n_rows), squeeze=False, layout="constrained"
    )
    for r, row in enumerate(rows):
        # Every image is shown in the canonical LPS order, whatever order its file stores: axial slices with
        # the patient's right on the viewer's left and anterior at the top (radiological convention).
        label_image = sitk.ReadImage(str(row["label"]))
        image = reorient(sitk.ReadImage(str(row["image"])))
        ref_image = sitk.GetImageFromArray(apply_label_map_image(label_image, row["labels"]))  # type: ignore[arg-type]
        ref_image.CopyInformation(label_image)
        ref = sitk.GetArrayFromImage(reorient(ref_image))
        classes = [CLASS_INDEX[o] for o in row["family_organs"]]  # type: ignore[attr-defined]
        z = _slice_with_most(ref, classes)
        sx, sy = image.GetSpacing()[:2]
        ct = sitk.GetArrayFromImage(image)[z]
        _show(axes[r, 0], ct, None, sy / sx)
        _show(axes[r, 1], ct, ref[z], sy / sx)
        for c, model in enumerate(columns, start=2):
            pred_path = Path(prediction_pattern.format(model=model, site=row["site"], case=row["case"]))
            pred = (
                sitk.GetArrayFromImage(reorient(sitk.ReadImage(str(pred_path))))
                if pred_path.is_file()
                else None
            )
            if pred is not None and pred.shape != ref.shape:
                pred = None
            _show(axes[r, c], ct, None if pred is None else pred[z], sy / sx)
            if pred is None:
                ax = axes[r, c]
                ax.text(0.5, 0.5, "not run", color="white", ha="center", va="center", transform=ax.transAxes)
        axes[r, 0].set_ylabel(f"{row['family']}\n{row['site']}", fontsize=9)
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=8)
    if not rows:
        for ax in axes[0]:
            _show(ax, np.zeros((2, 2)), None, 1.0)
        _empty(axes[0, 0], "no test cases")
    handles = [Patch(color=colour, alpha=0.6) for colour in ORGAN_COLOURS]
    names = [o.replace("_", " ") for o in ORGANS]
    fig.legend(handles, names, loc="outside lower center", ncol=len(ORGANS), fontsize=8, frameon=False)
    return fig


def models_from_prediction_dirs(dirs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Model ids of ``results/{model id}/{site}/predictions`` folders, in the paper's order.

    Parameters
    ----------
    dirs:
        Prediction folders (the evaluation rules' outputs).
    """
    models = set()
    for directory in dirs:
        parts = Path(directory).parts
        if len(parts) >= 4 and parts[-1] == "predictions" and "results" in parts:
            models.add("/".join(parts[parts.index("results") + 1 : -2]))
    return sorted((m for m in models if _is_model_id(m)), key=model_order)


def _is_model_id(text: str) -> bool:
    """Whether ``text`` parses as a workflow model id."""
    try:
        model_order(text)
    except ValueError:
        return False
    return True


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
    paths = dice_figure(metrics, out / FIGURES["dice"])
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
