"""The per-rule conda environments (envs/*.yaml) pin the same versions as pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
UNPINNED_OK = {"python", "pip"}  # python is pinned to a minor version, pip is the installer itself

_SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(==|=|>=|<=|~=|>|<)?\s*([^\s;,]*)")


def normalise(name: str) -> str:
    """Return a package name in PEP 503 form, so that PyYAML, pyyaml and py_yaml compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Split ``name==1.2`` (pip) or ``name=1.2`` (conda) into (normalised name, operator, version)."""
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"cannot parse package spec {spec!r}")
    name, op, version = match.groups()
    return normalise(name), op, version or None


def pyproject_pins(path: Path) -> dict[str, str]:
    """Return name -> exact version of every ``==`` pin in pyproject.toml (main and optional deps)."""
    project = tomllib.loads(path.read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    pins = {}
    for spec in specs:
        name, op, version = parse_spec(spec)
        if op == "==" and version:
            pins[name] = version
    return pins


def env_specs(path: Path) -> list[str]:
    """Return every package spec of a conda env file: conda dependencies and its pip section."""
    env = yaml.safe_load(path.read_text())
    if not isinstance(env, dict) or not isinstance(env.get("dependencies"), list):
        raise ValueError(f"{path}: no 'dependencies' list")
    specs = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            specs += [str(s) for s in dep.get("pip", [])]
        else:
            specs.append(str(dep))
    return specs


def pin_mismatches(pyproject: Path, env_files: list[Path]) -> list[str]:
    """Return one message per package pinned in an env file and in pyproject.toml at different versions,
    and per env package (other than python and pip) that is not pinned exactly."""
    pins = pyproject_pins(pyproject)
    problems = []
    for env_file in env_files:
        for spec in env_specs(env_file):
            name, op, version = parse_spec(spec)
            if name in UNPINNED_OK:
                continue
            if op not in ("==", "=") or not version:
                problems.append(f"{env_file.name}: {spec!r} is not pinned to one version")
            elif name in pins and pins[name] != version:
                problems.append(f"{env_file.name}: {name} {version} but pyproject.toml pins {pins[name]}")
    return problems


def test_checker_reports_a_version_that_differs_from_pyproject(tmp_path: Path) -> None:
    # Prepare
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch==2.14.1", "PyYAML==6.0.4"]\n')
    env = tmp_path / "env.yaml"
    env.write_text("dependencies:\n  - python=3.11\n  - pyyaml=6.0.4\n  - pip:\n      - torch==2.13.0\n")
    # Execute
    problems = pin_mismatches(pyproject, [env])
    # Assert: the torch pin differs; pyyaml matches although spelled differently and conda-style.
    assert problems == ["env.yaml: torch 2.13.0 but pyproject.toml pins 2.14.1"]


def test_checker_reports_an_unpinned_package(tmp_path: Path) -> None:
    # Prepare
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = []\n')
    env = tmp_path / "env.yaml"
    env.write_text("dependencies:\n  - pip\n  - pip:\n      - numpy>=2\n")
    # Execute / Assert
    assert pin_mismatches(pyproject, [env]) == ["env.yaml: 'numpy>=2' is not pinned to one version"]


def test_env_files_exist_for_each_rule_family() -> None:
    assert {p.stem for p in ENV_FILES} >= {"training", "data", "plotting"}


def test_env_pins_agree_with_pyproject() -> None:
    assert pin_mismatches(REPO / "pyproject.toml", ENV_FILES) == []


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_python_satisfies_requires_python(env_file: Path) -> None:
    # Prepare
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    pythons = [parse_spec(s) for s in env_specs(env_file) if parse_spec(s)[0] == "python"]
    # Assert
    assert len(pythons) == 1, f"{env_file.name}: pin python to one minor version"
    assert Version(pythons[0][2]) in SpecifierSet(requires)


def test_env_packages_cover_the_project_runtime_needs() -> None:
    # The training env runs the whole package; every runtime dependency but the workflow engine itself.
    runtime = set(pyproject_pins(REPO / "pyproject.toml")) - {
        "snakemake",
        "snakemake-executor-plugin-slurm",
        "pytest",
        "pytest-xdist",
        "filelock",
        "ruff",
        "snakefmt",
        "mypy",
    }
    training = {parse_spec(s)[0] for s in env_specs(REPO / "envs" / "training.yaml")}
    assert runtime <= training, f"missing from envs/training.yaml: {sorted(runtime - training)}"


def test_conda_directives_in_rules_point_at_existing_env_files() -> None:
    # Prepare
    rules = sorted((REPO / "workflow" / "rules").glob("*.smk"))
    referenced = {m for p in rules for m in re.findall(r"conda:\s*\n?\s*[\"']([^\"']+)[\"']", p.read_text())}
    if not referenced:
        pytest.skip("no rule declares conda: yet")
    # Assert: rule paths are relative to the .smk file.
    missing = [r for r in referenced if not (REPO / "workflow" / "rules" / r).resolve().is_file()]
    assert missing == []
