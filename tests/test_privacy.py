"""The privacy boundary of the federated rounds.

docs/design.md "The pipeline and the privacy boundary": each site's data is read only by that site's
rules; the aggregation rule reads only model weights. Batch worker processes report the case files they
open to their trainer (``PatchSampler.opened``), which the audit hook of this process cannot see.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import SimpleITK as sitk

from fedpsmos.federated import aggregation, paths, rounds, site_round
from fedpsmos.network import NetworkSpec, build_network
from fedpsmos.organs import ORGANS
from fedpsmos.preprocessing.fingerprint import N_BINS, site_fingerprint
from fedpsmos.training.checkpoint import load_checkpoint
from fedpsmos.training.selection import score_on_validation
from fedpsmos.training.trainer import Trainer, TrainSettings
from tests.conftest import DryRun
from tests.test_fingerprint import AUTO, make_site
from tests.test_rounds import (
    ITERS,
    LOSS,
    PATCH,
    SEED,
    SPEC,
    TRAINING,
    make_m0,
    make_sites,
    run_rounds,
    validation_of,
)

_OPENED: list[list[str]] = []  # stack of active recorders; the audit hook cannot be removed once added


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED and event in ("open", "os.listdir", "os.scandir", "glob.glob") and args:
        target = args[0]
        if isinstance(target, (str, bytes, os.PathLike)):
            _OPENED[-1].append(os.fsdecode(target))


sys.addaudithook(_audit)


@contextlib.contextmanager
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every path opened or listed from Python, and parquet files read natively by pyarrow."""
    opened: list[str] = []
    real = pd.read_parquet

    def spy(path: Any, *args: Any, **kwargs: Any) -> pd.DataFrame:
        opened.append(os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pd, "read_parquet", spy)
    _OPENED.append(opened)
    try:
        yield opened
    finally:
        _OPENED.pop()
        monkeypatch.setattr(pd, "read_parquet", real)


def _resolved(paths: list[str]) -> set[Path]:
    return {Path(p).resolve() for p in paths if p and not p.startswith("/proc")}


