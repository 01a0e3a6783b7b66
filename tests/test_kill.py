"""Kill -9 of jobs and of Snakemake itself, and the rerun a user types: the workflow-level test of the first
fault family of docs/reliability.md (the others: ``tests/test_faults.py``).

It runs the real Snakefile (``tests/workflow_helpers.py``) on a copy of the session's finished run of
``config/ci.yaml`` (the ``tiny_run`` fixture; copies keep modification times and ``.snakemake`` metadata, so
Snakemake sees them as done). It deletes the last round of the run's V1 chain, V1's final model and site2's
full adaptation, rebuilds them through a series of kills and compares every model with the tiny run's own
(config/ci.yaml sizes V1 for it: two rounds, site jobs that train for a second or two, three adaptation
epochs). Round 1 runs the same rules and code as round 2, so it is not rebuilt. It is a module of its own so
that, at about a minute, it runs on one test worker while the other fault tests run on the other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedpsmos.training.checkpoint import load_checkpoint
from tests.test_faults import FED, FEDERATED_MODEL, SITES
from tests.workflow_helpers import copy_run, processes_running, snakemake, snakemake_command

pytestmark = pytest.mark.workflow

TARGETS = (FEDERATED_MODEL, "results/models/adapted/full/site2/model.pt")
COMPARED = (f"{FED}/round_2/global.pt", *(f"{FED}/round_2/{site}.pt" for site in SITES), *TARGETS)
# What the kill test deletes from its copy of the tiny run: everything round 2 of V1, V1's final model and
# site2's full adaptation write (their logs too, so each log read is the rerun's).
REBUILT = (
    f"{FED}/round_2",
    *(f"{FED}/private/{site}/round_2.pt" for site in SITES),
    "results/models/federated/V1",
    "results/models/adapted/full/site2",
    "logs/train_site_round/V1/round_2",
    "logs/aggregate_round/V1/round_2.log",
    "logs/adapt_model/full/site2.log",
)
WAIT = 600.0  # seconds: the longest any stage may take on a loaded 2-core machine before the test gives up


def _models_equal(a: Path, b: Path) -> list[str]:
    """Names of the model tensors that differ between two checkpoints (empty: bit-identical)."""
    left, right = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert left.keys() == right.keys(), (a, b)
    return [k for k in left if not torch.equal(left[k], right[k])]


def _bench_seconds(work: Path, pattern: str) -> float:
    """Shortest wall time (s) of finished jobs, from their Snakemake benchmark files."""
    times = [float(p.read_text().splitlines()[1].split("\t")[0]) for p in work.glob(pattern)]
    assert times, pattern
    return min(times)


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
    # Prepare: a copy of the tiny run without V1's round 2 and site2's full adaptation; the tiny run's own
    # (uninterrupted, same seed, one thread a job) models are the reference. Its job times tell when a kill
    # lands inside a job.
    work = copy_run(tiny_run, tmp_path / "killed")
    site_round = _bench_seconds(work, "results/benchmarks/train_site_round/V1/round_2/*.tsv")
    aggregation = _bench_seconds(work, "results/benchmarks/aggregate_round/V1/round_2.tsv")
    for rel in REBUILT:
        path = work / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    overlays: list[str | Path] = ["config/ci.yaml"]
    inject = Injector(work, overlays, tmp_path / "snakemake-logs")
    adapted = work / "results/models/adapted/full/site2"
    try:
        # Execute (a): kill -9 a round-2 training job 60 % into the shortest such job's run time
        inject.start()
        pid = inject.job_older_than("train_site_round.py", 0.6 * site_round)
        os.kill(pid, signal.SIGKILL)
        assert inject.wait_exit() != 0
        assert "Error in rule train_site_round" in inject.output()

        # Execute (d): kill -9 Snakemake itself while a round-2 site job runs; the job is orphaned
        run = inject.start("--rerun-incomplete")
        inject.job_older_than("train_site_round.py", 0.3 * site_round)
        os.kill(run.pid, signal.SIGKILL)
        assert inject.wait_exit() == -signal.SIGKILL
        inject.wait_jobs_gone()
        assert (work / ".snakemake" / "locks").exists() and any((work / ".snakemake" / "locks").iterdir())
        snakemake(work, "--unlock", *TARGETS, overlays=overlays)  # what a user does after a crash

        # Execute (b): kill -9 the aggregation (after the orphaned job's round file is made again: incomplete)
        inject.start("--rerun-incomplete")
        pid = inject.job_older_than("aggregate_round.py", 0.5 * aggregation)
        os.kill(pid, signal.SIGKILL)
        assert inject.wait_exit() != 0
        assert "Error in rule aggregate_round" in inject.output()

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
