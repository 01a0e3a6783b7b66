"""Faults met by the running workflow: a malicious site checkpoint before aggregation, and a site that fails
every attempt under each fault policy. One test per fault family; kill -9 of jobs and of Snakemake is
``tests/test_kill.py``.

Every test runs the real Snakefile (``tests/workflow_helpers.py``) in its own working directory, copied from
the session's finished run of ``config/ci.yaml`` (the ``tiny_run`` fixture; copies keep modification times
and ``.snakemake`` metadata, so Snakemake sees them as done) and changed only where the fault is injected.
The catalogues of corrupt checkpoints and of site failures are unit tests of the functions the rules call
(``tests/test_rounds.py``, ``tests/test_checkpoint.py``). docs/reliability.md lists each fault, what happens,
and which test proves it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from fedpsmos.training.checkpoint import load_checkpoint
from tests.test_checkpoint import RunsCode
from tests.workflow_helpers import copy_run, processes_running, snakemake

pytestmark = pytest.mark.workflow

SITES = ["site1", "site2", "site5"]  # config/ci.yaml's sites
FED = "results/federated/V1"
FEDERATED_MODEL = "results/models/federated/V1/model.pt"


def _overlay(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------- 1. a malicious site checkpoint


def test_malicious_site_checkpoint_stops_aggregation_with_one_line(tiny_run: Path, tmp_path: Path) -> None:
    # Prepare: site2's round-1 file of the tiny run replaced, after its job ran, by one that runs code when
    # unpickled (tests/test_checkpoint.py shows that it does); the aggregation is now older than its input
    work = copy_run(tiny_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    site_file = work / FED / "round_1" / "site2.pt"
    payload = load_checkpoint(site_file)
    payload["meta"]["note"] = RunsCode(marker)
    torch.save(payload, site_file)
    # Execute
    result = snakemake(work, "--cores", "1", f"{FED}/round_1/global.pt", check=False)
    # Assert: the aggregation reran and failed; its log's last line names round, site, file and problem; the
    # round has no global model nor record, and no code ran
    assert result.returncode != 0
    assert "Error in rule aggregate_round" in result.stdout + result.stderr
    line = _last_line(work / "logs/aggregate_round/V1/round_1.log")
    assert line.startswith("fedpsmos.federated.rounds.RoundError: round 1, site site2"), line
    assert "not a weights-only checkpoint" in line and f"{FED}/round_1/site2.pt" in line, line
    assert not (work / FED / "round_1" / "global.pt").exists()
    assert not (work / FED / "round_1" / "record.json").exists()
    assert not marker.exists(), "the malicious pickle ran code"


# ------------------------------------------------------------------------------ 2. a site that always fails


def _policy_overlay(tmp_path: Path, policy: str) -> Path:
    return _overlay(tmp_path / f"{policy}.yaml", {"federated": {"on_site_failure": policy}})


def test_site_failing_every_attempt_fails_the_round_then_is_dropped_under_skip(
    tiny_run: Path, tmp_path: Path
) -> None:
    # Prepare: the tiny run with site5's patch index overwritten with garbage after it was built: every local
    # training attempt of site5 fails when it reads the index
    work = copy_run(tiny_run, tmp_path / "run")
    (work / "results/patches/site5.parquet").write_bytes(b"not a parquet file\n" * 10)
    round_1 = f"{FED}/round_1/global.pt"  # round 2 runs as round 1 does (tests/test_rounds.py)
    stamp = (work / round_1).stat().st_mtime_ns
    try:
        # Execute (a): the default policy, fail
        fail = ["config/ci.yaml", _policy_overlay(tmp_path, "fail")]
        result = snakemake(work, "--cores", "2", round_1, overlays=fail, check=False)
        # Assert: the workflow fails at site5's round-1 job after all its attempts; site5 has no round-1 file
        # and the round-1 aggregation did not run (its global model is the tiny run's)
        assert result.returncode != 0
        assert "Error in rule train_site_round" in result.stdout + result.stderr
        line = _last_line(work / "logs/train_site_round/V1/round_1/site5.log")
        assert "RoundError: site site5 round 1: all 2 attempt(s) failed" in line, line
        assert not (work / FED / "round_1" / "site5.pt").exists()
        assert (work / round_1).stat().st_mtime_ns == stamp
        assert "Error in rule aggregate_round" not in result.stdout + result.stderr

        # Execute (b): what the user does next: the skip policy, and the same command
        snakemake(
            work,
            "--cores",
            "2",
            round_1,
            overlays=["config/ci.yaml", _policy_overlay(tmp_path, "skip")],
        )
    finally:
        for pid in processes_running("", work):
            os.kill(pid, signal.SIGKILL)
    # Assert: the round aggregates the two other sites with renormalised n_k weights and records site5
    record = json.loads((work / FED / "round_1" / "record.json").read_text())
    assert record["policy"] == "skip" and record["failed"] == ["site5"] and record["renormalised"]
    kept = [s for s in SITES if s != "site5"]
    assert record["sites"] == kept
    total = sum(record["n_cases"][s] for s in kept)
    assert record["weights"] == pytest.approx({s: record["n_cases"][s] / total for s in kept})
    site5 = load_checkpoint(work / FED / "round_1" / "site5.pt")["meta"]
    assert site5["failed"] and site5["attempts"] == 2 and site5["mean_loss"] is None
    # The global model is the weighted mean of the two kept sites only.
    states = {s: load_checkpoint(work / FED / "round_1" / f"{s}.pt")["model"] for s in kept}
    merged = load_checkpoint(work / FED / "round_1" / "global.pt")["model"]
    for key, value in merged.items():
        expected = sum(record["weights"][s] * states[s][key].double() for s in kept)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    assert "skipped after 2 attempt(s)" in (work / "logs/train_site_round/V1/round_1/site5.log").read_text()
