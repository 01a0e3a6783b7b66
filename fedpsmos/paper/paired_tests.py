"""Paired Wilcoxon signed-rank tests of two models' per-case Dice, per organ (the paper's Tables 4 and 6).

Table 4 tests M0 and site-alone against the federated model, Table 6 each adaptation mode against the
federated model it starts from: two-sided, per organ, on the per-case Dice paired by (site, case). The CSVs
hold the numbers in separate columns (``{organ} DC p``, ``{organ} DC n``, and ``p vs`` naming the model
compared with); Markdown and LaTeX show the p-values in a second block under the table
(:mod:`fedpsmos.paper.table_format`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from fedpsmos.organs import ORGANS
from fedpsmos.paper.models import model_name

VERSUS = "p vs"  # column naming the model a row's p-values compare it with
# With n <= 5 pairs the smallest two-sided exact Wilcoxon p is 2 / 2**n >= 0.0625: the test cannot reject at
# 0.05, so such p-values are shown with their n and marked as having little power.
MIN_PAIRS = 6
PVALUE_NOTE = (
    "p: two-sided paired Wilcoxon signed-rank test (scipy.stats.wilcoxon) per organ on the per-case Dice, "
    "paired by (site, case); p = 1 when every difference is zero; n: pairs; with n < 6 pairs p cannot fall "
    "below 0.05 (low power)."
)


def pvalue_columns() -> list[str]:
    """Paired-test columns: the compared-with model, then ``{organ} DC p`` and ``{organ} DC n`` per organ."""
    return [VERSUS, *(f"{o} DC {k}" for o in ORGANS for k in ("p", "n"))]


def paired_wilcoxon(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (``scipy.stats.wilcoxon`` defaults).

    Every difference zero (all ties): 1.0, no evidence of a difference (scipy would warn and divide by
    zero); no pairs: NaN.

    Parameters
    ----------
    x, y:
        Paired values, same length.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    if not a.size:
        return math.nan
    if np.all(a == b):
        return 1.0
    return float(stats.wilcoxon(a, b).pvalue)


def paired_dice(
    metrics: pd.DataFrame, model_id: str, reference_id: str, sites: Sequence[str], organ: str
) -> pd.DataFrame:
    """Per-case Dice of two models on one organ, paired by (site, case): columns ``dice_model, dice_ref``.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    model_id, reference_id:
        The compared model and the model it is compared with.
    sites:
        Sites pooled.
    organ:
        The organ.
    """
    keep = metrics["site"].isin(list(sites)) & (metrics["organ"] == organ)
    keys = ["site", "case"]
    model = metrics.loc[keep & (metrics["model"] == model_id), [*keys, "dice"]]
    reference = metrics.loc[keep & (metrics["model"] == reference_id), [*keys, "dice"]]
    pairs = model.merge(reference, on=keys, suffixes=("_model", "_ref"), validate="one_to_one")
    return pairs.dropna(subset=["dice_model", "dice_ref"])


def compare_row(
    metrics: pd.DataFrame, model_id: str, reference_id: str, sites: Sequence[str]
) -> dict[str, float | str]:
    """Per organ, the paired Wilcoxon p of ``model_id`` against ``reference_id`` and the number of pairs.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    model_id, reference_id:
        The compared model and the model it is compared with.
    sites:
        Sites pooled in this block.
    """
    out: dict[str, float | str] = {VERSUS: model_name(reference_id)}
    for organ in ORGANS:
        pairs = paired_dice(metrics, model_id, reference_id, sites, organ)
        n = len(pairs)
        out[f"{organ} DC p"] = paired_wilcoxon(pairs["dice_model"], pairs["dice_ref"]) if n else math.nan
        out[f"{organ} DC n"] = float(n) if n else math.nan
    return out
