"""The paper's Tables 2-6 from the workflow's metrics CSVs, as CSV, Markdown and LaTeX.

Every table reports per organ the mean Dice (DC) and HD95 (mm) over test cases, and their mean over organs,
separately for the fully labelled site(s) (all five organs) and the partially labelled sites (each scored on
the organs it labels), as the paper's tables do. Dice averages every case; HD95 averages the cases where it
is defined (NaN, an empty prediction or reference, is skipped: :mod:`fedpsmos.evaluation.metrics`). A model
that has not been run gives a row of '-', as in the paper, never an error.

- Table 2: loss-combination ablation of the central model (``central/{losses}``).
- Table 3: the MargExc-style Dice+CE combination against the default combination, federated and adapted.
- Table 4: federated against central (upper bound) and site-alone models.
- Table 5: federated settings (client iterations x rounds), total iterations and training time.
- Table 6: the adaptation modes against the federated model they start from.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedpsmos.atomic import atomic_path, write_text
from fedpsmos.evaluation.evaluate import COLUMNS
from fedpsmos.organs import ORGANS
from fedpsmos.paper.models import loss_label, model_name

MISSING = "-"


def read_metrics(paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """Concatenate metrics CSVs (columns ``model, site, case, organ, dice, hd95``); missing files are skipped.

    Parameters
    ----------
    paths:
        ``results/{model}/{site}/metrics.csv`` files.
    """
    frames = []
    for path in paths:
        if not Path(path).is_file():
            continue
        frame = pd.read_csv(path)
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: metrics CSV lacks columns {missing}")
        frames.append(frame[list(COLUMNS)])
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c in ("dice", "hd95") else object) for c in COLUMNS})
    return pd.concat(frames, ignore_index=True)


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


def organ_columns() -> list[str]:
    """Column names of a results block: ``{organ} DC``, ``{organ} HD95`` per organ, then the means."""
    return [f"{o} {m}" for o in (*ORGANS, "mean") for m in ("DC", "HD95")]


def results_row(metrics: pd.DataFrame, model_id: str, sites: Sequence[str]) -> dict[str, float]:
    """Mean DC and HD95 per organ of one model over the test cases of ``sites``, and their mean over organs.

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
    out: dict[str, float] = {c: math.nan for c in organ_columns()}
    for organ in ORGANS:
        cases = rows[rows["organ"] == organ]
        if len(cases):
            out[f"{organ} DC"] = float(cases["dice"].mean())
            hd = cases["hd95"].dropna()
            out[f"{organ} HD95"] = float(hd.mean()) if len(hd) else math.nan
    for metric in ("DC", "HD95"):
        values = [out[f"{o} {metric}"] for o in ORGANS if not math.isnan(out[f"{o} {metric}"])]
        out[f"mean {metric}"] = float(np.mean(values)) if values else math.nan
    return out


def results_table(
    metrics: pd.DataFrame, rows: Sequence[tuple[str, str]], full_sites: Sequence[str] | None = None
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
    """
    full = list(full_sites) if full_sites is not None else fully_labelled_sites(metrics)
    partial = sorted(s for s in metrics["site"].unique() if s not in full)
    blocks = [(f"{', '.join(full)} (fully labelled)", full)]
    blocks.append((f"{', '.join(partial) or 'none'} (partially labelled, own organs)", partial))
    records = []
    for block, sites in blocks:
        for name, model_id in rows:
            records.append({"data": block, "model": name, **results_row(metrics, model_id, sites)})
    return pd.DataFrame(records, columns=["data", "model", *organ_columns()])


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
    metrics: pd.DataFrame, *, margexc: str, default_losses: str, default_setting: str, modes: Sequence[str]
) -> pd.DataFrame:
    """Table 3: MargExc-style Dice+CE central model vs the default combination, federated and best adaptation.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    margexc, default_losses:
        Loss combination names (config ``losses.margexc`` and ``losses.default``).
    default_setting:
        Federated setting compared (config ``federated.default``).
    modes:
        Adaptation modes; the best by mean Dice is shown.
    """
    best = best_adaptation_mode(metrics, modes)
    rows = [
        (f"MargExc-style losses: {model_name(f'central/{margexc}')}", f"central/{margexc}"),
        (model_name(f"central/{default_losses}"), f"central/{default_losses}"),
        (model_name(f"federated/{default_setting}"), f"federated/{default_setting}"),
        (f"{model_name(f'adapted/{best}')} (best mode)", f"adapted/{best}")
        if best
        else ("FL + adaptation (best mode)", "adapted/none"),
    ]
    return results_table(metrics, rows)


def table4_federated(metrics: pd.DataFrame, *, default_losses: str, default_setting: str) -> pd.DataFrame:
    """Table 4: central upper bound vs site-alone models vs the federated model.

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    default_losses, default_setting:
        The central loss combination and the federated setting compared.
    """
    ids = [f"central/{default_losses}", "site_alone", f"federated/{default_setting}"]
    return results_table(metrics, [(model_name(i), i) for i in ids])


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
) -> pd.DataFrame:
    """Table 5: federated settings at equal total iterations, with their mean results and training time.

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
    """
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
                "mean DC": row["mean DC"],
                "mean HD95": row["mean HD95"],
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
            "total iterations": None,
            "mean DC": row["mean DC"],
            "mean HD95": row["mean HD95"],
            "training time (h)": benchmark_seconds(benchmarks.get(central, [])) / 3600,
        }
    )
    return pd.DataFrame(records)


def table6_adaptation(metrics: pd.DataFrame, *, default_setting: str, modes: Sequence[str]) -> pd.DataFrame:
    """Table 6: the federated model and its adaptation to each site with each mode (per-site models).

    Parameters
    ----------
    metrics:
        Concatenated metrics.
    default_setting:
        The federated setting adapted.
    modes:
        Adaptation modes (config ``adaptation.modes``).
    """
    ids = [f"federated/{default_setting}", *(f"adapted/{m}" for m in modes)]
    return results_table(metrics, [(model_name(i), i) for i in ids])


def _format(column: str, value: object) -> str:
    """Paper-style cell: DC to 3 decimals, HD95 to 2, times to 3 significant digits, '-' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float | np.floating):
        if column.endswith("DC"):
            return f"{value:.3f}"
        if column.endswith("HD95"):
            return f"{value:.2f}"
        if value == int(value) and "time" not in column:
            return str(int(value))
        return f"{value:.3g}"
    return str(value)


