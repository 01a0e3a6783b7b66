"""Faults met by the running workflow: kill -9 of jobs and of Snakemake itself, a malicious site checkpoint
before aggregation, and a site that fails every attempt under each fault policy. One test per fault family.

Every test runs the real Snakefile (``tests/workflow_helpers.py``) in its own working directory, copied from
the session's finished run of ``config/ci.yaml`` (the ``tiny_run`` fixture; copies keep modification times
and ``.snakemake`` metadata, so Snakemake sees them as done) and changed only where the fault is injected.
The kill test deletes the run's V1 chain and site2's full adaptation, rebuilds them through a series of kills
and compares every model with the tiny run's own (config/ci.yaml sizes V1 for it: two rounds, site jobs that
train for a second or two, three adaptation epochs). The catalogues of corrupt checkpoints and of site
failures are unit tests of the functions the rules call (``tests/test_rounds.py``,
``tests/test_checkpoint.py``). docs/reliability.md lists each fault, what happens, and which test proves it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from fedpsmos.training.checkpoint import load_checkpoint
from tests.test_checkpoint import RunsCode
from tests.workflow_helpers import copy_run, processes_running, snakemake, snakemake_command

pytestmark = pytest.mark.workflow

SITES = ["site1", "site2", "site5"]  # config/ci.yaml's sites
FED = "results/federated/V1"
TARGETS = ("results/models/federated/V1/model.pt", "results/models/adapted/full/site2/model.pt")
COMPARED = (
    f"{FED}/round_1/global.pt",
    f"{FED}/round_2/global.pt",
    *(f"{FED}/round_{r}/{site}.pt" for r in (1, 2) for site in SITES),
    *TARGETS,
)
# What the kill test deletes from its copy of the tiny run: everything the federated V1 chain and site2's
# full adaptation write (their logs too, so each log read is the rerun's).
REBUILT = (
    FED,
    "results/models/federated/V1",
    "results/models/adapted/full/site2",
    "logs/train_site_round/V1",
    "logs/aggregate_round/V1",
    "logs/adapt_model/full/site2.log",
)
WAIT = 600.0  # seconds: the longest any stage may take on a loaded 2-core machine before the test gives up


def _overlay(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def _models_equal(a: Path, b: Path) -> list[str]:
    """Names of the model tensors that differ between two checkpoints (empty: bit-identical)."""
    left, right = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert left.keys() == right.keys(), (a, b)
    return [k for k in left if not torch.equal(left[k], right[k])]


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _bench_seconds(work: Path, pattern: str) -> float:
    """Shortest wall time (s) of finished jobs, from their Snakemake benchmark files."""
    times = [float(p.read_text().splitlines()[1].split("\t")[0]) for p in work.glob(pattern)]
    assert times, pattern
    return min(times)


# ------------------------------------------------------------------------------------------- 1. kill -9


class Injector:
    """Starts Snakemake runs in one working directory and kills what it is told to, with bounded waits.

    ``cleanup`` kills the run and every job process of this working directory that is still alive, so a
    failing test leaves nothing behind.
    """

    def __init__(self, work: Path, overlays: list[str | Path], logs: Path) -> None:
        self.work, self.overlays, self.logs = work, overlays, logs
        self.run: subprocess.Popen[bytes] | None = None
        self.count = 0

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start ``snakemake --cores 1 TARGETS`` (one job at a time, so each kill hits a known job)."""
        self.count += 1
        cmd = snakemake_command(self.work, "--cores", "1", *extra, *TARGETS, overlays=self.overlays)
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"run{self.count}.log", "wb") as out:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.run = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.work.parent
            )
        return self.run

    def output(self) -> str:
        """The current run's Snakemake output."""
        return (self.logs / f"run{self.count}.log").read_text(errors="replace")

    def wait_until(self, what: str, ready: Callable[[], int | None]) -> int:
        """Poll ``ready`` until it returns a PID (or other non-None value); fail if the run ends first."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            found = ready()
            if found is not None:
                return found
            assert self.run is not None
            if self.run.poll() is not None:
                pytest.fail(f"run ended ({self.run.returncode}) before {what}:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}")

    def job_older_than(self, script: str, seconds: float, when: Callable[[], bool] = lambda: True) -> int:
        """PID of a job running ``script`` that has been alive ``seconds`` (first seen by this poller)."""
        seen: dict[int, float] = {}

        def ready() -> int | None:
            now = time.monotonic()
            for pid in processes_running(script, self.work) if when() else []:
                if now - seen.setdefault(pid, now) >= seconds:
                    return pid
            return None

        return self.wait_until(f"a {script} job alive for {seconds:.1f} s", ready)

    def wait_exit(self) -> int:
        """Wait for the current Snakemake run to end; its exit status."""
        assert self.run is not None
        return self.run.wait(timeout=WAIT)

    def wait_jobs_gone(self) -> None:
        """Wait for job processes orphaned by a killed Snakemake to finish by themselves."""
        deadline = time.monotonic() + WAIT
        while processes_running("", self.work):
            assert time.monotonic() < deadline, "orphaned jobs did not finish"
            time.sleep(0.2)

    def cleanup(self) -> None:
        """Kill the run and every remaining job process of this working directory."""
        if self.run is not None and self.run.poll() is None:
            self.run.kill()
            self.run.wait(timeout=60)
        for pid in processes_running("", self.work):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_kill9_of_jobs_and_snakemake_resumes_to_the_uninterrupted_models(
    tiny_run: Path, tmp_path: Path
) -> None:
    # Prepare: a copy of the tiny run without its V1 chain and site2's full adaptation; the tiny run's own
    # (uninterrupted, same seed, one thread a job) models are the reference. Its job times tell when a kill
    # lands inside a job.
    work = copy_run(tiny_run, tmp_path / "killed")
    site_round = _bench_seconds(work, "results/benchmarks/train_site_round/V1/round_*/*.tsv")
    aggregation = _bench_seconds(work, "results/benchmarks/aggregate_round/V1/round_*.tsv")
    for rel in REBUILT:
        path = work / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    overlays: list[str | Path] = ["config/ci.yaml"]
    inject = Injector(work, overlays, tmp_path / "snakemake-logs")
    adapted = work / "results/models/adapted/full/site2"
    try:
        # Execute (a): kill -9 a local training job 60 % into the shortest such job's run time
        inject.start()
        pid = inject.job_older_than("train_site_round.py", 0.6 * site_round)
        os.kill(pid, signal.SIGKILL)
        assert inject.wait_exit() != 0
        assert "Error in rule train_site_round" in inject.output()

        # Execute (b): kill -9 an aggregation job
        inject.start("--rerun-incomplete")
        pid = inject.job_older_than("aggregate_round.py", 0.5 * aggregation)
        os.kill(pid, signal.SIGKILL)
        assert inject.wait_exit() != 0
        assert "Error in rule aggregate_round" in inject.output()

        # Execute (d): kill -9 Snakemake itself while a round-2 site job runs; the job is orphaned
        run = inject.start("--rerun-incomplete")
        round_1_done = (work / FED / "round_1" / "global.pt").exists
        inject.job_older_than("train_site_round.py", 0.3 * site_round, when=round_1_done)
        os.kill(run.pid, signal.SIGKILL)
        assert inject.wait_exit() == -signal.SIGKILL
        inject.wait_jobs_gone()
        assert (work / ".snakemake" / "locks").exists() and any((work / ".snakemake" / "locks").iterdir())
        snakemake(work, "--unlock", *TARGETS, overlays=overlays)  # what a user does after a crash

        # Execute (c): kill -9 the adaptation mid-epoch, once its first epoch's resume.pt exists
        inject.start("--rerun-incomplete")
        inject.wait_until("adaptation's resume.pt", lambda: 0 if (adapted / "resume.pt").exists() else None)
        pids = processes_running("train_model.py", work)
        assert pids, "the adaptation finished before it could be killed"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert inject.wait_exit() != 0
        assert "Error in rule adapt_model" in inject.output()
        assert not (adapted / "model.pt").exists()
        resumed_after = load_checkpoint(adapted / "resume.pt")["epoch"]

        # Execute: the rerun a user types
        inject.start("--rerun-incomplete")
        assert inject.wait_exit() == 0, inject.output()[-3000:]
    finally:
        inject.cleanup()

    # Assert: the adaptation resumed from its epoch checkpoint, and every round and final model is
    # bit-identical to the uninterrupted tiny run's
    log = (work / "logs/adapt_model/full/site2.log").read_text()
    assert f"after epoch {resumed_after}" in log and "resuming from" in log
    assert not (adapted / "resume.pt").exists()
    for rel in COMPARED:
        assert _models_equal(tiny_run / rel, work / rel) == [], rel
    assert processes_running("", work) == []


# ---------------------------------------------------------------------------- 2. a malicious site checkpoint


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


# ------------------------------------------------------------------------------ 3. a site that always fails


def _policy_overlay(tmp_path: Path, policy: str) -> Path:
    return _overlay(tmp_path / f"{policy}.yaml", {"federated": {"on_site_failure": policy}})


def test_site_failing_every_attempt_fails_the_round_then_is_dropped_under_skip(
    tiny_run: Path, tmp_path: Path
) -> None:
    # Prepare: the tiny run with site5's patch index overwritten with garbage after it was built: every local
    # training attempt of site5 fails when it reads the index
    work = copy_run(tiny_run, tmp_path / "run")
    (work / "results/patches/site5.parquet").write_bytes(b"not a parquet file\n" * 10)
    downstream = [work / FED / f"round_{r}" / "global.pt" for r in (1, 2)] + [work / TARGETS[0]]
    stamps = [path.stat().st_mtime_ns for path in downstream]
    try:
        # Execute (a): the default policy, fail
        fail = ["config/ci.yaml", _policy_overlay(tmp_path, "fail")]
        result = snakemake(work, "--cores", "2", TARGETS[0], overlays=fail, check=False)
        # Assert: the workflow fails at site5's round-1 job after all its attempts; site5 has no round-1 file
        # and nothing after it ran (the round-1 aggregation, round 2 and the final model are the tiny run's)
        assert result.returncode != 0
        assert "Error in rule train_site_round" in result.stdout + result.stderr
        line = _last_line(work / "logs/train_site_round/V1/round_1/site5.log")
        assert "RoundError: site site5 round 1: all 2 attempt(s) failed" in line, line
        assert not (work / FED / "round_1" / "site5.pt").exists()
        assert [path.stat().st_mtime_ns for path in downstream] == stamps
        assert "Error in rule aggregate_round" not in result.stdout + result.stderr

        # Execute (b): what the user does next: the skip policy, and the same command
        snakemake(
            work, "--cores", "2", TARGETS[0], overlays=["config/ci.yaml", _policy_overlay(tmp_path, "skip")]
        )
    finally:
        for pid in processes_running("", work):
            os.kill(pid, signal.SIGKILL)
    # Assert: each round aggregates the two other sites with renormalised n_k weights and records site5
    for r in (1, 2):
        record = json.loads((work / FED / f"round_{r}" / "record.json").read_text())
        assert record["policy"] == "skip" and record["failed"] == ["site5"] and record["renormalised"]
        kept = [s for s in SITES if s != "site5"]
        assert record["sites"] == kept
        total = sum(record["n_cases"][s] for s in kept)
        assert record["weights"] == pytest.approx({s: record["n_cases"][s] / total for s in kept})
        site5 = load_checkpoint(work / FED / f"round_{r}" / "site5.pt")["meta"]
        assert site5["failed"] and site5["attempts"] == 2 and site5["mean_loss"] is None
        # The global model is the weighted mean of the two kept sites only.
        states = {s: load_checkpoint(work / FED / f"round_{r}" / f"{s}.pt")["model"] for s in kept}
        merged = load_checkpoint(work / FED / f"round_{r}" / "global.pt")["model"]
        for key, value in merged.items():
            expected = sum(record["weights"][s] * states[s][key].double() for s in kept)
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
        assert (
            "skipped after 2 attempt(s)"
            in (work / f"logs/train_site_round/V1/round_{r}/site5.log").read_text()
        )
    final = load_checkpoint(work / TARGETS[0])
    assert final["meta"]["kind"] == "federated"
