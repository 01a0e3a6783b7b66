"""Patch sampling from the sites' patch indices (paper Sec. 2.1: 2 patches per iteration).

Each patch of a batch is drawn in two steps: a site, then a row of that site's patch index uniformly (the rows
are the kept patches, their ``z, y, x`` the patch's lower corner; docs/architecture.md "Patch index").

How the site is drawn (``site_sampling``):

- ``proportional`` (default): site ``k`` with probability ``n_k / n``, ``n_k`` its training cases. This is
  what pooling the sites' cases into one data set and drawing a case uniformly does, and it gives each site
  the share of the gradient that FedAvg's weights ``n_k / n`` give it, so the central upper bound differs
  from the federated model in federation alone, not in how much each site counts.
- ``uniform``: every site the same share whatever its size (one site's few cases are then seen more often).

A batch may mix sites, each sample carrying its own labelled-class mask for the marginal and exclusion
losses. The sampler opens only the ``.npz`` files of the sites it was given (each site's data is read only
by that site's rules), lazily, keeping the most recently used cases in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedpsmos.organs import IGNORE_CLASS, NUM_CLASSES
from fedpsmos.training.augmentation import augment_batch
from fedpsmos.training.checkpoint import numpy_generator_state, set_numpy_generator_state

INDEX_COLUMNS = ("case", "z", "y", "x")
SITE_SAMPLING = ("proportional", "uniform")


class SamplerError(ValueError):
    """A site's patch index or preprocessed case is unusable; the message names the file."""


