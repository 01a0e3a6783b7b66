"""Patch index: training patches that pass the target-fraction filter (paper Sec. "Implementation details").

The paper keeps a sampled patch only if its "target area is larger than 33%". This project reads that as:
a patch is kept when it holds at least ``min_fraction`` of the voxels of at least one organ the site labels
and the case contains (docs/design.md "Training"). Organs a site does not label are invisible here (they are
background in its label map), and a labelled organ absent from a case is skipped rather than failing it.

Candidates per training case: half are lower corners drawn uniformly over the valid range, half are centred
on a random voxel of a labelled organ (organ drawn uniformly, so a small pancreas gets as many candidates as
a large liver), clipped to the valid range; duplicate corners are dropped. The random stream of a case is
seeded from ``seed`` and the case id, so the index does not depend on the order of cases.

Organ voxel counts inside every candidate box come from one summed-area table (3-D cumulative sum) per organ:
eight lookups a candidate, no loop over voxels.

Images smaller than the patch on an axis: the corner on that axis is 0 and the training sampler pads the
patch. A patch more than ``max_pad_ratio`` (default 2) times the image on any axis is an error instead: the
patch would be mostly padding, which usually means a spacing given in (x, y, z) instead of (z, y, x) order.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedpsmos.atomic import atomic_path
from fedpsmos.data.manifest import Manifest
from fedpsmos.organs import CLASSES
from fedpsmos.preprocessing.storage import case_id, read_case

INDEX_COLUMNS = ("site", "case", "z", "y", "x", "organ", "fraction")


class PatchIndexError(ValueError):
    """The patch index cannot be built (bad manifest, missing case, oversized patch, no patch kept)."""


def summed_area_table(mask: np.ndarray) -> np.ndarray:
    """Zero-padded 3-D cumulative sum: ``table[z, y, x]`` counts ``mask[:z, :y, :x]``.

    Parameters
    ----------
    mask:
        Boolean ``[Z, Y, X]`` array.
    """
    table = np.zeros(tuple(s + 1 for s in mask.shape), dtype=np.int64)
    table[1:, 1:, 1:] = mask.cumsum(0, dtype=np.int64).cumsum(1).cumsum(2)
    return table


def box_counts(table: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Counts inside boxes ``[lower, upper)`` (``[N, 3]`` each) by inclusion-exclusion on a summed-area table.

    Parameters
    ----------
    table:
        Output of :func:`summed_area_table`.
    lower, upper:
        Box corners in voxels, (z, y, x), ``0 <= lower <= upper <= shape``.
    """
    z0, y0, x0 = lower.T
    z1, y1, x1 = upper.T
    return (
        table[z1, y1, x1]
        - table[z0, y1, x1]
        - table[z1, y0, x1]
        - table[z1, y1, x0]
        + table[z0, y0, x1]
        + table[z0, y1, x0]
        + table[z1, y0, x0]
        - table[z0, y0, x0]
    )


