"""The configuration schema and the cross-reference checks name the bad key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fedpsmos.config import ConfigError, drop_unset, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_config() -> dict:
    return load_config(REPO / "config.yaml")


def _merged(overlay: str) -> dict:
    from snakemake.utils import update_config

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / overlay).read_text()))
    return drop_unset(config)  # as common.smk does: a null deletes the key (config/ci.yaml drops sites)


@pytest.mark.parametrize("overlay", ["config/paper.yaml", "config/ci.yaml"])
def test_overlays_merge_into_valid_configs(overlay: str) -> None:
    validate_config(_merged(overlay), source=overlay)


def test_paper_overlay_holds_the_paper_values() -> None:
    config = _merged("config/paper.yaml")
    assert config["preprocessing"]["spacing"] == [2.41, 1.63, 1.63]
    assert config["patches"]["size"] == [80, 160, 128]
    assert (config["preprocessing"]["mean"], config["preprocessing"]["std"]) == (90.9, 65.5)
    assert len(config["losses"]["central"]) == 7
    settings = config["federated"]["settings"]
    assert {k: (v["local_iterations"], v["rounds"]) for k, v in settings.items()} == {
        "V1": (25, 4000),
        "V2": (50, 2000),
        "V3": (100, 1000),
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["sites"]["site2"]["labels"].update(livr=[1]), "sites.site2.labels"),
        (lambda c: c["training"].update(lr="fast"), "training.lr"),
        (lambda c: c["sites"].update(site9={"source": "nnunet", "labels": {"liver": [1]}}), "sites.site9"),
        (lambda c: c["sites"]["site1"].update(source="dicom"), "sites.site1.source"),
        (lambda c: c["losses"].update(default="dice_only"), "losses.default"),
        (lambda c: c["losses"]["central"].append("nope"), "losses.central.2"),
        (lambda c: c["federated"].update(default="V9"), "federated.default"),
        (lambda c: c["patches"].update(size=[25, 48, 48]), "patches.size.0"),
        (lambda c: c["network"].update(strides=[[1, 1, 1]]), "network.strides"),
        (lambda c: c.update(unknown_key=1), "unknown_key"),
        (lambda c: c["sites"]["site1"]["labels"].pop("liver"), "no site labels all organs"),
        (
            lambda c: c["sites"]["site5"].update(labels={"kidney": [1], "kidney_left": [2]}),
            "sites.site5.labels",
        ),
    ],
)
def test_bad_config_names_the_key(default_config: dict, edit, message: str) -> None:
    # Prepare
    config = copy.deepcopy(default_config)
    edit(config)
    # Execute / Assert
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_config(config, source="config.yaml")


def test_unreadable_config_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("sites: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_site_background_ignore_and_dataset_json_names(default_config: dict) -> None:
    # Prepare: a real (nnU-Net) site naming its labels from its dataset.json, with background and ignore
    config = copy.deepcopy(default_config)
    real = {"source": "nnunet", "path": "/data/btcv", "labels": {"liver": ["liver"], "spleen": [1]}}
    config["sites"]["site9"] = {**real, "background": ["gallbladder", 8], "ignore": [255]}
    validate_config(config, source="config.yaml")
    config["sites"]["site9"]["background"] = "rest"
    validate_config(config, source="config.yaml")
    # Execute / Assert: a value in two groups, names on a synthetic site, a background that is neither
    bad = [
        ({**real, "labels": {"spleen": [1]}, "background": [1]}, "sites.site9: label value 1 is in both"),
        ({**default_config["sites"]["site2"], "labels": {"liver": ["liver"]}}, "sites.site9: a synthetic"),
        ({**real, "background": "all"}, "sites.site9.background"),
    ]
    for site, message in bad:
        config["sites"]["site9"] = site
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            validate_config(config, source="config.yaml")


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ({"labels": {"stomach": [3]}}, r"^config: sites\.site2\.labels: .*'stomach' was unexpected"),
        ({"source": "dropbox"}, r"^config: sites\.site2\.source: 'dropbox' is not one of"),
        ({"hospital": "St. Elsewhere"}, r"^config: sites\.site2: .*'hospital' was unexpected"),
        ({"source": "msd"}, r"^config: sites\.site2: 'path' is a required property"),
    ],
    ids=["unknown organ", "unknown source", "unknown site key", "site without a path"],
)
def test_bad_site_overlay_is_named_as_the_workflow_loads_it(site: dict, message: str) -> None:
    # Prepare: config.yaml, config/ci.yaml and an overlay on site2, merged and cleaned as common.smk does
    from snakemake.utils import update_config

    config = _merged("config/ci.yaml")
    update_config(config, {"sites": {"site2": site}})
    drop_unset(config)
    # Execute / Assert: one line naming the key and the problem, prefixed as the workflow prints it
    with pytest.raises(ConfigError, match=message) as info:
        validate_config(config, source="config")
    assert "\n" not in str(info.value)
