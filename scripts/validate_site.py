"""Snakemake entry point: validate a site's cases, split them, write its manifest (validation)."""

import contextlib
import sys

from fedpsmos.data.validation import build_manifest


def main(smk) -> None:
    """Wire ``output.manifest`` and ``params`` (site, source, root, labels, test_fraction, seed) to
    :func:`build_manifest`."""
    log = smk.log[0] if smk.log else None
    with (
        open(log, "w") if log else contextlib.nullcontext(sys.stderr) as err,
        contextlib.redirect_stderr(err),
    ):
        manifest = build_manifest(
            smk.output.manifest,
            site=smk.params.site,
            source=smk.params.source,
            root=smk.params.root,
            labels=dict(smk.params.labels),
            test_fraction=float(smk.params.test_fraction),
            seed=int(smk.params.seed),
        )
        print(
            f"{manifest['site']}: {len(manifest['train'])} train, {len(manifest['test'])} test cases",
            file=sys.stderr,
        )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
