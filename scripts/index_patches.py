"""Snakemake entry point of rule index_patches: a site's train cases -> results/patches/{site}.parquet."""

import sys

from fedpsmos.patches import index_site


def main(snakemake) -> None:
    """Index the rule's site with the rule's params."""
    params = snakemake.params
    index_site(
        snakemake.input.manifest,
        list(snakemake.input.cases),
        snakemake.output.index,
        patch_size=[int(s) for s in params.patch_size],
        min_fraction=float(params.min_fraction),
        candidates_per_case=int(params.candidates_per_case),
        seed=int(params.seed),
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    main(snakemake)  # noqa: F821
