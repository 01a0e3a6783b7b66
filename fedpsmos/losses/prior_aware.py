"""PaNN's prior-aware loss (Zhou et al., ICCV 2019), the partially-supervised baseline of the paper's Table 3.

PaNN assumes that the organ size distribution a network predicts over the abdomen should match the one
measured on the fully labelled data. On a partially labelled sample that constraint is what tells the
network that part of the "background" of its label map is in fact other organs.

Notation. A sample labels the organ set L (background always labelled); ``U = {0} u (organs not in L)`` is
the merged background of the marginal loss; ``V`` is the set of its voxels whose target is background, i.e.
neither a labelled organ nor ignored (in a partial label map an unlabelled organ reads as background, so V
holds every voxel whose class lies in U). ``q`` is the prior: class fractions over the voxels of training
patches of the fully labelled site (:func:`prior_from_site`). ``p_c(v) = softmax(z(v))_c``.

For each partially labelled sample with non-empty V::

    pbar_c   = (1 / |V|) sum_{v in V} p_c(v)                       (average prediction over V)
    pbar_U,c = pbar_c / sum_{j in U} pbar_j,    q_U,c = q_c / sum_{j in U} q_j       (c in U)
    KL_i     = sum_{c in U} q_U,c (log q_U,c - log pbar_U,c)                      (KL(q_U || pbar_U))

and the loss of a batch is::

    loss = S(batch) + weight * (1 / |P|) sum_{i in P} KL_i

with S the supervised part (a marginal-only :class:`~fedpsmos.losses.PartialLoss`: the conventional loss on
fully labelled samples, the labelled organs without calling the unlabelled ones background on partially
labelled samples) and P the partially labelled samples with a non-empty V. Restricting q to U and
renormalising gives the class fractions of U among the fully labelled site's voxels that are not one of the
sample's labelled organs, which is what ``pbar_U`` estimates on the sample. The direction is PaNN's: the
prior first.

PaNN defines the term on the whole partially labelled data set, ``KL(q || pbar)`` with ``pbar`` averaged over
all of its voxels; the logarithm of a data-set average is not a sum over samples, so stochastic gradients of
it are biased, and PaNN solves a min-max (primal-dual) reformulation instead. This module takes a stochastic
approximation of that whole-data term: the same KL on each partially labelled sample of a mini-batch (its
``pbar`` over the sample's patch), averaged over those samples, and plain gradient descent on it.

Numerics: the computation runs in at least float32, from ``log_softmax`` (``log pbar_c`` is a logsumexp of
``log p_c`` over V minus ``log |V|``, which cancels in the renormalisation), so no probability is summed and
no logarithm of a sum of probabilities is taken. A sample with empty V has no term (it is not counted in
|P|); a batch with no sample in P adds an exact zero that keeps the graph. Ignored voxels
(``IGNORE_CLASS``) are not in V and receive no gradient from the term; neither do voxels of labelled organs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedpsmos.atomic import write_json
from fedpsmos.data.manifest import Manifest
from fedpsmos.losses.checks import validate_inputs
from fedpsmos.organs import CLASSES, IGNORE_CLASS, NUM_CLASSES

if TYPE_CHECKING:
    from fedpsmos.losses.compose import PartialLoss

PRIOR_FLOOR = 1e-6


def _check_prior(prior: Sequence[float] | np.ndarray) -> np.ndarray:
    """Validated prior as float64, normalised to sum one."""
    values = np.asarray(prior, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"prior must be a list of at least 2 class fractions, got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"prior fractions must be finite and >= 0, got {values.tolist()}")
    if values[0] <= 0:
        raise ValueError(f"prior fraction of background must be > 0, got {values[0]}")
    return values / values.sum()


class PriorAwareLoss(nn.Module):
    """A supervised marginal loss plus PaNN's prior-aware KL on partially labelled samples (module doc)."""

    prior: torch.Tensor  # float64 [C + 1] buffer, normalised

    def __init__(self, supervised: PartialLoss, prior: Sequence[float] | np.ndarray, weight: float) -> None:
        """Combine the supervised part with the prior term.

        Parameters
        ----------
        supervised:
            a :class:`~fedpsmos.losses.PartialLoss` with marginal-side terms only (no exclusion term: the
            prior term takes the exclusion side's place).
        prior:
            class fractions q over the model's C + 1 classes (background first), e.g. from
            :func:`prior_from_site`; normalised here. Background must be > 0; zero organ fractions are allowed
            (their ``0 log 0`` counts as 0).
        weight:
            weight of the KL term, finite and >= 0.
        """
        super().__init__()
        if getattr(supervised, "exclusion_weights", None):
            raise ValueError("the supervised part of a prior-aware loss must have no exclusion-side term")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"prior-aware weight must be a finite number, got {weight!r}")
        if weight < 0:
            raise ValueError(f"prior-aware weight must be >= 0, got {weight}")
        self.supervised = supervised
        self.weight = float(weight)
        self.register_buffer("prior", torch.from_numpy(_check_prior(prior)), persistent=False)

    def extra_repr(self) -> str:
        """Weight and prior, for ``print(model)``."""
        return f"weight={self.weight}, prior={[round(float(v), 6) for v in self.prior]}"

    def prior_term(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """``(1 / |P|) sum_{i in P} KL(q_U || pbar_U)`` of a batch, unweighted (module docstring).

        Parameters
        ----------
        logits, target, labelled:
            as for :meth:`forward`.
        """
        target_long, mask = validate_inputs(logits, target, labelled)
        batch, channels = logits.shape[:2]
        prior = self.prior
        if channels != prior.numel():
            raise ValueError(f"prior has {prior.numel()} classes but the logits have {channels} channels")
        flat_target = target_long.reshape(batch, -1)  # b, n
        # V: background voxels (unlabelled organs read as background; ignored voxels are 255, not 0)
        in_v = flat_target == 0  # b, n
        chosen = (~mask.all(dim=1)) & in_v.any(dim=1)  # b: partially labelled with non-empty V
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 under autocast (module docstring)
        if not bool(chosen.any()):
            return (logits * 0.0).sum().to(dtype)  # nothing to constrain: an exact zero that keeps the graph
        flat_logits = logits.reshape(batch, channels, -1)[chosen].to(dtype)  # p, k, n
        in_v, merged = in_v[chosen], ~mask[chosen]  # p, n and p, k
        merged[:, 0] = True  # U = background plus the unlabelled organs
        log_prob = torch.log_softmax(flat_logits, dim=1)  # p, k, n
        # log(|V| pbar_c) = logsumexp over V of log p_c; the |V| cancels below
        log_sum = torch.logsumexp(log_prob.masked_fill(~in_v[:, None, :], float("-inf")), dim=2)  # p, k
        log_sum_u = log_sum.masked_fill(~merged, float("-inf"))
        log_pbar_u = log_sum_u - torch.logsumexp(log_sum_u, dim=1, keepdim=True)  # p, k; -inf outside U
        q = prior.to(device=logits.device, dtype=dtype)[None, :].expand_as(log_sum)  # p, k
        q_u = torch.where(merged, q, 0.0)
        q_u = q_u / q_u.sum(dim=1, keepdim=True)  # > 0 total: q_0 > 0
        safe_log_pbar = torch.where(merged, log_pbar_u, 0.0)  # the -inf outside U never meets a product
        kl = torch.special.xlogy(q_u, q_u) - q_u * safe_log_pbar  # p, k; 0 outside U
        return kl.sum(dim=1).mean()

    def terms(
        self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Unweighted terms: the supervised part's ``marginal/<name>`` and ``prior/kl``.

        Parameters
        ----------
        logits, target, labelled:
            as for :meth:`forward`.
        """
        values = dict(self.supervised.terms(logits, target, labelled))
        values["prior/kl"] = self.prior_term(logits, target, labelled)
        return values

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Scalar loss ``S(batch) + weight * mean_i KL_i`` of a batch.

        Parameters
        ----------
        logits:
            float ``[B, C+1, Z, Y, X]`` (any number of spatial axes).
        target:
            integer ``[B, 1, Z, Y, X]`` global classes, or ``IGNORE_CLASS`` where the class is unknown;
            unlabelled organs read as background.
        labelled:
            bool ``[B, C+1]``: classes each sample labels, column 0 True; all True = fully labelled.
        """
        supervised = self.supervised(logits, target, labelled)
        if self.weight == 0.0:
            return supervised
        return supervised + self.weight * self.prior_term(logits, target, labelled).to(supervised.dtype)


def organ_size_prior(
    labels: Iterable[np.ndarray], num_classes: int = NUM_CLASSES, floor: float = PRIOR_FLOOR
) -> np.ndarray:
    """Class fractions over the voxels of label maps, ignored voxels left out; strictly positive.

    Parameters
    ----------
    labels:
        integer label maps of any shape, classes in ``[0, num_classes)`` or ``IGNORE_CLASS``.
    num_classes:
        C + 1.
    floor:
        every fraction is raised to at least ``floor`` and the result renormalised, so that a class absent
        from the patches still has a finite logarithm.

    Returns
    -------
    numpy.ndarray
        float64 ``[num_classes]`` summing to one.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    for label in labels:
        values = np.asarray(label).reshape(-1)
        values = values[values != IGNORE_CLASS].astype(np.int64)
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"label values must lie in [0, {num_classes - 1}] or be {IGNORE_CLASS}, "
                f"got [{values.min()}, {values.max()}]"
            )
        counts += np.bincount(values, minlength=num_classes)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no labelled voxel to estimate a prior from")
    fractions = np.maximum(counts / total, floor)
    return fractions / fractions.sum()


def prior_from_site(
    manifest_path: str | Path,
    npz_dir: str | Path,
    patch_index_path: str | Path,
    patch_size: Sequence[int],
    n_patches: int,
    seed: int,
) -> np.ndarray:
    """PaNN's prior: class fractions over training patches of the fully labelled site, drawn as in training.

    The KL term compares the prior with averages over patches, not whole volumes, so the prior is measured
    on patches drawn by the training sampler (:class:`~fedpsmos.training.sampler.PatchSampler`: a patch-index
    row uniformly among the site's training cases, padded with background outside the volume), without
    augmentation.

    Parameters
    ----------
    manifest_path:
        the site's ``manifest.json`` (its ``site`` and ``train`` entries are read).
    npz_dir:
        the site's preprocessed cases ``{case}.b2zip``.
    patch_index_path:
        the site's patch index (parquet).
    patch_size:
        (z, y, x) voxels, as in training.
    n_patches:
        how many patches to draw (>= 1).
    seed:
        seeds the sampler.

    Returns
    -------
    numpy.ndarray
        float64 ``[C + 1]`` class fractions, strictly positive, summing to one.

    Raises
    ------
    ValueError
        when a drawn case does not label every class (the prior needs the fully labelled site).
    """
    from fedpsmos.training.sampler import PatchSampler
    from fedpsmos.training.site_data import site_data_from_manifest

    if n_patches < 1:
        raise ValueError(f"n_patches must be >= 1, got {n_patches}")
    site = Manifest.load(manifest_path).site
    data = site_data_from_manifest(site, manifest_path, npz_dir, patch_index_path)
    sampler = PatchSampler(
        [data], patch_size=patch_size, patches_per_iteration=1, seed=seed, augment=False, cache_cases=8
    )

    def drawn_labels() -> Iterator[np.ndarray]:
        # one patch at a time: the counts are accumulated, the patches never held together
        for _ in range(int(n_patches)):
            _, target, mask = sampler.next_batch()
            if not bool(mask.all()):
                case = sampler.last_draw[0][1]
                raise ValueError(f"case {case} of site {site} does not label every class; the prior needs it")
            yield target.numpy()

    return organ_size_prior(drawn_labels(), num_classes=sampler.num_classes)


def write_prior(
    path: str | os.PathLike[str], prior: Sequence[float] | np.ndarray, *, site: str, patches: int
) -> None:
    """Write the organ-size prior as JSON (``classes``, ``prior``, ``site``, ``patches``), atomically.

    Parameters
    ----------
    path:
        Output file (``results/models/baseline/panns/prior.json``).
    prior:
        Class fractions, background first (:func:`prior_from_site`).
    site, patches:
        The fully labelled site it was estimated on and the number of patches drawn (provenance).
    """
    values = _check_prior(prior)
    write_json(
        path,
        {
            "classes": list(CLASSES),
            "prior": [float(v) for v in values],
            "site": site,
            "patches": int(patches),
        },
    )


def read_prior(path: str | os.PathLike[str]) -> list[float]:
    """The prior of a file :func:`write_prior` wrote; a missing or malformed file raises naming it.

    Parameters
    ----------
    path:
        The prior JSON.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        values = [float(v) for v in data["prior"]]
        _check_prior(values)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not an organ-size prior file ({error})") from error
    return values
