"""Snakemake entry point of rule merge_fingerprints: site fingerprints -> results/data/fingerprint.json."""

import sys

from fedpsmos.preprocessing.fingerprint import write_merged_fingerprint


def main(snakemake) -> None:
    """Merge the site summaries into the federation's median spacing, percentiles, mean and std."""
    write_merged_fingerprint(list(snakemake.input.sites), snakemake.output.fingerprint)


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    main(snakemake)  # noqa: F821
