"""Snakemake entry point of rule preprocess_case: one case -> results/preprocessed/{site}/{case}.npz."""

import sys

from fedpsmos.preprocessing.case import preprocess_manifest_case


def main(snakemake) -> None:
    """Preprocess the rule's case (looked up in the manifest) with the rule's params."""
    params = snakemake.params
    preprocess_manifest_case(
        snakemake.input.manifest,
        str(params.case),
        snakemake.output.npz,
        labels={organ: [int(v) for v in values] for organ, values in dict(params.labels).items()},
        spacing=[float(s) for s in params.spacing],
        image_order=int(params.image_order),
        clip=[float(c) for c in params.clip],
        mean=float(params.mean),
        std=float(params.std),
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    main(snakemake)  # noqa: F821
