"""The paper's Tables 2-6 from the workflow's metrics CSVs, as CSV, Markdown and LaTeX.

Every table reports per organ the mean and sample standard deviation (n - 1) over test cases of Dice (DC) and
HD95 (mm), and the mean over organs, separately for the fully labelled site(s) (all five organs) and the
partially labelled sites (each scored on the organs it labels), as the paper's tables do. A missed organ
(reference present, prediction empty) and a spurious one (reference empty, prediction present) are in both
means, with Dice 0 and the HD95 penalty (the image diagonal, :mod:`fedpsmos.evaluation.metrics`), and each row
counts them (``missed``, ``spurious``); only an organ absent from both masks (HD95 NaN) is left out of the
HD95 mean, because there is nothing to measure. A model that has not been run gives a row of '-', as in the
paper, never an error.

Tables 4 and 6 add a two-sided paired Wilcoxon signed-rank test per organ on the per-case Dice
(:func:`paired_wilcoxon`): Table 4 of M0 and site-alone against the federated model, Table 6 of each
adaptation mode against the federated model it starts from. The CSVs hold the numbers in separate columns
(``{organ} DC_sd``, ``{organ} DC p``, ``{organ} DC n``); Markdown and LaTeX show ``mean ± sd`` cells and the
p-values in a second block under the table.

- Table 2: loss-combination ablation of the central model (``central/{losses}``).
- Table 3: the other methods for partially labelled data trained centrally (PaNN, PIPO, the MargExc-style
  Dice+CE combination) against the default combination, federated and adapted.
- Table 4: federated against M0 (pretraining alone), central (upper bound) and site-alone models.
- Table 5: federated settings (client iterations x rounds), total iterations and training time.
- Table 6: the adaptation modes against the federated model they start from.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from fedpsmos.atomic import atomic_path, write_text
from fedpsmos.evaluation.evaluate import COLUMNS, FLAG_COLUMNS
from fedpsmos.evaluation.metrics import DEFAULT_HD95, check_convention
from fedpsmos.organs import ORGANS
from fedpsmos.paper.models import loss_label, model_name

MISSING = "-"
SD = "_sd"  # suffix of a standard-deviation column: "liver DC" -> "liver DC_sd"
COUNT_COLUMNS = ("cases", "missed", "spurious")
VERSUS = "p vs"  # column naming the model a row's p-values compare it with
# With n <= 5 pairs the smallest two-sided exact Wilcoxon p is 2 / 2**n >= 0.0625: the test cannot reject at
# 0.05, so such p-values are shown with their n and marked as having little power.
MIN_PAIRS = 6


def read_metrics(paths: Sequence[str | os.PathLike[str]], *, require_flags: bool = False) -> pd.DataFrame:
    """Concatenate metrics CSVs (written by ``evaluate_site``); missing files are skipped.

    Parameters
    ----------
    paths:
        ``results/{model}/{site}/metrics.csv`` files.
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


def pvalue_columns() -> list[str]:
    """Paired-test columns: the compared-with model, then ``{organ} DC p`` and ``{organ} DC n`` per organ."""
    return [VERSUS, *(f"{o} DC {k}" for o in ORGANS for k in ("p", "n"))]


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
        Model id -> the model id its per-case Dice is tested against (:func:`compare_row`); when given, the
        table has the :func:`pvalue_columns`, filled on those rows.
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


def table2_losses(metrics: pd.DataFrame, central_losses: Sequence[str]) -> pd.DataFrame:
    """Table 2: the central model trained with each loss combination.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    central_losses:
        Loss combination names (config ``losses.central``).
    """
    return results_table(metrics, [(model_name(f"central/{c}"), f"central/{c}") for c in central_losses])


def best_adaptation_mode(metrics: pd.DataFrame, modes: Sequence[str]) -> str | None:
    """The adaptation mode with the highest mean Dice over all its rows, or ``None`` when none has metrics.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    modes:
        Candidate modes (config ``adaptation.modes``).
    """
    means = {m: metrics.loc[metrics["model"] == f"adapted/{m}", "dice"].mean() for m in modes}
    scored = {m: v for m, v in means.items() if not pd.isna(v)}
    return max(scored, key=lambda m: scored[m]) if scored else None


