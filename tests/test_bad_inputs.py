"""The bad-input catalogue as a user meets it: through the workflow's rules, not the package functions.

``tests/test_validation.py`` checks :func:`fedpsmos.data.validation.build_manifest` itself; here a site of
the workflow is pointed (by a ``--configfile`` overlay) at an nnU-Net folder written in the test's tmp_path
with one broken case, and the test checks what the user sees: Snakemake fails, the rule's log ends with one
line naming the file and the problem, and no manifest (nor anything half-written) is left. Errors that the
workflow finds when it loads (no cases, a missing folder, an unknown organ, source or site key) are checked
with ``snakemake -n``. docs/reliability.md lists each case.
"""

from __future__ import annotations

import gzip
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import Geometry, tiny_ct, write_sitk
from tests.workflow_helpers import snakemake

pytestmark = pytest.mark.workflow

SITE = "site2"
MANIFEST = f"results/data/{SITE}/manifest.json"
LABELS = {"liver": [1], "spleen": [2]}  # tiny_ct's label values 1 and 2


def _image(root: Path) -> Path:
    return root / "imagesTr" / "c1_0000.nii.gz"


def _label(root: Path) -> Path:
    return root / "labelsTr" / "c1.nii.gz"


def _write_site(root: Path) -> None:
    """Three valid cases c0..c2 in nnU-Net v2 raw layout."""
    image, label = tiny_ct()
    for i in range(3):
        write_sitk(image, root / "imagesTr" / f"c{i}_0000.nii.gz")
        write_sitk(label, root / "labelsTr" / f"c{i}.nii.gz")


def _overlay(tmp_path: Path, site: dict) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"sites": {SITE: site}}))
    return path


def _nnunet_site(root: Path) -> dict:
    return {"source": "nnunet", "path": str(root), "labels": LABELS}


def _set_pixdim(path: Path, index: int, value: float) -> None:
    # SimpleITK refuses to write a zero or negative spacing, so the NIfTI header is edited directly.
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[76 + 4 * index : 80 + 4 * index] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(raw)))


def _not_gzip(root: Path) -> None:
    image, _ = tiny_ct()
    write_sitk(image, root / "plain.nii")
    shutil.move(root / "plain.nii", _image(root))


def _rewrite(which: Callable[[Path], Path], array: np.ndarray, geometry: Geometry | None = None):
    return lambda root: write_sitk(array, which(root), geometry)


def _catalogue() -> list[tuple[str, Callable[[Path], object], Callable[[Path], Path], str]]:
    """(name, how to break case c1, the file the error must name, the problem it must state)."""
    image, label = tiny_ct()
    nan = image.astype(np.float32)
    nan[2, 2, 2] = np.nan
    outside = label.copy()
    outside[0, 0, 0] = 7
    return [
        (
            "unreadable",
            lambda root: _image(root).write_bytes(gzip.compress(b"not an image" * 20)),
            _image,
            "cannot read image file",
        ),
        ("not gzip", _not_gzip, _image, "is named .gz but is not gzip-compressed"),
        ("2-D", _rewrite(_image, image[0]), _image, "image is 2-D, a 3-D image is required"),
        ("4-D", _rewrite(_image, np.stack([image, image])), _image, "image is 4-D, a 3-D image is required"),
        ("size", _rewrite(_label, label[:, :, :-1]), _label, "label size [7, 6, 4] differs from the image's"),
        (
            "spacing",
            _rewrite(_label, label, Geometry(spacing=(1.0, 1.0, 1.01))),
            _label,
            "label spacing [1.0, 1.0, 1.01] differs",
        ),
        (
            "origin",
            _rewrite(_label, label, Geometry(origin=(0.0, 0.5, 0.0))),
            _label,
            "label origin [0.0, 0.5, 0.0] differs",
        ),
        (
            "direction",
            _rewrite(_label, label, Geometry(direction=(-1, 0, 0, 0, 1, 0, 0, 0, -1))),
            _label,
            "label direction",
        ),
        (
            "label values",
            _rewrite(_label, outside),
            _label,
            "label values [7] are not in the site's label map",
        ),
        ("nan", _rewrite(_image, nan), _image, "image has 1 non-finite (NaN or infinite) intensities"),
        ("constant", _rewrite(_image, np.full_like(image, 40)), _image, "image intensity is constant (40)"),
        ("zero spacing", lambda root: _set_pixdim(_image(root), 2, 0.0), _image, "image spacing must be > 0"),
        (
            "negative spacing",
            lambda root: _set_pixdim(_label(root), 1, -1.0),
            _label,
            "label spacing must be > 0",
        ),
    ]


CATALOGUE = _catalogue()


