"""The paper-scale benchmarks (input pipeline, host memory, GPU step): their summary rows and the GPU
benchmark's behaviour without a GPU and on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[1]


run_all = load_bench("run_all")

PIPELINE = {
    "patch": [80, 160, 128], "enlarged_patch": [175, 238, 177], "batch": 2, "workers": 1,
    "batches_per_second": {"ours_cpu": 4.5, "ours_cuda_worker": 3.4, "nnunet": 1.3},
    "baseline": "nnunetv2 loader", "ratio_ours_cpu_over_nnunet": 3.46,
    "ratio_ours_cuda_worker_over_nnunet": 2.62,
}  # fmt: skip
MEMORY = {
    "device": "cpu", "patch": [16, 32, 32], "sites": 5, "baseline": "one trainer",
    "trainer": {"tree_peak_mib": 1000.0}, "block": {"tree_peak_mib": 6000.0}, "ratio_block_over_trainer": 6.0,
}  # fmt: skip
STEP = {
    "device": "cuda", "patch": [80, 160, 128], "precision": "bf16", "iterations": 250, "baseline": "nnU-Net",
    "ours_step_ms": 90.0, "nnunet_step_ms": 100.0, "loop_ms": 95.0, "augment_on_device_ms": 9.0,
    "ratio_ours_over_nnunet": 0.9, "ratio_loop_over_step": 1.056,
}  # fmt: skip


def _rows(name: str, result: dict) -> list[dict]:
    return run_all.rows_for({"name": name, "status": "ok", "result": result})


def test_summary_rows_of_the_scale_benchmarks() -> None:
    # Execute
    pipeline, memory, step = (
        _rows("bench_input_pipeline", PIPELINE),
        _rows("bench_memory", MEMORY),
        _rows("bench_gpu_step", STEP),
    )
    skipped = _rows("bench_gpu_step", {"benchmark": "gpu_step", "skipped": "no GPU"})
    # Assert
    assert [r["ratio"] for r in pipeline] == [3.46, 2.62] and pipeline[0]["baseline_value"] == 1.3
    assert (
        memory[1]["value"] == 6000.0 and memory[1]["ratio"] == 6.0 and memory[1]["baseline_value"] == 1000.0
    )
    assert [r["ratio"] for r in step] == [0.9, 1.056, 0.1] and step[0]["unit"] == "ms"
    assert len(skipped) == 1 and skipped[0]["status"] == "ok" and "no GPU" in skipped[0]["figure"]


def test_gpu_benchmark_without_a_gpu_says_so_and_succeeds() -> None:
    # Execute
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gpu_step.py")], capture_output=True, text=True, env=env,
        timeout=300, cwd=REPO,
    )  # fmt: skip
    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("no GPU")
    assert run_all.parse_result(proc.stdout) == {"benchmark": "gpu_step", "skipped": "no GPU"}


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu_at_a_small_patch() -> None:
    # Execute
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        str(REPO / "bench" / "bench_gpu_step.py"),
        "--device",
        "cpu",
        "--iterations",
        "1",
        "--warmup",
        "0",
    ]
    proc = subprocess.run(
        command + ["--cases", "1"], capture_output=True, text=True, env=env, timeout=1200, cwd=REPO
    )
    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["patch"] == [16, 32, 32] and result["iterations"] == 1
    assert min(result["ours_step_ms"], result["nnunet_step_ms"], result["loop_ms"]) > 0
