"""A federated data fingerprint: the ``auto`` preprocessing settings without pooling any voxel.

nnU-Net derives its CT preprocessing from a fingerprint of the whole training set: the median voxel spacing
as target spacing, and, from the intensities inside the annotated structures, the 0.5 and 99.5 percentiles
as clipping window and the mean and standard deviation as normalisation statistics (the unclipped foreground,
then clip and normalise). In a federation no site may send voxels, so each site summarises its own training
and validation cases (never its test cases) and only the summaries travel (docs/design.md "Preprocessing"):

- the voxel spacing of each case in the canonical (z, y, x) order (:mod:`fedpsmos.preprocessing.orientation`);
- a histogram of the intensities inside the labelled organs, one bin per Hounsfield unit over the fixed range
  :data:`HIST_LOW` .. :data:`HIST_HIGH` (bins centred on integers, so integer CT values are binned exactly),
  values outside it counted as underflow and overflow;
- the exact moments of the same voxels: count, mean and the sum of squared deviations ``m2``, which merge
  without loss by Chan et al.'s parallel formula.

"Inside the labelled organs" means voxels whose label maps (:mod:`fedpsmos.data.label_map`) to a global organ
class 1..5; background and ignored voxels (:data:`fedpsmos.organs.IGNORE_CLASS`) are left out. A summary's
size depends on the number of cases and the fixed number of bins, never on the number of voxels.

:func:`merge_fingerprints` turns every site's summary into the median spacing per axis over all cases, the
percentiles of the summed histogram (within one bin of the pooled voxels' own percentiles) and the pooled mean
and standard deviation (equal to those of the pooled voxels up to rounding). :func:`resolve_settings` puts
them in place of the ``auto`` keys of ``preprocessing``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fedpsmos.atomic import write_json
from fedpsmos.data.label_map import apply_label_map_image
from fedpsmos.data.manifest import Manifest
from fedpsmos.io import ImageError, read_image_pair
from fedpsmos.organs import NUM_CLASSES, LabelMapError
from fedpsmos.preprocessing.orientation import reorient

AUTO = "auto"
SETTING_KEYS = ("spacing", "image_order", "clip", "mean", "std")
AUTO_KEYS = ("spacing", "clip", "mean", "std")  # the keys that may be ``auto``
HIST_LOW = -1024  # centre of the first 1-HU bin (air)
HIST_HIGH = 3071  # centre of the last bin (12-bit CT's upper end)
N_BINS = HIST_HIGH - HIST_LOW + 1
PERCENTILES = (0.5, 99.5)  # nnU-Net's CT clipping window
FINGERPRINT_KIND = "site_fingerprint"
MERGED_KIND = "federated_fingerprint"


class FingerprintError(ValueError):
    """A manifest, case or fingerprint cannot be summarised or merged; the message names the file."""


# ---------------------------------------------------------------- moments and histograms


def moments(values: np.ndarray) -> dict[str, Any]:
    """Count, mean and sum of squared deviations ``m2`` of ``values`` (float64)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return {"count": 0, "mean": 0.0, "m2": 0.0}
    mean = float(x.mean())
    return {"count": int(x.size), "mean": mean, "m2": float(np.sum((x - mean) ** 2))}


