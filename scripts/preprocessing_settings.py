"""Snakemake entry point of rule preprocessing_settings: config (and fingerprint) -> settings.json."""

import sys

from fedpsmos.preprocessing.fingerprint import write_settings


def main(snakemake) -> None:
    """Resolve the ``auto`` keys of ``preprocessing`` (from the federated fingerprint when there is one)."""
    fingerprint = snakemake.input.get("fingerprint")
    write_settings(dict(snakemake.params.preprocessing), fingerprint or None, snakemake.output.settings)


if "snakemake" in globals():
    if snakemake.log:  # noqa: F821
        sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
    main(snakemake)  # noqa: F821