@dataclass(frozen=True)
class SiteData:
    """One site's training data: its preprocessed cases, its patch index and (optionally) its labelled mask.

    ``labelled`` is the bool ``[C + 1]`` mask of the classes the site annotates; ``None`` reads each case's
    ``labelled`` array from its ``.npz``. Only cases in ``npz_paths`` are sampled, so giving the training
    cases keeps test cases out even when the patch index lists them.
    """

    site: str
    npz_paths: Mapping[str, Path]
    patches: Path
    labelled: np.ndarray | None = field(default=None, compare=False)


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
        ``results/preprocessed/{site}``, holding ``{case}.npz``.
    patches:
        ``results/patches/{site}.parquet``.
    """
    import json

    manifest = Path(manifest)
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SamplerError(f"{manifest}: cannot read manifest ({error})") from None
    if data.get("site") != site:
        raise SamplerError(f"{manifest}: manifest of site {data.get('site')!r}, expected {site!r}")
    train = data.get("train")
    if not isinstance(train, list) or not train:
        raise SamplerError(f"{manifest}: no training cases ('train' list)")
    return SiteData(
        site=site, npz_paths={c: Path(npz_dir) / f"{c}.npz" for c in train}, patches=Path(patches)
    )


@dataclass
class _SiteIndex:
    site: SiteData
    cases: list[str]  # case names, indexed by ``codes``
    codes: np.ndarray  # int64 [R]
    corners: np.ndarray  # int64 [R, 3] (z, y, x)


def _read_index(site: SiteData) -> _SiteIndex:
    path = Path(site.patches)
    try:
        frame = pd.read_parquet(path, columns=list(INDEX_COLUMNS))
    except (OSError, ValueError, KeyError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SamplerError(
            f"{path}: cannot read patch index with columns {INDEX_COLUMNS} ({first})"
        ) from None
    frame = frame[frame["case"].isin(list(site.npz_paths))]
    if frame.empty:
        raise SamplerError(
            f"{path}: no patch of site {site.site} belongs to its {len(site.npz_paths)} training case(s)"
        )
    cases = sorted(frame["case"].unique())
    lookup = {c: i for i, c in enumerate(cases)}
    codes = frame["case"].map(lookup).to_numpy(dtype=np.int64)
    corners = frame[["z", "y", "x"]].to_numpy(dtype=np.int64)
    return _SiteIndex(site=site, cases=cases, codes=codes, corners=corners)


def crop_patch(array: np.ndarray, corner: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """The ``size`` box of ``array`` whose lower corner is ``corner``, padded with ``fill`` outside the array.

    Parameters
    ----------
    array:
        ``[Z, Y, X]`` array.
    corner:
        lower corner (z, y, x); may lie partly outside the array.
    size:
        patch size (z, y, x).
    fill:
        value of voxels outside the array.
    """
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for c, s, n in zip(corner, size, array.shape, strict=True):
        lo, hi = max(c, 0), min(c + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - c, hi - c))
    out[tuple(dst)] = array[tuple(src)]
    return out


def remap_mask(labelled: np.ndarray, class_map: np.ndarray) -> np.ndarray:
    """A site's labelled mask over a model's output classes, given ``class_map[global] = model class``.

    Background is labelled (the model's background deliberately absorbs the organs it does not output); an
    output organ is labelled when a labelled global class maps onto it.

    Parameters
    ----------
    labelled:
        bool ``[C + 1]`` over global classes.
    class_map:
        int ``[C + 1]``.
    """
    n_out = int(class_map.max()) + 1
    mask = np.zeros(n_out, dtype=bool)
    mask[0] = True
    for c, k in enumerate(class_map):
        if k > 0 and labelled[c]:
            mask[k] = True
    return mask


class PatchSampler:
    """Draws batches of patches from several sites' patch indices, deterministically from a seed."""

    def __init__(
        self,
        sites: Sequence[SiteData],
        *,
        patch_size: Sequence[int],
        patches_per_iteration: int,
        seed: int,
        augment: bool,
        class_map: np.ndarray | None = None,
        cache_cases: int = 64,
        site_sampling: str = "proportional",
    ) -> None:
        """Read the sites' patch indices (the cases themselves are loaded on first use).

        Parameters
        ----------
        sites:
            the sites to sample from (and the only ones whose files are opened).
        patch_size:
            (z, y, x) voxels.
        patches_per_iteration:
            batch size.
        seed:
            seeds the generator that draws sites, rows and augmentation parameters.
        augment:
            apply :func:`fedpsmos.training.augmentation.augment_batch`.
        class_map:
            int ``[C + 1]`` mapping global classes to the model's classes (e.g. a site-alone liver model:
            ``[0, 1, 0, 0, 0, 0]``); ``None`` keeps the global classes.
        cache_cases:
            how many decoded cases to keep in memory (least recently used are dropped).
        site_sampling:
            ``proportional`` (a site with probability ``n_k / n``, as pooled data) or ``uniform``.
        """
        if not sites:
            raise SamplerError("no site to sample from")
        if patches_per_iteration < 1:
            raise SamplerError(f"patches_per_iteration must be >= 1, got {patches_per_iteration}")
        self.patch_size = tuple(int(s) for s in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise SamplerError(f"patch_size must be three positive ints, got {list(patch_size)}")
        if class_map is not None:
            class_map = np.asarray(class_map, dtype=np.int64)
            if class_map.shape != (NUM_CLASSES,) or class_map.min() < 0 or class_map[0] != 0:
                raise SamplerError(f"class_map must map the {NUM_CLASSES} global classes, background to 0")
        self.class_map = class_map
        self.batch_size = int(patches_per_iteration)
        self.augment = bool(augment)
        self.rng = np.random.default_rng(seed)
        self._indices = [_read_index(s) for s in sites]
        if site_sampling not in SITE_SAMPLING:
            raise SamplerError(f"site_sampling must be one of {SITE_SAMPLING}, got {site_sampling!r}")
        sizes = np.array([len(s.npz_paths) for s in sites], dtype=np.float64)
        self.site_probabilities = (
            sizes / sizes.sum() if site_sampling == "proportional" else np.full(len(sites), 1.0 / len(sites))
        )
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = max(1, int(cache_cases))
        self.opened: set[Path] = set()  # every .npz this sampler has read (the site boundary, tested)
        self.last_draw: list[
            tuple[str, str, tuple[int, int, int]]
        ] = []  # (site, case, corner) of the last batch

    @property
    def num_classes(self) -> int:
        """Classes of the targets and masks produced (C + 1, or the model's classes under ``class_map``)."""
        return NUM_CLASSES if self.class_map is None else int(self.class_map.max()) + 1

    def _case(self, s: int, code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = (s, code)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        index = self._indices[s]
        path = Path(index.site.npz_paths[index.cases[code]])
        self.opened.add(path)
        try:
            with np.load(path) as npz:
                image = npz["image"].astype(np.float32, copy=False)
                label = npz["label"]
                labelled = (
                    npz["labelled"].astype(bool) if index.site.labelled is None else index.site.labelled
                )
        except (OSError, KeyError, ValueError, EOFError) as error:
            raise SamplerError(f"{path}: cannot read preprocessed case ({error})") from None
        if image.ndim != 3 or label.shape != image.shape:
            raise SamplerError(f"{path}: image {image.shape} and label {label.shape} must be equal [Z, Y, X]")
        labelled = np.asarray(labelled, dtype=bool)
        if labelled.shape != (NUM_CLASSES,):
            raise SamplerError(f"{path}: labelled mask has shape {labelled.shape}, need ({NUM_CLASSES},)")
        ignored = label == IGNORE_CLASS  # class unknown: kept as IGNORE_CLASS for the losses to skip
        out_of_range = (label >= NUM_CLASSES) & ~ignored
        if out_of_range.any():
            raise SamplerError(
                f"{path}: label holds class {int(label[out_of_range].max())} >= {NUM_CLASSES} "
                f"(only the ignore label {IGNORE_CLASS} may exceed the classes)"
            )
        if self.class_map is not None:
            mapped = self.class_map[np.where(ignored, 0, label)]
            label = np.where(ignored, IGNORE_CLASS, mapped).astype(np.uint8)
            labelled = remap_mask(labelled, self.class_map)
        entry = (image, label, labelled)
        self._cache[key] = entry
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry

    def _draw_rows(self) -> list[tuple[int, int, tuple[int, int, int]]]:
        # (site number, case code, corner) per sample: a site by its probability, then one row uniformly.
        out = []
        for _ in range(self.batch_size):
            s = int(self.rng.choice(len(self._indices), p=self.site_probabilities))
            index = self._indices[s]
            r = int(self.rng.integers(len(index.codes)))
            z, y, x = (int(v) for v in index.corners[r])
            out.append((s, int(index.codes[r]), (z, y, x)))
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch: image ``[B, 1, Z, Y, X]`` float32, target ``[B, 1, Z, Y, X]`` int64, mask ``[B, K]``."""
        images, targets, masks = [], [], []
        self.last_draw = []
        for s, code, corner in self._draw_rows():
            self.last_draw.append((self._indices[s].site.site, self._indices[s].cases[code], corner))
            image, label, labelled = self._case(s, code)
            # Outside the image is air-like: pad with the case's minimum intensity and background labels
            # (known background, not the ignore label: nnU-Net also pads labels as background).
            images.append(crop_patch(image, corner, self.patch_size, float(image.min())))
            targets.append(crop_patch(label, corner, self.patch_size, 0))
            masks.append(labelled)
        image_t = torch.from_numpy(np.stack(images)[:, None])  # b, 1, z, y, x
        target_t = torch.from_numpy(np.stack(targets)[:, None].astype(np.int64))  # b, 1, z, y, x
        mask_t = torch.from_numpy(np.stack(masks))  # b, k
        if self.augment:
            image_t, target_t = augment_batch(image_t, target_t, self.rng)
        return image_t, target_t, mask_t

    def state_dict(self) -> dict[str, Any]:
        """The generator state as plain data (the only state that changes while sampling)."""
        return {"generator": numpy_generator_state(self.rng)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Parameters
        ----------
        state:
            a saved state.
        """
        set_numpy_generator_state(self.rng, state["generator"])
