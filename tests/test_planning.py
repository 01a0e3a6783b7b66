"""The workflow's plan (fedpsmos.planning): blocks of rounds, per-round jobs, evaluated models and their
paths, checked in Python without running Snakemake, and against the output patterns of the rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from snakemake.utils import update_config

from fedpsmos import planning
from fedpsmos.config import drop_unset, validate_config
from fedpsmos.data.sources import DataError
from fedpsmos.federated.jobs import BlockJobs, RoundJobs
from fedpsmos.federated.paths import aggregator_input_violations, site_input_violations
from fedpsmos.paper.qualitative import PREDICTION_PATTERN, models_from_prediction_dirs
from fedpsmos.planning import Plan

REPO = Path(__file__).resolve().parents[1]
SITES = ["site1", "site2", "site3", "site4", "site5"]
CI_SITES = ["site1", "site2", "site5"]  # config/ci.yaml keeps three


def _config(*overlays: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.yaml with repository overlays and ``extra`` merged as Snakemake merges them, validated."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for overlay in overlays:
        update_config(config, yaml.safe_load((REPO / overlay).read_text()))
    update_config(config, extra or {})
    drop_unset(config)
    validate_config(config)
    return config


def _plan(*overlays: str, extra: dict[str, Any] | None = None) -> Plan:
    return Plan(_config(*overlays, extra=extra))


# ---------------------------------------------------------------- federated rounds


def test_paper_config_runs_350_blocks_of_20_rounds() -> None:
    # Prepare
    plan = _plan("config/paper.yaml")
    # Execute
    v2 = plan.blocks("V2")
    # Assert: 4000 + 2000 + 1000 rounds in blocks of 20 (the slurm test's count), each block's rounds
    assert not plan.per_round and isinstance(v2, BlockJobs)
    assert [plan.blocks(s).n_blocks for s in ("V1", "V2", "V3")] == [200, 100, 50]
    assert v2.block_rounds(0) == (1, 20) and v2.block_rounds(99) == (1981, 2000)
    assert v2.round_range(5) == {"first_round": 101, "last_round": 120}
    assert v2.previous(0) == "results/federated/V2/round_0/global.pt"
    assert v2.previous(5) == "results/federated/V2/block_4.json"
    assert v2.first_global(5) == "results/federated/V2/round_100/global.pt"
    assert v2.end() == [f"results/federated/V2/block_{b}.json" for b in range(100)]
    assert v2.selection_inputs("site3") == {"block": "results/federated/V2/block_99.json"}
    assert v2.last_global() == "results/federated/V2/round_2000/global.pt"
    assert v2.final_private("site3") == "results/federated/V2/private/site3/round_2000.pt"
    assert v2.benchmarks()[-1] == "results/benchmarks/run_round_block/V2/block_99.tsv"


def test_last_block_is_shorter_when_rounds_do_not_divide() -> None:
    # Prepare
    plan = _plan(
        "config/ci.yaml", extra={"federated": {"rounds_per_job": 2, "settings": {"V1": {"rounds": 5}}}}
    )
    # Execute
    v1 = plan.blocks("V1")
    # Assert
    assert v1.n_blocks == 3
    assert [v1.block_rounds(b) for b in range(3)] == [(1, 2), (3, 4), (5, 5)]
    assert v1.first_global(2) == "results/federated/V1/round_4/global.pt"


def test_per_round_config_plans_round_and_aggregation_files() -> None:
    # Prepare: config/ci.yaml runs one job per round and site (V1: 2 rounds)
    plan = _plan("config/ci.yaml")
    # Execute
    v1 = plan.federation("V1")
    # Assert
    assert plan.per_round and isinstance(v1, RoundJobs)
    assert v1.end() == [
        "results/federated/V1/round_1/record.json",
        "results/federated/V1/round_2/record.json",
        "results/federated/V1/round_2/global.pt",
    ]
    assert v1.selection_inputs("site5") == {
        "private": "results/federated/V1/private/site5/round_2.pt",
        "global_model": "results/federated/V1/round_2/global.pt",
    }
    assert v1.previous_private("site5", 1) == []
    assert v1.previous_private("site5", 2) == "results/federated/V1/private/site5/round_1.pt"
    assert v1.benchmarks() == [
        *(f"results/benchmarks/train_site_round/V1/round_{r}/{s}.tsv" for r in (1, 2) for s in CI_SITES),
        "results/benchmarks/aggregate_round/V1/round_1.tsv",
        "results/benchmarks/aggregate_round/V1/round_2.tsv",
    ]
    with pytest.raises(ValueError, match="rounds_per_job is 1: setting V1 runs no blocks"):
        plan.blocks("V1")


def test_round_inputs_keep_the_privacy_boundary() -> None:
    # Prepare
    plan = _plan("config/ci.yaml")
    v1 = plan.federation("V1")
    # Execute: what aggregation of round 2 and site5's local round 2 read
    aggregation = [*v1.site_models(2), v1.global_model(1)]
    site = plan.site_inputs("site5")
    local = [
        site["manifest"],
        site["patches"],
        *site["cases"],
        v1.global_model(1),
        v1.previous_private("site5", 2),
    ]
    # Assert
    assert aggregator_input_violations(aggregation) == []
    assert site_input_violations(local, "site5", CI_SITES) == []
    assert site_input_violations(plan.site_inputs("site2")["cases"], "site5", CI_SITES) != []


# ---------------------------------------------------------------- data


def test_case_files_are_listed_once_per_site(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: count the listings behind the plan's case files
    calls: list[str] = []
    real = planning.case_ids

    def counting(*args: Any, **kwargs: Any) -> list[str]:
        calls.append(kwargs["site"])
        return real(*args, **kwargs)

    monkeypatch.setattr(planning, "case_ids", counting)
    plan = _plan("config/paper.yaml")
    # Execute: as 350 block jobs and every site's rules ask for them
    for _ in range(350):
        cases = plan.all_case_files()
    site2 = plan.case_files("site2")
    site2.append("changed by a caller")
    # Assert: one listing per site; 693 cases, site by site; a caller's list is its own
    assert sorted(calls) == SITES
    assert len(cases) == 30 + 131 + 41 + 281 + 210
    assert cases[0] == "results/preprocessed/site1/site1_000.b2zip"
    assert cases[-1] == "results/preprocessed/site5/site5_209.b2zip"
    assert plan.case_files("site2")[-1] == "results/preprocessed/site2/site2_130.b2zip"


def test_missing_real_folder_is_named_when_cases_are_listed(tmp_path: Path) -> None:
    # Prepare: site2 reads an nnU-Net folder that does not exist
    missing = tmp_path / "nowhere"
    site = {"source": "nnunet", "path": str(missing), "synthetic": None}
    plan = _plan("config/ci.yaml", extra={"sites": {"site2": site}})
    # Execute / Assert
    assert plan.raw_inputs("site2") == [] and plan.raw_inputs("site1") == ["results/raw/site1"]
    with pytest.raises(DataError, match=re.escape(str(missing))):
        plan.case_files("site2")


def test_site_inputs_and_descriptor_name_one_site() -> None:
    plan = _plan("config/ci.yaml")

    inputs = plan.site_inputs("site5")
    descriptor = plan.site_descriptor("site5")

    assert inputs["manifest"] == descriptor["manifest"] == "results/data/site5/manifest.json"
    assert inputs["patches"] == descriptor["patches"] == "results/patches/site5.parquet"
    assert inputs["cases"] == [f"results/preprocessed/site5/site5_00{i}.b2zip" for i in range(3)]
    assert plan.prediction_inputs("site5") == {  # the cases through the patch index, not one edge each
        "manifest": "results/data/site5/manifest.json",
        "patches": "results/patches/site5.parquet",
    }
    assert descriptor["npz_dir"] == "results/preprocessed/site5"
    assert plan.full_sites == ["site1"]
    assert plan.sites_inputs(["site1"])[:2] == [
        "results/data/site1/manifest.json",
        "results/patches/site1.parquet",
    ]


# ---------------------------------------------------------------- models and evaluation


def test_model_file_is_the_selected_model_only_where_a_site_validates() -> None:
    # Prepare: site2 holds out no validation cases
    plan = _plan("config/ci.yaml", extra={"sites": {"site2": {"split": {"validation_cases": 0}}}})
    # Execute / Assert
    assert plan.model_file("federated/V1", "site1") == "results/models/federated/V1/selected/site1.pt"
    assert plan.model_file("federated/V1", "site2") == "results/models/federated/V1/model.pt"
    assert plan.model_file("adapted/decoder", "site2") == "results/models/adapted/decoder/site2/model.pt"
    assert plan.model_file("site_alone", "site5") == "results/models/site_alone/site5/model.pt"
    assert plan.model_file("central/dice_ce", "site5") == "results/models/central/dice_ce/model.pt"


def test_evaluated_pairs_land_under_results_evaluation() -> None:
    # Prepare
    plan = _plan()
    # Execute
    pairs = plan.evaluated_pairs()
    metrics, predictions = plan.all_metrics(), plan.all_predictions()
    # Assert: 12 models (M0, 2 central, PaNN, PIPO, 3 federated, site alone, 3 adapted) at 5 sites
    models = [m for m, _ in pairs[:: len(SITES)]]
    assert models == [
        "pretrain",
        "central/dice_ce",
        "central/dice_ce_lovasz",
        "baseline/panns",
        "baseline/pipo",
        "federated/V1",
        "federated/V2",
        "federated/V3",
        "site_alone",
        "adapted/full",
        "adapted/decoder",
        "adapted/encoder",
    ]
    assert len(pairs) == len(metrics) == len(predictions) == 60
    assert metrics[6] == "results/evaluation/central/dice_ce/site2/metrics.csv"
    assert predictions[6] == "results/evaluation/central/dice_ce/site2/predictions"
    # The figures read the same layout back.
    assert PREDICTION_PATTERN.format(model="federated/V2", site="site3", case="c") == (
        planning.predictions_dir("federated/V2", "site3") + "/c.nii.gz"
    )
    assert set(models_from_prediction_dirs(predictions)) == set(models)


def test_evaluation_models_choose_curves_pairs_and_table5_rows() -> None:
    # Prepare
    federated_only = _plan(extra={"evaluation": {"models": ["federated"]}})
    pretrain_only = _plan(extra={"evaluation": {"models": ["pretrain"]}})
    everything = _plan()
    # Execute / Assert
    assert {m for m, _ in federated_only.evaluated_pairs()} == {
        "federated/V1",
        "federated/V2",
        "federated/V3",
    }
    assert federated_only.trained_model_dirs() == ["results/models/pretrain"]
    assert federated_only.federated_curves() == [
        f"results/models/federated/V{i}/rounds.csv" for i in (1, 2, 3)
    ]
    assert pretrain_only.federated_curves() == [] and pretrain_only.table5_benchmarks() == {}
    assert federated_only.qualitative_models() == ["federated/V2"]
    # The default config runs 40 rounds a job: V1's 40 rounds are one block.
    assert everything.table5_benchmarks() == {
        "V1": ["results/benchmarks/run_round_block/V1/block_0.tsv"],
        "V2": ["results/benchmarks/run_round_block/V2/block_0.tsv"],
        "V3": ["results/benchmarks/run_round_block/V3/block_0.tsv"],
        "central/dice_ce_lovasz": ["results/benchmarks/train_central/dice_ce_lovasz.tsv"],
    }
    assert everything.qualitative_models() == [
        "pretrain",
        "site_alone",
        "federated/V2",
        "adapted/full",
        "adapted/decoder",
        "adapted/encoder",
        "central/dice_ce_lovasz",
    ]


def test_final_output_is_the_paper_and_every_site_preview() -> None:
    plan = _plan("config/ci.yaml")

    final = plan.final_output()

    assert len(final) == 15 + 4 + 3 and len(set(final)) == len(final)
    assert "results/paper/table5.tex" in final and "results/paper/fig_qualitative.png" in final
    assert final[-3:] == [f"results/data/{s}/preview.png" for s in CI_SITES]


# ---------------------------------------------------------------- the plan against the rules


def _rule_patterns() -> list[re.Pattern[str]]:
    """Output and benchmark paths of the rules in workflow/rules/*.smk, as regular expressions."""
    literals = set()
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        section = ""
        for line in smk.read_text().splitlines():
            directive = re.fullmatch(r"\s+(\w+):.*", line)
            if directive and not line.strip().startswith(("#", '"', 'f"')) and "=" not in line.split(":")[0]:
                section = directive.group(1)
            if section in ("output", "benchmark"):
                literals.update(re.findall(r'"(results/[^"]+)"', line))
    patterns = []
    for literal in literals:
        # {model} spans folders (federated/V2); other wildcards and f-string fields are one folder name.
        parts = re.split(r"(\{[^}]+\})", literal)
        regex = "".join(
            (".+" if part == "{model}" else "[^/]+") if part.startswith("{") else re.escape(part)
            for part in parts
        )
        patterns.append(re.compile(regex))
    return patterns


@pytest.mark.parametrize("overlays", [(), ("config/ci.yaml",), ("config/paper.yaml",)])
def test_every_planned_file_is_some_rules_output(overlays: tuple[str, ...]) -> None:
    # Prepare
    plan = _plan(*overlays)
    patterns = _rule_patterns()
    # Execute: what the plan hands to rules as inputs and benchmark lists
    planned = [*plan.final_output(), *plan.all_metrics(), *plan.all_predictions(), *plan.training_curves()]
    planned += [*plan.federated_curves(), *plan.table5_benchmark_list(), *plan.sites_inputs(plan.sites)]
    planned += [plan.model_file(m, s) for m, s in plan.evaluated_pairs()]
    for setting in plan.settings:
        federation = plan.federation(setting)
        planned += [
            *federation.end(),
            *federation.selection_inputs("site2").values(),
            federation.last_global(),
        ]
        if isinstance(federation, BlockJobs):
            planned += [federation.previous(b) for b in range(federation.n_blocks)]
        else:
            planned += [*federation.site_models(1), *federation.records()]
    # Assert
    unmatched = sorted({f for f in planned if not any(p.fullmatch(f) for p in patterns)})
    assert unmatched == []
    assert not any(p.fullmatch("results/pretrain/site1/metrics.csv") for p in patterns)  # the old layout
