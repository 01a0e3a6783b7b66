"""Snakemake dry-run time and peak memory of the paper configuration, against the default config's dry run.

Baseline: ``snakemake -n all`` of the default ``config.yaml`` (synthetic CPU config), run by this process
the same way. Measured: the paper overlay ``config/paper.yaml`` (federated V2 at 2000 rounds, 20 rounds a
job), plainly (``paper``) and as the cluster runs it, ``snakemake --profile slurm -n all``
(``paper_slurm_profile``: the profile loads the paper overlay and adds its resources); the paper overlay
with V2 at 4000 rounds; and, for comparison, the paper overlay with ``federated.rounds_per_job: 1`` (one job
per round and site, plus an aggregation job per round), which may hit ``--timeout`` and is then reported as
``timeout``. Each dry run is a fresh ``python -m snakemake`` child in an empty working directory, started
from the repository root; its wall time is measured here and its peak resident memory is GNU time's
maximum RSS of the snakemake process (or, without ``/usr/bin/time``, the child's own ``ru_maxrss`` from
``os.wait4``; either way not the maximum over all children so far). The job count is read from
Snakemake's "Job stats" table. Every case runs ``--repeats`` times, the cases interleaved, and reports its
fastest run (``seconds``; on a shared machine the minimum is the least disturbed) besides every run's time.
Prints one line per run and one ``RESULT {json}`` line.

``--quick``: the baseline and the paper cases (plain and slurm profile) only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GNU_TIME = Path("/usr/bin/time")

# Overlays on top of config/paper.yaml (Snakemake merges config files key by key, later files winning).
EXTRA_OVERLAYS: dict[str, str] = {
    "paper_4000_rounds": "federated:\n  settings:\n    V2: {rounds: 4000}\n",
    "paper_rounds_per_job_1": "federated:\n  rounds_per_job: 1\n",
}


def dryrun_command(repo: Path, workdir: Path, overlays: list[Path], profile: Path | None = None) -> list[str]:
    """The ``python -m snakemake -n`` command line of one dry run.

    Parameters
    ----------
    repo:
        Repository root holding ``Snakefile`` and ``config.yaml``.
    workdir:
        Empty working directory (``-d``), so no earlier ``.snakemake`` state or outputs count.
    overlays:
        Config files merged after ``config.yaml``, in order.
    profile:
        A Snakemake profile folder; then the profile's config files are used (its paths are relative to the
        repository root, where the child starts) and ``overlays`` must be empty.
    """
    command = [sys.executable, "-m", "snakemake"]
    if profile is not None:
        if overlays:
            raise ValueError("a profile dry run takes its config files from the profile, not from overlays")
        command += ["--profile", str(profile)]
    command += ["-n", "all", "-s", str(repo / "Snakefile"), "-d", str(workdir)]
    if profile is None:
        # The target comes before --configfile, which takes every following word as a config file.
        command += ["--configfile", str(repo / "config.yaml"), *(str(o) for o in overlays)]
    return command


def run_dryrun(command: list[str], log: Path, timeout_s: float, cwd: Path | None = None) -> dict[str, object]:
    """Run one dry run as a child process; its wall time, peak RSS, job count and status.

    Peak RSS is GNU time's ``%M`` when ``/usr/bin/time`` exists: the forked child's ``ru_maxrss`` also
    counts the pages it shares with this process until it execs, which GNU time (a small process) keeps out.
    Without it, the child's own ``ru_maxrss`` from ``os.wait4`` (this process is small, a few tens of MiB).

    Parameters
    ----------
    command:
        From :func:`dryrun_command`.
    log:
        File receiving the child's stdout and stderr (parsed for the job count).
    timeout_s:
        Seconds after which the child's process group is killed and the status is ``timeout``.
    cwd:
        The child's working directory (default: this process's).
    """
    rss_file = log.with_suffix(".maxrss")
    if GNU_TIME.exists():
        command = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *command]
    timed_out = False
    with log.open("wb") as out:
        start = time.perf_counter()
        # Its own session, so a timeout kills snakemake and GNU time together.
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
        )
        while True:
            # wait4 on this child's pid gives its own rusage; RUSAGE_CHILDREN would be the max over all runs.
            pid, status_word, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() - start > timeout_s:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                _, status_word, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status_word)  # reaped here, so Popen must not wait again
    text = log.read_text(errors="replace")
    jobs = re.findall(r"^total\s+(\d+)\s*$", text, flags=re.MULTILINE)
    # Linux reports ru_maxrss and GNU time's %M in KiB.
    rss_text = rss_file.read_text().strip().splitlines() if rss_file.exists() else []
    if rss_text and rss_text[-1].isdigit():
        peak_kib: int | None = int(rss_text[-1])
    else:
        # A killed GNU time writes nothing, and its own rusage would be GNU time's, not snakemake's.
        peak_kib = None if command[0] == str(GNU_TIME) else rusage.ru_maxrss
    result: dict[str, object] = {
        "status": "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed"),
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1) if peak_kib is not None else None,
        "jobs": int(jobs[-1]) if jobs else None,
    }
    if result["status"] == "failed":
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("Command exited")]
        result["error"] = lines[-1][:300] if lines else f"exit {proc.returncode}"
    return result


def _number(value: object) -> float:
    """A measured number of a result dictionary."""
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _fastest(runs: list[dict[str, object]]) -> dict[str, object]:
    """One case's result: its fastest successful run (else its last run), with every run's seconds."""
    ok = [r for r in runs if r["status"] == "ok"]
    best = dict(min(ok, key=lambda r: _number(r["seconds"])) if ok else runs[-1])
    best["runs_seconds"] = [r["seconds"] for r in runs]
    return best


def run(repo: Path, quick: bool, timeout_s: float, repeats: int = 3) -> dict[str, object]:
    """Dry-run the baseline and the paper cases ``repeats`` times each; the RESULT dictionary.

    Parameters
    ----------
    repo:
        Repository root (``Snakefile``, ``config.yaml``, ``config/paper.yaml``, ``profiles/slurm``).
    quick:
        Baseline and the paper cases (plain and slurm profile) only.
    timeout_s:
        Per dry run limit (a case past it is reported as ``timeout``).
    repeats:
        Runs of each case; a case reports its fastest.
    """
    cases: dict[str, list[str]] = {"default": [], "paper": [], "paper_slurm_profile": []}
    if not quick:
        cases.update({name: [name] for name in EXTRA_OVERLAYS})
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in cases}
    described: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_dryrun_") as tmp_name:
        tmp = Path(tmp_name)
        for repeat in range(repeats):
            for name, extras in cases.items():
                profile = repo / "profiles" / "slurm" if name == "paper_slurm_profile" else None
                overlays = [] if name == "default" or profile else [repo / "config" / "paper.yaml"]
                for extra in extras:
                    path = tmp / f"{extra}.yaml"
                    path.write_text(EXTRA_OVERLAYS[extra])
                    overlays.append(path)
                workdir = tmp / f"work_{name}_{repeat}"
                workdir.mkdir()
                command = dryrun_command(repo, workdir, overlays, profile=profile)
                measured = run_dryrun(command, tmp / f"{name}_{repeat}.log", timeout_s, cwd=repo)
                runs[name].append(measured)
                described[name] = ["--profile profiles/slurm"] if profile else ["config.yaml"]
                described[name] += [
                    str(o.relative_to(repo)) if o.is_relative_to(repo) else EXTRA_OVERLAYS[o.stem].strip()
                    for o in overlays
                ]
                print(
                    f"{name:24s} run {repeat + 1}/{repeats} {json.dumps(measured)}",
                    file=sys.stderr,
                    flush=True,
                )
    measured_cases = {name: {**_fastest(r), "overlays": described[name]} for name, r in runs.items()}
    base = measured_cases["default"]
    ratios: dict[str, float | None] = {}
    for name, case in measured_cases.items():
        if name == "default":
            continue
        ok = case["status"] == "ok" and base["status"] == "ok"
        ratios[f"time_ratio_{name}_over_default"] = (
            round(_number(case["seconds"]) / _number(base["seconds"]), 2) if ok else None
        )
        ratios[f"memory_ratio_{name}_over_default"] = (
            round(_number(case["peak_rss_mib"]) / _number(base["peak_rss_mib"]), 2) if ok else None
        )
    for name, case in measured_cases.items():
        ratio = ratios.get(f"time_ratio_{name}_over_default")
        print(
            f"{name:24s} {case['status']:8s} fastest {case['seconds']} s of {case['runs_seconds']}"
            + (f", {ratio}x the default config's dry run" if ratio is not None else ""),
            file=sys.stderr,
            flush=True,
        )
    return {
        "benchmark": "snakemake_dryrun",
        "baseline": "snakemake -n all with config.yaml (default synthetic config), same process",
        "timeout_s": timeout_s,
        "repeats": repeats,
        "cases": measured_cases,
        **ratios,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Parse arguments, run the dry runs, print the ``RESULT`` line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="baseline and the paper cases only")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per dry run before 'timeout'")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case; each reports its fastest")
    parser.add_argument("--repo", type=Path, default=REPO, help="repository whose workflow is dry-run")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    result = run(args.repo.resolve(), args.quick, args.timeout, args.repeats)
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
