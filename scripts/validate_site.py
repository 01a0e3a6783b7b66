"""Snakemake entry point of rule validate_site: validate a site's cases, split them, write its manifest."""

import logging
import sys

from fedpsmos.data.validation import SplitSettings, build_manifest


def main(snakemake) -> None:
    """Validate every case of the site and write ``output.manifest`` (nothing is written if a case is bad)."""
    params = snakemake.params
    manifest = build_manifest(
        snakemake.output.manifest,
        site=params.site,
        source=params.source,
        root=params.root,
        labels=dict(params.labels),
        background=params.background,  # values, dataset.json names or "rest"; None
        ignore=params.ignore,
        files=params.files,  # path templates of a `files` source; None
        split=SplitSettings.from_config(dict(params.split)),
        seed=int(params.seed),
    )
    train, validation, test = (len(manifest[k]) for k in ("train", "validation", "test"))
    logging.info("%s: %d train, %d validation, %d test cases", manifest["site"], train, validation, test)


if "snakemake" in globals():
    # The log gets everything, an uncaught error's one-line message and traceback included.
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
