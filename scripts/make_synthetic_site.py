"""Snakemake entry point: write one synthetic site's nnU-Net raw folder (synthetic.write_site)."""

import contextlib
import sys

from fedpsmos.data.synthetic import write_site


def main(smk) -> None:
    """Wire ``output.root`` and ``params`` (site, spec, labels, seed) to :func:`write_site`."""
    log = smk.log[0] if smk.log else None
    with (
        open(log, "w") if log else contextlib.nullcontext(sys.stderr) as err,
        contextlib.redirect_stderr(err),
    ):
        cases = write_site(
            smk.output.root,
            site=smk.params.site,
            spec=dict(smk.params.spec),
            labels=dict(smk.params.labels),
            seed=int(smk.params.seed),
        )
        print(f"{smk.params.site}: wrote {len(cases)} synthetic cases to {smk.output.root}", file=sys.stderr)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
