"""Bad input as a user meets it: through the workflow's rules, not the package functions.

A site of the workflow is pointed (by a ``--configfile`` overlay) at an nnU-Net folder written in the test's
tmp_path. While the folder does not exist the workflow refuses to load, naming it; once it holds a case with
a broken label, ``validate_site`` fails, its log ends with one line naming the file and the problem, and no
manifest (nor anything half-written) is left.

The catalogue of defects is checked on the package functions the rules call, without starting Snakemake:
``tests/test_validation.py`` (every broken image or label a case can have), ``tests/test_sources.py``
(a missing folder, a folder without cases), ``tests/test_config.py`` (a bad site key, merged and named as the
workflow loads it) and ``tests/test_patches.py`` (a patch larger than the resampled image).
docs/reliability.md lists each case.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_ct, write_sitk
from tests.workflow_helpers import snakemake

pytestmark = pytest.mark.workflow

SITE = "site2"
MANIFEST = f"results/data/{SITE}/manifest.json"
LABELS = {"liver": [1], "spleen": [2]}  # tiny_ct's label values 1 and 2


def _overlay(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump({"sites": {SITE: {"source": "nnunet", "path": str(root), "labels": LABELS}}})
    )
    return path


def _write_site(root: Path) -> Path:
    """Three valid cases c0..c2 in nnU-Net v2 raw layout, then case c1's label given a value (7) that the
    site's label map does not name; the broken label file."""
    image, label = tiny_ct()
    for i in range(3):
        write_sitk(image, root / "imagesTr" / f"c{i}_0000.nii.gz")
        write_sitk(label, root / "labelsTr" / f"c{i}.nii.gz")
    outside = label.copy()
    outside[0, 0, 0] = 7
    return write_sitk(outside, root / "labelsTr" / "c1.nii.gz")


def test_bad_site_stops_the_workflow_naming_the_file_and_the_problem(tmp_path: Path) -> None:
    # Prepare: site2 pointed at a folder that does not exist yet
    root = tmp_path / "raw"
    overlays = ["config/ci.yaml", _overlay(tmp_path, root)]
    work = tmp_path / "run"
    # Execute (a): a dry run; the workflow lists the site's cases when it loads
    result = snakemake(work, "-n", MANIFEST, overlays=overlays, check=False)
    # Assert: it refuses to load, one line names the folder and the problem; nothing was built
    assert result.returncode != 0
    output = result.stdout + result.stderr
    message = rf"^{re.escape(str(root))}: site {SITE} data folder does not exist$"
    assert re.search(message, output, flags=re.MULTILINE), output[-3000:]
    assert not (work / "results").exists()

    # Prepare: the folder, with case c1's label broken
    broken = _write_site(root)
    # Execute (b)
    result = snakemake(work, "--cores", "1", MANIFEST, overlays=overlays, check=False)
    # Assert: the rule failed; its log ends with the one-line error naming the file and the problem; no
    # manifest and nothing half-written
    assert result.returncode != 0
    assert "Error in rule validate_site" in result.stdout + result.stderr
    lines = [ln for ln in (work / f"logs/validate_site/{SITE}.log").read_text().splitlines() if ln.strip()]
    assert lines, "the rule's log is empty"
    last = lines[-1]
    assert last.startswith(f"fedpsmos.data.sources.DataError: {broken}: "), last
    assert "label values [7] are not in the site's label map" in last, last
    assert not (work / MANIFEST).exists()
    data = work / "results" / "data" / SITE
    assert not data.exists() or not any(data.iterdir())
