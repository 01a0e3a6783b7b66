"""Snakemake entry point of rule train_site_round: one site's local round -> round_{r}/{site}.pt + private.

The rule gives this site's files only (manifest, training cases, patch index) plus the previous global model
and the site's own private state; ``input.private`` is ``""`` (or absent) in round 1.
"""

import logging
import sys

import torch

from fedpsmos.federated.site_round import run_site_round_job


def main(snakemake) -> None:
    """Train the rule's site for one round from the previous global model."""
    torch.set_num_threads(max(1, int(snakemake.threads)))  # the cores the rule was given, no more
    params = snakemake.params
    private = snakemake.input.get("private", "") or ""
    run_site_round_job(
        global_path=snakemake.input.global_model,
        private_in=str(private),
        site=str(params.site),
        manifest=snakemake.input.manifest,
        cases=list(snakemake.input.cases),
        patches=snakemake.input.patches,
        loss_spec=params.loss,
        training=dict(params.training),
        patch_size=[int(s) for s in params.patch_size],
        local_iterations=int(params.local_iterations),
        round_index=int(params.round),
        seed=int(params.seed),
        attempts=int(params.attempts),
        on_site_failure=str(params.on_site_failure),
        out_site=snakemake.output.site_model,
        out_private=snakemake.output.private,
        threads=int(snakemake.threads),  # training.workers: auto -> on a GPU, threads - 1 batch workers
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
