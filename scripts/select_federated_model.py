"""Snakemake entry point of rule select_federated_model: a site's last private state -> its selected model."""

import logging
import sys

from fedpsmos.federated.site_selection import write_selected_model
from fedpsmos.preprocessing.fingerprint import read_settings


def main(snakemake) -> None:
    """Write the site's locally selected model (the final global model when it had no validation cases)."""
    params = snakemake.params
    write_selected_model(
        private_state=params.private,
        last_global=params.global_model,
        out_model=snakemake.output.model,
        site=str(params.site),
        setting=str(params.setting),
        preprocessing=read_settings(snakemake.input.settings),
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