@pytest.mark.parametrize(("name", "breakage", "named", "problem"), CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_case_stops_validate_site_with_one_line_and_no_manifest(
    tmp_path: Path, name: str, breakage, named, problem: str
) -> None:
    # Prepare: a valid three-case site with case c1 broken
    root = tmp_path / "raw"
    _write_site(root)
    breakage(root)
    work = tmp_path / "run"
    # Execute
    result = snakemake(
        work,
        "--cores",
        "1",
        MANIFEST,
        overlays=["config/ci.yaml", _overlay(tmp_path, _nnunet_site(root))],
        check=False,
    )
    # Assert: the rule failed; its log ends with the one-line error naming the file and the problem
    assert result.returncode != 0
    assert "Error in rule validate_site" in result.stdout + result.stderr
    lines = [ln for ln in (work / f"logs/validate_site/{SITE}.log").read_text().splitlines() if ln.strip()]
    assert lines, "the rule's log is empty"
    last = lines[-1]
    assert last.startswith(f"fedpsmos.data.sources.DataError: {named(root)}: "), last
    assert problem in last, last
    assert not (work / MANIFEST).exists()
    assert not (work / "results" / "data" / SITE).exists() or not any(
        (work / "results/data" / SITE).iterdir()
    )


def _empty_site(tmp_path: Path) -> dict:
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "raw" / folder).mkdir(parents=True)
    return _nnunet_site(tmp_path / "raw")


LOAD_TIME = [
    (
        "no cases",
        _empty_site,
        lambda tmp: rf"^{re.escape(str(tmp / 'raw' / 'imagesTr'))}: site {SITE} has no cases",
    ),
    (
        "missing data folder",
        lambda tmp: _nnunet_site(tmp / "nowhere"),
        lambda tmp: rf"^{re.escape(str(tmp / 'nowhere'))}: site {SITE} data folder does not exist$",
    ),
    (
        "unknown organ",
        lambda tmp: {"labels": {"stomach": [3]}},
        lambda tmp: rf"^config: sites\.{SITE}\.labels: .*'stomach' was unexpected",
    ),
    (
        "unknown source",
        lambda tmp: {"source": "dropbox"},
        lambda tmp: rf"^config: sites\.{SITE}\.source: 'dropbox' is not one of",
    ),
    (
        "unknown site key",
        lambda tmp: {"hospital": "St. Elsewhere"},
        lambda tmp: rf"^config: sites\.{SITE}: .*'hospital' was unexpected",
    ),
    (
        "site without a path",
        lambda tmp: {"source": "msd"},
        lambda tmp: rf"^config: sites\.{SITE}: 'path' is a required property",
    ),
]


@pytest.mark.parametrize(("name", "site", "message"), LOAD_TIME, ids=[c[0] for c in LOAD_TIME])
def test_bad_site_config_fails_when_the_workflow_loads(tmp_path: Path, name: str, site, message) -> None:
    # Execute: a dry run is enough, the workflow refuses to load
    work = tmp_path / "run"
    overlay = _overlay(tmp_path, site(tmp_path))
    result = snakemake(work, "-n", MANIFEST, overlays=["config/ci.yaml", overlay], check=False)
    # Assert: one line names the key or the folder and the problem; nothing was built
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert re.search(message(tmp_path), output, flags=re.MULTILINE), output[-3000:]
    assert not (work / "results").exists()


def test_patch_larger_than_resampled_image_fails_index_patches(tmp_path: Path) -> None:
    # Prepare: the tiny synthetic site, a patch several times its resampled size
    overlay = tmp_path / "patch.yaml"
    overlay.write_text(yaml.safe_dump({"patches": {"size": [64, 256, 256]}}))
    work = tmp_path / "run"
    # Execute
    result = snakemake(
        work,
        "--cores",
        "2",
        f"results/patches/{SITE}.parquet",
        overlays=["config/ci.yaml", overlay],
        check=False,
    )
    # Assert: index_patches fails naming a case, the patch and the image size; no index is left
    assert result.returncode != 0
    assert "Error in rule index_patches" in result.stdout + result.stderr
    lines = [ln for ln in (work / f"logs/index_patches/{SITE}.log").read_text().splitlines() if ln.strip()]
    assert re.match(
        rf"fedpsmos\.patches\.PatchIndexError: case {SITE}_\d+: patch \(64, 256, 256\) exceeds the "
        r"preprocessed image \(\d+, \d+, \d+\) by more than 2\.0x on an axis",
        lines[-1],
    ), lines[-1]
    assert not (work / f"results/patches/{SITE}.parquet").exists()
    patches = work / "results" / "patches"
    assert not patches.exists() or not any(patches.iterdir())
