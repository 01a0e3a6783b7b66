"""Snakemake entry point of rule predict_site: a model + a site's test cases -> predictions/{case}.nii.gz."""

import logging
import sys
from pathlib import Path

import torch

from fedpsmos.inference.predict import predict_site


def main(snakemake) -> None:
    """Predict the site's test cases in their original geometry."""
    torch.set_num_threads(max(1, int(snakemake.threads)))  # the cores the rule was given, no more
    predict_site(
        model_path=snakemake.input.model,
        manifest_path=snakemake.input.manifest,
        npz_dir=Path(snakemake.params.case_dir),
        out_dir=snakemake.output.predictions,
        patch_size=[int(v) for v in snakemake.params.patch_size],
        step=float(snakemake.params.step),
        mirror=bool(snakemake.params.mirror),
        resample=str(snakemake.params.resample),
    )


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(snakemake)  # noqa: F821
