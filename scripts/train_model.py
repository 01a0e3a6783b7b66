"""Snakemake entry point of the training rules: train one model (pretrain, central, site_alone or adapted).

The rule's params are plain data (see :func:`fedpsmos.training.run.train_from_params`); outputs are the model
checkpoint and its training curve.
"""

import logging
import sys

from fedpsmos.training.run import train_from_params


def main(snakemake) -> None:
    """Train the model described by the rule's params."""
    train_from_params(
        dict(snakemake.params.items()),
        {
            "model": snakemake.output.model,
            "curve_csv": snakemake.output.curve_csv,
            "curve_png": snakemake.output.curve_png,
        },
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    main(snakemake)  # noqa: F821
