"""The federated data fingerprint: per-site summaries, their merge and the resolved preprocessing settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from fedpsmos.config import ConfigError, load_config, validate_config
from fedpsmos.organs import IGNORE_CLASS
from fedpsmos.preprocessing.fingerprint import (
    HIST_HIGH,
    HIST_LOW,
    N_BINS,
    FingerprintError,
    histogram,
    histogram_percentile,
    merge_fingerprints,
    merge_moments,
    moments,
    read_settings,
    resolve_settings,
    site_fingerprint,
    write_settings,
)
from tests.conftest import DryRun
from tests.workflow_helpers import REPO

LABELS = {"liver": [1], "kidney": [2]}
FIXED = {"spacing": [2.5, 1.5, 1.5], "image_order": 3, "clip": [-80.0, 305.0], "mean": 90.9, "std": 65.5}
# the canonical (z, y, x) spacing of a case stored slice axis first: sitk axis 0 runs along z
SLICE_FIRST = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)


def _write_case(
    folder: Path,
    case: str,
    rng: np.random.Generator,
    *,
    spacing_zyx: tuple[float, float, float],
    offset: float,
    scale: int = 1,
) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A float CT of organ, background, ignored and tumour-like voxels, and its site label; returns paths,
    the intensities and the mapped organ mask (liver 1, kidney 2 on both sides, 7 ignored, 9 background).
    """
    shape = tuple(scale * int(n) for n in rng.integers(6, 12, size=3))
    label = np.zeros(shape, dtype=np.uint8)
    label[1:-1, 2:-2, 1 : shape[2] // 2 - 1] = 1
    label[2:-2, 2:-2, shape[2] // 2 + 1 : -1] = 2
    label[0, 0, :] = 7  # ignored: not an organ
    label[-1, -1, :] = 9  # background structure
    image = rng.normal(-700.0, 200.0, size=shape)  # background: far from the organs
    organ = np.isin(label, (1, 2))
    image[organ] = rng.normal(60.0 + offset, 40.0, size=int(organ.sum()))
    image[label == 7] = 2500.0  # must not count
    image = image.astype(np.float32)
    img, lab = sitk.GetImageFromArray(image), sitk.GetImageFromArray(label)
    for item in (img, lab):
        item.SetSpacing(tuple(reversed(spacing_zyx)))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{case}_img.nii.gz", folder / f"{case}_seg.nii.gz"
    sitk.WriteImage(img, str(paths[0]))
    sitk.WriteImage(lab, str(paths[1]))
    return paths[0], paths[1], image, organ


def make_site(root: Path, site: str, n_cases: int, seed: int, scale: int = 1) -> dict[str, Any]:
    """A site folder and manifest with ``n_cases`` cases: the last is test, the one before validation;
    ``scale`` multiplies each image's extent.

    Returns the manifest path, the training and validation cases' organ voxels and canonical spacings.
    """
    rng = np.random.default_rng(seed)
    cases, voxels, spacings = [], [], []
    ids = [f"{site}_{i:03d}" for i in range(n_cases)]
    split = {"test": ids[-1:], "validation": ids[-2:-1], "train": ids[:-2]}
    for i, case in enumerate(ids):
        in_plane = float(rng.choice([0.625, 0.75, 0.8125]))  # exact in NIfTI's float32
        spacing = (float(rng.choice([2.0, 2.5, 5.0])), in_plane, in_plane)
        is_test = case in split["test"]
        image, label, values, organ = _write_case(
            root / site, case, rng, spacing_zyx=spacing, offset=1000.0 if is_test else 10.0 * i, scale=scale
        )
        if i == 1:  # stored slice axis first: canonical spacing must still be (z, y, x)
            for path in (image, label):
                item = sitk.ReadImage(str(path))
                item.SetSpacing(spacing)  # sitk (x, y, z) order = (z, y, x) mm along the permuted axes
                item.SetDirection(SLICE_FIRST)
                sitk.WriteImage(item, str(path))
        cases.append({"case": case, "image": str(image), "label": str(label)})
        if not is_test:
            voxels.append(values[organ].astype(np.float64))
            spacings.append(spacing)
    manifest = {"site": site, "labels": LABELS, "background": [9], "ignore": [7], "cases": cases, **split}
    path = root / "data" / site / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return {"manifest": path, "voxels": np.concatenate(voxels), "spacings": spacings}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fingerprint")
    sites = {f"site{i}": make_site(root, f"site{i}", n, seed=i) for i, n in ((1, 5), (2, 3), (3, 4))}
    summaries = [site_fingerprint(s["manifest"]) for s in sites.values()]
    return {"root": root, "sites": sites, "summaries": summaries, "merged": merge_fingerprints(summaries)}


def test_merged_mean_and_std_equal_the_pooled_organ_voxels(federation: dict[str, Any]) -> None:
    # Prepare: every site's training and validation organ voxels pooled (what no site may do)
    pooled = np.concatenate([s["voxels"] for s in federation["sites"].values()])
    # Execute
    merged = federation["merged"]
    # Assert: ignored, background and test-case voxels left out; moments exact up to rounding
    assert merged["voxels"] == pooled.size
    assert merged["mean"] == pytest.approx(np.mean(pooled), rel=1e-9)
    assert merged["std"] == pytest.approx(np.std(pooled), rel=1e-9)


def test_merged_percentiles_lie_within_one_bin_of_the_pooled_ones(federation: dict[str, Any]) -> None:
    pooled = np.concatenate([s["voxels"] for s in federation["sites"].values()])
    lo, hi = np.percentile(pooled, [0.5, 99.5])
    merged = federation["merged"]["percentiles"]
    assert abs(merged["0.5"] - lo) <= 1.0 and abs(merged["99.5"] - hi) <= 1.0


def test_merged_spacing_is_the_median_over_all_cases_in_canonical_order(federation: dict[str, Any]) -> None:
    spacings = [s for site in federation["sites"].values() for s in site["spacings"]]
    assert federation["merged"]["spacing"] == pytest.approx(list(np.median(spacings, axis=0)))
    assert federation["merged"]["cases"] == len(spacings) == 4 + 2 + 3
    # the slice-first case of site1 reports its spacing as (z, y, x), like the others
    assert sorted(federation["summaries"][0]["spacings"]) == sorted(
        [list(s) for s in federation["sites"]["site1"]["spacings"]]
    )


def test_summary_size_does_not_grow_with_voxels(federation: dict[str, Any]) -> None:
    for summary in federation["summaries"]:
        assert len(summary["histogram"]["counts"]) == N_BINS
        assert len(summary["spacings"]) == summary["cases"]
        assert "site1_000" not in json.dumps(summary)  # no case ids


def test_chan_merge_and_histogram_percentiles_are_exact_on_integer_data() -> None:
    # Prepare: integer HU, some outside the binned range
    rng = np.random.default_rng(0)
    values = np.clip(np.rint(rng.normal(50.0, 300.0, size=5000)), HIST_LOW, HIST_HIGH)
    values[:3] = [HIST_LOW - 50, HIST_HIGH + 10, HIST_HIGH + 500]
    parts = np.array_split(values, [7, 1000, 1001, 3000])
    # Execute
    merged = merge_moments(moments(p) for p in parts)
    hist = histogram(values)
    # Assert
    assert merged["count"] == values.size and merged["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert merged["m2"] / merged["count"] == pytest.approx(values.var(), rel=1e-12)
    assert (hist["underflow"], hist["overflow"]) == (1, 2) and hist["counts"].sum() == values.size - 3
    for q in (0.5, 25.0, 50.0, 99.5):
        assert histogram_percentile(hist["counts"], 1, 2, q) == pytest.approx(np.percentile(values, q))


def test_resolve_settings_replaces_only_auto(federation: dict[str, Any]) -> None:
    merged = federation["merged"]
    assert resolve_settings(FIXED, None) == FIXED
    mixed = resolve_settings({**FIXED, "clip": "auto", "std": "auto"}, merged)
    assert mixed["clip"] == [merged["percentiles"]["0.5"], merged["percentiles"]["99.5"]]
    assert mixed["std"] == merged["std"] and mixed["mean"] == 90.9 and mixed["spacing"] == FIXED["spacing"]
    every = resolve_settings(
        {**FIXED, "spacing": "auto", "clip": "auto", "mean": "auto", "std": "auto"}, merged
    )
    assert every["spacing"] == merged["spacing"] and every["mean"] == merged["mean"]
    with pytest.raises(FingerprintError, match="mean are 'auto' but no fingerprint"):
        resolve_settings({**FIXED, "mean": "auto"}, None)


def test_settings_file_round_trip_and_bad_files(tmp_path: Path, federation: dict[str, Any]) -> None:
    out = tmp_path / "settings.json"
    assert write_settings(FIXED, None, out) == read_settings(out) == FIXED
    (tmp_path / "bad.json").write_text('{"spacing": [1, 1, 1]}')
    with pytest.raises(FingerprintError, match=r"bad\.json: preprocessing settings lack image_order"):
        read_settings(tmp_path / "bad.json")
    with pytest.raises(FingerprintError, match=r"site9\.json: not a site fingerprint"):
        merge_fingerprints([{"kind": "other"}], names=["site9.json"])


def test_unknown_label_value_names_the_label_file(tmp_path: Path) -> None:
    site = make_site(tmp_path, "siteX", 3, seed=4)
    manifest = json.loads(site["manifest"].read_text())
    manifest["ignore"] = []  # value 7 is then unknown
    site["manifest"].write_text(json.dumps(manifest))
    with pytest.raises(FingerprintError, match=r"siteX_000_seg\.nii\.gz: label values \[7\]"):
        site_fingerprint(site["manifest"])
    assert IGNORE_CLASS == 255  # the ignored class is not an organ (1..5)


AUTO = {"preprocessing": {"spacing": "auto", "clip": "auto", "mean": "auto", "std": "auto"}}


def test_config_accepts_auto_and_names_a_bad_value() -> None:
    config = load_config(REPO / "config.yaml")
    validate_config({**config, "preprocessing": {**config["preprocessing"], **AUTO["preprocessing"]}})
    with pytest.raises(ConfigError, match=r"preprocessing\.spacing: expected a value or 'auto'"):
        validate_config({**config, "preprocessing": {**config["preprocessing"], "spacing": "automatic"}})


@pytest.mark.parametrize("auto", [False, True])
def test_dry_run_plans_fingerprint_rules_only_when_something_is_auto(tiny_plan: DryRun, auto: bool) -> None:
    # Execute: the tiny config's DAG, with every preprocessing setting `auto` or none
    jobs = tiny_plan(AUTO if auto else None)
    # Assert
    rules = [j["rule"] for j in jobs]
    settings = [j for j in jobs if j["rule"] == "preprocessing_settings"]
    assert len(settings) == 1 and all(
        "results/preprocessed/settings.json" in j["input"] for j in jobs if j["rule"] == "preprocess_case"
    )
    if auto:
        # config/ci.yaml's three sites
        assert rules.count("site_fingerprint") == 3 and rules.count("merge_fingerprints") == 1
        assert settings[0]["input"] == ["results/data/fingerprint.json"]
    else:
        assert "site_fingerprint" not in rules and "merge_fingerprints" not in rules
        assert settings[0]["input"] == []