def organ_fractions(
    label: np.ndarray, classes: Sequence[int], corners: np.ndarray, patch_size: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Fraction of each class's voxels inside each patch; ``[N, len(classes)]`` float64.

    Parameters
    ----------
    label:
        Global label map ``[Z, Y, X]``.
    classes:
        Global class indices, each with at least one voxel in ``label``.
    corners:
        Patch lower corners ``[N, 3]`` (z, y, x); boxes are clipped to the image.
    patch_size:
        Patch size (z, y, x) in voxels.
    """
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 3)
    upper = np.minimum(corners + np.asarray(patch_size, dtype=np.int64), np.asarray(label.shape))
    out = np.zeros((len(corners), len(classes)), dtype=np.float64)
    for i, c in enumerate(classes):
        table = summed_area_table(label == c)
        out[:, i] = box_counts(table, corners, upper) / table[-1, -1, -1]
    return out


def candidate_corners(
    label: np.ndarray,
    classes: Sequence[int],
    patch_size: Sequence[int] | np.ndarray,
    count: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Unique candidate lower corners ``[M, 3]``, half uniform and half organ-centred (module docstring).

    Parameters
    ----------
    label:
        Global label map ``[Z, Y, X]``.
    classes:
        Labelled classes present in the case (organ-centred candidates pick one uniformly).
    patch_size:
        Patch size (z, y, x).
    count:
        Number of candidates drawn before de-duplication.
    rng:
        The case's random generator.
    """
    shape = np.asarray(label.shape, dtype=np.int64)
    size = np.asarray(patch_size, dtype=np.int64)
    high = np.maximum(shape - size, 0)
    n_uniform = count // 2
    corners = [rng.integers(0, high + 1, size=(n_uniform, 3))]
    n_centred = count - n_uniform
    if classes and n_centred:
        picks = rng.integers(0, len(classes), size=n_centred)
        for i, c in enumerate(classes):
            n = int(np.sum(picks == i))
            if n:
                voxels = np.argwhere(label == c)
                centre = voxels[rng.integers(0, len(voxels), size=n)]
                corners.append(np.clip(centre - size // 2, 0, high))
    return np.unique(np.concatenate(corners).astype(np.int64), axis=0)


def _case_rng(seed: int, case: str) -> np.random.Generator:
    """A case's generator, from the index seed and a stable hash of the case id (order independent)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(case.encode())]))


def index_case(
    label: np.ndarray,
    labelled: np.ndarray,
    *,
    case: str,
    patch_size: Sequence[int],
    min_fraction: float,
    candidates_per_case: int,
    seed: int,
    max_pad_ratio: float = 2.0,
) -> pd.DataFrame:
    """Kept patches of one case: columns ``case, z, y, x, organ, fraction`` (module docstring).

    Parameters
    ----------
    label:
        Global label map ``[Z, Y, X]`` (the case file's array ``label``).
    labelled:
        Boolean ``[6]`` mask of the site's labelled classes (the case file's array ``labelled``).
    case:
        Case id, also used to seed the case's candidates.
    patch_size, min_fraction, candidates_per_case, seed:
        See :func:`index_site`.
    max_pad_ratio:
        Largest allowed patch/image size ratio on any axis.
    """
    size = np.asarray(patch_size, dtype=np.int64)
    if np.any(size > max_pad_ratio * np.asarray(label.shape)):
        raise PatchIndexError(
            f"case {case}: patch {tuple(int(s) for s in size)} exceeds the preprocessed image {label.shape} "
            f"by more than {max_pad_ratio}x on an axis (is the spacing in (z, y, x) order?)"
        )
    counts = np.bincount(label.ravel(), minlength=len(CLASSES))
    classes = [c for c in range(1, len(CLASSES)) if labelled[c] and counts[c] > 0]
    columns = {"case": pd.Series(dtype=str), **{a: pd.Series(dtype=np.int64) for a in "zyx"}}
    empty = pd.DataFrame({**columns, "organ": pd.Series(dtype=str), "fraction": pd.Series(dtype=np.float64)})
    if not classes:
        return empty
    corners = candidate_corners(label, classes, size, candidates_per_case, _case_rng(seed, case))
    fractions = organ_fractions(label, classes, corners, size)
    best = np.argmax(fractions, axis=1)  # ties go to the first organ in global class order
    best_fraction = fractions[np.arange(len(corners)), best]
    keep = best_fraction >= min_fraction
    return (
        pd.DataFrame(
            {
                "case": case,
                "z": corners[keep, 0],
                "y": corners[keep, 1],
                "x": corners[keep, 2],
                "organ": [CLASSES[classes[i]] for i in best[keep]],
                "fraction": best_fraction[keep],
            }
        )
        if keep.any()
        else empty
    )


def index_site(
    manifest_path: str | os.PathLike[str],
    npz_paths: Sequence[str | os.PathLike[str]],
    out_parquet: str | os.PathLike[str],
    *,
    patch_size: Sequence[int],
    min_fraction: float,
    candidates_per_case: int,
    seed: int,
    max_pad_ratio: float = 2.0,
) -> pd.DataFrame:
    """Build and atomically write a site's patch index (docs/architecture.md "Patch index").

    Parameters
    ----------
    manifest_path:
        The site manifest; its ``train`` cases are indexed, in manifest order.
    npz_paths:
        Preprocessed cases; a case id is matched to the file name (``site1_000.b2zip`` -> ``site1_000``).
    out_parquet:
        Output parquet path.
    patch_size:
        Patch size (z, y, x) in voxels.
    min_fraction:
        Keep a patch holding at least this fraction of one labelled organ's voxels (paper: 0.33).
    candidates_per_case:
        Candidate corners drawn per case before filtering.
    seed:
        Seed of the candidate draws.
    max_pad_ratio:
        Largest allowed patch/image size ratio on any axis (module docstring).

    Raises
    ------
    PatchIndexError
        On a bad case file, a train case without a case file, or when no patch is kept.
    fedpsmos.data.manifest.ManifestError
        On a missing or malformed manifest (one without ``site`` or ``train``).
    """
    manifest_path = Path(manifest_path)
    if len(patch_size) != 3 or any(int(s) < 1 for s in patch_size):
        raise PatchIndexError(f"{manifest_path}: patch_size must be 3 positive integers, got {patch_size}")
    if not 0.0 < float(min_fraction) <= 1.0:
        raise PatchIndexError(f"{manifest_path}: min_fraction must be in (0, 1], got {min_fraction}")
    if int(candidates_per_case) < 1:
        raise PatchIndexError(f"{manifest_path}: candidates_per_case must be >= 1, got {candidates_per_case}")
    manifest = Manifest.load(manifest_path)
    site = manifest.site
    by_case: dict[str, Path] = {}
    for p in map(Path, npz_paths):
        if case_id(p) in by_case:
            raise PatchIndexError(
                f"site {site}: two preprocessed files for case {case_id(p)}: {by_case[case_id(p)]}, {p}"
            )
        by_case[case_id(p)] = p
    frames = []
    for case in manifest.train:
        if case not in by_case:
            raise PatchIndexError(
                f"site {site}: no preprocessed case file for train case {case} ({manifest_path})"
            )
        try:
            arrays = read_case(by_case[case], ("label", "labelled"))
            label, labelled = arrays["label"], arrays["labelled"]
        except (OSError, KeyError, ValueError) as err:
            raise PatchIndexError(f"{by_case[case]}: cannot read label/labelled: {err}") from err
        if label.ndim != 3 or labelled.shape != (len(CLASSES),):
            raise PatchIndexError(f"{by_case[case]}: label must be 3-D and labelled [{len(CLASSES)}]")
        frames.append(
            index_case(
                label,
                labelled.astype(bool),
                case=str(case),
                patch_size=patch_size,
                min_fraction=float(min_fraction),
                candidates_per_case=int(candidates_per_case),
                seed=int(seed),
                max_pad_ratio=max_pad_ratio,
            )
        )
    kept = [frame for frame in frames if not frame.empty]
    if not kept:
        raise PatchIndexError(
            f"site {site}: no patch holds >= {min_fraction} of a labelled organ in {len(frames)} train cases "
            f"(patch {list(patch_size)}, {candidates_per_case} candidates a case)"
        )
    index = pd.concat(kept, ignore_index=True)
    index.insert(0, "site", site)
    index = index[list(INDEX_COLUMNS)]
    with atomic_path(out_parquet, suffix=".parquet") as tmp:
        index.to_parquet(tmp, index=False)
    return index
