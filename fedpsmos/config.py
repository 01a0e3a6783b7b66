"""Load and validate the workflow configuration.

The schema (``workflow/schemas/config.schema.yaml``) checks types and allowed keys;
:func:`validate_config` adds the checks a schema cannot express (names that must refer to each other, a
fully labelled site for pre-training, a patch that the network can downsample). Every error names the
offending key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from fedpsmos.organs import ORGANS, LabelMapError, labelled_organs

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def _key_path(path: Any) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "<top level>"


def load_schema(schema_path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """Read the JSON schema (written as YAML)."""
    with open(schema_path) as handle:
        return yaml.safe_load(handle)


def validate_config(
    config: Mapping[str, Any], *, source: str = "config", schema_path: str | Path = SCHEMA_PATH
) -> None:
    """Raise :class:`ConfigError` naming the bad key if ``config`` is not a valid workflow configuration.

    Parameters
    ----------
    config:
        The parsed configuration.
    source:
        What to call the configuration in messages (usually its file name).
    schema_path:
        The JSON schema to validate against.
    """
    validator = jsonschema.Draft202012Validator(load_schema(schema_path))
    errors = sorted(
        validator.iter_errors(dict(config)), key=lambda e: (len(e.absolute_path), list(e.absolute_path))
    )
    if errors:
        # The deepest error says most about the bad key (an `anyOf` at the top hides the real cause).
        error = max(errors, key=lambda e: len(e.absolute_path))
        raise ConfigError(f"{source}: {_key_path(error.absolute_path)}: {error.message}")
    _check_references(config, source)


def _check_references(config: Mapping[str, Any], source: str) -> None:
    sites = config["sites"]
    fully = []
    for name, site in sites.items():
        try:
            organs = labelled_organs(site["labels"])
        except LabelMapError as err:
            raise ConfigError(f"{source}: sites.{name}.labels: {err}") from err
        if "kidney" in site["labels"] and ({"kidney_left", "kidney_right"} & set(site["labels"])):
            raise ConfigError(
                f"{source}: sites.{name}.labels: 'kidney' (split by body side) cannot be combined "
                "with kidney_left/kidney_right"
            )
        if set(organs) == set(ORGANS):
            fully.append(name)
    if not fully:
        raise ConfigError(
            f"{source}: sites: no site labels all organs {list(ORGANS)}; pre-training (M0) needs one"
        )
    losses = config["losses"]
    combos = losses["combinations"]
    for key in ("margexc", "default"):
        if losses[key] not in combos:
            raise ConfigError(
                f"{source}: losses.{key}: unknown loss combination {losses[key]!r} (known: {sorted(combos)})"
            )
    for i, name in enumerate(losses["central"]):
        if name not in combos:
            raise ConfigError(
                f"{source}: losses.central.{i}: unknown loss combination {name!r} (known: {sorted(combos)})"
            )
    federated = config["federated"]
    if federated["default"] not in federated["settings"]:
        raise ConfigError(
            f"{source}: federated.default: unknown setting {federated['default']!r} "
            f"(known: {sorted(federated['settings'])})"
        )
    network = config["network"]
    n_stages = len(network["features"])
    for key in ("strides", "kernel_sizes"):
        if len(network[key]) != n_stages:
            raise ConfigError(
                f"{source}: network.{key}: {len(network[key])} entries for {n_stages} stages "
                "(one per entry of network.features)"
            )
    total = [math.prod(s[axis] for s in network["strides"]) for axis in range(3)]
    size = config["patches"]["size"]
    for axis, (extent, stride) in enumerate(zip(size, total, strict=True)):
        if extent % stride:
            raise ConfigError(
                f"{source}: patches.size.{axis}: {extent} is not divisible by the network's total "
                f"stride {stride} on that axis"
            )


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML configuration file and validate it (see :func:`validate_config`)."""
    path = Path(path)
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: <top level>: expected a mapping of keys")
    validate_config(config, source=str(path))
    return config
