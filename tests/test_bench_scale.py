"""The paper-scale benchmarks (input pipeline, host memory, GPU step): their summary rows and the GPU
benchmark's behaviour without a GPU and on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

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


def _run_gpu_benchmark(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """``bench/bench_gpu_step.py`` run in this process (its imports are the tests' own: no second start of
    torch and nnU-Net); its standard output."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # the script imports its sibling benchmarks
    monkeypatch.setattr(sys, "argv", ["bench_gpu_step.py", *argv])
    load_bench("bench_gpu_step").main()
    return capsys.readouterr().out


def test_gpu_benchmark_without_a_gpu_says_so_and_succeeds(monkeypatch, capsys) -> None:
    # Prepare: no CUDA device, whatever the machine has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Execute
    out = _run_gpu_benchmark([], monkeypatch, capsys)
    # Assert
    assert out.startswith("no GPU")
    assert run_all.parse_result(out) == {"benchmark": "gpu_step", "skipped": "no GPU"}


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu_at_a_small_patch(monkeypatch, capsys) -> None:
    # Execute: every phase once, at the quick patch, on one case
    out = _run_gpu_benchmark(
        ["--device", "cpu", "--iterations", "1", "--warmup", "0", "--cases", "1"], monkeypatch, capsys
    )
    # Assert
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["patch"] == [16, 32, 32] and result["iterations"] == 1
    assert min(result["ours_step_ms"], result["nnunet_step_ms"], result["loop_ms"]) > 0
