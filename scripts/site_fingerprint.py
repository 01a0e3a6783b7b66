"""Snakemake entry point of rule site_fingerprint: a site manifest -> results/data/{site}/fingerprint.json."""

import sys

from fedpsmos.preprocessing.fingerprint import write_site_fingerprint


def main(snakemake) -> None:
    """Summarise the site's training and validation cases (no voxel leaves the site)."""
    write_site_fingerprint(snakemake.input.manifest, snakemake.output.fingerprint)


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    main(snakemake)  # noqa: F821
