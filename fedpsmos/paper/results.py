"""A model's results on the fully and on the partially labelled sites: the rows of the paper's Tables 2-6.

Every table reports per organ the mean and sample standard deviation (n - 1) over test cases of Dice (DC) and
HD95 (mm), and the mean over organs, separately for the fully labelled site(s) (all five organs) and the
partially labelled sites (each scored on the organs it labels), as the paper's tables do. A missed organ
(reference present, prediction empty) and a spurious one (reference empty, prediction present) are in both
means, with Dice 0 and the HD95 penalty (the image diagonal, :mod:`fedpsmos.evaluation.metrics`), and each row
counts them (``missed``, ``spurious``); only an organ absent from both masks (HD95 NaN) is left out of the
HD95 mean, because there is nothing to measure. A model that has not been run gives a row of NaN (shown as
'-', as in the paper, by :mod:`fedpsmos.paper.table_format`), never an error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedpsmos.evaluation.evaluate import COLUMNS, FLAG_COLUMNS
from fedpsmos.evaluation.metrics import DEFAULT_HD95, check_convention
from fedpsmos.organs import ORGANS
from fedpsmos.paper.paired_tests import compare_row, pvalue_columns

SD = "_sd"  # suffix of a standard-deviation column: "liver DC" -> "liver DC_sd"
COUNT_COLUMNS = ("cases", "missed", "spurious")


def read_metrics(paths: Sequence[str | os.PathLike[str]], *, require_flags: bool = False) -> pd.DataFrame:
    """Concatenate metrics CSVs (written by ``evaluate_site``); missing files are skipped.

    Parameters
    ----------
    paths:
        ``results/evaluation/{model}/{site}/metrics.csv`` files.
    require_flags:
        Reject a CSV without the ``missed, spurious, hd95_convention`` columns: one written before missed
        organs were penalised holds NaN for them, which tables must not average. Otherwise (figures, which
        use Dice only) such columns are filled with NA.
    """
    frames = []
    for path in paths:
        if not Path(path).is_file():
            continue
        frame = pd.read_csv(path)
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: metrics CSV lacks columns {missing}")
        absent = [c for c in FLAG_COLUMNS if c not in frame.columns]
        if absent and require_flags:
            raise ValueError(
                f"{path}: metrics CSV lacks columns {absent}; it predates the missed-organ penalty, "
                "re-run rule evaluate_site"
            )
        for column in absent:
            frame[column] = pd.NA
        frames.append(frame[[*COLUMNS, *FLAG_COLUMNS]])
    if not frames:
        numeric = ("dice", "hd95")
        return pd.DataFrame(
            {c: pd.Series(dtype=float if c in numeric else object) for c in (*COLUMNS, *FLAG_COLUMNS)}
        )
    return pd.concat(frames, ignore_index=True)


def checked_convention(metrics: pd.DataFrame, configured: str = DEFAULT_HD95) -> str:
    """The one HD95 convention of the metrics, checked against the configured one.

    Parameters
    ----------
    metrics:
        Concatenated metrics (:func:`read_metrics`).
    configured:
        Config ``evaluation.hd95``; returned when the metrics are empty or carry no convention.
    """
    check_convention(configured)
    column = metrics["hd95_convention"] if "hd95_convention" in metrics.columns else pd.Series(dtype=object)
    found = sorted({str(v) for v in column.dropna()})
    if len(found) > 1:
        raise ValueError(f"metrics mix HD95 conventions {found}; re-run rule evaluate_site for one of them")
    if found and found[0] != configured:
        raise ValueError(
            f"metrics were computed with HD95 convention {found[0]!r} but evaluation.hd95 is {configured!r}; "
            "re-run rule evaluate_site"
        )
    return configured


def fully_labelled_sites(metrics: pd.DataFrame, default: Sequence[str] = ("site1",)) -> list[str]:
    """Sites scored on every organ (the fully labelled site1 in the paper); ``default`` when none is found.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    default:
        Used when no site in ``metrics`` has all organs.
    """
    organs = (
        metrics.groupby("site")["organ"].agg(lambda s: set(s)) if len(metrics) else pd.Series(dtype=object)
    )
    full = sorted(site for site, seen in organs.items() if set(ORGANS) <= seen)
    return full or list(default)


def organ_columns(*, sd: bool = True) -> list[str]:
    """Value columns of a results block: ``{organ} DC``, ``{organ} HD95`` (and their ``_sd``), then the means.

    Parameters
    ----------
    sd:
        Include the ``{organ} DC_sd`` / ``{organ} HD95_sd`` standard-deviation columns.
    """
    columns = []
    for organ in ORGANS:
        for metric in ("DC", "HD95"):
            columns += [f"{organ} {metric}", f"{organ} {metric}{SD}"] if sd else [f"{organ} {metric}"]
    return [*columns, "mean DC", "mean HD95"]


def _flag_count(rows: pd.DataFrame, column: str) -> float:
    """Number of flagged rows; NaN when there are no rows or a flag is unknown (a CSV without flags)."""
    if not len(rows) or column not in rows.columns:
        return math.nan
    flags = rows[column]
    if flags.isna().any():
        return math.nan
    return float(flags.astype(bool).sum())


def results_row(metrics: pd.DataFrame, model_id: str, sites: Sequence[str]) -> dict[str, float]:
    """Case and missed-organ counts, and mean and SD over cases of DC and HD95 per organ, of one model.

    HD95 includes the penalty of missed and spurious organs and skips only NaN (organ absent from both masks).
    The ``mean`` columns average the organ means.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    model_id:
        The model (``model`` column).
    sites:
        Sites pooled in this block.
    """
    rows = metrics[(metrics["model"] == model_id) & metrics["site"].isin(list(sites))]
    out: dict[str, float] = {c: math.nan for c in (*COUNT_COLUMNS, *organ_columns())}
    if len(rows):
        out["cases"] = float(len(rows[["site", "case"]].drop_duplicates()))
        out["missed"] = _flag_count(rows, "missed")
        out["spurious"] = _flag_count(rows, "spurious")
    for organ in ORGANS:
        cases = rows[rows["organ"] == organ]
        for metric, column in (("DC", "dice"), ("HD95", "hd95")):
            values = cases[column].dropna().astype(float)
            if len(values):
                out[f"{organ} {metric}"] = float(values.mean())
                # Sample SD (n - 1); NaN for a single case, shown as the mean alone.
                out[f"{organ} {metric}{SD}"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    for metric in ("DC", "HD95"):
        values = [out[f"{o} {metric}"] for o in ORGANS if not math.isnan(out[f"{o} {metric}"])]
        out[f"mean {metric}"] = float(np.mean(values)) if values else math.nan
    return out


def results_table(
    metrics: pd.DataFrame,
    rows: Sequence[tuple[str, str]],
    full_sites: Sequence[str] | None = None,
    comparisons: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Rows ``(name, model_id)`` scored on the fully and on the partially labelled sites, one block each.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    rows:
        Display name and model id of each row, in order.
    full_sites:
        Fully labelled sites; default :func:`fully_labelled_sites`.
    comparisons:
        Model id -> the model id its per-case Dice is tested against
        (:func:`~fedpsmos.paper.paired_tests.compare_row`); when given, the table has the
        :func:`~fedpsmos.paper.paired_tests.pvalue_columns`, filled on those rows.
    """
    full = list(full_sites) if full_sites is not None else fully_labelled_sites(metrics)
    partial = sorted(s for s in metrics["site"].unique() if s not in full)
    blocks = [(f"{', '.join(full)} (fully labelled)", full)]
    blocks.append((f"{', '.join(partial) or 'none'} (partially labelled, own organs)", partial))
    columns = ["data", "model", *COUNT_COLUMNS, *organ_columns()]
    if comparisons is not None:
        columns += pvalue_columns()
    records = []
    for block, sites in blocks:
        for name, model_id in rows:
            record: dict[str, object] = {
                "data": block,
                "model": name,
                **results_row(metrics, model_id, sites),
            }
            if comparisons and model_id in comparisons:
                record.update(compare_row(metrics, model_id, comparisons[model_id], sites))
            records.append(record)
    return pd.DataFrame(records, columns=columns)
