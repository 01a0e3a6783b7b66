"""The workflow as a user runs it: the DAG's privacy boundary, the paper config's size, and the tiny config
end to end (every rule family), with a one-site adaptation rerun that touches nothing else."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from fedpsmos.inference.apply import predict_folder
from fedpsmos.organs import ORGANS
from fedpsmos.paper import figures
from fedpsmos.training.checkpoint import load_checkpoint
from tests.conftest import DryRun
from tests.workflow_helpers import copy_run, dry_run_jobs, snakemake

SITES = ["site1", "site2", "site5"]
SITE_ORGANS = {  # config/ci.yaml's synthetic sites (config.yaml's label maps)
    "site1": list(ORGANS),
    "site2": ["liver"],
    "site5": ["kidney_left", "kidney_right"],
}
EVALUATED = [  # every model the tiny config trains, evaluated on every site
    "pretrain",
    "central/dice_ce_lovasz",
    "baseline/panns",
    "baseline/pipo",
    "site_alone",
    "federated/V1",
    *(f"adapted/{m}" for m in ("full", "encoder", "decoder")),
]
SITE_RULES = {
    "make_synthetic_site",
    "validate_site",
    "plot_site_preview",
    "preprocess_case",
    "index_patches",
    "train_site_alone",
    "train_site_round",
    "adapt_model",
    "select_federated_model",
    "predict_site",
    "evaluate_site",
}
SITE_DATA = re.compile(
    r"results/(?:raw|data|preprocessed|patches)/(site\d)|results/federated/[^/]+/private/(site\d)"
)


def _sites_read(files: list[str]) -> set[str]:
    found = set()
    for path in files:
        for match in SITE_DATA.finditer(path):
            found.add(match.group(1) or match.group(2))
    return found


def test_no_site_rule_reads_another_sites_data(tiny_plan: DryRun) -> None:
    # Prepare / Execute: the whole DAG of the tiny config, per-round federated rules
    jobs = tiny_plan()
    # Assert
    assert {j["rule"] for j in jobs} >= SITE_RULES - {"run_round_block"} | {"aggregate_round"}
    for job in jobs:
        rule, wildcards = job["rule"], job["wildcards"]
        if rule in SITE_RULES:
            assert _sites_read(job["input"]) <= {wildcards["site"]}, (rule, wildcards, job["input"])
        if rule == "aggregate_round":
            # The aggregator reads nothing but weight files: the round's site models and the previous global.
            r = int(wildcards["r"])
            expected = {f"results/federated/{wildcards['setting']}/round_{r}/{s}.pt" for s in SITES}
            expected.add(f"results/federated/{wildcards['setting']}/round_{r - 1}/global.pt")
            assert set(job["input"]) == expected


def _metrics(work: Path) -> dict[tuple[str, str], Path]:
    """Every metrics CSV of a run by its (model, site), read from its rows."""
    found: dict[tuple[str, str], Path] = {}
    for path in sorted((work / "results").rglob("metrics.csv")):
        frame = pd.read_csv(path)
        assert frame["model"].nunique() == 1 and frame["site"].nunique() == 1, path
        key = (frame["model"].iloc[0], frame["site"].iloc[0])
        assert key not in found, (path, found.get(key))
        found[key] = path
    return found


def _dice_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The Dice columns of a paper table (per organ and the mean), '-' (not run) as NaN."""
    columns = [c for c in table.columns if c.endswith(" DC")]
    return table[columns].replace("-", float("nan")).astype(float)


