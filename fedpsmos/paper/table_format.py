"""How a paper table is shown: CSV (numbers, '-' when missing), Markdown and LaTeX, each written atomically.

Markdown and LaTeX show DC to 3 decimals and HD95 to 2, ``mean ± sd`` cells (the CSV keeps the ``_sd``
columns), and the paired Wilcoxon p-values (:mod:`fedpsmos.paper.paired_tests`) with their number of pairs in
a second block under the table.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from fedpsmos.atomic import atomic_path, write_text
from fedpsmos.organs import ORGANS
from fedpsmos.paper.paired_tests import MIN_PAIRS, PVALUE_NOTE, VERSUS, pvalue_columns
from fedpsmos.paper.results import COUNT_COLUMNS, SD

MISSING = "-"


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
        A table (:mod:`fedpsmos.paper.tables`).
    """
    return pd.DataFrame({c: [_format(c, v) for v in df[c].astype(object)] for c in df.columns})


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """The table as shown in Markdown and LaTeX: ``mean ± sd`` cells, without the paired-test columns.

    Parameters
    ----------
    df:
        A table (:mod:`fedpsmos.paper.tables`).
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
        A table (:mod:`fedpsmos.paper.tables`).
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


def to_markdown(df: pd.DataFrame, caption: str) -> str:
    """A pipe table with the caption as a bold first line, and the paired p-values in a second table.

    Parameters
    ----------
    df, caption:
        A table (:mod:`fedpsmos.paper.tables`) and its caption.
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
        A table (:mod:`fedpsmos.paper.tables`) and its caption.
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
        A table (:mod:`fedpsmos.paper.tables`).
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
