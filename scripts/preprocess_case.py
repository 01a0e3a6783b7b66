"""Snakemake entry point of rule preprocess_case: one case -> results/preprocessed/{site}/{case}.b2zip."""

import sys

from fedpsmos.preprocessing.case import preprocess_manifest_case
from fedpsmos.preprocessing.fingerprint import read_settings


def main(snakemake) -> None:
    """Preprocess the rule's case (looked up in the manifest) with the resolved preprocessing settings."""
    params = snakemake.params
    settings = read_settings(snakemake.input.settings)  # rule preprocessing_settings: `auto` resolved
    preprocess_manifest_case(
        snakemake.input.manifest,
        str(params.case),
        snakemake.output.case,
        spacing=[float(s) for s in settings["spacing"]],
        image_order=int(settings["image_order"]),
        clip=[float(c) for c in settings["clip"]],
        mean=float(settings["mean"]),
        std=float(settings["std"]),
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    main(snakemake)  # noqa: F821