def merge_moments(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge ``{count, mean, m2}`` summaries with Chan et al.'s parallel formula (exact up to rounding).

    For two parts ``a`` and ``b`` with ``delta = mean_b - mean_a``: ``n = n_a + n_b``,
    ``mean = mean_a + delta * n_b / n`` and ``m2 = m2_a + m2_b + delta**2 * n_a * n_b / n``.
    """
    count, mean, m2 = 0, 0.0, 0.0
    for part in parts:
        n_b, mean_b, m2_b = int(part["count"]), float(part["mean"]), float(part["m2"])
        if n_b == 0:
            continue
        n = count + n_b
        delta = mean_b - mean
        mean += delta * n_b / n
        m2 += m2_b + delta * delta * count * n_b / n
        count = n
    return {"count": count, "mean": mean, "m2": m2}


def histogram(values: np.ndarray) -> dict[str, Any]:
    """1-HU histogram over :data:`HIST_LOW` .. :data:`HIST_HIGH` (bin ``i`` is centred on ``HIST_LOW + i``).

    Returns ``{counts, underflow, overflow}``; ``counts`` has :data:`N_BINS` entries.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    index = np.floor(x - (HIST_LOW - 0.5)).astype(np.int64)
    under = index < 0
    over = index >= N_BINS
    counts = np.bincount(index[~(under | over)], minlength=N_BINS)
    return {"counts": counts.astype(np.int64), "underflow": int(under.sum()), "overflow": int(over.sum())}


def histogram_percentile(counts: np.ndarray, underflow: int, overflow: int, q: float) -> float:
    """The ``q``-th percentile of the binned values, as :func:`numpy.percentile` would give it (linear).

    Each order statistic is taken as the centre of its bin, so the result lies within half a bin of the
    exact percentile; order statistics in the underflow or overflow are taken as the range's end.

    Parameters
    ----------
    counts:
        :data:`N_BINS` bin counts.
    underflow, overflow:
        Values below and above the binned range.
    q:
        Percentile in [0, 100].
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(underflow) + int(counts.sum()) + int(overflow)
    if total == 0:
        raise ValueError("no values to take a percentile of")
    # the value of order statistic k (0-based): underflow, then the bins, then the overflow
    edges = np.concatenate([[int(underflow)], int(underflow) + np.cumsum(counts)])
    centres = np.arange(HIST_LOW, HIST_HIGH + 1, dtype=np.float64)

    def order_statistic(k: int) -> float:
        if k < edges[0]:
            return float(HIST_LOW)
        if k >= edges[-1]:
            return float(HIST_HIGH)
        return float(centres[int(np.searchsorted(edges[1:], k, side="right"))])

    rank = q / 100.0 * (total - 1)
    low = math.floor(rank)
    frac = rank - low
    below = order_statistic(low)
    if frac == 0.0:
        return below
    return below + frac * (order_statistic(low + 1) - below)


# ---------------------------------------------------------------- one site


def case_summary(
    image_path: str | os.PathLike[str], label_path: str | os.PathLike[str], labels: Any
) -> tuple[list[float], dict[str, Any], dict[str, Any]]:
    """Spacing (canonical z, y, x), organ-intensity histogram and moments of one case.

    Parameters
    ----------
    image_path, label_path:
        The CT image (HU) and its site label image.
    labels:
        The site's resolved :class:`~fedpsmos.data.label_map.LabelMap` (or a plain ``{organ: [values]}``).
    """
    image_path, label_path = Path(image_path), Path(label_path)
    try:
        image, label = read_image_pair(image_path, label_path)
    except ImageError as err:
        raise FingerprintError(str(err)) from err
    try:
        mapped = apply_label_map_image(label, labels)
    except LabelMapError as err:
        raise FingerprintError(f"{label_path}: {err}") from err
    organ = (mapped >= 1) & (mapped < NUM_CLASSES)
    values = sitk.GetArrayViewFromImage(image)[organ]
    if not np.all(np.isfinite(values)):
        raise FingerprintError(f"{image_path}: image holds non-finite values inside the organs")
    spacing = [float(s) for s in reversed(reorient(image).GetSpacing())]
    return spacing, histogram(values), moments(values)


def site_fingerprint(manifest_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise one site's training and validation cases (never its test cases); see the module docstring.

    Parameters
    ----------
    manifest_path:
        The site's ``manifest.json`` (``cases`` with ``image``/``label`` paths, ``train`` and ``validation``
        case lists, and the resolved label map: ``labels`` and, if present, ``background`` and ``ignore``).

    Returns
    -------
    dict
        ``{kind, site, cases, spacings, histogram: {low, high, counts, underflow, overflow}, moments}``;
        JSON-ready, its size bounded by the number of cases and :data:`N_BINS`.
    """
    manifest = Manifest.load(manifest_path)
    labels = manifest.label_map  # the resolved organ, background and ignore values
    files = [(r.image, r.label) for r in manifest.records([*manifest.train, *manifest.validation])]
    if not files:
        raise FingerprintError(f"{manifest_path}: no training or validation cases to summarise")
    spacings, parts = [], []
    counts = np.zeros(N_BINS, dtype=np.int64)
    underflow = overflow = 0
    for image_path, label_path in files:
        spacing, hist, stats = case_summary(image_path, label_path, labels)
        spacings.append(spacing)
        counts += hist["counts"]
        underflow += hist["underflow"]
        overflow += hist["overflow"]
        parts.append(stats)
    return {
        "kind": FINGERPRINT_KIND,
        "site": manifest.site,
        "cases": len(files),
        "spacings": sorted(spacings),  # sorted: no case order, no case ids
        "histogram": {
            "low": HIST_LOW,
            "high": HIST_HIGH,
            "counts": [int(c) for c in counts],
            "underflow": underflow,
            "overflow": overflow,
        },
        "moments": merge_moments(parts),
    }


# ---------------------------------------------------------------- the federation


def _check_summary(summary: Mapping[str, Any], where: str) -> None:
    try:
        hist = summary["histogram"]
        ok = (
            summary["kind"] == FINGERPRINT_KIND
            and hist["low"] == HIST_LOW
            and hist["high"] == HIST_HIGH
            and len(hist["counts"]) == N_BINS
            and all(len(s) == 3 for s in summary["spacings"])
            and {"count", "mean", "m2"} <= set(summary["moments"])
        )
    except (KeyError, TypeError) as err:
        raise FingerprintError(f"{where}: not a site fingerprint (missing {err})") from err
    if not ok:
        raise FingerprintError(
            f"{where}: not a site fingerprint of this version ({N_BINS} bins from {HIST_LOW} HU, 3-D spacing)"
        )


def merge_fingerprints(
    summaries: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Merge site fingerprints into the federation's: median spacing, percentiles, mean and std.

    Parameters
    ----------
    summaries:
        :func:`site_fingerprint` results, one per site.
    names:
        What to call each summary in errors (its file); defaults to its site name.

    Returns
    -------
    dict
        ``{kind, sites, cases, voxels, spacing, percentiles: {"0.5", "99.5"}, mean, std, underflow,
        overflow}``: ``spacing`` is the per-axis median over every case of every site; the percentiles come
        from the summed histogram, ``mean`` and ``std`` (population) from the merged moments.
    """
    if not summaries:
        raise FingerprintError("no site fingerprints to merge")
    names = list(names) if names is not None else [str(s.get("site", i)) for i, s in enumerate(summaries)]
    for summary, name in zip(summaries, names, strict=True):
        _check_summary(summary, name)
    spacings = np.array([s for summary in summaries for s in summary["spacings"]], dtype=np.float64)
    counts = np.sum([np.asarray(s["histogram"]["counts"], dtype=np.int64) for s in summaries], axis=0)
    underflow = sum(int(s["histogram"]["underflow"]) for s in summaries)
    overflow = sum(int(s["histogram"]["overflow"]) for s in summaries)
    pooled = merge_moments(s["moments"] for s in summaries)
    if pooled["count"] == 0:
        raise FingerprintError(f"{', '.join(names)}: no voxel inside a labelled organ at any site")
    std = math.sqrt(pooled["m2"] / pooled["count"])
    return {
        "kind": MERGED_KIND,
        "sites": [str(s.get("site", "")) for s in summaries],
        "cases": int(len(spacings)),
        "voxels": int(pooled["count"]),
        "spacing": [float(v) for v in np.median(spacings, axis=0)],
        "percentiles": {str(q): histogram_percentile(counts, underflow, overflow, q) for q in PERCENTILES},
        "mean": float(pooled["mean"]),
        "std": std,
        "underflow": underflow,
        "overflow": overflow,
    }


def is_auto(value: Any) -> bool:
    """Whether a preprocessing value is the string ``auto``."""
    return isinstance(value, str) and value == AUTO


def needs_fingerprint(preprocessing: Mapping[str, Any]) -> bool:
    """Whether any of ``preprocessing``'s spacing, clip, mean or std is ``auto``."""
    return any(is_auto(preprocessing.get(key)) for key in AUTO_KEYS)


def resolve_settings(preprocessing: Mapping[str, Any], merged: Mapping[str, Any] | None) -> dict[str, Any]:
    """The preprocessing settings with every ``auto`` replaced from the federation's fingerprint.

    Parameters
    ----------
    preprocessing:
        The ``preprocessing`` config section (``spacing``, ``image_order``, ``clip``, ``mean``, ``std``).
    merged:
        :func:`merge_fingerprints`' result, or ``None`` when nothing is ``auto``.

    Returns
    -------
    dict
        ``{spacing: [z, y, x], image_order, clip: [lo, hi], mean, std}`` with plain numbers.
    """
    if needs_fingerprint(preprocessing) and merged is None:
        auto = [k for k in AUTO_KEYS if is_auto(preprocessing.get(k))]
        raise FingerprintError(f"preprocessing: {', '.join(auto)} are 'auto' but no fingerprint was given")
    fp: Mapping[str, Any] = merged or {}

    def pick(key: str, derived: Any) -> Any:
        return derived() if is_auto(preprocessing[key]) else preprocessing[key]

    settings: dict[str, Any] = {
        "spacing": [float(s) for s in pick("spacing", lambda: fp["spacing"])],
        "image_order": int(preprocessing["image_order"]),
        "clip": [float(c) for c in pick("clip", lambda: [fp["percentiles"][str(q)] for q in PERCENTILES])],
        "mean": float(pick("mean", lambda: fp["mean"])),
        "std": float(pick("std", lambda: fp["std"])),
    }
    if not settings["clip"][0] < settings["clip"][1]:
        raise FingerprintError(f"preprocessing.clip: the window {settings['clip']} is empty (need lo < hi)")
    if not settings["std"] > 0:
        raise FingerprintError(f"preprocessing.std: {settings['std']} is not positive")
    return settings


def read_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``results/preprocessed/settings.json``, raising :class:`FingerprintError` naming the file."""
    path = Path(path)
    try:
        settings = json.loads(path.read_text())
        missing = [k for k in SETTING_KEYS if k not in settings]
    except (OSError, ValueError, TypeError) as err:
        raise FingerprintError(f"{path}: cannot read the preprocessing settings: {err}") from err
    if missing:
        raise FingerprintError(f"{path}: preprocessing settings lack {', '.join(missing)}")
    return settings


# ---------------------------------------------------------------- rule entry points


def write_site_fingerprint(manifest_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Rule ``site_fingerprint``: one site's manifest -> its ``fingerprint.json`` (written atomically)."""
    write_json(out, site_fingerprint(manifest_path))


def write_merged_fingerprint(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> None:
    """Rule ``merge_fingerprints``: every site's ``fingerprint.json`` -> the federation's (atomically)."""
    summaries = []
    for path in paths:
        try:
            summaries.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise FingerprintError(f"{path}: cannot read the site fingerprint: {err}") from err
    write_json(out, merge_fingerprints(summaries, names=[str(p) for p in paths]))


def write_settings(
    preprocessing: Mapping[str, Any],
    merged_path: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
) -> dict[str, Any]:
    """Rule ``preprocessing_settings``: the resolved settings -> ``settings.json`` (atomically); returns them.

    Parameters
    ----------
    preprocessing:
        The ``preprocessing`` config section.
    merged_path:
        The federation's fingerprint, or ``None`` when nothing is ``auto``.
    out:
        Output path.
    """
    merged = None
    if merged_path is not None:
        try:
            merged = json.loads(Path(merged_path).read_text())
        except (OSError, ValueError) as err:
            raise FingerprintError(f"{merged_path}: cannot read the federated fingerprint: {err}") from err
    settings = resolve_settings(preprocessing, merged)
    write_json(out, settings)
    return settings