@pytest.mark.workflow
def test_tiny_config_runs_end_to_end(tiny_run: Path, tmp_path: Path) -> None:
    # Execute: the whole workflow on the tiny config (run once per session by the tiny_run fixture)
    work = tiny_run
    # Assert: a metrics CSV per evaluated model and site, holding the site's test cases and the organs the
    # site labels, with Dice in [0, 1]
    metrics = _metrics(work)
    assert set(metrics) == {(model, site) for model in EVALUATED for site in SITES}
    for (_, site), path in metrics.items():
        frame = pd.read_csv(path)
        test_cases = json.loads((work / "results" / "data" / site / "manifest.json").read_text())["test"]
        assert sorted(set(frame["case"])) == sorted(test_cases), path
        assert sorted(frame["organ"]) == sorted(SITE_ORGANS[site] * len(test_cases)), path
        assert frame["dice"].between(0, 1).all(), path
    scores = pd.concat(pd.read_csv(p) for p in metrics.values())

    # Tables 2-6 in every format; each model's Dice in [0, 1] ('-' only for the losses the tiny config does
    # not train, and in the partially labelled block for spleen and pancreas, which no site there labels),
    # both data blocks (the fully labelled site1, the partially labelled sites), and the values are the
    # metrics': the federated model's liver Dice on site1 in Table 4 is its site1 test case's
    paper = work / "results" / "paper"
    partial_organs = {o for site in SITES[1:] for o in SITE_ORGANS[site]}
    for n in (2, 3, 4, 5, 6):
        assert {p.name for p in paper.glob(f"table{n}.*")} == {f"table{n}.{e}" for e in ("csv", "md", "tex")}
        table = pd.read_csv(paper / f"table{n}.csv", keep_default_na=False)
        dice = _dice_cells(table)
        assert ((dice >= 0) & (dice <= 1) | dice.isna()).all().all(), n
        ran = ~table["model"].str.startswith("MargExc-style")  # central Dice+CE: not in the tiny config
        assert dice[~ran].isna().all().all(), n
        if n == 5:  # one row per federated setting, mean Dice only
            assert dice.notna().all().all()
            continue
        partial = ~table["data"].str.startswith("site1 (fully labelled)")
        assert partial.sum() == len(table) // 2, n
        unlabelled = [f"{o} DC" for o in ORGANS if o not in partial_organs]
        assert dice.drop(columns=unlabelled)[ran].notna().all().all(), n
        assert dice.loc[ran & ~partial, unlabelled].notna().all().all(), n
        assert dice.loc[partial, unlabelled].isna().all().all(), n
    table4 = pd.read_csv(paper / "table4.csv", keep_default_na=False).set_index(["data", "model"])
    federated = table4.loc[("site1 (fully labelled)", "federated (FL), V1")]
    site1 = scores[(scores["model"] == "federated/V1") & (scores["site"] == "site1")]
    assert float(federated["liver DC"]) == pytest.approx(site1.loc[site1["organ"] == "liver", "dice"].mean())
    assert list(table4.loc["site1 (fully labelled)"].index) == [
        "M0 (pretrained on site 1)",
        "central (non-FL, upper bound), Dice+CE+Lovasz",
        "site alone",
        "federated (FL), V1",
    ]
    table5 = pd.read_csv(paper / "table5.csv", keep_default_na=False).set_index("model")
    # the tiny config's one setting (several: tests/test_paper.py), beside the central row
    assert [m for m in table5.index if m.startswith("federated")] == ["federated (FL), V1"]
    row = table5.loc["federated (FL), V1"]
    assert (int(row["client iterations"]), int(row["rounds"])) == (10, 2)

    # The federated curves drawn from the run's own rounds.csv: a panel for V1, a line per site
    rounds = figures.read_federated_curves(sorted(work.glob("results/models/federated/*/rounds.csv")))
    fig = figures.federated_curves_figure(rounds)
    top = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in top] == ["V1"]
    assert all([line.get_label() for line in ax.get_lines()] == SITES for ax in top)
    assert [len(line.get_xdata()) for line in top[0].get_lines()] == [2] * len(SITES)  # V1: two rounds
    plt.close(fig)
    for name in ("dice_per_organ", "qualitative", "federated_curves", "training_curves"):
        assert (paper / f"fig_{name}.png").read_bytes()[:4] == b"\x89PNG"
    for r in (1, 2):
        assert {p.name for p in (work / "results/federated/V1" / f"round_{r}").glob("*.pt")} == {
            "global.pt",
            *(f"{s}.pt" for s in SITES),
        }

    # The federated model site2 selected loads and predicts a raw scan as the workflow did (fedpsmos predict)
    case = json.loads((work / "results/data/site2/manifest.json").read_text())["test"][0]
    (tmp_path / "scan").mkdir()
    shutil.copy(work / f"results/raw/site2/imagesTr/{case}_0000.nii.gz", tmp_path / "scan" / f"{case}.nii.gz")
    model = work / "results/models/federated/V1/selected/site2.pt"
    (written,) = predict_folder(
        model, tmp_path / "scan", tmp_path / "predicted", device="cpu", progress=False
    )
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(written)))
    theirs = metrics[("federated/V1", "site2")].parent / "predictions" / f"{case}.nii.gz"
    np.testing.assert_array_equal(ours, sitk.GetArrayFromImage(sitk.ReadImage(str(theirs))))
    assert set(np.unique(ours)) <= set(range(len(ORGANS) + 1))
    # Nothing left to do (asked of a copy: the tiny run is shared and stays as it is).
    work = copy_run(tiny_run, tmp_path / "rerun")
    metrics = _metrics(work)
    assert "Nothing to be done" in snakemake(work, "-n", "all").stdout

    # Rerunning one site's adaptation plans that adaptation, its prediction and evaluation, nothing else
    # (the target goes before --forcerun, which takes every following word as a rule name).
    target = metrics[("adapted/decoder", "site5")].relative_to(work).as_posix()
    plan = dry_run_jobs(snakemake(work, "-n", target, "--forcerun", "adapt_model").stdout)
    assert sorted(j["rule"] for j in plan) == ["adapt_model", "evaluate_site", "predict_site"]
    assert all(j["wildcards"].get("site") == "site5" for j in plan)
    before = {p: p.stat().st_mtime_ns for p in (work / "results").rglob("*") if p.is_file()}
    snakemake(work, "--cores", "2", target, "--forcerun", "adapt_model")
    changed = {
        p for p in (work / "results").rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns
    }
    assert changed, "the rerun wrote nothing"
    for path in changed:
        rel = path.relative_to(work).as_posix()
        assert "decoder/site5" in rel, rel


@pytest.mark.workflow
def test_blocks_of_rounds_give_the_per_round_federated_model(tiny_run: Path, tmp_path: Path) -> None:
    # Prepare: a copy of the tiny run, switched to blocks of 2 rounds per job (the paper config's layout)
    work = tmp_path / "blocks"
    copy_run(tiny_run, work)
    overlay = tmp_path / "blocks.yaml"
    overlay.write_text("federated:\n  rounds_per_job: 2\n")
    target = "results/models/federated/V1/model.pt"
    # Execute
    plan = dry_run_jobs(snakemake(work, "-n", target, overlays=["config/ci.yaml", overlay]).stdout)
    snakemake(work, "--cores", "2", target, overlays=["config/ci.yaml", overlay])
    # Assert: one block job ran both rounds, wrote every round's files and reached the same weights
    assert sorted(j["rule"] for j in plan) == ["finalise_federation", "run_round_block"]
    for r in (1, 2):
        assert {p.name for p in (work / "results/federated/V1" / f"round_{r}").iterdir()} >= {
            "global.pt",
            "record.json",
            *(f"{s}.pt" for s in SITES),
        }
    by_block = load_checkpoint(work / target)["model"]
    by_rounds = load_checkpoint(tiny_run / target)["model"]
    assert by_block.keys() == by_rounds.keys()
    assert all(torch.equal(by_block[k], by_rounds[k]) for k in by_rounds)
