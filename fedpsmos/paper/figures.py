"""The paper's figures: Dice per organ and model, qualitative overlays (paper Fig. 2), training curves.

Every figure is written as PNG (and PDF for the main ones) through :func:`fedpsmos.atomic.atomic_path`, with
the Agg backend so it runs without a display. Inputs that have not been produced yet are skipped or drawn as
an empty panel that says so, never an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from fedpsmos.atomic import atomic_path  # noqa: E402
from fedpsmos.data.label_map import apply_label_map_image  # noqa: E402
from fedpsmos.organs import ORGANS  # noqa: E402
from fedpsmos.paper.models import model_name, model_order  # noqa: E402
from fedpsmos.paper.tables import read_metrics  # noqa: E402

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


def _slice_with_most_foreground(label: np.ndarray) -> int:
    """Axial slice showing the most labelled voxels (the middle slice when the label is empty)."""
    counts = (label > 0).sum(axis=(1, 2))
    return int(np.argmax(counts)) if counts.any() else label.shape[0] // 2


def _show(ax: plt.Axes, image: np.ndarray, label: np.ndarray | None, aspect: float, title: str) -> None:
    """One panel: a CT slice in a soft-tissue window with an organ overlay."""
    ax.imshow(image, cmap="gray", vmin=-160, vmax=240, aspect=aspect, origin="upper")
    if label is not None:
        overlay = np.ma.masked_where(label == 0, label)
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
    else:
        ax.text(0.5, 0.5, "not run", color="white", ha="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def qualitative_figure(
    cases: Sequence[Mapping[str, object]],
    models: Sequence[str],
    path: str | os.PathLike[str],
    *,
    prediction_pattern: str = PREDICTION_PATTERN,
) -> list[Path]:
    """Axial slices of test cases (rows): image with reference, then each model's prediction (paper Fig. 2).

    Parameters
    ----------
    cases:
        ``{"site", "case", "image", "label", "labels"}``: raw image and label files and the site label map.
    models:
        Model ids, one column each.
    path:
        ``results/paper/fig_qualitative.png`` (a PDF is written beside it).
    prediction_pattern:
        Path of a prediction with ``{model}``, ``{site}``, ``{case}`` placeholders.
    """
    n_rows, n_cols = max(1, len(cases)), len(models) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.3 * n_rows), squeeze=False)
    for row, case in enumerate(cases):
        image = sitk.ReadImage(str(case["image"]))
        ref = apply_label_map_image(sitk.ReadImage(str(case["label"])), case["labels"])  # type: ignore[arg-type]
        z = _slice_with_most_foreground(ref)
        sx, sy = image.GetSpacing()[:2]
        ct = sitk.GetArrayFromImage(image)[z]
        _show(axes[row, 0], ct, ref[z], sy / sx, f"{case['site']} {case['case']}: reference")
        for col, model in enumerate(models, start=1):
            pred_path = Path(prediction_pattern.format(model=model, site=case["site"], case=case["case"]))
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_path)))[z] if pred_path.is_file() else None
            _show(axes[row, col], ct, pred, sy / sx, model_name(model))
    if not cases:
        axes[0, 0].text(0.5, 0.5, "no test cases", ha="center", transform=axes[0, 0].transAxes)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in ORGAN_COLOURS]
    names = [o.replace("_", " ") for o in ORGANS]
    fig.legend(handles, names, loc="lower center", ncol=len(ORGANS), fontsize=7)
    return save_figure(fig, path, pdf=True)


def cases_from_manifests(
    manifests: Sequence[str | os.PathLike[str]], n_cases: int
) -> list[dict[str, object]]:
    """The first test case of each site's manifest, up to ``n_cases``, for :func:`qualitative_figure`.

    Parameters
    ----------
    manifests:
        ``results/data/{site}/manifest.json`` files, in site order.
    n_cases:
        Most rows of the figure.
    """
    chosen: list[dict[str, object]] = []
    for manifest_path in manifests:
        manifest = json.loads(Path(manifest_path).read_text())
        entries = {c["case"]: c for c in manifest.get("cases", [])}
        test = [c for c in manifest.get("test", []) if c in entries]
        if not test or len(chosen) >= n_cases:
            continue
        entry, root = entries[test[0]], Path(manifest.get("root", "."))

        def where(p: str, root: Path = root) -> str:
            return p if Path(p).is_file() or not (root / p).is_file() else str(root / p)

        chosen.append(
            {
                "site": manifest["site"],
                "case": test[0],
                "image": where(entry["image"]),
                "label": where(entry["label"]),
                "labels": manifest["labels"],
            }
        )
    return chosen


def _numeric_columns(frame: pd.DataFrame, x: str) -> list[str]:
    """Numeric columns other than the x axis, read defensively from a curve CSV."""
    return [c for c in frame.columns if c != x and pd.api.types.is_numeric_dtype(frame[c])]


def curves_figure(
    curves: Mapping[str, str | os.PathLike[str]], path: str | os.PathLike[str], *, x_candidates: Sequence[str]
) -> list[Path]:
    """Training curves: one panel per numeric column (loss, lr, ...), one line per labelled CSV.

    Parameters
    ----------
    curves:
        Legend label -> CSV (``curve.csv``: epoch, loss, lr; or a federated ``rounds.csv``); missing files
        are skipped.
    path:
        Output ``.png``.
    x_candidates:
        Column names tried for the x axis, in order (e.g. ``("epoch",)`` or ``("round", "epoch")``).
    """
    frames: dict[str, tuple[pd.DataFrame, str]] = {}
    for label, csv in curves.items():
        if not Path(csv).is_file():
            continue
        frame = pd.read_csv(csv)
        x = next((c for c in x_candidates if c in frame.columns), None)
        if x is None:
            raise ValueError(f"{csv}: curve CSV has none of the columns {list(x_candidates)}")
        frames[label] = (frame, x)
    found = {c for f, x in frames.values() for c in _numeric_columns(f, x)}
    columns = sorted(found, key=lambda c: (c != "loss", c))  # loss first, then alphabetical
    n_panels = max(1, len(columns))
    fig, axes = plt.subplots(1, n_panels, figsize=(4.5 * n_panels, 3.4), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=False):
        for label, (frame, x) in frames.items():
            if column in frame.columns:
                ax.plot(frame[x], frame[column], label=label, lw=1.2)
        ax.set_xlabel(next(iter(frames.values()))[1])
        ax.set_ylabel(column)
        if column in ("lr", "loss") and all((f[column] > 0).all() for f, _ in frames.values() if column in f):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if columns:
        axes[0, 0].legend(fontsize=6)
    else:
        axes[0, 0].text(0.5, 0.5, "no curves yet", ha="center", transform=axes[0, 0].transAxes)
    return save_figure(fig, path)


def curve_label(path: str | os.PathLike[str]) -> str:
    """Legend label of ``results/models/{model id}[/{site}]/curve.csv`` (or ``rounds.csv``) in paper names.

    Parameters
    ----------
    path:
        A curve CSV under ``results/models``.
    """
    parts = Path(path).parent.parts
    if "models" not in parts:
        return Path(path).parent.name
    rest = list(parts[parts.index("models") + 1 :])
    for n_id in (2, 1):
        try:
            name = model_name("/".join(rest[:n_id]))
        except ValueError:
            continue
        return f"{name} ({'/'.join(rest[n_id:])})" if rest[n_id:] else name
    return "/".join(rest)


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
    n_cases: int = 3,
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
        ``results/models/federated/{setting}/rounds.csv`` files (x column ``round`` or ``epoch``).
    manifests:
        Site manifests; the first test case of each (up to ``n_cases``) is shown in the qualitative figure.
    qualitative_models:
        Model ids shown as columns of the qualitative figure.
    n_cases:
        Rows of the qualitative figure.
    prediction_pattern:
        Prediction path with ``{model}``, ``{site}``, ``{case}``.
    """
    out = Path(out_dir)
    paths = dice_figure(read_metrics(metrics_csvs), out / FIGURES["dice"])
    cases = cases_from_manifests(manifests, n_cases)
    paths += qualitative_figure(
        cases, qualitative_models, out / FIGURES["qualitative"], prediction_pattern=prediction_pattern
    )
    x_axes = ("epoch", "round", "iteration")
    paths += curves_figure(
        {curve_label(p): p for p in curves}, out / FIGURES["training"], x_candidates=x_axes
    )
    fed = {curve_label(p): p for p in federated_curves}
    paths += curves_figure(fed, out / FIGURES["federated"], x_candidates=("round", "epoch", "iteration"))
    return paths