def table3_margexc(
    metrics: pd.DataFrame,
    *,
    margexc: str,
    default_losses: str,
    default_setting: str,
    modes: Sequence[str],
    baselines: Sequence[str] = ("panns", "pipo"),
) -> pd.DataFrame:
    """Table 3: PaNN, PIPO, MargExc-style central models vs the default combination, FL, best adaptation.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    margexc, default_losses:
        Loss combination names (config ``losses.margexc`` and ``losses.default``).
    baselines:
        Baseline methods shown first, in the paper's order (config ``baselines.methods``; a method not run
        gives a row of '-').
    default_setting:
        Federated setting compared (config ``federated.default``).
    modes:
        Adaptation modes; the best by mean Dice is shown.
    """
    best = best_adaptation_mode(metrics, modes)
    rows = [
        *((model_name(f"baseline/{m}"), f"baseline/{m}") for m in baselines),
        (f"MargExc-style losses: {model_name(f'central/{margexc}')}", f"central/{margexc}"),
        (model_name(f"central/{default_losses}"), f"central/{default_losses}"),
        (model_name(f"federated/{default_setting}"), f"federated/{default_setting}"),
        (f"{model_name(f'adapted/{best}')} (best mode)", f"adapted/{best}")
        if best
        else ("FL + adaptation (best mode)", "adapted/none"),
    ]
    return results_table(metrics, rows)


def table4_federated(metrics: pd.DataFrame, *, default_losses: str, default_setting: str) -> pd.DataFrame:
    """Table 4: M0 (pretraining alone), central upper bound and site-alone models vs the federated model.

    M0 and site-alone rows carry the paired Wilcoxon p-values against the federated model, so the table shows
    what federated training adds over pretraining and over training alone.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    default_losses, default_setting:
        The central loss combination and the federated setting compared.
    """
    federated = f"federated/{default_setting}"
    ids = ["pretrain", f"central/{default_losses}", "site_alone", federated]
    comparisons = {"pretrain": federated, "site_alone": federated}
    return results_table(metrics, [(model_name(i), i) for i in ids], comparisons=comparisons)


def benchmark_seconds(paths: Sequence[str | os.PathLike[str]]) -> float:
    """Total wall time ``s`` of Snakemake benchmark files (NaN when any is missing).

    Parameters
    ----------
    paths:
        ``results/benchmarks/...tsv`` files written by the rules' ``benchmark:`` directive.
    """
    if not paths:
        return math.nan
    total = 0.0
    for path in paths:
        if not Path(path).is_file():
            return math.nan
        frame = pd.read_csv(path, sep="\t")
        if "s" not in frame.columns:
            raise ValueError(f"{path}: benchmark file has no 's' column")
        total += float(frame["s"].sum())
    return total


def table5_settings(
    metrics: pd.DataFrame,
    *,
    settings: Mapping[str, Mapping[str, int]],
    default_losses: str,
    benchmarks: Mapping[str, Sequence[str | os.PathLike[str]]],
    pretrain_iterations: int | None = None,
    central_iterations: int | None = None,
) -> pd.DataFrame:
    """Table 5: federated settings at equal total iterations, with their mean results and training time.

    ``total iterations`` counts each site's local iterations after M0 (client iterations x rounds) for a
    federated setting and the central model's iterations after M0 for the non-FL row; ``with M0`` adds M0's
    pretraining iterations, which every row starts from. Training time sums the Snakemake benchmark times of
    the jobs that trained the row's model after M0.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    settings:
        Setting -> ``{local_iterations, rounds}`` (config ``federated.settings``).
    default_losses:
        The central model's loss combination (the non-FL row).
    benchmarks:
        Setting name or model id -> the benchmark files of all jobs that trained it (summed).
    pretrain_iterations, central_iterations:
        M0's iterations and the central model's after M0 (:func:`fedpsmos.budgets.iteration_budgets`);
        ``None`` leaves those cells empty.
    """

    def with_m0(iterations: int | None) -> int | None:
        return None if iterations is None or pretrain_iterations is None else pretrain_iterations + iterations

    all_sites = sorted(metrics["site"].unique())
    records = []
    for setting, values in settings.items():
        local, rounds = int(values["local_iterations"]), int(values["rounds"])
        row = results_row(metrics, f"federated/{setting}", all_sites)
        files = benchmarks.get(setting, benchmarks.get(f"federated/{setting}", []))
        records.append(
            {
                "model": model_name(f"federated/{setting}"),
                "client iterations": local,
                "rounds": rounds,
                "total iterations": local * rounds,
                "with M0": with_m0(local * rounds),
                "mean DC": row["mean DC"],
                "mean HD95": row["mean HD95"],
                "missed": row["missed"],
                "spurious": row["spurious"],
                "training time (h)": benchmark_seconds(files) / 3600,
            }
        )
    central = f"central/{default_losses}"
    row = results_row(metrics, central, all_sites)
    records.append(
        {
            "model": model_name(central),
            "client iterations": None,
            "rounds": None,
            "total iterations": central_iterations,
            "with M0": with_m0(central_iterations),
            "mean DC": row["mean DC"],
            "mean HD95": row["mean HD95"],
            "missed": row["missed"],
            "spurious": row["spurious"],
            "training time (h)": benchmark_seconds(benchmarks.get(central, [])) / 3600,
        }
    )
    return pd.DataFrame(records)


