"""A site's training data: which of its preprocessed cases and which patch index a sampler may read.

A :class:`SiteData` is built from the site's manifest (docs/architecture.md "Manifest"): only its training
cases are listed, so test cases stay out of training even when the patch index lists them. The training
sampler (:mod:`fedpsmos.training.sampler`) opens nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedpsmos.preprocessing.storage import case_path


class SamplerError(ValueError):
    """A site's patch index or preprocessed case is unusable; the message names the file."""


@dataclass(frozen=True)
class SiteData:
    """One site's training data: its preprocessed cases and its patch index.

    Each case's labelled-class mask is read from its file. Only cases in ``npz_paths`` are sampled, so
    giving the training cases keeps test cases out even when the patch index lists them.
    """

    site: str
    npz_paths: Mapping[str, Path]
    patches: Path


def site_data_from_manifest(
    site: str, manifest: str | Path, npz_dir: str | Path, patches: str | Path
) -> SiteData:
    """A site's training cases from its manifest (docs/architecture.md "Manifest"), as :class:`SiteData`.

    Parameters
    ----------
    site:
        the site name (must match the manifest).
    manifest:
        ``results/data/{site}/manifest.json``; its ``train`` list names the training cases.
    npz_dir:
        ``results/preprocessed/{site}``, holding ``{case}.b2zip``.
    patches:
        ``results/patches/{site}.parquet``.
    """
    from fedpsmos.data.manifest import Manifest, ManifestError

    try:
        train = Manifest.load(manifest, site=site).train
    except ManifestError as error:
        raise SamplerError(str(error)) from None
    if not train:
        raise SamplerError(f"{manifest}: no training cases ('train' list)")
    return SiteData(site=site, npz_paths={c: case_path(npz_dir, c) for c in train}, patches=Path(patches))
