"""Training budgets: the default compares models with equal work; the paper config keeps its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedpsmos.budgets import baseline_epochs, budget_mismatches, iteration_budgets
from fedpsmos.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _overlay(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _overlay(base[key], value) if isinstance(value, dict) and key in base else value
    return out


def test_budgets_count_every_iteration_behind_a_model() -> None:
    # Prepare
    config = {
        "training": {
            "iterations_per_epoch": 10,
            "pretrain_epochs": 3,
            "central_epochs": 2,
            "site_alone_epochs": 5,
        },
        "federated": {
            "settings": {
                "V1": {"local_iterations": 5, "rounds": 4},
                "V2": {"local_iterations": 2, "rounds": 5},
            }
        },
        "adaptation": {"epochs": 1},
    }
    # Execute
    b = iteration_budgets(config)
    problems = budget_mismatches(config)
    # Assert: M0 30, central 30 + 20, site alone 50, V1 20 local a site (fair), V2 10 (not)
    assert (b.pretrain, b.central, b.central_total, b.site_alone, b.adaptation) == (30, 20, 50, 50, 10)
    assert b.federated == {"V1": 20, "V2": 10} and b.federated_total("V1") == 50
    assert len(problems) == 1 and "V2" in problems[0] and "10" in problems[0]


def test_the_default_run_compares_models_with_equal_budgets() -> None:
    config = load_config(ROOT / "config.yaml")
    assert budget_mismatches(config) == []


def test_table3_baselines_get_the_central_models_budget() -> None:
    # PaNN continues from M0 (its iterations count, as for the central model); PIPO starts from scratch.
    config = load_config(ROOT / "config.yaml")
    b = iteration_budgets(config)
    per_epoch = int(config["training"]["iterations_per_epoch"])
    assert b.pretrain + baseline_epochs(config["training"], "panns") * per_epoch == b.central_total
    assert baseline_epochs(config["training"], "pipo") * per_epoch == b.central_total
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_epochs(config["training"], "unet")


def test_the_paper_config_keeps_the_papers_budgets() -> None:
    # Table 5: 250 iterations x 500 epochs for the central model (120 of them M0), 25 x 4000, 50 x 2000 and
    # 100 x 1000 for the federated settings, 125,000 for the site-alone models.
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    config = _overlay(base, yaml.safe_load((ROOT / "config" / "paper.yaml").read_text()))
    b = iteration_budgets(config)
    assert (b.pretrain, b.central_total, b.site_alone) == (30_000, 125_000, 125_000)
    assert set(b.federated.values()) == {100_000}
