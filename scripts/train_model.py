"""Snakemake entry point of the training rules: train one model (pretrain, central, site_alone or adapted).

The rule's params are plain data (see :func:`fedpsmos.training.run.train_from_params`); outputs are the model
checkpoint and its training curve.
"""

import logging
import sys

import torch

from fedpsmos.training.run import train_from_params


def main(snakemake) -> None:
    """Train the model described by the rule's params."""
    torch.set_num_threads(max(1, int(snakemake.threads)))  # the cores the rule was given, no more
    train_from_params(
        # The initial weights are an input (M0 or the federated model), or none for training from scratch.
        {**dict(snakemake.params.items()), "init": snakemake.input.get("init", "")},
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
