"""The paper's figures, checked on the figure objects: panels, titles, lines per panel, their labels, legends.

Fixtures are written by the functions the workflow writes them with (``fedpsmos.federated.curves`` for
``rounds.csv``, ``fedpsmos.training.curves`` for ``curve.csv``), so they cannot drift from the real formats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from fedpsmos.federated.curves import curve_frame, write_curves
from fedpsmos.organs import ORGANS
from fedpsmos.paper import figures, qualitative, training_curves
from fedpsmos.paper.models import model_name
from fedpsmos.paper.plotting import site_colours
from fedpsmos.training.curves import write_curve_csv

SITES = {  # site -> (label map, organs), as config.yaml's synthetic sites
    "site1": {"liver": [1], "spleen": [2], "pancreas": [3], "kidney_left": [4], "kidney_right": [5]},
    "site2": {"liver": [1]},
    "site3": {"spleen": [1]},
    "site4": {"pancreas": [1]},
    "site5": {"kidney_left": [1], "kidney_right": [2]},
}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _line_labels(ax: plt.Axes) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def _legend_texts(legend: Any) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def _has_colour(png: Path, colour: Any, tol: float = 2 / 255) -> bool:
    """Whether some pixel of the PNG has this RGB colour (a line's or marker's own colour, not a blend)."""
    pixels = plt.imread(png)[..., :3]
    return bool((np.abs(pixels - np.asarray(colour[:3])) <= tol).all(axis=-1).any())


# ---------------------------------------------------------------- Dice per organ


def test_dice_figure_one_panel_per_organ_one_box_per_model():
    # Prepare: the federated model on every organ of site1 (three cases), M0 on two liver cases only
    rows = [("federated/V2", "site1", f"c{i}", o, 0.5 + 0.2 * i, 2.0) for i in range(3) for o in ORGANS]
    rows += [("pretrain", "site2", f"d{i}", "liver", dice, 3.0) for i, dice in enumerate((0.2, 0.4))]
    metrics = pd.DataFrame(rows, columns=["model", "site", "case", "organ", "dice", "hd95"])
    # Execute
    fig = figures.dice_figure(metrics)
    # Assert: a panel per organ, boxes in the paper's order (M0 before FL), Dice on a shared 0-1 axis
    assert [ax.get_title() for ax in fig.axes] == [
        "liver",
        "spleen",
        "pancreas",
        "kidney left",
        "kidney right",
    ]
    for ax in fig.axes:
        ticks = [label.get_text() for label in ax.get_xticklabels()]
        assert ticks == [model_name("pretrain"), model_name("federated/V2")]
        assert ax.get_ylim() == (0, 1.02)
    assert fig.axes[0].get_ylabel() == "Dice (per test case)"
    # each box draws its model's cases: the mean marker at the mean, whiskers reaching the extremes
    liver, spleen = fig.axes[0], fig.axes[1]
    means = [
        (line.get_xdata()[0], line.get_ydata()[0]) for line in liver.get_lines() if line.get_marker() == "^"
    ]
    assert means == [(1, pytest.approx(0.3)), (2, pytest.approx(0.7))]
    for position, (low, high) in ((1, (0.2, 0.4)), (2, (0.5, 0.9))):
        drawn = [
            y for line in liver.get_lines() if set(line.get_xdata()) == {position} for y in line.get_ydata()
        ]
        assert min(drawn) == pytest.approx(low) and max(drawn) == pytest.approx(high)
    spleen_means = [line.get_ydata()[0] for line in spleen.get_lines() if line.get_marker() == "^"]
    assert np.isnan(spleen_means[0]) and spleen_means[1] == pytest.approx(0.7)  # M0 has no spleen case


def test_dice_figure_without_metrics_says_so():
    fig = figures.dice_figure(figures.read_metrics([]))
    assert len(fig.axes) == len(ORGANS)
    assert all(ax.texts[0].get_text() == "no metrics yet" and not ax.get_lines() for ax in fig.axes)


# ---------------------------------------------------------------- federated curves


def _records(n_rounds: int, sites: list[str], *, dice: bool = True) -> list[dict[str, Any]]:
    """Round records as site_round/aggregation write them (losses, val_dice per organ, weights, failures)."""
    records = []
    for r in range(1, n_rounds + 1):
        record: dict[str, Any] = {
            "round": r,
            "losses": {s: 1.0 / (r + i) for i, s in enumerate(sites)},
            "weights": {s: 1.0 / len(sites) for s in sites},
            "failed": [],
        }
        if dice:
            record["val_dice"] = {
                s: {o: 0.1 * r + 0.02 * k for k, o in enumerate(SITES[s]) if o != "kidney_right"}
                for s in sites
            }
        records.append(record)
    return records


def _rounds_csvs(root: Path, settings: dict[str, int], sites: list[str], *, dice: bool = True) -> list[Path]:
    """``results/models/federated/{setting}/rounds.csv`` written by the workflow's own writer."""
    paths = []
    for setting, n_rounds in settings.items():
        out = root / "models" / "federated" / setting
        write_curves(
            curve_frame(_records(n_rounds, sites, dice=dice)),
            out / "rounds.csv",
            out / "rounds.png",
            setting=setting,
        )
        paths.append(out / "rounds.csv")
    return paths


