"""Run the workflow's Snakefile from tests, in a working directory of the test's own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(
    workdir: Path,
    *args: str,
    overlay: str | None = "config/ci.yaml",
    timeout: float = 1800,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run snakemake on the repository's Snakefile in ``workdir`` with the default config plus ``overlay``."""
    configs = [str(REPO / "config.yaml")] + ([str(REPO / overlay)] if overlay else [])
    # Targets go before --configfile, which takes every following word as a file.
    cmd = [*SNAKEMAKE, *args, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", *configs]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir.parent)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}): {' '.join(args)}\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def dry_run_jobs(output: str) -> list[dict[str, object]]:
    """Parse the jobs of a dry run: rule name, input and output files, wildcards."""
    jobs: list[dict[str, object]] = []
    current: dict[str, object] | None = None
    for line in output.splitlines():
        head = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if head:
            current = {"rule": head.group(1), "input": [], "output": [], "wildcards": {}}
            jobs.append(current)
            continue
        if current is None:
            continue
        field = re.match(r"^\s+(input|output|wildcards): (.*)$", line)
        if field:
            key, value = field.groups()
            if key == "wildcards":
                current["wildcards"] = dict(item.split("=", 1) for item in value.split(", "))
            else:
                current[key] = [v.strip() for v in value.split(", ") if v.strip()]
    return jobs