@pytest.fixture(scope="module")
def one_round(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("privacy")
    sites = make_sites(root)
    make_m0(root / "m0.pt")
    setting = root / "federated" / "V"
    rounds.init_global(root / "m0.pt", paths.global_model_path(setting, 0))
    run_rounds(setting, sites, 1)
    return {"root": root, "sites": sites, "setting": setting}


def test_aggregator_files_hold_only_parameter_tensors(one_round: dict[str, Any]) -> None:
    # Prepare: the model the files must match, parameter for parameter
    setting = one_round["setting"]
    spec = NetworkSpec.from_dict(load_checkpoint(paths.global_model_path(setting, 0))["meta"]["network"])
    reference = build_network(spec).state_dict()
    files = [paths.global_model_path(setting, 0)] + [
        paths.site_model_path(setting, 1, s) for s in ("site1", "site2")
    ]
    for path in files:
        # Execute
        payload = load_checkpoint(path)
        # Assert: weights only, the model's keys and shapes; metadata only scalars and small organ dicts
        assert set(payload) == {"model", "meta", "integrity"}, path
        assert list(payload["model"]) == list(reference), path
        for key, tensor in payload["model"].items():
            assert tensor.shape == reference[key].shape and tensor.dtype == reference[key].dtype, (path, key)
        for key, value in payload["meta"].items():
            if key == "network":
                assert value == spec.to_dict()
            elif isinstance(value, dict):  # val_dice per organ, weights per site: a few scalars
                assert len(value) <= 6 and all(isinstance(v, (int, float)) for v in value.values()), key
            elif isinstance(value, list):
                assert key in ("sites", "organs", "failed") and all(isinstance(v, str) for v in value), key
            else:
                assert value is None or isinstance(value, (int, float, str, bool)), key
        # no case identifiers leave a site
        assert "site1_000" not in repr(payload["meta"]) and "site2_000" not in repr(payload["meta"])


def test_aggregator_opens_only_round_models(
    one_round: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    setting = one_round["setting"]
    site_paths = [paths.site_model_path(setting, 1, s) for s in ("site1", "site2")]
    inputs = [paths.global_model_path(setting, 0), *site_paths]
    # Execute
    with recording(monkeypatch) as opened:
        aggregation.aggregate_round(
            previous_global=inputs[0],
            site_paths=site_paths,
            out_global=setting / "agg" / "global.pt",
            out_record=setting / "agg" / "record.json",
            round_index=1,
            policy="fail",
        )
    # Assert: reads exactly its inputs (plus its own temporary outputs), nothing private, no data
    read = {p for p in _resolved(opened) if p.parent != (setting / "agg").resolve()}
    assert read == {p.resolve() for p in inputs}
    assert paths.aggregator_input_violations(inputs) == []
    assert paths.aggregator_input_violations([paths.private_state_path(setting, "site1", 1)]) != []


def test_site_round_opens_only_its_own_files(
    one_round: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: round 2 of site1, from round 1's global and site1's private state
    sites, setting = one_round["sites"], one_round["setting"]
    out = setting / "probe"
    # Execute
    root = one_round["root"]
    inputs = {
        "global_path": paths.global_model_path(setting, 1),
        "private_in": paths.private_state_path(setting, "site1", 1),
        "manifest": root / "data" / "site1" / "manifest.json",
        "cases": [str(p) for p in sites["site1"].npz_paths.values()]
        + [str(v.npz) for v in validation_of(sites["site1"])],
        "patches": sites["site1"].patches,
    }
    with recording(monkeypatch) as opened:
        site_round.run_site_round_job(  # the rule's entry point: plain paths and config values
            site="site1",
            loss_spec=LOSS,
            training=TRAINING,
            patch_size=PATCH,
            local_iterations=ITERS,
            round_index=2,
            seed=SEED,
            attempts=1,
            on_site_failure="fail",
            out_site=out / "site1.pt",
            out_private=out / "private.pt",
            device="cpu",
            **inputs,
        )
    read = _resolved(opened)
    root = root.resolve()
    ours = [p for p in read if root in p.parents]
    # Assert: the hook saw the site's own data (so it works) and nothing of site2
    assert {p.resolve() for p in sites["site1"].npz_paths.values()} <= read
    assert {v.npz.resolve() for v in validation_of(sites["site1"])} <= read  # it scored its validation case
    assert sites["site1"].patches.resolve() in read
    assert paths.private_state_path(setting, "site1", 1).resolve() in read
    assert paths.site_input_violations([str(p) for p in ours], "site1", ["site1", "site2"]) == []
    flat = [inputs["global_path"], inputs["private_in"], inputs["manifest"], inputs["patches"]]
    flat += inputs["cases"]
    assert paths.site_input_violations(flat, "site1", ["site1", "site2"]) == []
    assert paths.site_input_violations(flat, "site2", ["site1", "site2"]) != []
    assert not [p for p in ours if "site2" in str(p.relative_to(root))]


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_batch_workers_open_only_the_sites_own_files(tmp_path: Path) -> None:
    # Prepare: site2's case files are garbage, so reading any of them would fail the training
    sites = make_sites(tmp_path)
    for path in sites["site2"].npz_paths.values():
        path.write_bytes(b"not a case")
    trainer = Trainer(
        model=build_network(SPEC, seed=0),
        sites=[sites["site1"]],
        loss_spec=LOSS,
        settings=TrainSettings.from_config(TRAINING),
        seed=SEED,
        device="cpu",
        patch_size=PATCH,
        workers=1,
    )
    # Execute: the batches come from a background worker process
    try:
        trainer.train_iterations(4)
        pids = trainer.batches.loader.worker_pids if trainer.batches.loader else []
    finally:
        trainer.close()
    # Assert: the worker's reads reach the trainer's record, and they are site1's training files only
    own = {Path(p) for p in sites["site1"].npz_paths.values()}
    assert len(pids) == 1 and trainer.sampler.opened and trainer.sampler.opened <= own


def test_validation_scorer_opens_only_the_given_cases(
    one_round: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: site1's validation cases and a model
    cases = validation_of(one_round["sites"]["site1"])
    spec = NetworkSpec.from_dict(
        load_checkpoint(paths.global_model_path(one_round["setting"], 1))["meta"]["network"]
    )
    model = build_network(spec)
    # Execute
    with recording(monkeypatch) as opened:
        score = score_on_validation(model, cases, organs=ORGANS, patch_size=PATCH, device="cpu")
    # Assert: exactly the validation files, nothing of site2, nothing of site1's training data
    ours = {p for p in _resolved(opened) if one_round["root"].resolve() in p.parents}
    assert ours == {c.npz.resolve() for c in cases} and 0.0 <= score <= 1.0


def test_selection_state_stays_private_and_out_of_the_aggregator_files(one_round: dict[str, Any]) -> None:
    # Prepare
    setting = one_round["setting"]
    # Execute
    private = load_checkpoint(paths.private_state_path(setting, "site1", 1))
    site_file = load_checkpoint(paths.site_model_path(setting, 1, "site1"))
    # Assert: the best model lives in the private state; the site file the aggregator reads carries only
    # per-organ Dice scalars, never the selection or its weights
    assert private["meta"]["best"]["which"] in ("global", "local") and private["best_model"]
    assert "best" not in site_file["meta"] and set(site_file) == {"model", "meta", "integrity"}
    final_private = paths.private_state_path(setting, "site1", 1)
    assert paths.aggregator_input_violations([final_private]) != []
    assert (
        paths.site_input_violations(
            [final_private, paths.global_model_path(setting, 1)], "site1", ["site1", "site2"]
        )
        == []
    )
    assert paths.site_input_violations([final_private], "site2", ["site1", "site2"]) != []


# ---------------------------------------------------------------- the federated data fingerprint


def test_site_fingerprint_rule_reads_only_its_own_site(tiny_plan: DryRun) -> None:
    # Prepare / Execute: the tiny config's DAG with every preprocessing setting `auto`
    jobs = tiny_plan(AUTO)
    # Assert: a site's summary reads its own manifest only; the merge reads summaries only, no site data
    sites = sorted({j["wildcards"]["site"] for j in jobs if j["rule"] == "site_fingerprint"})
    assert sites == ["site1", "site2", "site5"]  # config/ci.yaml's sites
    for job in jobs:
        if job["rule"] == "site_fingerprint":
            site = job["wildcards"]["site"]
            assert job["input"] == [f"results/data/{site}/manifest.json"]
            assert paths.site_input_violations(job["input"], site, sites) == []
        if job["rule"] == "merge_fingerprints":
            assert sorted(job["input"]) == [f"results/data/{s}/fingerprint.json" for s in sites]
        if job["rule"] == "preprocessing_settings":
            assert job["input"] == ["results/data/fingerprint.json"]


def _lists(value: Any) -> list[int]:
    """Lengths of every list in a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _lists(v)]
    if isinstance(value, list):
        return [len(value)] + [n for v in value for n in _lists(v)]
    return []


def test_site_fingerprint_holds_no_per_voxel_data_and_opens_no_test_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two sites of 4 cases each, one with about 27 times as many voxels; spy on native image reads
    small = make_site(tmp_path, "siteA", 4, seed=1)
    large = make_site(tmp_path, "siteB", 4, seed=1, scale=3)
    read_images: list[str] = []
    real = sitk.ReadImage

    def spy(path: Any, *args: Any, **kwargs: Any) -> sitk.Image:
        read_images.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sitk, "ReadImage", spy)
    # Execute
    with recording(monkeypatch) as opened:
        summaries = [site_fingerprint(site["manifest"]) for site in (small, large)]
    # Assert: the same structure and list sizes whatever the voxel count; every list is a spacing triple,
    # the spacings of the 3 training and validation cases, or the fixed histogram
    assert summaries[1]["moments"]["count"] > 20 * summaries[0]["moments"]["count"]
    assert _lists(summaries[0]) == _lists(summaries[1])
    assert max(_lists(summaries[1])) == N_BINS and set(_lists(summaries[1])) == {N_BINS, 3}
    assert abs(len(json.dumps(summaries[1])) - len(json.dumps(summaries[0]))) < 2000
    # only the site's own manifest and its training and validation images, never its test case
    test_cases = {json.loads(s["manifest"].read_text())["test"][0] for s in (small, large)}
    assert read_images and not [p for p in read_images if any(c in p for c in test_cases)]
    ours = {p for p in _resolved(opened) if tmp_path.resolve() in p.parents}
    manifests = {small["manifest"].resolve(), large["manifest"].resolve()}
    # besides the manifests, Python opens only the images it reads (their gzip and NIfTI header checks)
    assert manifests <= ours and ours - manifests <= {Path(p).resolve() for p in read_images}
