"""Run every benchmark in ``bench/`` and write a JSON and a Markdown summary of their figures.

Each ``bench/bench_*.py`` runs as its own subprocess (``--quick`` and ``--device`` are passed where its
argparse accepts them) and prints one ``RESULT {json}`` line. Every ratio in it becomes one row: the measured
value, its named baseline's value and the ratio (the benchmark's own ratio, as it printed it). A benchmark
that exits non-zero, prints no ``RESULT`` line or passes its time limit is a ``failed`` row with the reason,
not a crash of the runner. The summary states the machine (CPU model, cores, torch version, device), the
date and the command, and both files are written atomically.

    python bench/run_all.py --quick --device cpu --out-json docs/benchmarks.json --out-md docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpsmos.atomic import write_json, write_text

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

Row = dict[str, Any]
# "ratio" as a word of a key ("time_ratio", "ratio_vs_x"), not inside "iterations".
RATIO_KEY = re.compile(r"(^|[._])ratio($|_)|_over_")
# Hand-measured sections of the Markdown summary start at this heading; a new run keeps them.
SEPARATE = "\n## Measured separately"


def with_separate_sections(generated: str, previous: str | None) -> str:
    """The generated summary followed by the previous file's hand-measured part (from :data:`SEPARATE` on).

    Parameters
    ----------
    generated:
        The new Markdown summary.
    previous:
        The file's current text, or ``None`` when there is none.
    """
    if not previous or SEPARATE not in previous:
        return generated
    return generated.rstrip("\n") + "\n" + previous[previous.index(SEPARATE) :]


def discover(bench_dir: Path) -> list[Path]:
    """The benchmark scripts ``bench_*.py`` of a folder, sorted by name.

    Parameters
    ----------
    bench_dir:
        Folder to list.
    """
    return sorted(bench_dir.glob("bench_*.py"))


def accepted_flags(script: Path) -> set[str]:
    """The long options a script's argparse declares (read from its source, so nothing is imported).

    Parameters
    ----------
    script:
        A benchmark script.
    """
    return set(re.findall(r"add_argument\(\s*[\"'](--[a-z0-9-]+)[\"']", script.read_text()))


def command_for(script: Path, quick: bool, device: str | None) -> list[str]:
    """The command line running one benchmark with the options it supports.

    Parameters
    ----------
    script:
        A benchmark script.
    quick, device:
        Passed on as ``--quick`` / ``--device DEVICE`` where the script accepts them.
    """
    flags = accepted_flags(script)
    command = [sys.executable, str(script)]
    if quick and "--quick" in flags:
        command.append("--quick")
    if device is not None and "--device" in flags:
        command += ["--device", device]
    return command


def parse_result(stdout: str) -> dict[str, Any]:
    """The JSON object of the last ``RESULT `` line of a benchmark's output.

    Parameters
    ----------
    stdout:
        The benchmark's standard output.
    """
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise ValueError("no 'RESULT {json}' line in its output")
    result = json.loads(lines[-1][len("RESULT ") :])
    if not isinstance(result, dict):
        raise ValueError("its RESULT line is not a JSON object")
    return result


def run_benchmark(script: Path, quick: bool, device: str | None, timeout_s: float) -> dict[str, Any]:
    """Run one benchmark; its command, status, seconds, parsed RESULT or error, and output tail.

    Parameters
    ----------
    script:
        A benchmark script.
    quick, device:
        As in :func:`command_for`.
    timeout_s:
        Wall-clock limit, after which the benchmark is killed and reported failed.
    """
    command = command_for(script, quick, device)
    entry: dict[str, Any] = {"name": script.stem, "command": shlex.join(_display(command))}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        entry.update(status="failed", error=f"timed out after {timeout_s:.0f} s")
        entry["seconds"] = round(time.perf_counter() - start, 1)
        return entry
    entry["seconds"] = round(time.perf_counter() - start, 1)
    try:
        if proc.returncode != 0:
            raise ValueError(f"exit code {proc.returncode}: {_last_line(proc.stderr or proc.stdout)}")
        entry.update(status="ok", result=parse_result(proc.stdout))
    except ValueError as err:  # json.JSONDecodeError is a ValueError too
        entry.update(status="failed", error=str(err), stderr_tail=proc.stderr[-2000:])
    return entry


def _display(command: list[str]) -> list[str]:
    """A command with the interpreter and repository paths shortened for the summary."""
    shown = ["python" if c == sys.executable else c for c in command]
    return [os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c for c in shown]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _row(figure: str, unit: str, value: Any, baseline_name: str, baseline_value: Any, ratio: Any) -> Row:
    return {
        "figure": figure,
        "unit": unit,
        "value": value,
        "baseline": baseline_name,
        "baseline_value": baseline_value,
        "ratio": ratio,
    }


def rows_inference(r: dict[str, Any]) -> list[Row]:
    """Rows of ``bench_inference``: our predictor (default and batch 1) over nnU-Net's, plus agreement."""
    setting = f"{r['device']}, volume {r['shape']}, patch {r['patch']}"
    rows = [
        _row(f"sliding window, ours ({setting})", "s", r["seconds_ours"], r["baseline"],
             r["seconds_nnunet"], r["ratio_ours_over_nnunet"]),
    ]  # fmt: skip
    if "seconds_ours_batch1" in r:
        rows.append(
            _row("sliding window, ours at batch 1 (tile for tile as nnU-Net)", "s", r["seconds_ours_batch1"],
                 r["baseline"], r["seconds_nnunet"], r["ratio_ours_batch1_over_nnunet"])
        )  # fmt: skip
    rows.append(
        _row("sliding window, max |logit difference| where weights are representable", "logit",
             r["max_abs_logit_diff_trusted"], r["baseline"], 0.0, None)
    )  # fmt: skip
    return rows


