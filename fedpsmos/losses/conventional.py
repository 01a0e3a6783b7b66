"""Conventional segmentation losses on prepared probabilities: Dice, CE, focal, top-k and Lovasz-softmax.

Every loss term here reads a :class:`Prepared` record: per-voxel log-probabilities ``log q`` over the C + 1
channels, the label map ``y`` and its one-hot form, all flattened over space (``[B, K, N]``, K = C + 1). The
*conventional* losses prepare it with ``log q = log_softmax(z)`` (:func:`conventional_prepare`); the
*marginal* losses (``fedpsmos.losses.marginal``) override only that preparation hook and reuse these terms
unchanged, so a marginal loss with every organ labelled is its conventional loss (docs/design.md, "Losses").

With ``q_{y}`` the probability of each voxel's label and M = B * N voxels in the batch (paper Eq. 3-7,
written for the conventional case ``q = p``):

- Dice (nnU-Net's ``MemoryEfficientSoftDiceLoss`` with batch Dice, do_bg False, smooth s = 1e-5), per
  foreground class c summed over the whole batch: ``dc_c = (2 sum q_c y_c + s) / (sum y_c + sum q_c + s)``;
  loss ``1 - mean_c dc_c``. nnU-Net returns ``-mean_c dc_c``: the constant 1 keeps the loss non-negative and
  changes no gradient.
- CE: ``-(1/M) sum log q_{y}`` (``torch.nn.CrossEntropyLoss`` with mean reduction).
- Focal (Lin et al. 2017, without class weights): ``-(1/M) sum (1 - q_{y})^gamma log q_{y}``, gamma = 2.
- Top-k (Fan et al. 2017, nnU-Net's ``TopKLoss``): the mean of the largest ``max(1, floor(M k / 100))``
  voxel-wise CE values, k = 10.
- Lovasz-softmax (Berman et al. 2018, ``classes='present'``, ``per_image=False``): for every class c present
  in ``y`` (background included) the Lovasz extension of the Jaccard loss with errors ``|y_c - q_c|`` over
  the whole batch, averaged over those classes.

Precision: every preparation (:func:`conventional_prepare`, the marginal and exclusion ones) first casts the
logits to :func:`accumulation_dtype`, at least float32, as nnU-Net's softmax runs in float32 under autocast.
The terms' sums run over every voxel of the batch: the probabilities of one class over two paper patches
(2 x 80 x 160 x 128 voxels) sum to hundreds of thousands, past float16's maximum 65,504, and bfloat16's 8-bit
mantissa would round the Dice by about 1%. Float32 and float64 inputs are used as they are (bit-identical to
a loss without this cast); gradients flow back to half-precision logits through the cast."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpsmos.losses.lovasz import lovasz_extension

DEFAULT_SMOOTH = 1e-5
DEFAULT_GAMMA = 2.0
DEFAULT_TOPK_PERCENT = 10.0


@dataclass(frozen=True)
class Prepared:
    """What the Dice/CE/focal/top-k/Lovasz terms read, flattened over space (K = C + 1 channels, N voxels).

    ``log_prob`` may hold ``-inf`` on channels a sample merged into background (marginal case); terms read
    those channels only through ``prob`` (exactly 0 there) and never through ``log_prob`` directly.
    """

    log_prob: torch.Tensor  # b, k, n: log q
    prob: torch.Tensor  # b, k, n: q
    log_prob_target: torch.Tensor  # b, n: log q_{y}
    target: torch.Tensor  # b, n (int64): y
    onehot: torch.Tensor  # b, k, n (bool): y_c
    dice_classes: tuple[int, ...]  # foreground channels the Dice averages over


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss computes in for logits of ``dtype``: float32 for float16/bfloat16, else ``dtype``.

    Parameters
    ----------
    dtype:
        the logits' floating dtype.
    """
    return torch.promote_types(dtype, torch.float32)