def test_federated_curves_one_panel_per_setting_one_line_per_site(tmp_path):
    # Prepare: three settings, four sites, the long rounds.csv (one row per round, site and organ)
    sites = ["site1", "site2", "site3", "site5"]
    csvs = _rounds_csvs(tmp_path, {"V1": 4, "V2": 2, "V3": 1}, sites)
    assert {"round", "site", "organ", "failed", "weight"} <= set(pd.read_csv(csvs[0]).columns)
    # Execute
    rounds = figures.read_federated_curves([*csvs, tmp_path / "missing" / "rounds.csv"])
    fig = figures.federated_curves_figure(rounds)
    # Assert: one row per (setting, round, site), organs averaged
    assert len(rounds) == (4 + 2 + 1) * len(sites)
    v1 = rounds[(rounds["setting"] == "V1") & (rounds["site"] == "site1") & (rounds["round"] == 2)]
    assert v1["loss"].item() == pytest.approx(0.5) and v1["val_dice"].item() == pytest.approx(0.23)
    # two rows (loss, validation Dice) by three settings, nothing for bookkeeping columns
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["V1", "V2", "V3"]
    assert all(ax.get_title() == "" for ax in axes[1])
    assert axes[0, 0].get_ylabel() == "local training loss" and axes[1, 0].get_ylabel() == "validation Dice"
    assert all(ax.get_xlabel() == "round" for ax in axes[1])
    for ax in axes.flat:
        assert _line_labels(ax) == sites
        assert len({tuple(line.get_color()) for line in ax.get_lines()}) == len(sites)
    assert len(axes[0, 0].get_lines()[0].get_xdata()) == 4  # V1: four rounds, not a saw-tooth over sites
    # what is drawn: each site's local loss and its mean validation Dice over organs, per round, as recorded
    for i, site in enumerate(sites):
        loss, dice = axes[0, 0].get_lines()[i], axes[1, 0].get_lines()[i]
        assert list(loss.get_xdata()) == [1, 2, 3, 4] and list(dice.get_xdata()) == [1, 2, 3, 4]
        assert np.allclose(loss.get_ydata(), [1.0 / (r + i) for r in (1, 2, 3, 4)])
        organs = 0.03 if site == "site1" else 0.0  # mean of 0, 0.02, 0.04, 0.06 over site1's four organs
        assert np.allclose(dice.get_ydata(), [0.1 * r + organs for r in (1, 2, 3, 4)])
        assert loss.get_color() == dice.get_color() == site_colours(sites)[site]
    assert np.allclose(axes[0, 2].get_lines()[3].get_ydata(), [1.0 / (1 + 3)])  # V3, site5: one round
    assert axes[1, 0].get_ylim() == (0, 1.02)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert not any(word in " ".join(labels) for word in ("failed", "weight"))
    # shared y axis within a row; one site legend, outside the panels
    assert axes[0, 1].get_shared_y_axes().joined(axes[0, 0], axes[0, 2])
    assert [ax.get_legend() for ax in fig.axes] == [None] * 6
    assert len(fig.legends) == 1 and _legend_texts(fig.legends[0]) == sites


