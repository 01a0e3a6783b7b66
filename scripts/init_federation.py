"""Snakemake entry point of rule init_federation: M0 -> results/federated/{setting}/round_0/global.pt."""

import logging
import sys

from fedpsmos.federated.rounds import init_global
from fedpsmos.preprocessing.fingerprint import read_settings


def main(snakemake) -> None:
    """Write round 0's global model from the pretrained model."""
    init_global(
        snakemake.input.model,
        snakemake.output.global_model,
        preprocessing=read_settings(snakemake.input.settings),
        patch_size=[int(p) for p in snakemake.params.patch_size],
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
