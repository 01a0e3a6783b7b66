"""Exclusion losses (Shi et al., MedIA 2021; paper Sec. 4.1.2, Eq. 8-13): a voxel belongs to one organ only.

For a partially labelled sample with labelled organ set L and softmax probabilities p over K = C + 1
channels, the exclusion target of each channel (paper Eq. 8, docs/design.md "Losses") is

    e_c = 1 - y_c                           for a labelled organ c (c in L, c > 0),
    e_j = union_{c in L, c > 0} y_c         for background (j = 0) and for every unlabelled organ j,

and the prediction should vanish on it. Sums run over the partially labelled samples of the batch and their
voxels (batch style, like nnU-Net's batch Dice); s = 1e-5, gamma = 2, k = 10:

- Dice: ``(1/|J|) sum_{j in J} 2 sum(e_j p_j) / (sum e_j + sum p_j + s)`` over the channels J whose
  exclusion target is not empty, minimised (a positive Dice). The smoothing term sits in the denominator
  only, so the loss is exactly 0 when p puts no mass on any exclusion target.
- CE: ``sum_{j,v} e log(p + 1) / sum_{j,v} e``, bounded in [0, ln 2].
- Focal: ``sum_{j,v} e p^gamma log(p + 1) / sum_{j,v} e``.
- Top-k: the mean of the largest k% of the voxel-wise values ``sum_j e_j log(p_j + 1)``.
- Lovasz: ``(1/|J|) sum_{j in J} (1 - ext_j)`` where ext_j is the Lovasz extension of the Jaccard loss with
  errors ``|e_j - p_j|`` and ``e_j`` as the positive set (``fedpsmos.losses.lovasz``). On hard predictions
  this is the IoU of ``p_j`` and ``e_j``; it is exactly 0 whenever ``p_j`` vanishes on ``e_j``. Channels
  with an empty exclusion target are skipped, as Lovasz-softmax skips absent classes (the Jaccard loss of an
  empty set is undefined).

The paper prints these equations without their symbols; the five forms above are this project's reading of
them, after Shi et al.'s exclusion Dice and CE. Exclusion terms apply to partially labelled samples only:
for a fully labelled sample ``e_c = 1 - y_c`` for every channel and the conventional losses already carry
that information (docs/design.md "Losses": fully labelled samples use the conventional losses), see
``fedpsmos.losses.compose``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpsmos.losses.conventional import (
    DEFAULT_GAMMA,
    DEFAULT_SMOOTH,
    DEFAULT_TOPK_PERCENT,
    accumulation_dtype,
    topk_fraction_mean,
)
from fedpsmos.losses.lovasz import lovasz_extension


@dataclass(frozen=True)
class ExclusionPrepared:
    """Softmax probabilities and exclusion targets of the partially labelled samples, flattened over space."""

    prob: torch.Tensor  # b, k, n: p = softmax(z)
    excluded: torch.Tensor  # b, k, n (bool): e_j
    nonempty: tuple[int, ...]  # channels whose exclusion target holds at least one voxel


def exclusion_targets(target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Exclusion targets ``e`` (paper Eq. 8) as bool ``[B, K, N]``.

    Parameters
    ----------
    target:
        int64 ``[B, N]``: partial label map (only labelled classes occur).
    labelled:
        bool ``[B, K]``: the classes each sample labels; column 0 is True.
    """
    num_channels = labelled.shape[1]
    channels = torch.arange(num_channels, device=target.device)
    onehot = target[:, None, :] == channels[None, :, None]  # b, k, n
    labelled_organ = labelled.clone()
    labelled_organ[:, 0] = False  # background is excluded from the labelled organs, not one of them
    foreground = (target > 0)[:, None, :]  # b, 1, n: union of the labelled organs
    return torch.where(labelled_organ[:, :, None], ~onehot, foreground)  # b, k, n


