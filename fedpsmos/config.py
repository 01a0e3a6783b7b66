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

from fedpsmos.data.label_map import LabelMap
from fedpsmos.data.templates import FileTemplate, TemplateError
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
        message = error.message
        if error.validator == "anyOf" and {"const": "auto"} in error.validator_value:
            # a value that may be `auto` (preprocessing): say what is wrong with it as a value
            inner = jsonschema.exceptions.best_match(e for e in error.context if e.validator != "const")
            message = f"expected a value or 'auto': {inner.message if inner else message}"
        raise ConfigError(f"{source}: {_key_path(error.absolute_path)}: {message}")
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
        _check_label_values(site, f"{source}: sites.{name}")
        if site["source"] == "files":
            for key in ("images", "labels"):
                try:
                    FileTemplate(site["files"][key])
                except TemplateError as err:
                    raise ConfigError(f"{source}: sites.{name}.files.{key}: {err}") from err
        if set(organs) == set(ORGANS):
            fully.append(name)
    if not fully:
        raise ConfigError(
            f"{source}: sites: no site labels all organs {list(ORGANS)}; pre-training (M0) needs one"
        )
    clip = config["preprocessing"]["clip"]
    if clip != "auto" and not float(clip[0]) < float(clip[1]):
        raise ConfigError(f"{source}: preprocessing.clip: {clip} is not a window [lo, hi] with lo < hi")
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
    baselines = config.get("baselines")
    if baselines and baselines["losses"] not in combos:
        raise ConfigError(
            f"{source}: baselines.losses: unknown loss combination {baselines['losses']!r} "
            f"(known: {sorted(combos)})"
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


def _check_label_values(site: Mapping[str, Any], where: str) -> None:
    """A site's labels/background/ignore: no value in two groups; names (resolved by validate_site against
    the site's dataset.json) only for real sites, since a synthetic site's generator needs numbers."""
    background, ignore = site.get("background"), site.get("ignore")
    values = [v for vals in site["labels"].values() for v in vals] + list(ignore or [])
    values += background if isinstance(background, list) else []
    if any(isinstance(v, str) for v in values):
        if site["source"] == "synthetic":
            raise ConfigError(f"{where}: a synthetic site's label values must be numbers, not names")
        return
    try:
        LabelMap.from_config(site["labels"], background, ignore)
    except LabelMapError as err:
        raise ConfigError(f"{where}: {err}") from err


def drop_unset(config: dict[str, Any]) -> dict[str, Any]:
    """Remove, in place and at any depth, every key whose value is null; returns ``config``.

    Snakemake merges ``--configfile`` overlays key by key, so an overlay cannot delete a key of the file it
    is merged into; it sets the key to null instead (``synthetic: null`` for a site that reads real data,
    ``kidney_left: null`` where a site's labels change to ``kidney``). No configuration key takes null.
    """
    for key in [k for k, v in config.items() if v is None]:
        del config[key]
    for value in config.values():
        if isinstance(value, dict):
            drop_unset(value)
    return config


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