def test_federated_curves_without_validation_dice_have_one_row(tmp_path):
    csvs = _rounds_csvs(tmp_path, {"V2": 3}, ["site2", "site4"], dice=False)
    fig = figures.federated_curves_figure(figures.read_federated_curves(csvs))
    assert len(fig.axes) == 1
    assert fig.axes[0].get_title() == "V2" and _line_labels(fig.axes[0]) == ["site2", "site4"]
    assert np.allclose(fig.axes[0].get_lines()[1].get_ydata(), [1.0 / (r + 1) for r in (1, 2, 3)])
    # the federation's own rounds.png is drawn by the same plotter: both sites' colours are in it
    png = csvs[0].with_name("rounds.png")
    assert all(_has_colour(png, colour) for colour in site_colours(["site2", "site4"]).values())


def test_federated_curves_draw_a_row_per_validation_score():
    raw = curve_frame(_records(2, ["site1", "site3"])).assign(val_dice_local=0.5)
    fig = figures.federated_curves_figure(figures.per_site_rounds(raw, "V1"))
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "local training loss",
        "validation Dice",
        "val. Dice after local",
    ]
    assert all(_line_labels(ax) == ["site1", "site3"] for ax in fig.axes)
    assert all(list(line.get_ydata()) == [0.5, 0.5] for line in fig.axes[2].get_lines())


def test_federated_curves_reject_a_table_without_sites(tmp_path):
    stale = tmp_path / "V2" / "rounds.csv"
    stale.parent.mkdir()
    stale.write_text("round,loss,n_sites\n1,0.9,5\n2,0.7,5\n")
    with pytest.raises(ValueError, match=r"V2/rounds.csv.*\['site'\]"):
        figures.read_federated_curves([stale])


def test_federated_curves_with_nothing_yet_say_so():
    fig = figures.federated_curves_figure(figures.read_federated_curves([]))
    assert len(fig.axes) == 1 and fig.axes[0].texts[0].get_text() == "no federated curves yet"


# ---------------------------------------------------------------- training curves


def _training_curves(root: Path) -> list[Path]:
    """curve.csv of M0, two central combinations, three site-alone and four adapted models."""
    dirs = ["pretrain", "central/dice_ce", "central/dice_ce_lovasz"]
    dirs += [f"site_alone/site{i}" for i in (1, 2, 3)]
    dirs += [f"adapted/{mode}/site{i}" for mode in ("full", "decoder") for i in (1, 2)]
    paths = []
    for i, d in enumerate(dirs):
        path = root / "models" / d / "curve.csv"
        history = [{"epoch": e, "loss": 1.0 / (e + i), "lr": 0.01, "seconds": 1.0} for e in range(1, 4)]
        write_curve_csv(path, history)
        paths.append(path)
    return paths


def test_training_curves_one_panel_per_family(tmp_path):
    # Prepare
    paths = _training_curves(tmp_path)
    # Execute
    curves = training_curves.read_training_curves(
        [*paths, tmp_path / "models" / "central" / "x" / "curve.csv"]
    )
    fig = training_curves.training_curves_figure(curves)
    # Assert
    assert [ax.get_title() for ax in fig.axes] == [
        "M0 (pretraining)",
        "central, per loss",
        "site alone",
        "FL + adaptation",
    ]
    pretrain, central, alone, adapted = fig.axes
    assert _line_labels(pretrain) == ["M0"]
    assert _line_labels(central) == ["Dice+CE", "Dice+CE+Lovasz"]
    assert _line_labels(alone) == ["site1", "site2", "site3"]
    assert _line_labels(adapted) == ["site1, decoder", "site1, full", "site2, decoder", "site2, full"]
    # what is drawn: each model's loss per epoch from its curve.csv (central/dice_ce is the second file)
    (m0,) = pretrain.get_lines()
    assert list(m0.get_xdata()) == [1, 2, 3] and np.allclose(m0.get_ydata(), [1.0, 0.5, 1 / 3])
    assert np.allclose(central.get_lines()[0].get_ydata(), [1 / 2, 1 / 3, 1 / 4])
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch" and ax.get_yscale() == "log"
        styles = {(tuple(line.get_color()), line.get_linestyle()) for line in ax.get_lines()}
        assert len(styles) == len(ax.get_lines())  # every line tells itself apart
        legend = ax.get_legend()
        assert legend is not None and legend.get_bbox_to_anchor().y1 < ax.get_window_extent().y0  # below
    assert fig.axes[0].get_ylabel() == "training loss"
    assert len({tuple(line.get_color()) for line in alone.get_lines()}) == 3
    # adapted: colour per site (the site-alone panel's colours), line style per mode; legend sites then modes
    colour = {line.get_label(): tuple(line.get_color()) for line in alone.get_lines()}
    for line in adapted.get_lines():
        site, mode = line.get_label().split(", ")
        assert tuple(line.get_color()) == colour[site]
        assert line.get_linestyle() == {"full": "-", "decoder": "--"}[mode]
    assert _legend_texts(adapted.get_legend()) == ["site1", "site2", "full", "decoder"]
    assert _legend_texts(central.get_legend()) == ["Dice+CE", "Dice+CE+Lovasz"]


