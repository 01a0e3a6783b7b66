"""The ignore label in the losses: voxels whose target is ``IGNORE_CLASS`` are taken out of every term.

A site may declare label values whose class is unknown; preprocessing writes them as
:data:`fedpsmos.organs.IGNORE_CLASS` (255), as nnU-Net's ignore label. Every loss term of this package is a
batch-style reduction over the voxels of a prepared record (sums for Dice, means for CE and focal, the top k%
for top-k, one sorted row per class for Lovasz), so leaving a voxel out of all of them at once is the same as
deleting it from the batch. This module does exactly that, after the preparation and before the terms:

1. the ignored voxels' targets are replaced by background (0) for the preparation only, so gathers and
   one-hots stay in range (their values are discarded in step 2);
2. the prepared record is restricted to the kept voxels and flattened into one sample ``[1, K, M]``
   (M = kept voxels of the batch). Every per-voxel quantity was computed voxel by voxel, so restricting
   after preparation equals preparing only the kept voxels; the batch-style sums do not care which sample
   a voxel came from.

Consequences: ignored voxels add nothing to Dice numerators or denominators, CE and focal average over the
kept voxels, top-k takes its k% among the kept voxels, Lovasz drops them (the reference Lovasz-softmax's
``ignore`` argument) and considers only classes present among the kept voxels, exclusion terms skip a channel
whose exclusion target lies entirely on ignored voxels. The gradient at an ignored voxel is exactly zero: the
restriction's backward writes zeros there, and the preparation is voxel-wise.

A batch without ignored voxels never comes here (``fedpsmos.losses.compose`` checks first), so its loss is
bit-identical to the loss without ignore support. Samples all of whose voxels are ignored are dropped from the
batch before any of this (see :class:`~fedpsmos.losses.compose.PartialLoss`)."""

from __future__ import annotations

import torch

from fedpsmos.losses.conventional import Prepared
from fedpsmos.losses.exclusion import ExclusionPrepared
from fedpsmos.organs import IGNORE_CLASS


def ignored_voxels(target: torch.Tensor) -> torch.Tensor:
    """Bool mask of the voxels whose target is :data:`~fedpsmos.organs.IGNORE_CLASS`.

    Parameters
    ----------
    target:
        int64 label map of any shape.
    """
    return target == IGNORE_CLASS


def fill_ignored(target: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    """``target`` with its ignored voxels set to background, for the preparation only (module step 1).

    Parameters
    ----------
    target:
        int64 ``[B, N]``.
    ignored:
        bool ``[B, N]`` from :func:`ignored_voxels`.
    """
    return target.masked_fill(ignored, 0)


def _keep_channels(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[B, K, N]`` restricted to the kept voxels, as ``[1, K, M]`` in (sample, voxel) order."""
    return values.transpose(0, 1)[:, keep][None]


def keep_prepared(prep: Prepared, keep: torch.Tensor) -> Prepared:
    """A conventional or marginal record restricted to the voxels ``keep`` marks, as one sample.

    Parameters
    ----------
    prep:
        record over ``[B, K, N]``, prepared with the ignored targets filled by :func:`fill_ignored`.
    keep:
        bool ``[B, N]``: the voxels that count (target not ignored).
    """
    return Prepared(
        log_prob=_keep_channels(prep.log_prob, keep),
        prob=_keep_channels(prep.prob, keep),
        log_prob_target=prep.log_prob_target[keep][None],
        target=prep.target[keep][None],
        onehot=_keep_channels(prep.onehot, keep),
        dice_classes=prep.dice_classes,
    )


def keep_exclusion_prepared(prep: ExclusionPrepared, keep: torch.Tensor) -> ExclusionPrepared:
    """An exclusion record restricted to the voxels ``keep`` marks, as one sample; non-empty channels redone.

    Parameters
    ----------
    prep:
        record over ``[B, K, N]``, prepared with the ignored targets filled by :func:`fill_ignored`.
    keep:
        bool ``[B, N]``: the voxels that count (target not ignored).
    """
    excluded = _keep_channels(prep.excluded, keep)
    nonempty = excluded.any(dim=2).any(dim=0).nonzero().flatten().tolist()
    return ExclusionPrepared(
        prob=_keep_channels(prep.prob, keep), excluded=excluded, nonempty=tuple(int(c) for c in nonempty)
    )
