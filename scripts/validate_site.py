"""Snakemake entry point of rule validate_site: validate a site's cases, split them, write its manifest."""

import logging
import sys

from fedpsmos.data.validation import build_manifest


def main(snakemake) -> None:
    """Validate every case of the site and write ``output.manifest`` (nothing is written if a case is bad)."""
    params = snakemake.params
    manifest = build_manifest(
        snakemake.output.manifest,
        site=params.site,
        source=params.source,
        root=params.root,
        labels=dict(params.labels),
        test_fraction=float(params.test_fraction),
        seed=int(params.seed),
    )
    train, test = len(manifest["train"]), len(manifest["test"])
    logging.info("%s: %d train, %d test cases", manifest["site"], train, test)


if "snakemake" in globals():
    # The log gets everything, an uncaught error's one-line message and traceback included.
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
