"""Snakemake entry point of rule finalise_federation: last global model -> the federated model + curves."""

import logging
import sys

from fedpsmos.federated.curves import finalise_federation
from fedpsmos.preprocessing.fingerprint import read_settings


def main(snakemake) -> None:
    """Write the federated model and its per-round curves."""
    finalise_federation(
        last_global=snakemake.params.global_model,
        records=list(snakemake.params.records),
        out_model=snakemake.output.model,
        out_curve_csv=snakemake.output.csv,
        out_curve_png=snakemake.output.png,
        setting=str(snakemake.params.setting),
        preprocessing=read_settings(snakemake.input.settings),
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
