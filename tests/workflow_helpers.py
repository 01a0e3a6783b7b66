"""Run the workflow's Snakefile from tests, in a working directory of the test's own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake_command(
    workdir: Path, *args: str, overlays: Sequence[str | Path] = ("config/ci.yaml",)
) -> list[str]:
    """The snakemake command for ``workdir``: config.yaml plus ``overlays`` (repo-relative or absolute)."""
    configs = [str(REPO / "config.yaml")] + [str(REPO / o) for o in overlays]
    # Targets go before --configfile, which takes every following word as a file.
    return [*SNAKEMAKE, *args, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", *configs]


def snakemake(
    workdir: Path,
    *args: str,
    overlays: Sequence[str | Path] = ("config/ci.yaml",),
    timeout: float = 1800,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run snakemake on the repository's Snakefile in ``workdir`` with config.yaml plus ``overlays``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = snakemake_command(workdir, *args, overlays=overlays)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir.parent)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}): {' '.join(args)}\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a working directory that Snakemake sees as the same finished run: ``copytree`` keeps
    modification times (copy2) and the ``.snakemake`` metadata, so nothing upstream looks outdated."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


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


# ------------------------------------------------------------------ fault injection (tests/test_faults.py)


def processes_running(script: str, workdir: Path) -> list[int]:
    """PIDs of live Python processes running ``script`` (e.g. ``train_site_round.py``) of ``workdir``'s run.

    Snakemake runs a rule's script as ``python {workdir}/.snakemake/scripts/tmpXXXX.{script}``; only those of
    ``workdir`` match, so a test never touches another run's processes on the same machine.
    """
    prefix = str(Path(workdir).resolve() / ".snakemake" / "scripts") + os.sep
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = [
                part.decode(errors="replace") for part in (entry / "cmdline").read_bytes().split(b"\0")
            ]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        # The interpreter itself, not a shell wrapper whose -c string mentions the script.
        python = Path(cmdline[0]).name.startswith("python")
        ours = any(part.startswith(prefix) and part.endswith(script) for part in cmdline[1:])
        if state != "Z" and python and ours:
            pids.append(int(entry.name))
    return sorted(pids)
