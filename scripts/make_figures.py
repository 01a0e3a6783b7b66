"""Snakemake entry point of rule make_figures: metrics, predictions and curves -> results/paper/fig_*.png."""

import logging
import sys
from pathlib import Path

from fedpsmos.paper.figures import make_figures
from fedpsmos.paper.qualitative import models_from_prediction_dirs


def main(snakemake) -> None:
    """Dice per organ, qualitative overlays, training and federated curves."""
    written = make_figures(
        list(snakemake.input.metrics),
        Path(snakemake.output[0]).parent,
        curves=list(snakemake.input.get("curves", [])),
        federated_curves=list(snakemake.input.get("federated_curves", [])),
        manifests=list(snakemake.input.manifests),
        qualitative_models=list(snakemake.params.qualitative_models)
        or models_from_prediction_dirs(list(snakemake.input.get("predictions", []))),
    )
    missing = {str(p) for p in snakemake.output} - {str(p) for p in written}
    if missing:
        raise RuntimeError(f"make_figures did not write {sorted(missing)}")


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
