"""Snakemake entry point: a PNG of a site's slices with its labels overlaid (fedpsmos.data.preview)."""

import contextlib
import sys

from fedpsmos.data.preview import plot_site


def main(smk) -> None:
    """Wire ``input.manifest`` and ``output.png`` to :func:`plot_site`."""
    log = smk.log[0] if smk.log else None
    with (
        open(log, "w") if log else contextlib.nullcontext(sys.stderr) as err,
        contextlib.redirect_stderr(err),
    ):
        plot_site(smk.input.manifest, smk.output.png)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
