"""Snakemake entry point of rule aggregate_round: the sites' round files -> round_{r}/global.pt + record.json.

Its inputs are model files only (the previous global model and every site's ``round_{r}/{site}.pt``): the
aggregator never sees a site's data or private state.
"""

import logging
import sys

import torch

from fedpsmos.federated.aggregation import aggregate_round


def main(snakemake) -> None:
    """FedAvg the round's site models."""
    torch.set_num_threads(max(1, int(snakemake.threads)))  # the cores the rule was given, no more
    aggregate_round(
        previous_global=snakemake.input.previous_global,
        site_paths=list(snakemake.input.sites),
        out_global=snakemake.output.global_model,
        out_record=snakemake.output.record,
        round_index=int(snakemake.params.round),
        policy=str(snakemake.params.policy),
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
