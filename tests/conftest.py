"""Shared fixtures: tiny raw site folders (nnU-Net v2 or MSD layout) written from arrays and geometry."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import SimpleITK as sitk

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class Geometry:
    """SimpleITK geometry in SimpleITK's (x, y, z) order."""

    spacing: Sequence[float] = (1.0, 1.0, 1.0)
    origin: Sequence[float] = (0.0, 0.0, 0.0)
    direction: Sequence[float] = field(default_factory=lambda: IDENTITY)


def write_sitk(array: np.ndarray, path: Path, geometry: Geometry | None = None) -> Path:
    """Write a NumPy array ``[z, y, x]`` (or 2-D/4-D) as an image with the given geometry."""
    geometry = geometry or Geometry()
    image = sitk.GetImageFromArray(array, isVector=False)  # 4-D arrays stay 4-D scalar images
    dim = image.GetDimension()
    if dim == 3:
        image.SetSpacing([float(s) for s in geometry.spacing])
        image.SetOrigin([float(s) for s in geometry.origin])
        image.SetDirection([float(s) for s in geometry.direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def tiny_ct(shape: Sequence[int] = (4, 6, 8), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small int16 'CT' (air around a soft-tissue block) and a uint8 label with values 1 and 2."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, dtype=np.int16)
    image[1:-1, 1:-1, 1:-1] = (40 + rng.normal(0, 10, size=[s - 2 for s in shape])).astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    label[1:-1, 1:3, 1:3] = 1
    label[1:-1, 1:3, -3:-1] = 2
    return image, label


RawCaseWriter = Callable[..., tuple[Path, Path]]


@pytest.fixture
def write_raw_case() -> RawCaseWriter:
    """A function writing one case into a raw site folder; returns ``(image_path, label_path)``.

    Call as ``write_raw_case(root, case, image, label, layout="nnunet"|"msd", ending=".nii.gz",
    geometry=Geometry(...), label_geometry=None, dataset_json={...} | None)``; ``label_geometry`` defaults to
    the image's, ``dataset_json`` (nnU-Net only) is written when given.
    """

    def write(
        root: Path,
        case: str,
        image: np.ndarray,
        label: np.ndarray,
        *,
        layout: str = "nnunet",
        ending: str = ".nii.gz",
        geometry: Geometry | None = None,
        label_geometry: Geometry | None = None,
        dataset_json: Mapping[str, object] | None = None,
    ) -> tuple[Path, Path]:
        root = Path(root)
        channel = "_0000" if layout == "nnunet" else ""
        image_path = write_sitk(image, root / "imagesTr" / f"{case}{channel}{ending}", geometry)
        label_path = write_sitk(label, root / "labelsTr" / f"{case}{ending}", label_geometry or geometry)
        if dataset_json is not None:
            (root / "dataset.json").write_text(json.dumps(dict(dataset_json)))
        return image_path, label_path

    return write


def tiny_network(**overrides: object) -> dict[str, object]:
    """The tests' tiny real network as config.yaml's ``network`` section: a two-stage PlainConvUNet (4 and 8
    features, one conv a stage, deep supervision); ``overrides`` replace keys (``architecture="pipo"``)."""
    network: dict[str, object] = {
        "features": [4, 8],
        "strides": [[1, 1, 1], [2, 2, 2]],
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
        "conv_per_stage": 1,
        "deep_supervision": True,
    }
    return {**network, **overrides}


def tiny_training(**overrides: object) -> dict[str, object]:
    """The tests' short training as config.yaml's ``training`` section (2 patches, 2 iterations an epoch,
    nnU-Net's SGD settings, augmentation on); ``overrides`` replace keys."""
    training: dict[str, object] = {
        "patches_per_iteration": 2,
        "iterations_per_epoch": 2,
        "lr": 0.01,
        "momentum": 0.99,
        "weight_decay": 3.0e-5,
        "plateau": {"window": 10, "min_decrease": 0.001, "factor": 0.8},
        "augmentation": True,
    }
    return {**training, **overrides}


def tiny_spec(num_classes: int, *, deep_supervision: bool = True, **overrides: object):
    """The tests' tiny real network (:func:`tiny_network`) as a spec with ``num_classes`` outputs."""
    from fedpsmos.network import NetworkSpec

    return NetworkSpec.from_config(tiny_network(deep_supervision=deep_supervision, **overrides), num_classes)


def load_bench(name: str) -> ModuleType:
    """The script ``bench/{name}.py`` imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread for the whole session, module-scoped fixtures included: results that are compared
    bit for bit (a block of rounds in worker processes against the per-round computation in this process)
    depend on the thread count, and on a shared 2-core machine a second thread made small training loops
    ten times slower. Test modules never set the count themselves."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _reset_torch_threads():
    """A test that changes the torch thread count must not change the next test's arithmetic."""
    yield
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _keep_locale():
    """ITK's file readers and writers may switch the process locale to "C" (ASCII) while they parse numbers
    and not switch it back; the next test's text files would then be written in ASCII. Restore it."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use the shared tiny run first, then the modules with SLURM tests, the rest in pytest's
    order.

    With the two pytest-xdist workers taking whole modules in this order (``--no-loadscope-reorder``), the
    first worker makes the run while the other waits for it, so the run has both cores to itself; then the
    modules that use it (the kill test alone in one) are split between the workers, and the unit tests fill
    the rest. Measured on 2 cores: 6 min 45 s in pytest's order (the run made after the unit tests, the fault
    tests then on one worker) and 7 min 03 s to 7 min 15 s with unit tests running beside the run. Where a
    SLURM controller answers (CI), the SLURM workflow test spends about 3 minutes mostly waiting for the
    scheduler: started next, it waits while the other worker runs tests, instead of at the end with the
    other worker idle (8 min 20 s in pytest's order).
    """
    slurm_modules = {item.path for item in items if item.get_closest_marker("slurm")}

    def rank(item: pytest.Item) -> int:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            return 0
        return 1 if item.path in slurm_modules else 2

    items.sort(key=rank)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole workflow (`all`) run once per test session on the tiny config (config/ci.yaml); its
    working directory. Tests that use it must not change it: they copy it
    (:func:`tests.workflow_helpers.copy_run`) and run more on the copy, since tests on the other worker may
    read it at the same time.

    With pytest-xdist each worker has its own session: the first worker that needs the run makes it under a
    file lock in the folder the workers share, and the others wait for it and use it. A failed run is
    recorded there too, so the next worker fails at once with Snakemake's output instead of running it
    again.
    """
    from filelock import FileLock

    from tests.workflow_helpers import snakemake

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    base = shared / "tiny_run"
    work, done, failed = base / "run", base / "done", base / "failed"
    with FileLock(str(base) + ".lock"):
        if failed.exists():
            pytest.fail(f"the tiny run failed on another worker:\n{failed.read_text()}")
        if not done.exists():
            base.mkdir(exist_ok=True)
            try:
                snakemake(work, "--cores", "2", "all")
            except AssertionError as error:
                failed.write_text(str(error))
                raise
            done.touch()
    return work


DryRun = Callable[..., list[dict[str, object]]]


@pytest.fixture(scope="session")
def tiny_plan(tmp_path_factory: pytest.TempPathFactory) -> DryRun:
    """The jobs of ``snakemake -n --forceall all`` on the tiny config (config/ci.yaml) plus an optional
    overlay given as a dict, as :func:`tests.workflow_helpers.dry_run_jobs` parses them; each distinct overlay
    is planned once per test session (tests only read the plan)."""
    from tests.workflow_helpers import dry_run_jobs, snakemake

    plans: dict[str, list[dict[str, object]]] = {}

    def plan(overlay: Mapping[str, object] | None = None) -> list[dict[str, object]]:
        key = json.dumps(overlay or {}, sort_keys=True)
        if key not in plans:
            work = tmp_path_factory.mktemp("tiny_plan")
            overlays: list[str | Path] = ["config/ci.yaml"]
            if overlay:
                (work / "overlay.json").write_text(key)
                overlays.append(work / "overlay.json")
            result = snakemake(work / "run", "-n", "--forceall", "all", overlays=overlays)
            plans[key] = dry_run_jobs(result.stdout)
        return plans[key]

    return plan
