"""Federated rounds (site_round, site_selection, aggregation, blocks, curves) on tiny networks and data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from fedpsmos.federated import aggregation, blocks, curves, paths, rounds, site_round, site_selection
from fedpsmos.federated.rounds import RoundError
from fedpsmos.federated.site_setup import LocalSettings, RoundPlan
from fedpsmos.network import build_network
from fedpsmos.organs import ORGANS, labelled_mask
from fedpsmos.preprocessing.storage import case_path, write_case
from fedpsmos.training.checkpoint import load_checkpoint, save_checkpoint
from fedpsmos.training.selection import ValidationCase, validation_cases_from_manifest
from fedpsmos.training.site_data import SiteData
from fedpsmos.training.trainer import Trainer, TrainSettings
from tests.conftest import tiny_spec, tiny_training
from tests.test_checkpoint import RunsCode

PATCH = (8, 8, 8)
SPEC = tiny_spec(6)
LOSS = {"marginal": {"dice": 1.0, "ce": 1.0}, "exclusion": {"ce": 1.0}}
# The plateau rule decays every round: the schedule's state matters.
TRAINING = tiny_training(iterations_per_epoch=3, plateau={"window": 1, "min_decrease": 10.0, "factor": 0.8})
# site1 labels liver and spleen (2 training cases), site2 liver only (3 training cases): weights 2/5, 3/5
SITES = {"site1": (("liver", "spleen"), 2), "site2": (("liver",), 3)}
SEED = 3
ITERS = 2


def _write_case(path: Path, organs: tuple[str, ...], rng: np.random.Generator) -> pd.DataFrame:
    shape = (12, 12, 12)
    label = np.zeros(shape, np.uint8)
    label[2:7, 2:8, 2:8] = 1  # liver
    label[6:10, 6:11, 6:11] = np.where(label[6:10, 6:11, 6:11] == 0, 2, label[6:10, 6:11, 6:11])  # spleen
    keep = {ORGANS.index(o) + 1 for o in organs}
    label = np.where(np.isin(label, list(keep)), label, 0).astype(np.uint8)
    image = (rng.normal(0.0, 1.0, shape) + 2.0 * label).astype(np.float32)
    write_case(path, {"image": image, "label": label, "labelled": labelled_mask(organs)})
    rows = [
        {"case": path.stem, "z": z, "y": y, "x": x, "organ": organ, "fraction": 0.5}
        for organ in organs
        for z, y, x in ((0, 0, 0), (2, 2, 2), (4, 4, 4))
    ]
    return pd.DataFrame(rows)


def make_sites(root: Path) -> dict[str, SiteData]:
    """Two sites of tiny partially labelled cases with a patch index and manifest each; each site also holds
    one validation case (``{site}_val``, in the manifest's ``validation`` list, see :func:`validation_of`)."""
    rng = np.random.default_rng(0)
    out = {}
    for site, (organs, n) in SITES.items():
        folder = root / "preprocessed" / site
        folder.mkdir(parents=True)
        frames, npz = [], {}
        for i in range(n):
            case = f"{site}_{i:03d}"
            npz[case] = case_path(folder, case)
            frames.append(_write_case(npz[case], organs, rng))
        _write_case(case_path(folder, f"{site}_val"), organs, rng)
        index = pd.concat(frames).assign(site=site)
        (root / "patches").mkdir(exist_ok=True)
        index.to_parquet(root / "patches" / f"{site}.parquet")
        manifest = {"site": site, "train": sorted(npz), "validation": [f"{site}_val"], "test": []}
        (root / "data" / site).mkdir(parents=True)
        (root / "data" / site / "manifest.json").write_text(json.dumps(manifest))
        out[site] = SiteData(site=site, npz_paths=npz, patches=root / "patches" / f"{site}.parquet")
    return out


def validation_of(data: SiteData) -> tuple[ValidationCase, ...]:
    """The validation cases :func:`make_sites` wrote for a site, from its manifest."""
    root = Path(data.patches).parent.parent
    folder = root / "preprocessed" / data.site
    return validation_cases_from_manifest(data.site, root / "data" / data.site / "manifest.json", folder)


def make_m0(path: Path) -> dict[str, torch.Tensor]:
    """A tiny M0 checkpoint; returns its weights."""
    state = build_network(SPEC, seed=0).state_dict()
    save_checkpoint(path, {"model": state, "meta": {"network": SPEC.to_dict(), "organs": list(ORGANS)}})
    return load_checkpoint(path)["model"]


def local() -> LocalSettings:
    return LocalSettings(loss_spec=LOSS, settings=TrainSettings.from_config(TRAINING), patch_size=PATCH)


def run_rounds(setting: Path, sites: dict[str, SiteData], n_rounds: int, policy: str = "fail") -> None:
    """Per-round rules, called as functions."""
    for r in range(1, n_rounds + 1):
        for site, data in sites.items():
            site_round.run_site_round(
                global_path=paths.global_model_path(setting, r - 1),
                private_in=paths.private_state_path(setting, site, r - 1) if r > 1 else "",
                site_data=data,
                local=local(),
                plan=RoundPlan(local_iterations=ITERS, seed=SEED, attempts=1, on_site_failure=policy),
                round_index=r,
                out_site=paths.site_model_path(setting, r, site),
                out_private=paths.private_state_path(setting, site, r),
                validation=validation_of(data),
            )
        aggregation.aggregate_round(
            previous_global=paths.global_model_path(setting, r - 1),
            site_paths=[paths.site_model_path(setting, r, s) for s in sites],
            out_global=paths.global_model_path(setting, r),
            out_record=paths.record_path(setting, r),
            round_index=r,
            policy=policy,
        )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three per-round-rule rounds of two sites, shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("fed")
    sites = make_sites(root)
    m0 = make_m0(root / "m0.pt")
    setting = root / "federated" / "V"
    rounds.init_global(root / "m0.pt", paths.global_model_path(setting, 0))
    run_rounds(setting, sites, 3)
    return {"root": root, "sites": sites, "m0": m0, "setting": setting}


def test_rounds_equal_fedavg_by_hand(federation: dict[str, Any]) -> None:
    # Prepare: the same computation written out: train each site with the Trainer from the global, average
    sites, setting = federation["sites"], federation["setting"]
    weights = {k: v.clone() for k, v in federation["m0"].items()}
    private: dict[str, dict[str, Any]] = {}
    settings = TrainSettings.from_config(TRAINING)
    # Execute
    for r in (1, 2, 3):
        trained = {}
        for site, data in sites.items():
            model = build_network(SPEC)
            model.load_state_dict(weights)
            trainer = Trainer(
                model=model,
                sites=[data],
                loss_spec=LOSS,
                settings=settings,
                seed=site_round.round_seed(SEED, site, r),
                device="cpu",
                patch_size=PATCH,
            )
            if site in private:
                trainer.load_state_dict({k: v for k, v in private[site].items() if k != "rng"})
            trainer.end_epoch(trainer.train_iterations(ITERS))
            private[site] = trainer.state_dict()
            trained[site] = model.state_dict()
        weights = {
            k: ((2 * trained["site1"][k].double() + 3 * trained["site2"][k].double()) / 5).to(v.dtype)
            for k, v in weights.items()
        }
    # Assert: bit-identical on the CPU, and the model moved away from M0
    final = load_checkpoint(paths.global_model_path(setting, 3))["model"]
    assert list(final) == list(weights)
    for key in weights:
        torch.testing.assert_close(final[key], weights[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(final[k], federation["m0"][k]) for k in final)


def test_round_files_and_record(federation: dict[str, Any]) -> None:
    # Prepare
    setting = federation["setting"]
    # Execute
    record = json.loads(paths.record_path(setting, 2).read_text())
    glob = load_checkpoint(paths.global_model_path(setting, 2))["meta"]
    site = load_checkpoint(paths.site_model_path(setting, 2, "site1"))["meta"]
    decays = [
        load_checkpoint(paths.private_state_path(setting, "site1", r))["trainer"]["scheduler"]["decays"]
        for r in (1, 2, 3)
    ]
    # Assert
    assert record["sites"] == ["site1", "site2"] and record["failed"] == [] and record["policy"] == "fail"
    assert record["weights"] == pytest.approx({"site1": 0.4, "site2": 0.6})
    assert set(record["val_dice"]["site1"]) == {"liver", "spleen"}
    assert set(record["val_dice"]["site2"]) == {"liver"}
    assert all(0.0 <= d <= 1.0 for d in record["val_dice"]["site1"].values())
    assert set(record["val_dice_local"]["site1"]) == {"liver", "spleen"}
    assert record["losses"]["site1"] > 0
    assert glob["round"] == 2 and glob["network"] == SPEC.to_dict()
    assert site["n_cases"] == 2 and site["local_iterations"] == ITERS and site["failed"] is False
    # the plateau rule (window 1, huge min_decrease) steps once per round and its state survives rounds:
    # no decay after the first loss, then one per round
    assert decays == [0, 1, 2]


def test_finalise_writes_model_and_curves(federation: dict[str, Any], tmp_path: Path) -> None:
    # Prepare
    setting = federation["setting"]
    records = [paths.record_path(setting, r) for r in (3, 1, 2)]
    # Execute
    curves.finalise_federation(
        last_global=paths.global_model_path(setting, 3),
        records=records,
        out_model=tmp_path / "model.pt",
        out_curve_csv=tmp_path / "curve.csv",
        out_curve_png=tmp_path / "curve.png",
        setting="V",
    )
    # Assert
    model = load_checkpoint(tmp_path / "model.pt")
    assert model["meta"]["kind"] == "federated" and model["meta"]["rounds"] == 3
    assert model["meta"]["network"] == SPEC.to_dict() and model["meta"]["sites"] == ["site1", "site2"]
    frame = pd.read_csv(tmp_path / "curve.csv")
    assert len(frame) == 3 * 3  # 3 rounds x (site1: 2 organs + site2: 1 organ)
    assert sorted(frame["round"].unique()) == [1, 2, 3]
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert frame[["val_dice", "val_dice_local"]].notna().all().all()
    with pytest.raises(ValueError, match="records cover rounds"):
        curves.finalise_federation(
            last_global=paths.global_model_path(setting, 3),
            records=records[:2],
            out_model=tmp_path / "m.pt",
            out_curve_csv=tmp_path / "c.csv",
            out_curve_png=tmp_path / "c.png",
        )


def test_block_equals_rules_and_resumes(federation: dict[str, Any], tmp_path: Path) -> None:
    # Prepare: a block over the same three rounds, from the same M0
    sites, rules = federation["sites"], federation["setting"]
    setting = tmp_path / "block"
    rounds.init_global(federation["root"] / "m0.pt", paths.global_model_path(setting, 0))
    kwargs = dict(
        setting_dir=setting,
        first_round=1,
        last_round=3,
        sites=list(sites.values()),
        local=local(),
        plan=RoundPlan(local_iterations=ITERS, seed=SEED, attempts=1, on_site_failure="fail"),
        validation={s: validation_of(d) for s, d in sites.items()},
    )
    # Execute: the whole block; then "kill" it in round 3 (aggregate missing, a site file half-written,
    # round 3's private state already written) and run it again
    blocks.run_block(**kwargs)
    uninterrupted = load_checkpoint(paths.global_model_path(setting, 3))["model"]
    paths.global_model_path(setting, 3).unlink()
    paths.record_path(setting, 3).unlink()
    site_file = paths.site_model_path(setting, 3, "site1")
    site_file.write_bytes(site_file.read_bytes()[:100])
    before = {p: p.stat().st_mtime_ns for r in (1, 2) for p in paths.round_dir(setting, r).iterdir()}
    records = blocks.run_block(**kwargs)
    resumed = load_checkpoint(paths.global_model_path(setting, 3))["model"]
    # Assert: rules, block and resumed block agree bit for bit; rounds 1-2 were not redone
    by_rules = load_checkpoint(paths.global_model_path(rules, 3))["model"]
    for key in by_rules:
        assert torch.equal(uninterrupted[key], by_rules[key]), key
        assert torch.equal(resumed[key], by_rules[key]), key
    # ... and so do the sites' running best models and their choices
    for site in sites:
        ours = load_checkpoint(paths.private_state_path(setting, site, 3))
        theirs = load_checkpoint(paths.private_state_path(rules, site, 3))
        assert ours["meta"]["best"] == theirs["meta"]["best"]
        assert all(torch.equal(ours["best_model"][k], theirs["best_model"][k]) for k in theirs["best_model"])
    assert before == {p: p.stat().st_mtime_ns for p in before}
    assert [r["round"] for r in records] == [1, 2, 3]
    assert blocks.resume_round(setting, 1, 3, list(sites)) == 4


def test_block_does_not_reuse_rounds_made_with_other_settings_or_another_start(
    federation: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: the per-round federation's files stand in for a finished block's
    setting, names = federation["setting"], list(federation["sites"])
    local_ = local()
    plan = RoundPlan(local_iterations=ITERS, seed=SEED, attempts=1, on_site_failure="fail")
    copy = tmp_path / "copy"
    shutil.copytree(setting, copy)
    own = blocks.block_provenance(local_, plan, names)
    for r in (1, 2, 3):
        record = json.loads(paths.record_path(copy, r).read_text())
        paths.record_path(copy, r).write_text(json.dumps({**record, "provenance": own}))
    other = blocks.block_provenance(local_, RoundPlan(ITERS, SEED + 1, 1, "fail"), names)
    # Execute / Assert: complete for a block with the settings its records carry ...
    assert blocks.resume_round(copy, 1, 3, names, own) == 4
    # ... not for a block with another seed
    assert other != own and blocks.resume_round(copy, 1, 3, names, other) == 1
    # ... nor once the model they started from has changed (M0 retrained): everything is redone
    shutil.copy(paths.global_model_path(copy, 3), paths.global_model_path(copy, 0))
    assert blocks.resume_round(copy, 1, 3, names, own) == 1


def _site_file(
    setting: Path, site: str, state: dict[str, torch.Tensor], *, n: int = 2, failed: bool = False
) -> Path:
    path = paths.site_model_path(setting, 1, site)
    meta = {"site": site, "round": 1, "n_cases": n, "local_iterations": 1, "mean_loss": 0.5, "val_dice": {}}
    save_checkpoint(path, {"model": state, "meta": {**meta, "failed": failed}})
    return path


def _corrupt(state: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in state.items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    if how == "missing":
        del state[key]
    elif how == "extra":
        state["extra.weight"] = torch.zeros(1)
    elif how == "shape":
        state[key] = torch.zeros(3)
    elif how == "dtype":
        state[key] = state[key].double()
    elif how == "nan":
        state[key][(0,) * state[key].dim()] = float("nan")
    return state


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", "missing key"),
        ("extra", "unexpected key"),
        ("shape", "has shape"),
        ("dtype", "has dtype"),
        ("nan", "non-finite"),
        ("truncated", "truncated or corrupt"),
        ("code", "not a weights-only checkpoint"),
    ],
)
def test_aggregator_refusals_name_site_and_round(tmp_path: Path, how: str, message: str) -> None:
    # Prepare
    setting = tmp_path / "fed"
    m0 = make_m0(tmp_path / "m0.pt")
    rounds.init_global(tmp_path / "m0.pt", paths.global_model_path(setting, 0))
    good = _site_file(setting, "site1", m0)
    bad = _site_file(setting, "site2", m0 if how in ("truncated", "code") else _corrupt(m0, how))
    marker = tmp_path / "pwned"
    if how == "truncated":
        bad.write_bytes(bad.read_bytes()[:-200])
    if how == "code":  # a site file that runs code on whoever unpickles it (tests/test_checkpoint.py)
        payload = load_checkpoint(bad)
        payload["meta"]["note"] = RunsCode(marker)
        torch.save(payload, bad)
    # Execute / Assert: one line naming round and site, and the file where the file itself is unreadable
    with pytest.raises(RoundError, match=f"^round 1, site site2: .*{message}") as info:
        aggregation.aggregate_round(
            previous_global=paths.global_model_path(setting, 0),
            site_paths=[good, bad],
            out_global=paths.global_model_path(setting, 1),
            out_record=paths.record_path(setting, 1),
            round_index=1,
            policy="skip",
        )
    assert "\n" not in str(info.value)
    if how in ("nan", "truncated", "code"):
        assert str(bad) in str(info.value)
    assert not paths.global_model_path(setting, 1).exists()
    assert not paths.record_path(setting, 1).exists()
    assert not marker.exists(), "the code-running pickle ran"


def test_skip_policy_renormalises_and_fail_policy_raises(tmp_path: Path) -> None:
    # Prepare: site2's data is corrupt, so its local round fails on every attempt
    sites = make_sites(tmp_path)
    make_m0(tmp_path / "m0.pt")
    setting = tmp_path / "fed"
    rounds.init_global(tmp_path / "m0.pt", paths.global_model_path(setting, 0))
    for path in sites["site2"].npz_paths.values():
        path.write_bytes(b"not an npz")
    common = dict(
        global_path=paths.global_model_path(setting, 0),
        private_in="",
        local=local(),
        round_index=1,
    )
    site_paths = [paths.site_model_path(setting, 1, s) for s in sites]
    # Execute / Assert: fail policy: the site round raises
    with pytest.raises(RoundError, match="site site2 round 1: all 2 attempt"):
        site_round.run_site_round(
            site_data=sites["site2"],
            plan=RoundPlan(local_iterations=ITERS, seed=SEED, attempts=2, on_site_failure="fail"),
            out_site=site_paths[1],
            out_private=tmp_path / "p.pt",
            **common,
        )
    assert not site_paths[1].exists()
    # Execute: skip policy
    for site, data in sites.items():
        site_round.run_site_round(
            site_data=data,
            plan=RoundPlan(local_iterations=ITERS, seed=SEED, attempts=2, on_site_failure="skip"),
            out_site=paths.site_model_path(setting, 1, site),
            out_private=paths.private_state_path(setting, site, 1),
            **common,
        )
    agg = dict(
        previous_global=paths.global_model_path(setting, 0),
        site_paths=site_paths,
        out_global=paths.global_model_path(setting, 1),
        out_record=paths.record_path(setting, 1),
        round_index=1,
    )
    # Assert: the failed site's file holds the incoming weights, only parameter tensors, marked failed
    failed = load_checkpoint(site_paths[1])
    incoming = load_checkpoint(paths.global_model_path(setting, 0))["model"]
    assert failed["meta"]["failed"] is True and failed["meta"]["mean_loss"] is None
    assert isinstance(failed["meta"]["error"], str) and failed["meta"]["error"]
    assert all(torch.equal(failed["model"][k], incoming[k]) for k in incoming)
    # ... the fail-policy aggregator refuses it, the skip-policy one drops it and renormalises
    with pytest.raises(RoundError, match=r"round 1: site\(s\) \['site2'\] failed"):
        aggregation.aggregate_round(policy="fail", **agg)
    record = aggregation.aggregate_round(policy="skip", **agg)
    assert record["sites"] == ["site1"] and record["failed"] == ["site2"] and record["renormalised"]
    assert record["weights"] == {"site1": 1.0} and record["losses"]["site2"] is None
    glob = load_checkpoint(paths.global_model_path(setting, 1))["model"]
    site1 = load_checkpoint(site_paths[0])["model"]
    assert all(torch.equal(glob[k], site1[k]) for k in glob)
    # ... and with every site failed there is nothing to aggregate
    _site_file(setting, "site1", incoming, failed=True)
    with pytest.raises(RoundError, match="every site failed"):
        aggregation.aggregate_round(policy="skip", **agg)


def test_retry_starts_from_the_same_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a first attempt that trains (changing the model in place) and then fails
    sites = make_sites(tmp_path)
    make_m0(tmp_path / "m0.pt")
    setting = tmp_path / "fed"
    rounds.init_global(tmp_path / "m0.pt", paths.global_model_path(setting, 0))
    real = site_round.SiteRunner._train
    calls = []

    def flaky(self: site_round.SiteRunner, *args: Any) -> Any:
        calls.append(1)
        result = real(self, *args)
        if len(calls) == 1:
            raise OSError("node lost")
        return result

    def once(out: Path, private: Path) -> dict[str, Any]:
        return site_round.run_site_round(
            global_path=paths.global_model_path(setting, 0),
            private_in=None,
            site_data=sites["site1"],
            local=local(),
            plan=RoundPlan(local_iterations=ITERS, seed=SEED, attempts=2, on_site_failure="fail"),
            round_index=1,
            out_site=out,
            out_private=private,
        )

    # Execute
    clean = once(tmp_path / "clean.pt", tmp_path / "clean_p.pt")
    monkeypatch.setattr(site_round.SiteRunner, "_train", flaky)
    retried = once(tmp_path / "retry.pt", tmp_path / "retry_p.pt")
    # Assert
    assert clean["attempts"] == 1 and retried["attempts"] == 2 and len(calls) == 2
    a, b = load_checkpoint(tmp_path / "clean.pt")["model"], load_checkpoint(tmp_path / "retry.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_site_data_from_files_checks_the_split(tmp_path: Path) -> None:
    # Prepare
    sites = make_sites(tmp_path)
    manifest = tmp_path / "data" / "site1" / "manifest.json"
    cases = list(sites["site1"].npz_paths.values())
    # Execute
    data = site_round.site_data_from_files("site1", manifest, cases, sites["site1"].patches)
    # Assert
    assert data.site == "site1" and set(data.npz_paths) == {"site1_000", "site1_001"}
    with pytest.raises(RoundError, match="missing"):
        site_round.site_data_from_files("site1", manifest, cases[:1], sites["site1"].patches)
    with pytest.raises(RoundError, match="expected 'site2'"):
        site_round.site_data_from_files("site2", manifest, cases, sites["site1"].patches)


def test_round_seed_is_stable_and_distinct() -> None:
    seeds = {site_round.round_seed(0, s, r) for s in ("site1", "site2") for r in range(50)}
    assert len(seeds) == 100
    assert site_round.round_seed(0, "site1", 1) == site_round.round_seed(0, "site1", 1)


def test_site_selection_keeps_the_best_of_global_and_local_by_score(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: scripted scores per (round, global/local) for site1; site2 scores 0.5 always
    script = {
        "site1": iter([0.3, 0.5, 0.7, 0.6, 0.4, 0.7]),  # best: round 2's incoming global (round_1/global.pt)
        "site2": iter([0.5] * 6),  # ties keep the first: round 1's incoming global (round_0/global.pt)
    }

    def scripted(self: site_round.SiteRunner, model: torch.nn.Module) -> tuple[dict[str, float], float]:
        score = next(script[self.site])
        return {"liver": score}, score

    monkeypatch.setattr(site_round.SiteRunner, "_score", scripted)
    sites = make_sites(tmp_path)
    make_m0(tmp_path / "m0.pt")
    setting = tmp_path / "federated" / "V"
    rounds.init_global(tmp_path / "m0.pt", paths.global_model_path(setting, 0))
    run_rounds(setting, sites, 3)
    # Execute
    chosen = {
        site: site_selection.write_selected_model(
            private_state=paths.private_state_path(setting, site, 3),
            last_global=paths.global_model_path(setting, 3),
            out_model=tmp_path / "selected" / f"{site}.pt",
            site=site,
            setting="V",
        )
        for site in sites
    }
    # Assert
    assert chosen["site1"]["selected"] == {"round": 1, "which": "global", "score": 0.7}
    assert chosen["site2"]["selected"] == {"round": 0, "which": "global", "score": 0.5}
    for site, source in (
        ("site1", paths.global_model_path(setting, 1)),
        ("site2", paths.global_model_path(setting, 0)),
    ):
        written, expected = load_checkpoint(tmp_path / "selected" / f"{site}.pt"), load_checkpoint(source)
        assert (
            written["meta"]["kind"] == "federated_selected" and written["meta"]["network"] == SPEC.to_dict()
        )
        assert all(torch.equal(written["model"][k], expected["model"][k]) for k in expected["model"])
    record = json.loads(paths.record_path(setting, 2).read_text())
    assert record["val_dice"]["site1"] == {"liver": 0.7} and record["val_dice_local"]["site1"] == {
        "liver": 0.6
    }


def test_site_selection_prefers_local_when_better_and_falls_back_without_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: site1 scores its local model of round 1 best; site2 has no validation cases
    scores = iter([0.1, 0.9])
    monkeypatch.setattr(
        site_round.SiteRunner,
        "_score",
        lambda self, model: ({}, None) if not self.validation else ({"liver": (s := next(scores))}, s),
    )
    sites = make_sites(tmp_path)
    make_m0(tmp_path / "m0.pt")
    setting = tmp_path / "federated" / "V"
    rounds.init_global(tmp_path / "m0.pt", paths.global_model_path(setting, 0))
    for site, validation in (("site1", validation_of(sites["site1"])), ("site2", ())):
        site_round.run_site_round(
            global_path=paths.global_model_path(setting, 0),
            private_in="",
            site_data=sites[site],
            local=local(),
            plan=RoundPlan(local_iterations=ITERS, seed=SEED, attempts=1, on_site_failure="fail"),
            round_index=1,
            out_site=paths.site_model_path(setting, 1, site),
            out_private=paths.private_state_path(setting, site, 1),
            validation=validation,
        )
    aggregation.aggregate_round(
        previous_global=paths.global_model_path(setting, 0),
        site_paths=[paths.site_model_path(setting, 1, s) for s in sites],
        out_global=paths.global_model_path(setting, 1),
        out_record=paths.record_path(setting, 1),
        round_index=1,
        policy="fail",
    )
    # Execute
    metas = {
        site: site_selection.write_selected_model(
            private_state=paths.private_state_path(setting, site, 1),
            last_global=paths.global_model_path(setting, 1),
            out_model=tmp_path / "selected" / f"{site}.pt",
            site=site,
            setting="V",
        )
        for site in sites
    }
    # Assert
    assert metas["site1"]["selected"] == {"round": 1, "which": "local", "score": 0.9}
    assert metas["site2"]["selected"] == {"round": 1, "which": "final", "score": None}
    local1 = load_checkpoint(paths.site_model_path(setting, 1, "site1"))["model"]
    written = load_checkpoint(tmp_path / "selected" / "site1.pt")["model"]
    assert all(torch.equal(written[k], local1[k]) for k in local1)
    assert "best" not in load_checkpoint(paths.private_state_path(setting, "site2", 1))["meta"]