def _onehot(target: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Boolean one-hot ``[B, K, N]`` of an int64 label map ``[B, N]``."""
    channels = torch.arange(num_channels, device=target.device)
    return target[:, None, :] == channels[None, :, None]  # b, k, n


def prepare_from_log_prob(
    log_prob: torch.Tensor, target: torch.Tensor, dice_classes: tuple[int, ...]
) -> Prepared:
    """Assemble a :class:`Prepared` record from log-probabilities ``[B, K, N]`` and labels ``[B, N]``.

    Parameters
    ----------
    log_prob:
        float ``[B, K, N]``: log q (rows sum to one in probability space).
    target:
        int64 ``[B, N]``: labels in ``[0, K)`` whose channel has a finite ``log_prob``.
    dice_classes:
        foreground channels the Dice averages over.
    """
    log_prob = log_prob.to(accumulation_dtype(log_prob.dtype))  # sums below must not run in float16
    log_prob_target = torch.gather(log_prob, 1, target[:, None, :])[:, 0]  # b, n
    return Prepared(
        log_prob=log_prob,
        prob=log_prob.exp(),
        log_prob_target=log_prob_target,
        target=target,
        onehot=_onehot(target, log_prob.shape[1]),
        dice_classes=dice_classes,
    )


def conventional_prepare(logits: torch.Tensor, target: torch.Tensor) -> Prepared:
    """Conventional preparation (paper Eq. 1): ``log q = log_softmax(z)``, Dice over every foreground class.

    Parameters
    ----------
    logits:
        float ``[B, K, N]``: network outputs z, flattened over space.
    target:
        int64 ``[B, N]``: global classes in ``[0, K)``.
    """
    log_prob = torch.log_softmax(logits.to(accumulation_dtype(logits.dtype)), dim=1)  # b, k, n
    return prepare_from_log_prob(log_prob, target, tuple(range(1, logits.shape[1])))


def dice_term(prep: Prepared, smooth: float = DEFAULT_SMOOTH) -> torch.Tensor:
    """Batch soft Dice loss ``1 - mean_c dc_c`` over ``prep.dice_classes`` (paper Eq. 3, nnU-Net's form).

    Parameters
    ----------
    prep:
        prepared probabilities and labels.
    smooth:
        added to numerator and denominator (nnU-Net: 1e-5).
    """
    if not prep.dice_classes:
        return prep.prob.sum() * 0.0  # no labelled foreground class: nothing to overlap, keep the graph
    axes = (0, 2)  # batch Dice: sum over samples and voxels
    intersect = torch.where(prep.onehot, prep.prob, 0.0).sum(axes)  # k
    sum_pred = prep.prob.sum(axes)  # k
    sum_gt = prep.onehot.sum(axes).to(prep.prob.dtype)  # k
    dc = (2.0 * intersect + smooth) / (sum_gt + sum_pred + smooth).clamp_min(1e-8)  # k
    return 1.0 - dc[list(prep.dice_classes)].mean()


def ce_term(prep: Prepared) -> torch.Tensor:
    """Cross-entropy ``-mean log q_y`` over every voxel of the batch (paper Eq. 4).

    Parameters
    ----------
    prep:
        prepared probabilities and labels.
    """
    return -prep.log_prob_target.mean()


def focal_term(prep: Prepared, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """Focal loss ``-mean (1 - q_y)^gamma log q_y`` (paper Eq. 5, Lin et al. 2017).

    Parameters
    ----------
    prep:
        prepared probabilities and labels.
    gamma:
        focusing parameter (paper: 2).
    """
    q_target = prep.log_prob_target.exp()  # b, n
    return -((1.0 - q_target) ** gamma * prep.log_prob_target).mean()


def topk_fraction_mean(values: torch.Tensor, percent: float) -> torch.Tensor:
    """Mean of the largest ``max(1, floor(numel * percent / 100))`` entries of ``values`` (Fan et al. 2017).

    Parameters
    ----------
    values:
        any-shaped tensor of voxel-wise losses.
    percent:
        k in percent (paper: 10).
    """
    flat = values.reshape(-1)
    count = max(1, int(flat.numel() * percent / 100.0))  # nnU-Net floors; at least one voxel
    return torch.topk(flat, count, sorted=False).values.mean()


def topk_term(prep: Prepared, percent: float = DEFAULT_TOPK_PERCENT) -> torch.Tensor:
    """Top-k CE: the mean of the largest k% of voxel-wise ``-log q_y`` values (paper Eq. 6).

    Parameters
    ----------
    prep:
        prepared probabilities and labels.
    percent:
        k in percent (paper: 10).
    """
    return topk_fraction_mean(-prep.log_prob_target, percent)


def lovasz_term(prep: Prepared) -> torch.Tensor:
    """Lovasz-softmax over the classes present in ``y``, background included (paper Eq. 7, Berman et al.).

    Parameters
    ----------
    prep:
        prepared probabilities and labels.
    """
    present = prep.onehot.any(dim=2).any(dim=0).nonzero().flatten().tolist()  # classes='present'
    # [B, K, N] -> [K', B * N]: one sorted row per class over the flattened batch (per_image=False)
    prob = prep.prob[:, present].transpose(0, 1).reshape(len(present), -1)  # k', b*n
    positives = prep.onehot[:, present].transpose(0, 1).reshape(len(present), -1)  # k', b*n
    errors = (positives.to(prob.dtype) - prob).abs()
    return lovasz_extension(errors, positives).mean()
