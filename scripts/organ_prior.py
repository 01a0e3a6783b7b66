"""Snakemake entry point of rule organ_prior: PaNN's organ-size prior from site 1's training patches."""

import logging
import sys

from fedpsmos.losses.prior_aware import prior_from_site, write_prior


def main(snakemake) -> None:
    """Estimate the class fractions of site 1's training patches and write ``output.prior``."""
    site = snakemake.params.site
    prior = prior_from_site(
        site["manifest"],
        site["npz_dir"],
        site["patches"],
        patch_size=[int(p) for p in snakemake.params.patch_size],
        n_patches=int(snakemake.params.patches),
        seed=int(snakemake.params.seed),
    )
    write_prior(snakemake.output.prior, prior, site=site["site"], patches=int(snakemake.params.patches))
    logging.info("%s: organ-size prior %s", site["site"], [round(float(p), 5) for p in prior])


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