def rows_losses(r: dict[str, Any]) -> list[Row]:
    """Rows of ``bench_losses``: time and peak memory of our loss over nnU-Net's."""
    rows = []
    for key, value in r.items():
        match = re.fullmatch(r"(time|memory)_ratio", key)
        if match:
            what = "seconds" if match.group(1) == "time" else "peak_mib"
            rows.append(
                _row(f"loss {match.group(1)} ({r.get('device', '')})", "s" if what == "seconds" else "MiB",
                     r.get(f"ours_{what}", r.get(what)), r["baseline"], r.get(f"baseline_{what}"), value)
            )  # fmt: skip
    return rows


def rows_dryrun(r: dict[str, Any]) -> list[Row]:
    """Rows of ``bench_dryrun``: each case's dry-run time and peak memory over the default config's."""
    base = r["cases"]["default"]
    rows = []
    for name, case in r["cases"].items():
        if name == "default":
            continue
        for what, unit, key in (("time", "s", "seconds"), ("peak memory", "MiB", "peak_rss_mib")):
            ratio_key = f"{'time' if what == 'time' else 'memory'}_ratio_{name}_over_default"
            value = case[key] if case["status"] == "ok" else case["status"]
            rows.append(
                _row(f"dry run {what}, {name} ({case.get('jobs')} jobs)", unit, value,
                     f"{r['baseline']} ({base.get('jobs')} jobs)", base[key], r.get(ratio_key))
            )  # fmt: skip
    return rows


def rows_baselines(r: dict[str, Any]) -> list[Row]:
    """Rows of ``bench_baselines``: training iterations of PIPO and PaNN over the plain net's, PIPO's size."""
    setting = f"{r['device']}, patch {r['patch']}, batch {r['batch']}"
    rows = [
        _row(f"training iteration, PIPO + marginal Dice+CE ({setting})", "s", r["seconds_pipo"],
             r["baseline"], r["seconds_plain"], r["ratio_pipo_over_plain"]),
        _row("training iteration, PIPO over the plain net, both with marginal Dice+CE", "s",
             r["seconds_pipo"], "PlainConvUNet + marginal Dice+CE", r["seconds_plain_marginal"],
             r["ratio_pipo_over_plain_marginal"]),
        _row("parameters, PIPO", "parameters", r["parameters_pipo"], "PlainConvUNet", r["parameters_plain"],
             r["parameter_ratio_pipo_over_plain"]),
    ]  # fmt: skip
    if "seconds_panns" in r:
        rows.append(
            _row(f"training iteration, plain net + PaNN's prior-aware loss ({setting})", "s",
                 r["seconds_panns"], r["baseline"], r["seconds_plain"], r["ratio_panns_over_plain"])
        )  # fmt: skip
    else:
        rows.append(_row(f"PaNN: {r.get('note', 'not measured')}", "", None, r["baseline"], None, None))
    return rows