def test_curve_keys_and_prediction_dirs():
    assert training_curves.curve_key("results/models/site_alone/site3/curve.csv") == {
        "family": "site_alone",
        "label": "site3",
        "site": "site3",
        "mode": "",
    }
    assert (
        training_curves.curve_key("results/models/adapted/decoder/site2/curve.csv")["label"]
        == "site2, decoder"
    )
    assert training_curves.curve_key("results/models/central/dice_ce/curve.csv")["label"] == "Dice+CE"
    assert training_curves.curve_key("results/models/pretrain/curve.csv")["family"] == "pretrain"
    dirs = [
        "results/evaluation/adapted/full/site1/predictions",
        "results/evaluation/pretrain/site2/predictions",
        "/data/evaluation/run/results/evaluation/federated/V2/site1/predictions",
        "results/site_alone/site1/predictions",  # the layout before results/evaluation/: not read
    ]
    assert qualitative.models_from_prediction_dirs(dirs) == ["pretrain", "federated/V2", "adapted/full"]


# ---------------------------------------------------------------- qualitative results


def _site_data(root: Path, sites: dict[str, dict[str, list[int]]], models: list[str]) -> list[Path]:
    """A manifest, one test case (image + site-valued label) and every model's prediction per site."""
    manifests = []
    for site, labels in sites.items():
        label = np.zeros((5, 16, 16), np.uint8)
        for k, values in enumerate(labels.values()):
            label[1 + k % 4, 2 + 2 * k : 5 + 2 * k, 3:12] = values[0]  # each organ peaks on its own slice
        image = np.full(label.shape, 40, np.int16)
        case = f"{site}_000"
        (root / site).mkdir(parents=True)
        for name, array in (("img", image), ("lab", label)):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(root / site / f"{name}.nii.gz"))
        for model in models:
            pred_dir = root / model / site / "predictions"
            pred_dir.mkdir(parents=True)
            sitk.WriteImage(
                sitk.GetImageFromArray((label > 0).astype(np.uint8)), str(pred_dir / f"{case}.nii.gz")
            )
        manifest = {
            "site": site,
            "root": str(root / site),
            "labels": labels,
            "organs": list(labels),
            "test": [case],
            "train": [],
            "cases": [{"case": case, "image": "img.nii.gz", "label": "lab.nii.gz", "split": "test"}],
        }
        path = root / site / "manifest.json"
        path.write_text(json.dumps(manifest))
        manifests.append(path)
    return manifests


def test_qualitative_rows_pick_the_partially_labelled_site_per_organ(tmp_path):
    manifests = _site_data(tmp_path, SITES, [])
    rows = qualitative.qualitative_rows(manifests)
    assert [(r["family"], r["site"]) for r in rows] == [
        ("liver", "site2"),
        ("spleen", "site3"),
        ("pancreas", "site4"),
        ("kidneys", "site5"),
    ]
    # without a pancreas-only site the fully labelled site shows the pancreas
    rows = qualitative.qualitative_rows([m for m in manifests if m.parent.name != "site4"])
    assert [(r["family"], r["site"]) for r in rows][2] == ("pancreas", "site1")


def test_qualitative_columns_keep_one_model_per_kind_and_the_best_adaptation():
    metrics = pd.DataFrame(
        {"model": ["adapted/full", "adapted/decoder", "adapted/decoder"], "dice": [0.5, 0.9, 0.7]}
    )
    models = ["central/dice_ce", "adapted/full", "adapted/decoder", "federated/V2", "site_alone", "pretrain"]
    columns = qualitative.qualitative_columns(models, metrics)
    assert columns == {
        "pretrain": "M0",
        "site_alone": "site alone",
        "federated/V2": "FL V2",
        "adapted/decoder": "FL + adapt.\n(best: decoder)",
        "central/dice_ce": "central",
    }
    assert qualitative.qualitative_columns(["adapted/full"], metrics.iloc[:0]) == {
        "adapted/full": "FL + adapt. (all)"
    }
    # no metrics for any mode yet: the first mode given, not called "best"
    unscored = qualitative.qualitative_columns(["adapted/encoder", "adapted/full"], metrics.iloc[:0])
    assert unscored == {"adapted/encoder": "FL + adapt. (encoder)"}