def table6_adaptation(metrics: pd.DataFrame, *, default_setting: str, modes: Sequence[str]) -> pd.DataFrame:
    """Table 6: the federated model and its adaptation to each site with each mode (per-site models).

    Each adaptation row carries the paired Wilcoxon p-values against the federated model.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    default_setting:
        The federated setting adapted.
    modes:
        Adaptation modes (config ``adaptation.modes``).
    """
    federated = f"federated/{default_setting}"
    ids = [federated, *(f"adapted/{m}" for m in modes)]
    comparisons = {f"adapted/{m}": federated for m in modes}
    return results_table(metrics, [(model_name(i), i) for i in ids], comparisons=comparisons)


def _format(column: str, value: object) -> str:
    """Paper-style cell: DC to 3 decimals, HD95 and p to 2 (p < 0.01 to 3), '-' when missing."""
    if value is None or value is pd.NA or (isinstance(value, float | np.floating) and math.isnan(value)):
        return MISSING
    if isinstance(value, float | np.floating):
        name = column.removesuffix(SD)
        if name.endswith("DC"):
            return f"{value:.3f}"
        if name.endswith("HD95"):
            return f"{value:.2f}"
        if column.endswith(" p"):
            return "<0.001" if value < 0.001 else f"{value:.3f}" if value < 0.01 else f"{value:.2f}"
        if value == int(value) and "time" not in column:
            return str(int(value))
        return f"{value:.3g}"
    return str(value)


def format_table(df: pd.DataFrame) -> pd.DataFrame:
    """The table with every cell formatted as a string (:func:`_format`), each column kept.

    Parameters
    ----------
    df:
        A table from one of the ``table*`` functions.
    """
    return pd.DataFrame({c: [_format(c, v) for v in df[c].astype(object)] for c in df.columns})


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """The table as shown in Markdown and LaTeX: ``mean ± sd`` cells, without the paired-test columns.

    Parameters
    ----------
    df:
        A table from one of the ``table*`` functions.
    """
    cells = format_table(df)
    hidden = set(pvalue_columns()) | {c for c in df.columns if c.endswith(SD)}
    out = {}
    for column in df.columns:
        if column in hidden:
            continue
        values = list(cells[column])
        if f"{column}{SD}" in cells.columns:
            values = [
                mean if MISSING in (mean, sd) else f"{mean} ± {sd}"
                for mean, sd in zip(values, cells[f"{column}{SD}"], strict=True)
            ]
        out[column] = values
    return pd.DataFrame(out)


def pvalue_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """The paired Wilcoxon p-values as shown in Markdown and LaTeX (``p (n=…)``), or ``None`` without any.

    Parameters
    ----------
    df:
        A table from one of the ``table*`` functions.
    """
    if VERSUS not in df.columns:
        return None
    rows = df[df[VERSUS].notna()]
    if not len(rows):
        return None
    records = []
    for _, row in rows.iterrows():
        record = {"data": row["data"], "comparison": f"{row['model']} vs {row[VERSUS]}"}
        for organ in ORGANS:
            p, n = row[f"{organ} DC p"], row[f"{organ} DC n"]
            if pd.isna(p):
                record[f"{organ} DC p"] = MISSING
                continue
            note = f"n={int(n)}" + (", low power" if n < MIN_PAIRS else "")
            record[f"{organ} DC p"] = f"{_format(f'{organ} DC p', float(p))} ({note})"
        records.append(record)
    return pd.DataFrame(records)


def _markdown_rows(cells: pd.DataFrame) -> list[str]:
    """Header, alignment and body lines of a pipe table (text columns left, numbers right)."""
    lines = ["| " + " | ".join(cells.columns) + " |"]
    text = ("data", "model", "comparison")
    lines.append("|" + "|".join("---" if c in text else "---:" for c in cells.columns) + "|")
    lines += ["| " + " | ".join(str(v).replace("|", r"\|") for v in row) + " |" for row in cells.to_numpy()]
    return lines


