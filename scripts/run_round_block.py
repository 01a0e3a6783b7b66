"""Snakemake entry point of rule run_round_block: rounds first..last in one job, one worker process per site.

Inputs: the previous block's record (or round 0's global model), every site's manifest, patch index and
preprocessed cases (each site's worker reads only its own). Every round's site, global, record and private
files are written as the rounds complete; the block's own record is written last, so a killed block resumes
after its last complete round.
"""

import logging
import sys

from fedpsmos.atomic import write_json
from fedpsmos.federated.blocks import run_block_job


def main(snakemake) -> None:
    """Run the block's rounds (resuming after the last complete one) and record them."""
    params = snakemake.params
    records = run_block_job(
        previous_global=params.global_model,
        sites=[str(s) for s in params.sites],
        manifests=list(snakemake.input.manifests),
        cases=list(params.cases),
        patches=list(snakemake.input.patches),
        first_round=int(params.rounds["first_round"]),
        last_round=int(params.rounds["last_round"]),
        local_iterations=int(params.local_iterations),
        loss_spec=params.loss,
        training=dict(params.training),
        patch_size=[int(s) for s in params.patch_size],
        seed=int(params.seed),
        attempts=int(params.attempts),
        on_site_failure=str(params.on_site_failure),
        threads_per_worker=max(1, int(snakemake.threads) // max(1, len(params.sites))),
    )
    write_json(snakemake.output.block, {"rounds": params.rounds, "records": records})


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