def rows_input_pipeline(r: dict[str, Any]) -> list[Row]:
    """Rows of ``bench_input_pipeline``: batches a second of our two worker paths over nnU-Net's loader
    (a throughput ratio: above 1 is faster)."""
    rate = r["batches_per_second"]
    setting = f"patch {r['patch']}, batch {r['batch']}, {r['workers']} worker(s)"
    return [
        _row(f"input pipeline, ours CPU path, batches/s, higher is better ({setting})", "batches/s",
             rate["ours_cpu"], r["baseline"], rate["nnunet"], r["ratio_ours_cpu_over_nnunet"]),
        _row(f"input pipeline, ours CUDA-run worker (enlarged crop {r['enlarged_patch']}, no augmentation), "
             "batches/s", "batches/s", rate["ours_cuda_worker"], r["baseline"], rate["nnunet"],
             r["ratio_ours_cuda_worker_over_nnunet"]),
    ]  # fmt: skip


def rows_memory(r: dict[str, Any]) -> list[Row]:
    """Rows of ``bench_memory``: peak host memory of one trainer and of a block job of five site workers."""
    trainer, block = r["trainer"], r["block"]
    setting = f"{r['device']}, patch {r['patch']}"
    return [
        _row(f"host memory, one trainer, process tree peak ({setting})", "MiB", trainer["tree_peak_mib"],
             "", None, None),
        _row(f"host memory, block job of {r['sites']} site workers, process tree peak", "MiB",
             block["tree_peak_mib"], r["baseline"], trainer["tree_peak_mib"], r["ratio_block_over_trainer"]),
    ]  # fmt: skip


def rows_gpu_step(r: dict[str, Any]) -> list[Row]:
    """Rows of ``bench_gpu_step``: our step over nnU-Net's ``train_step``, the training loop over the bare
    step, augmentation on the device over the step; one row saying so without a GPU."""
    if "skipped" in r:
        return [_row(f"skipped: {r['skipped']}", "", None, "", None, None)]
    setting = f"{r['device']}, patch {r['patch']}, {r['precision']}"
    return [
        _row(f"training step, ours ({setting})", "ms", r["ours_step_ms"], r["baseline"], r["nnunet_step_ms"],
             r["ratio_ours_over_nnunet"]),
        _row(f"training loop per iteration ({r['iterations']} iterations)", "ms", r["loop_ms"],
             "the bare step", r["ours_step_ms"], r["ratio_loop_over_step"]),
        _row("augmentation of a batch on the device (extended)", "ms", r["augment_on_device_ms"],
             "the bare step", r["ours_step_ms"], round(r["augment_on_device_ms"] / r["ours_step_ms"], 3)),
    ]  # fmt: skip


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def rows_generic(r: dict[str, Any]) -> list[Row]:
    """Rows of any other benchmark: one per numeric key naming a ratio (``ratio``/``_over_``), nested keys
    joined by dots, with the ``baseline`` named by the benchmark."""
    flat = _flatten(r)
    baseline = str(r.get("baseline", "(named in the benchmark)"))
    return [
        _row(key, "ratio", None, baseline, None, value)
        for key, value in flat.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and RATIO_KEY.search(key)
    ]


EXTRACTORS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "bench_inference": rows_inference,
    "bench_losses": rows_losses,
    "bench_dryrun": rows_dryrun,
    "bench_baselines": rows_baselines,
    "bench_input_pipeline": rows_input_pipeline,
    "bench_memory": rows_memory,
    "bench_gpu_step": rows_gpu_step,
}


