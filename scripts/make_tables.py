"""Snakemake entry point of rule make_tables: all metrics CSVs + benchmarks -> results/paper/table{2..6}.*."""

import logging
import sys
from pathlib import Path

from fedpsmos.paper.tables import make_tables


def main(snakemake) -> None:
    """Build Tables 2-6 as CSV, Markdown and LaTeX."""
    written = make_tables(
        list(snakemake.input.metrics),
        Path(snakemake.output[0]).parent,
        central_losses=list(snakemake.params.central_losses),
        margexc=str(snakemake.params.margexc),
        default_losses=str(snakemake.params.default_losses),
        settings={k: dict(v) for k, v in dict(snakemake.params.settings).items()},
        default_setting=str(snakemake.params.default_setting),
        modes=list(snakemake.params.modes),
        benchmarks={k: list(v) for k, v in dict(snakemake.params.benchmarks).items()},
        hd95_convention=str(snakemake.params.hd95),
        budgets=dict(snakemake.params.budgets),
        baselines=list(snakemake.params.baselines),
    )
    missing = {str(p) for p in snakemake.output} - {str(p) for p in written}
    if missing:
        raise RuntimeError(
            f"make_tables did not write {sorted(missing)} (out_dir {Path(Path(snakemake.output[0]).parent)})"
        )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
