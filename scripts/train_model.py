"""Snakemake entry point of the training rules: train one model (pretrain, central, baseline,
site_alone or adapted).

The rule's params are plain data (see :func:`fedpsmos.training.run.train_from_params`); outputs are the model
checkpoint and its training curve.
"""

import logging
import sys

import torch

from fedpsmos.losses.prior_aware import read_prior
from fedpsmos.preprocessing.fingerprint import read_settings
from fedpsmos.training.run import train_from_params


def main(snakemake) -> None:
    """Train the model described by the rule's params."""
    torch.set_num_threads(max(1, int(snakemake.threads)))  # the cores the rule was given, no more
    loss = dict(snakemake.params.loss)
    if "prior" in snakemake.input.keys():  # PaNN: the organ-size prior the organ_prior rule estimated
        loss["prior_aware"] = {**loss["prior_aware"], "prior": read_prior(snakemake.input.prior)}
    train_from_params(
        # The initial weights are an input (M0 or the federated model), or none for training from scratch;
        # the resolved preprocessing settings go into the checkpoint's meta (fedpsmos predict reads them).
        {
            **dict(snakemake.params.items()),
            "loss": loss,
            "init": snakemake.input.get("init", ""),
            "preprocessing": read_settings(snakemake.input.settings),
            "threads": int(snakemake.threads),  # training.workers: auto -> threads - 1 batch workers
        },
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