def format_table(df: pd.DataFrame) -> pd.DataFrame:
    """The table with every cell formatted as a string (:func:`_format`).

    Parameters
    ----------
    df:
        A table from one of the ``table*`` functions.
    """
    return pd.DataFrame({c: [_format(c, v) for v in df[c].astype(object)] for c in df.columns})


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


def to_markdown(df: pd.DataFrame, caption: str) -> str:
    """A pipe table with the caption as a bold first line.

    Parameters
    ----------
    df, caption:
        The formatted table and its caption.
    """
    cells = format_table(df)
    lines = [f"**{caption}**", "", "| " + " | ".join(cells.columns) + " |"]
    lines.append("|" + "|".join("---" if c in ("data", "model") else "---:" for c in cells.columns) + "|")
    lines += ["| " + " | ".join(str(v).replace("|", r"\|") for v in row) + " |" for row in cells.to_numpy()]
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """A ``table`` environment with a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``).

    Parameters
    ----------
    df, caption:
        The formatted table and its caption.
    label:
        The ``\\label`` key.
    """
    cells = format_table(df)
    align = "".join("l" if c in ("data", "model") else "r" for c in cells.columns)
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\scriptsize",
        f"\\caption{{{_latex_escape(caption)}}}",
        f"\\label{{{label}}}",
        f"\\begin{{tabular}}{{{align}}}",
        "\\toprule",
        " & ".join(_latex_escape(c) for c in cells.columns) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(_latex_escape(str(v)) for v in row) + " \\\\" for row in cells.to_numpy()]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


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
        df.to_csv(tmp, index=False, na_rep=MISSING)
    write_text(paths[1], to_markdown(df, caption))
    write_text(paths[2], to_latex(df, caption, label=f"tab:{stem.name}"))
    return paths


NOTE = (
    "DC: mean Dice over test cases; HD95: mean 95th-percentile Hausdorff distance in mm, original spacing, "
    "over cases where both masks are non-empty; '-': not run."
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
    """
    metrics = read_metrics(metrics_csvs)
    out = Path(out_dir)
    ran = ", ".join(loss_label(c) for c in central_losses)
    tables = [
        (
            "table2",
            table2_losses(metrics, central_losses),
            f"Table 2. Loss-combination ablation of the central (non-FL) model; combinations run: {ran}. "
            f"{NOTE}",
        ),
        (
            "table3",
            table3_margexc(
                metrics,
                margexc=margexc,
                default_losses=default_losses,
                default_setting=default_setting,
                modes=modes,
            ),
            f"Table 3. MargExc-style {loss_label(margexc)} against {loss_label(default_losses)} (central), "
            f"federated ({default_setting}) and the best adaptation mode. {NOTE}",
        ),
        (
            "table4",
            table4_federated(metrics, default_losses=default_losses, default_setting=default_setting),
            f"Table 4. Federated ({default_setting}) against the central upper bound and site-alone models. "
            f"{NOTE}",
        ),
        (
            "table5",
            table5_settings(
                metrics, settings=settings, default_losses=default_losses, benchmarks=benchmarks or {}
            ),
            "Table 5. Federated settings: client iterations x rounds, mean over all sites and organs, and "
            "total "
            f"training time (sum of the Snakemake benchmark times of the training jobs). {NOTE}",
        ),
        (
            "table6",
            table6_adaptation(metrics, default_setting=default_setting, modes=modes),
            f"Table 6. Site adaptation of the federated model ({default_setting}): all layers, decoder only, "
            f"encoder only, each site's own model on its own test cases. {NOTE}",
        ),
    ]
    paths: list[Path] = []
    for stem, df, caption in tables:
        paths += write_table(df, out / stem, caption)
    return paths
