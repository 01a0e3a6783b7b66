"""The workflow as a user runs it: the DAG's privacy boundary, the paper config's size, and the tiny config
end to end (every rule family), with a one-site adaptation rerun that touches nothing else."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedpsmos.training.checkpoint import load_checkpoint
from tests.workflow_helpers import dry_run_jobs, snakemake

SITES = ["site1", "site2", "site3", "site4", "site5"]
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


def test_no_site_rule_reads_another_sites_data(tmp_path: Path) -> None:
    # Prepare / Execute: the whole DAG of the tiny config, per-round federated rules
    result = snakemake(tmp_path / "run", "-n", "--forceall", "all")
    jobs = dry_run_jobs(result.stdout)
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


@pytest.mark.workflow
def test_tiny_config_runs_end_to_end(tiny_run: Path) -> None:
    # Execute: the whole workflow on the tiny config (run once per session by the tiny_run fixture)
    work = tiny_run
    # Assert: every table and figure, and metrics for the organs each site labels
    paper = work / "results" / "paper"
    for n in (2, 3, 4, 5, 6):
        for ext in ("csv", "md", "tex"):
            assert (paper / f"table{n}.{ext}").stat().st_size > 0
    for fig in ("dice_per_organ", "qualitative", "federated_curves", "training_curves"):
        assert (paper / f"fig_{fig}.png").stat().st_size > 0
    metrics = pd.read_csv(work / "results" / "federated" / "V2" / "site2" / "metrics.csv")
    assert set(metrics["organ"]) == {"liver"}
    assert metrics["dice"].between(0, 1).all()
    for r in (1, 2):
        for site in SITES:
            assert (work / "results" / "federated" / "V1" / f"round_{r}" / f"{site}.pt").exists()
        assert (work / "results" / "federated" / "V1" / f"round_{r}" / "global.pt").exists()
    # Nothing left to do.
    assert "Nothing to be done" in snakemake(work, "-n", "all").stdout

    # Rerunning one site's adaptation plans that adaptation, its prediction and evaluation, nothing else
    # (the target goes before --forcerun, which takes every following word as a rule name).
    target = "results/adapted/decoder/site3/metrics.csv"
    plan = dry_run_jobs(snakemake(work, "-n", target, "--forcerun", "adapt_model").stdout)
    assert sorted(j["rule"] for j in plan) == ["adapt_model", "evaluate_site", "predict_site"]
    assert all(j["wildcards"].get("site") == "site3" for j in plan)
    before = {p: p.stat().st_mtime_ns for p in (work / "results").rglob("*") if p.is_file()}
    snakemake(work, "--cores", "2", target, "--forcerun", "adapt_model")
    changed = {
        p for p in (work / "results").rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns
    }
    assert changed, "the rerun wrote nothing"
    for path in changed:
        rel = path.relative_to(work).as_posix()
        assert "decoder/site3" in rel, rel


@pytest.mark.workflow
def test_blocks_of_rounds_give_the_per_round_federated_model(tiny_run: Path, tmp_path: Path) -> None:
    # Prepare: a copy of the tiny run, switched to blocks of 2 rounds per job (the paper config's layout)
    work = tmp_path / "blocks"
    shutil.copytree(tiny_run, work, symlinks=True)
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
