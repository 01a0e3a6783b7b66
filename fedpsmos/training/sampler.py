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
losses. The sampler opens only the case files of the sites it was given (each site's data is read only
by that site's rules), lazily, keeping the most recently used ones open; a patch read decodes that patch
only (:mod:`fedpsmos.preprocessing.storage`), padded outside the volume with the case's minimum intensity.

Determinism: batch ``i`` is a function of ``(seed, i)`` alone. The site and row draws come from
``np.random.default_rng([seed, i])`` and the augmentation parameters from :func:`augmentation_rng`
``(seed, i)``, never from a stream shared between batches, so the background loader's workers
(:mod:`fedpsmos.training.loader`) can make batches in any order and a resumed run needs only the iteration
counter (:meth:`PatchSampler.state_dict`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedpsmos.organs import IGNORE_CLASS, NUM_CLASSES
from fedpsmos.preprocessing.storage import CaseFile, CaseStorageError, open_case
from fedpsmos.training.augmentation import AugmentationSettings, augment_batch, input_patch_size
from fedpsmos.training.site_data import SamplerError, SiteData
from fedpsmos.training.transforms import crop_offset

INDEX_COLUMNS = ("case", "z", "y", "x")
SITE_SAMPLING = ("proportional", "uniform")


def augmentation_rng(seed: int, iteration: int) -> np.random.Generator:
    """The generator of batch ``iteration``'s augmentation parameters (independent of its patch draws).

    Parameters
    ----------
    seed:
        the training run's (or federated round's) seed, >= 0.
    iteration:
        the batch's iteration number, >= 0.
    """
    return np.random.default_rng([int(seed), int(iteration), 1])


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
        ``[Z, Y, X]`` array: NumPy, or a volume of an opened case (only the box is decoded).
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
    """Draws batches of patches from several sites' patch indices, batch ``i`` a function of ``(seed, i)``."""

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
        augmentation: AugmentationSettings | None = None,
    ) -> None:
        """Read the sites' patch indices (the cases themselves are opened on first use).

        Parameters
        ----------
        sites:
            the sites to sample from (and the only ones whose files are opened).
        patch_size:
            (z, y, x) voxels.
        patches_per_iteration:
            batch size.
        seed:
            with the iteration number, seeds the draws of sites, rows and augmentation parameters (>= 0).
        augment:
            apply :func:`fedpsmos.training.augmentation.augment_batch` to each batch.
        class_map:
            int ``[C + 1]`` mapping global classes to the model's classes (e.g. a site-alone liver model:
            ``[0, 1, 0, 0, 0, 0]``); ``None`` keeps the global classes.
        cache_cases:
            how many opened cases to keep (least recently used are closed).
        site_sampling:
            ``proportional`` (a site with probability ``n_k / n``, as pooled data) or ``uniform``.
        augmentation:
            the augmentation the batches get, here (``augment``) or on the training device; with the
            extended transforms each sample is cut at :func:`~fedpsmos.training.augmentation.input_patch_size`
            around the patch (nnU-Net's enlarged crop) and brought back to ``patch_size`` by the augmentation.
            ``None``: no augmentation anywhere (then ``augment`` must be false), or the default settings.
        """
        if not sites:
            raise SamplerError("no site to sample from")
        if patches_per_iteration < 1:
            raise SamplerError(f"patches_per_iteration must be >= 1, got {patches_per_iteration}")
        if int(seed) < 0:
            raise SamplerError(f"seed must be >= 0, got {seed}")
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
        self.augmentation = augmentation if augmentation is not None else AugmentationSettings()
        # What each sample is cut at: the patch, or the enlarged crop of the extended augmentation.
        self.crop_size = (
            input_patch_size(self.patch_size, augmentation) if augmentation is not None else self.patch_size
        )
        self._crop_shift = np.asarray(crop_offset(self.crop_size, self.patch_size))
        self.seed = int(seed)
        self.iteration = 0  # the next batch of next_batch(); the only state that changes while sampling
        self._indices = [_read_index(s) for s in sites]
        if site_sampling not in SITE_SAMPLING:
            raise SamplerError(f"site_sampling must be one of {SITE_SAMPLING}, got {site_sampling!r}")
        self.site_sampling = site_sampling
        sizes = np.array([len(s.npz_paths) for s in sites], dtype=np.float64)
        self.site_probabilities = (
            sizes / sizes.sum() if site_sampling == "proportional" else np.full(len(sites), 1.0 / len(sites))
        )
        # (site, case code) -> the open case and its labelled mask over the produced classes
        self._cache: OrderedDict[tuple[int, int], tuple[CaseFile, np.ndarray]] = OrderedDict()
        self._cache_size = max(1, int(cache_cases))
        self.opened: set[Path] = set()  # every case file this sampler has read (the site boundary, tested)
        self.last_draw: list[tuple[str, str, tuple[int, int, int]]] = []  # (site, case, corner), last batch

    def __getstate__(self) -> dict[str, Any]:
        # A copy for a loader worker: open cases (memory maps) stay behind, it opens its own.
        return {**self.__dict__, "_cache": OrderedDict(), "opened": set()}

    @property
    def num_classes(self) -> int:
        """Classes of the targets and masks produced (C + 1, or the model's classes under ``class_map``)."""
        return NUM_CLASSES if self.class_map is None else int(self.class_map.max()) + 1

    @property
    def signature(self) -> tuple[Any, ...]:
        """What decides the batches besides ``(seed, iteration)``: two samplers with equal signatures draw
        equal batches."""
        sites = tuple(
            (
                i.site.site,
                tuple(sorted((c, str(p)) for c, p in i.site.npz_paths.items())),
                str(i.site.patches),
            )
            for i in self._indices
        )
        class_map = None if self.class_map is None else tuple(int(c) for c in self.class_map)
        return (
            sites,
            self.patch_size,
            self.crop_size,
            self.batch_size,
            self.augment,
            self.augmentation,
            class_map,
            self.site_sampling,
        )

    def _case(self, s: int, code: int) -> tuple[CaseFile, np.ndarray]:
        key = (s, code)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        index = self._indices[s]
        path = Path(index.site.npz_paths[index.cases[code]])
        self.opened.add(path)
        try:
            case = open_case(path)
        except (OSError, CaseStorageError) as error:
            raise SamplerError(str(error) if str(path) in str(error) else f"{path}: {error}") from None
        if "labelled" not in case.arrays:
            raise SamplerError(f"{path}: preprocessed case has no 'labelled' array")
        labelled = np.asarray(case.arrays["labelled"], dtype=bool)
        if labelled.shape != (NUM_CLASSES,):
            raise SamplerError(f"{path}: labelled mask has shape {labelled.shape}, need ({NUM_CLASSES},)")
        out_of_range = [v for v in case.label_values if v >= NUM_CLASSES and v != IGNORE_CLASS]
        if out_of_range:
            raise SamplerError(
                f"{path}: label holds class {max(out_of_range)} >= {NUM_CLASSES} "
                f"(only the ignore label {IGNORE_CLASS} may exceed the classes)"
            )
        if self.class_map is not None:
            labelled = remap_mask(labelled, self.class_map)
        entry = self._cache[key] = (case, labelled)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry

    def _patch(
        self, s: int, code: int, corner: tuple[int, int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        case, labelled = self._case(s, code)
        z, y, x = (int(c) for c in np.subtract(corner, self._crop_shift))  # the crop centred on the patch
        corner = (z, y, x)
        try:
            # Outside the image is air-like: pad with the case's minimum intensity and background labels
            # (known background, not the ignore label: nnU-Net also pads labels as background).
            image = crop_patch(case.image, corner, self.crop_size, case.image_min)
            label = crop_patch(case.label, corner, self.crop_size, 0)
        except (OSError, ValueError, RuntimeError) as error:
            raise SamplerError(f"{case.path}: cannot read a patch at {list(corner)} ({error})") from None
        if self.class_map is not None:
            ignored = label == IGNORE_CLASS  # class unknown: kept as IGNORE_CLASS for the losses to skip
            mapped = self.class_map[np.where(ignored, 0, label)]
            label = np.where(ignored, IGNORE_CLASS, mapped).astype(np.uint8)
        return image, label, labelled

    def draw(self, iteration: int, *, seed: int | None = None) -> list[tuple[int, int, tuple[int, int, int]]]:
        """(site number, case code, corner) of each sample of batch ``iteration``: a site by its probability,
        then one row of its index uniformly, from ``default_rng([seed, iteration])``.

        Parameters
        ----------
        iteration:
            the batch's iteration number (>= 0).
        seed:
            default: the sampler's seed.
        """
        rng = np.random.default_rng([self.seed if seed is None else int(seed), int(iteration)])
        out = []
        for _ in range(self.batch_size):
            s = int(rng.choice(len(self._indices), p=self.site_probabilities))
            index = self._indices[s]
            r = int(rng.integers(len(index.codes)))
            z, y, x = (int(v) for v in index.corners[r])
            out.append((s, int(index.codes[r]), (z, y, x)))
        return out

    def batch(
        self, iteration: int, *, seed: int | None = None, augment: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``iteration``: image ``[B, 1, Z, Y, X]`` float32, target ``[B, 1, Z, Y, X]`` int64, mask
        ``[B, K]`` bool; a function of ``(seed, iteration)`` alone.

        Parameters
        ----------
        iteration:
            the batch's iteration number (>= 0).
        seed:
            default: the sampler's seed.
        augment:
            default: the sampler's ``augment``; augmentation draws from :func:`augmentation_rng`.
        """
        seed = self.seed if seed is None else int(seed)
        images, targets, masks = [], [], []
        self.last_draw = []
        for s, code, corner in self.draw(iteration, seed=seed):
            self.last_draw.append((self._indices[s].site.site, self._indices[s].cases[code], corner))
            image, label, labelled = self._patch(s, code, corner)
            images.append(image)
            targets.append(label)
            masks.append(labelled)
        image_t = torch.from_numpy(np.stack(images)[:, None])  # b, 1, z, y, x
        target_t = torch.from_numpy(np.stack(targets)[:, None].astype(np.int64))  # b, 1, z, y, x
        mask_t = torch.from_numpy(np.stack(masks))  # b, k
        if self.augment if augment is None else augment:
            image_t, target_t = augment_batch(
                image_t,
                target_t,
                augmentation_rng(seed, iteration),
                self.augmentation,
                patch_size=self.patch_size,
            )
        return image_t, target_t, mask_t

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of the current iteration (:meth:`batch`); advances the iteration counter."""
        out = self.batch(self.iteration)
        self.iteration += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """The iteration counter as plain data (the only state that changes while sampling)."""
        return {"iteration": int(self.iteration)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Parameters
        ----------
        state:
            a saved state.
        """
        if "iteration" not in state:
            raise SamplerError(f"sampler state holds no iteration counter (keys {sorted(state)})")
        iteration = int(state["iteration"])
        if iteration < 0:
            raise SamplerError(f"sampler state has a negative iteration {iteration}")
        self.iteration = iteration