PVALUE_NOTE = (
    "p: two-sided paired Wilcoxon signed-rank test (scipy.stats.wilcoxon) per organ on the per-case Dice, "
    "paired by (site, case); p = 1 when every difference is zero; n: pairs; with n < 6 pairs p cannot fall "
    "below 0.05 (low power)."
)


def to_markdown(df: pd.DataFrame, caption: str) -> str:
    """A pipe table with the caption as a bold first line, and the paired p-values in a second table.

    Parameters
    ----------
    df, caption:
        A table from one of the ``table*`` functions and its caption.
    """
    lines = [f"**{caption}**", "", *_markdown_rows(display_table(df))]
    pvalues = pvalue_table(df)
    if pvalues is not None:
        lines += ["", f"*{PVALUE_NOTE}*", "", *_markdown_rows(pvalues)]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "_": r"\_",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _latex_escape(text: str) -> str:
    """Escape LaTeX special characters in one pass, so replacements are not escaped again."""
    return re.sub(r"[\\&%_#${}~^]", lambda m: _LATEX_SPECIAL[m.group(0)], text)


def _latex_cell(text: str) -> str:
    """Escape a cell, then typeset ± and < in math mode (text-mode glyphs depend on the font encoding)."""
    return _latex_escape(text).replace("±", "$\\pm$").replace("<", "$<$")