def rows_for(entry: dict[str, Any]) -> list[Row]:
    """Summary rows of one benchmark run (a single ``failed`` row when it failed or gave no figure).

    Parameters
    ----------
    entry:
        From :func:`run_benchmark`.
    """
    name = entry["name"]
    if entry["status"] == "ok":
        try:
            rows = EXTRACTORS.get(name, rows_generic)(entry["result"])
            if not rows:
                rows = rows_generic(entry["result"])
        except (KeyError, TypeError) as err:
            # The script changed its RESULT keys: report that rather than guess figures.
            rows = []
            entry.update(status="failed", error=f"unexpected RESULT keys ({err!r})")
        if rows:
            return [{"benchmark": name, "status": "ok", **row} for row in rows]
        if entry["status"] == "ok":
            entry.update(status="failed", error="RESULT line holds no ratio")
    return [{"benchmark": name, "status": "failed", "figure": entry.get("error", "failed"), "unit": "",
             "value": None, "baseline": "", "baseline_value": None, "ratio": None}]  # fmt: skip


def machine(device: str | None) -> dict[str, Any]:
    """The machine the figures were measured on: CPU model, cores, Python and torch versions, device.

    Parameters
    ----------
    device:
        The ``--device`` given (``None``: each benchmark's default).
    """
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        torch_version, gpu = "not installed", None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch_version,
        "device": device or "each benchmark's default",
        "gpu": gpu,
        "platform": platform.platform(),
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def to_markdown(summary: dict[str, Any]) -> str:
    """The Markdown summary: machine, date, command, one table row per figure, then each run's command.

    Parameters
    ----------
    summary:
        The dictionary written as JSON by :func:`main`.
    """
    m = summary["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run_all.py`; do not edit by hand. Every figure is a ratio against a baseline",
        "measured in the same process (ratio = measured / baseline; below 1 is faster or smaller).",
        "",
        f"- Date: {summary['date']}",
        f"- Command: `{summary['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}; "
        f"device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"- Mode: {'--quick (small sizes)' if summary['quick'] else 'full sizes'}",
        "",
        "| benchmark | status | figure | measured | baseline | baseline value | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        unit = f" {row['unit']}" if row["unit"] and row["value"] is not None else ""
        base_unit = f" {row['unit']}" if row["unit"] and row["baseline_value"] is not None else ""
        cells = [
            row["benchmark"],
            row["status"],
            _cell(row["figure"]),
            _cell(row["value"]) + unit,
            _cell(row["baseline"]),
            _cell(row["baseline_value"]) + base_unit,
            _cell(row["ratio"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| benchmark | status | seconds | command |", "|---|---|---|---|"]
    for run in summary["runs"]:
        lines.append(f"| {run['name']} | {run['status']} | {run['seconds']} | `{run['command']}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run every benchmark, write the JSON and Markdown summaries."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="passed where accepted")
    parser.add_argument("--out-json", type=Path, default=REPO / "docs" / "benchmarks.json")
    parser.add_argument("--out-md", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these benchmarks (e.g. bench_losses)"
    )
    args = parser.parse_args(argv)

    scripts = discover(BENCH_DIR)
    if args.only:
        unknown = set(args.only) - {s.stem for s in scripts}
        if unknown:
            parser.error(f"no benchmark named {sorted(unknown)} in {BENCH_DIR}")
        scripts = [s for s in scripts if s.stem in args.only]
    runs = []
    for script in scripts:
        print(f"running {script.name} ...", file=sys.stderr, flush=True)
        runs.append(run_benchmark(script, args.quick, args.device, args.timeout))
        print(f"  {runs[-1]['status']} in {runs[-1]['seconds']} s", file=sys.stderr, flush=True)
    summary = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/run_all.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine(args.device),
        "rows": [row for run in runs for row in rows_for(run)],
        "runs": runs,
    }
    write_json(args.out_json, summary)
    previous = args.out_md.read_text(encoding="utf-8") if args.out_md.is_file() else None
    write_text(args.out_md, with_separate_sections(to_markdown(summary), previous))
    print(f"wrote {args.out_json} and {args.out_md}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
