"""The trainer: a step learns, freezing modes, bit-identical resume, the plateau rule, the rule entry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpsmos.network import NetworkSpec, build_network, decoder_parameters, encoder_parameters
from fedpsmos.training import epochs as epochs_module
from fedpsmos.training.checkpoint import load_checkpoint, save_checkpoint
from fedpsmos.training.epochs import train_model
from fedpsmos.training.run import class_map_for, train_from_params
from fedpsmos.training.schedule import PlateauDecay
from fedpsmos.training.selection import (
    case_dice,
    output_organs,
    score_on_validation,
    validation_cases_from_manifest,
)
from fedpsmos.training.trainer import Trainer, TrainingError, TrainSettings
from tests.conftest import tiny_network, tiny_training
from tests.test_sampler import write_site

PATCH = (4, 8, 8)
NETWORK = tiny_network()
TRAINING = tiny_training(pretrain_epochs=6)
LOSS = {"marginal": {"dice": 1.0, "ce": 1.0}, "exclusion": {"dice": 1.0, "ce": 1.0}}
ALL = ("liver", "spleen", "pancreas", "kidney_left", "kidney_right")


def make_trainer(tmp_path: Path, *, mode: str = "full", seed: int = 0) -> Trainer:
    sites = [write_site(tmp_path, "site1", ALL), write_site(tmp_path, "site2", ("liver",), seed=1)]
    model = build_network(NetworkSpec.from_config(NETWORK, num_classes=6), seed=0)
    return Trainer(
        model=model,
        sites=sites,
        loss_spec=LOSS,
        settings=TrainSettings.from_config(TRAINING),
        seed=seed,
        device="cpu",
        freeze_mode=mode,
        patch_size=PATCH,
    )


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def test_settings_come_from_the_config_training_section() -> None:
    # Execute
    settings = TrainSettings.from_config(TRAINING)
    # Assert
    assert settings.plateau_window == 10 and settings.plateau_factor == 0.8 and settings.momentum == 0.99
    with pytest.raises(KeyError, match="config training: missing key 'lr'"):
        TrainSettings.from_config({k: v for k, v in TRAINING.items() if k != "lr"})


def test_one_step_changes_the_weights_and_lowers_the_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    # Prepare
    trainer = make_trainer(tmp_path)
    batch = trainer.sampler.next_batch()
    trainer.sampler.next_batch = lambda: batch  # type: ignore[method-assign]
    before = snapshot(list(trainer.model.parameters()))

    def loss_now() -> float:
        with torch.no_grad():
            return float(trainer.loss(trainer.model(batch[0]), batch[1], batch[2]))

    first = loss_now()
    # Execute
    reported = trainer.train_iterations(1)
    # Assert
    assert reported == pytest.approx(first, rel=1e-5)
    assert loss_now() < first
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("mode", "encoder_changes", "decoder_changes"),
    [("full", True, True), ("decoder", False, True), ("encoder", True, False)],
)
def test_freeze_mode_changes_only_the_trained_part(
    tmp_path: Path, mode: str, encoder_changes: bool, decoder_changes: bool
) -> None:
    # Prepare
    trainer = make_trainer(tmp_path, mode=mode)
    enc, dec = encoder_parameters(trainer.model), decoder_parameters(trainer.model)
    enc0, dec0 = snapshot(enc), snapshot(dec)
    # Execute
    trainer.train_iterations(2)
    # Assert: every parameter of a trained part moves, no parameter of a frozen part does
    assert all(not torch.equal(a, p) for a, p in zip(enc0, enc, strict=True)) == encoder_changes
    assert all(torch.equal(a, p) for a, p in zip(enc0, enc, strict=True)) == (not encoder_changes)
    assert all(not torch.equal(a, p) for a, p in zip(dec0, dec, strict=True)) == decoder_changes
    assert all(torch.equal(a, p) for a, p in zip(dec0, dec, strict=True)) == (not decoder_changes)


def test_trainer_state_restores_into_a_fresh_trainer_and_refuses_another_model(tmp_path: Path) -> None:
    # Prepare
    a = make_trainer(tmp_path)
    a.train_iterations(2)
    a.end_epoch(1.0)
    path = tmp_path / "private.pt"
    save_checkpoint(path, {"trainer": a.state_dict(), "meta": {"site": "site1"}})
    b = make_trainer(tmp_path / "b")
    b.model.load_state_dict(a.model.state_dict())
    # Execute
    b.load_state_dict(load_checkpoint(path)["trainer"])
    loss_a, loss_b = a.train_iterations(2), b.train_iterations(2)
    # Assert
    assert loss_a == loss_b and b.scheduler.losses == [1.0]
    other = Trainer(
        model=build_network(NetworkSpec.from_config({**NETWORK, "features": [4, 6]}, num_classes=6), seed=0),
        sites=[write_site(tmp_path / "c", "site1", ALL)],
        loss_spec=LOSS,
        settings=TrainSettings.from_config(TRAINING),
        seed=0,
        device="cpu",
        patch_size=PATCH,
    )
    with pytest.raises(TrainingError, match="does not fit this model"):
        other.load_state_dict(a.state_dict())


def run_training(tmp_path: Path, out: str, epochs: int, hook=None) -> Path:
    sites = [write_site(tmp_path, "site1", ALL), write_site(tmp_path, "site3", ("spleen",), seed=2)]
    model_path = tmp_path / out / "model.pt"
    train_model(
        network=NetworkSpec.from_config(NETWORK, num_classes=6),
        init=None,
        sites=sites,
        loss_spec=LOSS,
        settings=TrainSettings.from_config(TRAINING),
        epochs=epochs,
        seed=11,
        out_model=model_path,
        out_curve_csv=model_path.parent / "curve.csv",
        out_curve_png=model_path.parent / "curve.png",
        meta={"kind": "central", "organs": list(ALL)},
        patch_size=PATCH,
        device="cpu",
        on_epoch_end=hook,
    )
    return model_path


class Killed(Exception):
    """Stands for the job being killed between epochs."""


def test_killed_training_resumes_to_bit_identical_weights(tmp_path: Path) -> None:
    # Prepare
    straight = run_training(tmp_path, "straight", epochs=3)

    def kill_after_first(epoch: int) -> None:
        if epoch == 1:
            raise Killed

    # Execute
    with pytest.raises(Killed):
        run_training(tmp_path, "resumed", epochs=3, hook=kill_after_first)
    assert (tmp_path / "resumed" / "resume.pt").exists() and not (tmp_path / "resumed" / "model.pt").exists()
    epochs_run = []
    resumed = run_training(tmp_path, "resumed", epochs=3, hook=epochs_run.append)
    # Assert
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert epochs_run == [2, 3]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert not (tmp_path / "resumed" / "resume.pt").exists()
    assert (
        b["meta"]["network"]["num_classes"] == 6
        and b["meta"]["kind"] == "central"
        and b["meta"]["epochs"] == 3
    )
    with open(resumed.parent / "curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and set(rows[0]) == {
        "epoch",
        "loss",
        "lr",
        "seconds",
    }
    assert (resumed.parent / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_checkpoint_of_another_run_is_ignored(tmp_path: Path) -> None:
    # Prepare: a resume file left by a run with other settings (here: 2 epochs instead of 3)
    def kill(epoch: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        run_training(tmp_path, "run", epochs=2, hook=kill)
    epochs_run = []
    # Execute
    run_training(tmp_path, "run", epochs=3, hook=epochs_run.append)
    # Assert
    assert epochs_run == [1, 2, 3]


def test_initial_model_with_other_classes_is_refused(tmp_path: Path) -> None:
    # Prepare
    six = tmp_path / "m0.pt"
    spec6 = NetworkSpec.from_config(NETWORK, num_classes=6)
    save_checkpoint(
        six, {"model": build_network(spec6, seed=0).state_dict(), "meta": {"network": spec6.to_dict()}}
    )
    site = write_site(tmp_path, "site2", ("liver",))
    # Execute / Assert
    with pytest.raises(
        TrainingError, match=r"m0\.pt: initial model outputs 6 classes, this training needs 2"
    ):
        train_model(
            network=NetworkSpec.from_config(NETWORK, num_classes=2),
            init=six,
            sites=[site],
            loss_spec=LOSS,
            settings=TrainSettings.from_config(TRAINING),
            epochs=1,
            seed=0,
            out_model=tmp_path / "out" / "model.pt",
            out_curve_csv=tmp_path / "out" / "curve.csv",
            out_curve_png=tmp_path / "out" / "curve.png",
            class_map=class_map_for(["liver"]),
            meta={"kind": "site_alone"},
            patch_size=PATCH,
            device="cpu",
        )


def test_rule_entry_point_trains_a_site_alone_binary_model_from_its_manifest(tmp_path: Path) -> None:
    # Prepare
    write_site(tmp_path, "site2", ("liver",), cases=2, test_cases=1)
    params = {
        "kind": "site_alone",
        "sites": [
            {
                "site": "site2",
                "manifest": str(tmp_path / "data" / "site2" / "manifest.json"),
                "npz_dir": str(tmp_path / "preprocessed" / "site2"),
                "patches": str(tmp_path / "patches" / "site2.parquet"),
            }
        ],
        "init": "",
        "loss": LOSS,
        "epochs": 1,
        "freeze_mode": "full",
        "network": NETWORK,
        "training": TRAINING,
        "patch_size": list(PATCH),
        "seed": 0,
        "organs": ["liver"],
    }
    out = tmp_path / "models" / "site_alone" / "site2"
    # Execute
    train_from_params(
        params, {"model": out / "model.pt", "curve_csv": out / "curve.csv", "curve_png": out / "curve.png"}
    )
    # Assert
    payload = load_checkpoint(out / "model.pt")
    meta = payload["meta"]
    assert meta["classes"] == ["background", "liver"] and meta["site"] == "site2" and meta["n_cases"] == 2
    assert meta["class_map"] == [0, 1, 0, 0, 0, 0] and meta["network"]["num_classes"] == 2
    assert payload["model"]["decoder.seg_layers.0.weight"].shape[0] == 2
    assert sorted(p.name for p in out.iterdir()) == ["curve.csv", "curve.png", "model.pt"]


def test_class_map_for_subsets_and_the_full_model() -> None:
    assert class_map_for(ALL) is None
    assert class_map_for(["kidney_left", "kidney_right"]).tolist() == [0, 0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="global class order"):
        class_map_for(["spleen", "liver"])


def plateau(losses: list[float], window: int = 3) -> tuple[list[int], list[float]]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    rule = PlateauDecay(optimizer, window=window, min_decrease=0.001, factor=0.8)
    decayed = [e for e, loss in enumerate(losses) if rule.step(loss)]
    return decayed, [rule.lr]


def test_plateau_rule_compares_over_a_window_and_waits_a_window_after_a_decay() -> None:
    # Falling fast enough never decays
    assert plateau([1.0, 0.9, 0.8, 0.7, 0.6, 0.5]) == ([], [1.0])
    # Flat from the start: first decay at epoch 3 (= window), next one a whole window later
    decayed, lr = plateau([1.0] * 10)
    assert decayed == [3, 6, 9] and lr[0] == pytest.approx(0.8**3)
    # A decrease of exactly min_decrease over the window is enough; slightly less is not
    assert plateau([1.0, 1.0, 1.0, 0.999])[0] == []
    assert plateau([1.0, 1.0, 1.0, 0.9995])[0] == [3]
    # A rising loss counts as "fell by less"
    assert plateau([1.0, 0.5, 0.5, 1.2])[0] == [3]


def test_plateau_state_round_trips() -> None:
    # Prepare
    param = torch.nn.Parameter(torch.zeros(1))
    a = PlateauDecay(torch.optim.SGD([param], lr=1.0), window=2)
    for loss in (1.0, 1.0, 1.0):
        a.step(loss)
    b = PlateauDecay(torch.optim.SGD([param], lr=1.0), window=2)
    # Execute
    b.load_state_dict(a.state_dict())
    # Assert
    assert b.losses == a.losses and b.last_decay == 2 and b.decays == 1
    with pytest.raises(ValueError, match="plateau schedule state"):
        PlateauDecay(torch.optim.SGD([param], lr=1.0), window=5).load_state_dict(a.state_dict())
    assert np.isclose(a.lr, 0.8)


def with_validation(root: Path, site: str, organs: tuple[str, ...], seed: int = 0) -> tuple:
    """A tiny site whose manifest holds its third case out as a validation case; (SiteData, cases)."""
    data = write_site(root, site, organs, cases=2, test_cases=1, seed=seed)
    manifest = root / "data" / site / "manifest.json"
    content = json.loads(manifest.read_text())
    content["validation"], content["test"] = content["test"], []
    manifest.write_text(json.dumps(content))
    return data, validation_cases_from_manifest(site, manifest, root / "preprocessed" / site)


def run_selected(tmp_path: Path, out: str, epochs: int, every: int, hook=None) -> Path:
    site1, val1 = with_validation(tmp_path, "site1", ALL)
    site3, val3 = with_validation(tmp_path, "site3", ("spleen",), seed=2)
    model_path = tmp_path / out / "model.pt"
    train_model(
        network=NetworkSpec.from_config(NETWORK, num_classes=6),
        init=None,
        sites=[site1, site3],
        loss_spec=LOSS,
        settings=TrainSettings.from_config({**TRAINING, "validation_every": every}),
        epochs=epochs,
        seed=11,
        out_model=model_path,
        out_curve_csv=model_path.parent / "curve.csv",
        out_curve_png=model_path.parent / "curve.png",
        meta={"kind": "central", "organs": list(ALL)},
        patch_size=PATCH,
        device="cpu",
        on_epoch_end=hook,
        validation=[*val1, *val3],
    )
    return model_path


def test_best_epoch_by_validation_score_is_the_written_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: scripted validation scores, best after epoch 2; the weights of each epoch from resume.pt
    scores = iter([0.2, 0.9, 0.5])
    monkeypatch.setattr(epochs_module, "score_on_validation", lambda *a, **k: next(scores))
    weights = {}

    def keep(epoch: int) -> None:
        weights[epoch] = load_checkpoint(tmp_path / "run" / "resume.pt")["model"]

    # Execute
    path = run_selected(tmp_path, "run", epochs=3, every=1, hook=keep)
    # Assert
    payload = load_checkpoint(path)
    assert payload["meta"]["selected_epoch"] == 2
    assert payload["meta"]["validation_dice"] == [
        {"epoch": 1, "dice": 0.2},
        {"epoch": 2, "dice": 0.9},
        {"epoch": 3, "dice": 0.5},
    ]
    assert all(torch.equal(payload["model"][k], weights[2][k]) for k in weights[2])
    assert any(not torch.equal(payload["model"][k], weights[3][k]) for k in weights[3])
    with open(path.parent / "curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["validation_dice"] for r in rows] == ["0.2", "0.9", "0.5"]


def test_killed_training_with_selection_resumes_bit_identically(tmp_path: Path) -> None:
    # Prepare: validation every 2 epochs and after the last: scored after epochs 2 and 3
    straight = run_selected(tmp_path, "straight", epochs=3, every=2)

    def kill_after_second(epoch: int) -> None:
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        run_selected(tmp_path, "resumed", epochs=3, every=2, hook=kill_after_second)
    assert load_checkpoint(tmp_path / "resumed" / "resume.pt")["best"]["epoch"] == 2
    epochs_run = []
    # Execute
    resumed = run_selected(tmp_path, "resumed", epochs=3, every=2, hook=epochs_run.append)
    # Assert
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert epochs_run == [3]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["meta"] == b["meta"] and [h["validation_dice"] for h in a["history"]] == [
        h["validation_dice"] for h in b["history"]
    ]
    scored = a["meta"]["validation_dice"]
    assert [s["epoch"] for s in scored] == [2, 3] and all(0.0 <= s["dice"] <= 1.0 for s in scored)
    assert a["meta"]["selected_epoch"] == max(scored, key=lambda s: s["dice"])["epoch"]
    with open(straight.parent / "curve.csv") as handle:
        assert [r["validation_dice"] == "" for r in csv.DictReader(handle)] == [True, False, False]


def test_site_alone_model_scores_only_its_own_classes(tmp_path: Path) -> None:
    # Prepare: a liver-only site with one validation case, a binary model
    with_validation(tmp_path, "site2", ("liver",))
    network = build_network(NetworkSpec.from_config(NETWORK, num_classes=2), seed=0)
    cases = validation_cases_from_manifest(
        "site2", tmp_path / "data" / "site2" / "manifest.json", tmp_path / "preprocessed" / "site2"
    )
    # Execute
    per_case = case_dice(
        network, cases, organs=output_organs(class_map_for(["liver"])), patch_size=PATCH, device="cpu"
    )
    # Assert
    assert [set(c) for c in per_case] == [{"liver"}]
    assert score_on_validation(
        network, cases, organs=("liver",), patch_size=PATCH, device="cpu"
    ) == pytest.approx(per_case[0]["liver"])
    assert network.training  # the scorer restores the mode
