"""The benchmark runner (bench/run_all.py) and the dry-run benchmark's child measurement (bench_dryrun)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[1]


run_all = load_bench("run_all")
bench_dryrun = load_bench("bench_dryrun")

GOOD = """import argparse, json
p = argparse.ArgumentParser(); p.add_argument("--quick", action="store_true"); a = p.parse_args()
print("noise"); print("RESULT " + json.dumps({"baseline": "b", "x": {"ratio_a": 0.5}, "quick": a.quick}))
"""


def _script(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(body)
    return path


def test_flags_are_passed_only_where_accepted(tmp_path):
    # Prepare
    good = _script(tmp_path, "bench_good", GOOD)
    # Execute
    command = run_all.command_for(good, quick=True, device="cpu")
    # Assert: --quick is declared, --device is not
    assert command[-1] == "--quick" and "--device" not in command


def test_results_failures_and_timeouts_become_rows(tmp_path):
    # Prepare
    scripts = [
        _script(tmp_path, "bench_good", GOOD),
        _script(tmp_path, "bench_crash", "raise SystemExit('boom: bad input')\n"),
        _script(tmp_path, "bench_silent", "print('no result')\n"),
        _script(tmp_path, "bench_slow", "import time; time.sleep(30)\n"),
    ]
    # Execute
    runs = [run_all.run_benchmark(s, quick=True, device=None, timeout_s=3) for s in scripts]
    rows = [row for run in runs for row in run_all.rows_for(run)]
    # Assert
    by_name = {row["benchmark"]: row for row in rows}
    assert by_name["bench_good"]["status"] == "ok" and by_name["bench_good"]["ratio"] == 0.5
    assert by_name["bench_good"]["figure"] == "x.ratio_a" and by_name["bench_good"]["baseline"] == "b"
    assert runs[0]["result"]["quick"] is True
    assert by_name["bench_crash"]["status"] == "failed" and "boom" in by_name["bench_crash"]["figure"]
    assert "no 'RESULT" in by_name["bench_silent"]["figure"]
    assert "timed out" in by_name["bench_slow"]["figure"]


def test_summary_files_state_machine_and_rows(tmp_path, monkeypatch):
    # Prepare: a bench folder with one passing and one failing benchmark
    bench = tmp_path / "bench"
    bench.mkdir()
    _script(bench, "bench_good", GOOD)
    _script(bench, "bench_crash", "import sys; sys.exit(3)\n")
    monkeypatch.setattr(run_all, "BENCH_DIR", bench)
    out_json, out_md = tmp_path / "docs" / "b.json", tmp_path / "docs" / "b.md"
    # Execute
    run_all.main(["--quick", "--out-json", str(out_json), "--out-md", str(out_md), "--timeout", "60"])
    # Assert
    summary = json.loads(out_json.read_text())
    assert summary["machine"]["cores"] >= 1 and summary["machine"]["torch"]
    assert [r["status"] for r in summary["rows"]] == ["failed", "ok"]  # sorted: bench_crash, bench_good
    text = out_md.read_text()
    assert "| bench_crash | failed | exit code 3" in text and "x.ratio_a" in text and "--quick" in text


def test_bad_result_line_is_an_error():
    with pytest.raises(ValueError, match="no 'RESULT"):
        run_all.parse_result("nothing here\n")
    with pytest.raises(ValueError):
        run_all.parse_result("RESULT [1, 2]\n")


def test_dryrun_child_is_measured_and_timed_out(tmp_path):
    # Prepare: stand-ins for snakemake that print a job table, fail, or hang
    ok = [sys.executable, "-c", "x = bytearray(50 * 2**20); print('job count\\ntotal   42')"]
    small = [sys.executable, "-c", "print('total 1')"]
    failing = [sys.executable, "-c", "import sys; print('MissingInputException in rule x'); sys.exit(1)"]
    hanging = [sys.executable, "-c", "import time; time.sleep(30)"]
    # Execute
    measured = bench_dryrun.run_dryrun(ok, tmp_path / "ok.log", timeout_s=60)
    measured_small = bench_dryrun.run_dryrun(small, tmp_path / "small.log", timeout_s=60)
    failed = bench_dryrun.run_dryrun(failing, tmp_path / "failed.log", timeout_s=60)
    timed_out = bench_dryrun.run_dryrun(hanging, tmp_path / "hang.log", timeout_s=1)
    # Assert: its own peak memory (the 50 MiB buffer), not a maximum over earlier children
    assert measured["status"] == "ok" and measured["jobs"] == 42 and measured["peak_rss_mib"] >= 50
    assert measured_small["peak_rss_mib"] < measured["peak_rss_mib"] - 30
    assert failed["status"] == "failed" and "MissingInputException" in failed["error"]
    assert timed_out["status"] == "timeout" and timed_out["seconds"] < 10


def test_dryrun_command_puts_the_target_before_configfiles(tmp_path):
    command = bench_dryrun.dryrun_command(REPO, tmp_path, [REPO / "config" / "paper.yaml"])
    assert command.index("all") < command.index("--configfile")
    assert command[-2:] == [str(REPO / "config.yaml"), str(REPO / "config" / "paper.yaml")]


def test_a_new_summary_keeps_the_hand_measured_sections():
    previous = "# Benchmarks\n\nold table\n\n## Measured separately\n\n### Case storage\n\nfigures\n"
    kept = run_all.with_separate_sections("# Benchmarks\n\nnew table\n", previous)
    assert kept == "# Benchmarks\n\nnew table\n\n## Measured separately\n\n### Case storage\n\nfigures\n"
    assert run_all.with_separate_sections("# Benchmarks\n", None) == "# Benchmarks\n"
    assert run_all.with_separate_sections("# B\n", "# B\n\nno such part\n") == "# B\n"