def test_qualitative_figure_one_row_per_organ_family(tmp_path):
    # Prepare: five sites; predictions of two of the three models
    manifests = _site_data(tmp_path, SITES, ["pretrain", "federated/V2"])
    columns = {"pretrain": "M0", "federated/V2": "FL V2", "central/dice_ce": "central"}
    # Execute
    fig = qualitative.qualitative_figure(
        qualitative.qualitative_rows(manifests),
        columns,
        prediction_pattern=str(tmp_path) + "/{model}/{site}/predictions/{case}.nii.gz",
    )
    # Assert: 4 rows x (CT, reference, 3 models); titles on the top row only, row labels on the left
    axes = np.array(fig.axes).reshape(4, 5)
    assert [ax.get_title() for ax in axes[0]] == ["CT", "reference", "M0", "FL V2", "central"]
    assert all(ax.get_title() == "" for ax in axes[1:].flat)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == [
        "liver\nsite2",
        "spleen\nsite3",
        "pancreas\nsite4",
        "kidneys\nsite5",
    ]
    assert all(ax.get_ylabel() == "" for ax in axes[:, 1:].flat)
    assert all(len(ax.get_images()) == 1 for ax in axes[:, 0])  # CT only
    assert all(len(ax.get_images()) == 2 for ax in axes[:, 1:4].flat)  # CT + overlay
    assert all(len(ax.get_images()) == 1 and ax.texts[0].get_text() == "not run" for ax in axes[:, 4])
    # the kidney row shows the slice with most kidney voxels: site5 puts them on slices 1 and 2
    kidneys = axes[3, 1].get_images()[1].get_array()
    assert set(np.unique(kidneys.compressed())) <= {4, 5} and kidneys.count() > 0
    assert len(fig.legends) == 1
    assert _legend_texts(fig.legends[0]) == ["liver", "spleen", "pancreas", "kidney left", "kidney right"]
    width, height = fig.get_size_inches()
    assert width <= 10 and height <= 8


def test_make_figures_writes_every_figure(tmp_path):
    # Prepare
    metrics = tmp_path / "metrics.csv"
    pd.DataFrame(
        [("federated/V2", "site2", "site2_000", "liver", 0.7, 5.0)],
        columns=["model", "site", "case", "organ", "dice", "hd95"],
    ).to_csv(metrics, index=False)
    manifests = _site_data(tmp_path / "data", {s: SITES[s] for s in ("site1", "site2")}, ["federated/V2"])
    # Execute
    paths = figures.make_figures(
        [metrics],
        tmp_path / "paper",
        curves=_training_curves(tmp_path),
        federated_curves=_rounds_csvs(tmp_path, {"V2": 2}, ["site1", "site2"]),
        manifests=manifests,
        qualitative_models=["federated/V2", "site_alone"],
        prediction_pattern=str(tmp_path / "data") + "/{model}/{site}/predictions/{case}.nii.gz",
    )
    # Assert: exactly these files (no temporary left), each a PNG or PDF
    names = [
        "fig_dice_per_organ.png",
        "fig_dice_per_organ.pdf",
        "fig_qualitative.png",
        "fig_qualitative.pdf",
        "fig_training_curves.png",
        "fig_federated_curves.png",
    ]
    assert sorted(p.name for p in paths) == sorted(names)
    assert sorted(p.name for p in (tmp_path / "paper").iterdir()) == sorted(names)
    assert all(p.read_bytes()[:4] in (b"\x89PNG", b"%PDF") for p in paths)
    assert plt.get_fignums() == []  # every figure closed once written
    # the PNGs hold what was drawn: each site's curve colour in the federated curves, each model family's
    # first colour in the training curves, an image (not a blank canvas) in the others
    paper = tmp_path / "paper"
    assert all(
        _has_colour(paper / "fig_federated_curves.png", c) for c in site_colours(["site1", "site2"]).values()
    )
    assert _has_colour(paper / "fig_training_curves.png", plt.get_cmap("tab10")(0))
    for name in ("fig_dice_per_organ.png", "fig_qualitative.png"):
        assert plt.imread(paper / name)[..., :3].std() > 0.05
