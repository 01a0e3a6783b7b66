"""Snakemake entry point of rule make_synthetic_site: one synthetic site's nnU-Net raw folder."""

import logging
import sys

from fedpsmos.data.synthetic import write_site


def main(snakemake) -> None:
    """Write ``output.root`` from the site's synthetic spec and label map."""
    params = snakemake.params
    cases = write_site(
        snakemake.output.root,
        site=params.site,
        spec=dict(params.spec),
        labels=dict(params.labels),
        seed=int(params.seed),
    )
    logging.info("%s: wrote %d synthetic cases to %s", params.site, len(cases), snakemake.output.root)


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
