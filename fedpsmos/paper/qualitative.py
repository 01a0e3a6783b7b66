"""The qualitative figure (paper Fig. 2): CT, reference and a few models' predictions per organ family.

One row per organ family (liver, spleen, pancreas, kidneys), each from the site that labels it (a partially
labelled one first), on the axial slice with most of that family; columns CT, reference, then at most one
model of each kind. Every image is shown in the canonical LPS order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fedpsmos.data.label_map import apply_label_map_image
from fedpsmos.data.manifest import Manifest
from fedpsmos.organs import CLASS_INDEX, IGNORE_CLASS, ORGANS
from fedpsmos.paper.models import model_order, parse_model_id
from fedpsmos.paper.plotting import empty_panel, plt
from fedpsmos.preprocessing.orientation import reorient

ORGAN_COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231"]  # liver..kidney_right
PREDICTION_PATTERN = "results/evaluation/{model}/{site}/predictions/{case}.nii.gz"
ORGAN_FAMILIES: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "pancreas": ("pancreas",),
    "kidneys": ("kidney_left", "kidney_right"),
}


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
    sites: list[dict[str, Any]] = []
    for manifest_path in manifests:
        manifest = Manifest.load(manifest_path)
        test = [c for c in manifest.test if c in manifest.case_ids]
        if not test:
            continue
        record = manifest.case(test[0])
        sites.append(
            {
                "site": manifest.site,
                "organs": list(manifest.organs),
                "case": test[0],
                "image": str(record.image),
                "label": str(record.label),
                "labels": manifest.label_map,
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
        empty_panel(axes[0, 0], "no test cases")
    handles = [Patch(color=colour, alpha=0.6) for colour in ORGAN_COLOURS]
    names = [o.replace("_", " ") for o in ORGANS]
    fig.legend(handles, names, loc="outside lower center", ncol=len(ORGANS), fontsize=8, frameon=False)
    return fig


def models_from_prediction_dirs(dirs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Model ids of ``results/evaluation/{model id}/{site}/predictions`` folders, in the paper's order.

    Parameters
    ----------
    dirs:
        Prediction folders (the evaluation rules' outputs).
    """
    models = set()
    for directory in dirs:
        parts = Path(directory).parts
        # .../evaluation/{model id}/{site}/predictions, where a model id has one or two parts
        head = list(parts[-5:-2])
        if parts and parts[-1] == "predictions" and "evaluation" in head:
            last = len(head) - 1 - head[::-1].index("evaluation")
            models.add("/".join(head[last + 1 :]))
    return sorted((m for m in models if _is_model_id(m)), key=model_order)


def _is_model_id(text: str) -> bool:
    """Whether ``text`` parses as a workflow model id."""
    try:
        model_order(text)
    except ValueError:
        return False
    return True