def exclusion_prepare(
    logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
) -> ExclusionPrepared:
    """Softmax probabilities and exclusion targets of partially labelled samples.

    Parameters
    ----------
    logits:
        float ``[B, K, N]``: network outputs z, flattened over space.
    target:
        int64 ``[B, N]``: partial label map.
    labelled:
        bool ``[B, K]``: the classes each sample labels.
    """
    excluded = exclusion_targets(target, labelled)
    nonempty = excluded.any(dim=2).any(dim=0).nonzero().flatten().tolist()
    prob = torch.softmax(logits.to(accumulation_dtype(logits.dtype)), dim=1)  # b, k, n: sums run in float32
    return ExclusionPrepared(prob=prob, excluded=excluded, nonempty=tuple(nonempty))


def _no_term(prep: ExclusionPrepared) -> torch.Tensor:
    """Zero that stays on the autograd graph (no channel has an exclusion target)."""
    return prep.prob.sum() * 0.0


def exclusion_dice_term(prep: ExclusionPrepared, smooth: float = DEFAULT_SMOOTH) -> torch.Tensor:
    """Exclusion Dice: mean over non-empty channels of ``2 sum(e p) / (sum e + sum p + s)`` (paper Eq. 9).

    Parameters
    ----------
    prep:
        probabilities and exclusion targets.
    smooth:
        added to the denominator only, so no overlap gives exactly 0.
    """
    if not prep.nonempty:
        return _no_term(prep)
    axes = (0, 2)
    overlap = torch.where(prep.excluded, prep.prob, 0.0).sum(axes)  # k
    size = prep.excluded.sum(axes).to(prep.prob.dtype) + prep.prob.sum(axes)  # k
    dice = 2.0 * overlap / (size + smooth)
    return dice[list(prep.nonempty)].mean()


def exclusion_ce_term(prep: ExclusionPrepared) -> torch.Tensor:
    """Exclusion CE ``sum e log(p + 1) / sum e`` over channels and voxels (paper Eq. 10).

    Parameters
    ----------
    prep:
        probabilities and exclusion targets.
    """
    if not prep.nonempty:
        return _no_term(prep)
    total = torch.where(prep.excluded, torch.log1p(prep.prob), 0.0).sum()
    return total / prep.excluded.sum().to(prep.prob.dtype)


def exclusion_focal_term(prep: ExclusionPrepared, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """Exclusion focal ``sum e p^gamma log(p + 1) / sum e`` (paper Eq. 11).

    Parameters
    ----------
    prep:
        probabilities and exclusion targets.
    gamma:
        focusing parameter (paper: 2).
    """
    if not prep.nonempty:
        return _no_term(prep)
    values = prep.prob**gamma * torch.log1p(prep.prob)
    return torch.where(prep.excluded, values, 0.0).sum() / prep.excluded.sum().to(prep.prob.dtype)


def exclusion_topk_term(prep: ExclusionPrepared, percent: float = DEFAULT_TOPK_PERCENT) -> torch.Tensor:
    """Exclusion top-k: mean of the largest k% of voxel-wise ``sum_j e_j log(p_j + 1)`` (paper Eq. 12).

    Parameters
    ----------
    prep:
        probabilities and exclusion targets.
    percent:
        k in percent (paper: 10).
    """
    voxelwise = torch.where(prep.excluded, torch.log1p(prep.prob), 0.0).sum(dim=1)  # b, n
    return topk_fraction_mean(voxelwise, percent)


def exclusion_lovasz_term(prep: ExclusionPrepared) -> torch.Tensor:
    """Exclusion Lovasz: mean over non-empty channels of ``1 - ext(|e_j - p_j|; e_j)`` (paper Eq. 13).

    Parameters
    ----------
    prep:
        probabilities and exclusion targets.
    """
    if not prep.nonempty:
        return _no_term(prep)
    channels = list(prep.nonempty)
    # [B, K, N] -> [J, B * N]: one sorted row per channel over the flattened batch
    prob = prep.prob[:, channels].transpose(0, 1).reshape(len(channels), -1)  # j, b*n
    positives = prep.excluded[:, channels].transpose(0, 1).reshape(len(channels), -1)  # j, b*n
    errors = (positives.to(prob.dtype) - prob).abs()
    return (1.0 - lovasz_extension(errors, positives)).mean()
