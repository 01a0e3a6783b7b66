"""Snakemake entry point of rule evaluate_site: predictions + the site's raw labels -> metrics.csv."""

import logging
import sys

from fedpsmos.evaluation.evaluate import evaluate_site


def main(snakemake) -> None:
    """Dice, HD95 and missed/spurious flags per test case and labelled organ."""
    evaluate_site(
        predictions_dir=snakemake.input.predictions,
        manifest_path=snakemake.input.manifest,
        model=str(snakemake.params.model),
        site=str(snakemake.params.site),
        out_csv=snakemake.output.metrics,
        hd95_convention=str(snakemake.params.hd95),
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