def _latex_tabular(cells: pd.DataFrame) -> list[str]:
    """A booktabs ``tabular`` of formatted cells (text columns left, numbers right)."""
    align = "".join("l" if c in ("data", "model", "comparison") else "r" for c in cells.columns)
    lines = [
        f"\\begin{{tabular}}{{{align}}}",
        "\\toprule",
        " & ".join(_latex_cell(c) for c in cells.columns) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(_latex_cell(str(v)) for v in row) + " \\\\" for row in cells.to_numpy()]
    return [*lines, "\\bottomrule", "\\end{tabular}"]


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """A ``table`` environment with booktabs ``tabular``s (needs ``\\usepackage{booktabs}``).

    Parameters
    ----------
    df, caption:
        A table from one of the ``table*`` functions and its caption.
    label:
        The ``\\label`` key.
    """
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\scriptsize",
        f"\\caption{{{_latex_cell(caption)}}}",
        f"\\label{{{label}}}",
        *_latex_tabular(display_table(df)),
    ]
    pvalues = pvalue_table(df)
    if pvalues is not None:
        lines += ["", "\\medskip", "", _latex_cell(PVALUE_NOTE), "", *_latex_tabular(pvalues)]
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def _integer_counts(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with count columns as nullable integers, so the CSV reads ``3`` rather than ``3.0``."""
    out = df.copy()
    counts = (*COUNT_COLUMNS, "client iterations", "rounds", "total iterations")
    for column in out.columns:
        if column in counts or column.endswith(" n"):
            values = pd.to_numeric(out[column], errors="coerce")
            if (values.dropna() == values.dropna().round()).all():
                out[column] = values.round().astype("Int64")
    return out


def write_table(df: pd.DataFrame, stem: str | os.PathLike[str], caption: str) -> list[Path]:
    """Write ``{stem}.csv`` (numbers, '-' when missing), ``{stem}.md`` and ``{stem}.tex``, each atomically.

    Parameters
    ----------
    df:
        A table from one of the ``table*`` functions.
    stem:
        Output path without suffix, e.g. ``results/paper/table2``.
    caption:
        Caption for Markdown and LaTeX.
    """
    stem = Path(stem)
    paths = [stem.with_suffix(s) for s in (".csv", ".md", ".tex")]
    with atomic_path(paths[0]) as tmp:
        _integer_counts(df).to_csv(tmp, index=False, na_rep=MISSING)
    write_text(paths[1], to_markdown(df, caption))
    write_text(paths[2], to_latex(df, caption, label=f"tab:{stem.name}"))
    return paths


CONVENTION_TEXT = {
    "max": "the larger of the two directed 95th percentiles of surface distances (MONAI / DeepMind "
    "surface-distance convention)",
    "pooled": "the 95th percentile of both directions' surface distances pooled (medpy convention)",
}


def caption_note(convention: str) -> str:
    """The sentence every caption ends with: what DC and HD95 are, the HD95 convention and the penalty.

    Parameters
    ----------
    convention:
        The HD95 convention of the metrics (``max`` or ``pooled``).
    """
    return (
        "DC: Dice; HD95 (mm, original spacing): "
        f"{CONVENTION_TEXT[check_convention(convention)]}; both averaged over test cases (± sample SD over "
        "cases where shown). A missed organ "
        "(reference present, prediction empty) or a spurious one (reference empty, prediction present) "
        "counts in both means with Dice 0 and HD95 = the image diagonal in mm; 'missed' and 'spurious' "
        "count such (case, organ) pairs per row; an organ absent from both masks has Dice 1 and no HD95. "
        "'-': not run."
    )


def make_tables(
    metrics_csvs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    central_losses: Sequence[str],
    margexc: str,
    default_losses: str,
    settings: Mapping[str, Mapping[str, int]],
    default_setting: str,
    modes: Sequence[str],
    benchmarks: Mapping[str, Sequence[str | os.PathLike[str]]] | None = None,
    hd95_convention: str = DEFAULT_HD95,
    budgets: Mapping[str, Any] | None = None,
    baselines: Sequence[str] = ("panns", "pipo"),
) -> list[Path]:
    """Build Tables 2-6 from the metrics CSVs and write ``{out_dir}/table{2..6}.{csv,md,tex}``.

    Parameters
    ----------
    metrics_csvs:
        All ``results/{model}/{site}/metrics.csv`` available (missing ones give '-' rows).
    out_dir:
        ``results/paper``.
    central_losses, margexc, default_losses:
        Config ``losses.central``, ``losses.margexc``, ``losses.default``.
    settings, default_setting:
        Config ``federated.settings`` and ``federated.default``.
    modes:
        Config ``adaptation.modes``.
    benchmarks:
        Setting name or model id -> benchmark files of the jobs that trained it (Table 5's time).
    hd95_convention:
        Config ``evaluation.hd95``; the metrics must have been computed with it (:func:`checked_convention`).
    budgets:
        ``pretrain`` and ``central`` iterations (:class:`fedpsmos.budgets.Budgets` as a dict) for Table 5.
    baselines:
        Config ``baselines.methods`` (Table 3's PaNN and PIPO rows).
    """
    metrics = read_metrics(metrics_csvs, require_flags=True)
    note = caption_note(checked_convention(metrics, hd95_convention))
    out = Path(out_dir)
    ran = ", ".join(loss_label(c) for c in central_losses)
    tables = [
        (
            "table2",
            table2_losses(metrics, central_losses),
            f"Table 2. Loss-combination ablation of the central (non-FL) model; combinations run: {ran}. "
            f"{note}",
        ),
        (
            "table3",
            table3_margexc(
                metrics,
                margexc=margexc,
                default_losses=default_losses,
                default_setting=default_setting,
                modes=modes,
                baselines=baselines,
            ),
            "Table 3. Methods for partially labelled data trained centrally on the pooled sites with the "
            "central model's budget: PaNN (prior-aware KL) and PIPO (pyramid input/output network), "
            f"MargExc-style {loss_label(margexc)}; against {loss_label(default_losses)} (central), "
            f"federated ({default_setting}) and the best adaptation mode. {note}",
        ),
        (
            "table4",
            table4_federated(metrics, default_losses=default_losses, default_setting=default_setting),
            f"Table 4. Federated ({default_setting}) against M0 (pretrained on site 1 only), the central "
            f"upper bound and site-alone models. {note} Under the table: paired Wilcoxon p of M0 and site "
            "alone vs federated.",
        ),
        (
            "table5",
            table5_settings(
                metrics,
                settings=settings,
                default_losses=default_losses,
                benchmarks=benchmarks or {},
                pretrain_iterations=None if budgets is None else int(budgets["pretrain"]),
                central_iterations=None if budgets is None else int(budgets["central"]),
            ),
            "Table 5. Federated settings: client iterations x rounds; total iterations: each site's local "
            "iterations after M0 (the non-FL row: the central model's after M0), with M0: plus M0's; "
            "mean over all sites and organs; training time: sum of the Snakemake benchmark times of the "
            f"jobs that trained the model after M0. {note}",
        ),
        (
            "table6",
            table6_adaptation(metrics, default_setting=default_setting, modes=modes),
            f"Table 6. Site adaptation of the federated model ({default_setting}): all layers, decoder only, "
            f"encoder only, each site's own model on its own test cases. {note} Under the table: paired "
            "Wilcoxon p of each mode vs federated.",
        ),
    ]
    paths: list[Path] = []
    for stem, df, caption in tables:
        paths += write_table(df, out / stem, caption)
    return paths
