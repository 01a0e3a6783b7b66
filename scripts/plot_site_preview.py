"""Snakemake entry point of rule plot_site_preview: a PNG of a site's slices with its labels overlaid."""

import logging
import sys

from fedpsmos.data.preview import plot_site


def main(snakemake) -> None:
    """Plot a few axial slices of the site's cases to ``output.png``."""
    plot_site(snakemake.input.manifest, snakemake.output.png)


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
