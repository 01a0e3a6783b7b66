"""Probabilities or labels: which way back to the original grid scores better (docs/benchmarks.md).

For M0 and the default federated model (each site's locally selected model when the run wrote one, else the
final federated model), predict every site's test cases twice with the workflow's own code
(:func:`fedpsmos.inference.predict.predict_site`): ``resample="probabilities"`` (softmax resampled class by
class to the original grid, argmax there) and ``resample="labels"`` (argmax on the preprocessed grid, nearest
neighbour label map). Both are scored with the project's evaluation (:func:`fedpsmos.evaluation.evaluate.
evaluate_site`, the site's raw labels in the original geometry). Prints the mean Dice and HD95 per model and
method over every (case, organ) the site labels, and the paired difference.

Usage::

    PYTHONPATH=. python bench/bench_resampling.py RESULTS [--setting V2] [--json out.json]

``RESULTS`` is a finished run's ``results`` folder; manifests name raw files relative to its parent, so the
script works from there. Predictions go to a temporary folder and are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedpsmos.evaluation.evaluate import evaluate_site
from fedpsmos.inference.predict import predict_site
from fedpsmos.inference.probabilities import RESAMPLE_MODES
from fedpsmos.training.checkpoint import load_checkpoint


def _models(results: Path, setting: str, sites: list[str]) -> dict[str, dict[str, Path]]:
    """Model id -> site -> checkpoint."""
    m0 = results / "models" / "pretrain" / "model.pt"
    federated = results / "models" / "federated" / setting
    per_site = {}
    for site in sites:
        selected = federated / "selected" / f"{site}.pt"
        per_site[site] = selected if selected.is_file() else federated / "model.pt"
    return {"pretrain": {s: m0 for s in sites}, f"federated/{setting}": per_site}


def _patch_size(model: Path, fallback: list[int] | None) -> list[int]:
    patch = load_checkpoint(model).get("meta", {}).get("patch_size") or fallback
    if not patch:
        raise SystemExit(f"{model}: meta has no patch_size; pass --patch-size")
    return [int(p) for p in patch]


def run(results: Path, setting: str, patch_fallback: list[int] | None, workdir: Path) -> pd.DataFrame:
    """Predict and score every (model, site, method); return the metrics rows with a ``method`` column."""
    sites = sorted(p.parent.name for p in (results / "data").glob("*/manifest.json"))
    frames = []
    m0_patch = _patch_size(results / "models" / "pretrain" / "model.pt", patch_fallback)
    for model, per_site in _models(results, setting, sites).items():
        for site in sites:
            manifest = results / "data" / site / "manifest.json"
            for method in RESAMPLE_MODES:
                out = workdir / model / site / method
                start = time.perf_counter()
                predict_site(
                    model_path=per_site[site],
                    manifest_path=manifest,
                    npz_dir=results / "preprocessed" / site,
                    out_dir=out,
                    patch_size=_patch_size(per_site[site], m0_patch),
                    device="cpu",
                    resample=method,
                )
                seconds = time.perf_counter() - start
                frame = evaluate_site(
                    predictions_dir=out,
                    manifest_path=manifest,
                    model=model,
                    site=site,
                    out_csv=out.parent / f"{method}.csv",
                )
                frames.append(frame.assign(method=method, seconds=seconds))
                dice = frame["dice"].mean()
                print(f"{model:14s} {site}: {method:13s} mean Dice {dice:.4f} ({seconds:.1f} s)", flush=True)
    return pd.concat(frames, ignore_index=True)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice and HD95 per model and method, and the paired difference probabilities - labels."""
    keys = ["model", "site", "case", "organ"]
    wide = rows.pivot(index=keys, columns="method", values=["dice", "hd95"])
    out = []
    for model, part in wide.groupby(level="model"):
        entry: dict[str, object] = {"model": model, "pairs": len(part)}
        for metric in ("dice", "hd95"):
            for method in RESAMPLE_MODES:
                entry[f"{metric}_{method}"] = float(np.nanmean(part[(metric, method)]))
            diff = part[(metric, "probabilities")] - part[(metric, "labels")]
            entry[f"{metric}_diff"] = float(np.nanmean(diff))
        entry["better_dice"] = int((part[("dice", "probabilities")] > part[("dice", "labels")]).sum())
        entry["worse_dice"] = int((part[("dice", "probabilities")] < part[("dice", "labels")]).sum())
        out.append(entry)
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a finished run's results folder")
    parser.add_argument("--setting", default="V2", help="federated setting (default V2, the default)")
    parser.add_argument("--patch-size", type=int, nargs=3, default=None, help="when a model's meta lacks it")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    results = args.results.resolve()
    json_out = args.json.resolve() if args.json else None
    torch.set_num_threads(1)
    os.chdir(results.parent)  # manifests name raw files relative to the run folder
    with tempfile.TemporaryDirectory(prefix="bench_resampling.") as tmp:
        rows = run(results, args.setting, args.patch_size, Path(tmp))
    summary = summarise(rows)
    pd.set_option("display.width", 160)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    timing = rows.groupby("method")["seconds"].apply(lambda s: s.drop_duplicates().sum())
    print("prediction seconds per method:", {k: round(float(v), 1) for k, v in timing.items()})
    if json_out:
        json_out.write_text(json.dumps(summary.to_dict(orient="records"), indent=2) + "\n")


if __name__ == "__main__":
    main()
