"""Partial-supervision losses (paper Sec. 4.1): conventional, marginal, exclusion forms.

The formulas and the choices behind them: docs/design.md "Losses".

Modules, one concept each:

- ``conventional``: Dice, CE, focal, top-k and Lovasz-softmax on prepared probabilities (paper Eq. 3-7 with
  q = p).
- ``marginal``: the marginal preparation, unlabelled organs merged into background (Shi et al. Eq. 2).
- ``exclusion``: exclusion targets and the five exclusion terms (paper Eq. 8-13, this project's reading).
- ``lovasz``: the Lovasz extension of the Jaccard loss, batched over classes (Berman et al. 2018).
- ``ignore``: the ignore label (``IGNORE_CLASS``): ignored voxels are taken out of every term.
- ``compose``: :class:`PartialLoss` and :func:`build_loss` (weights from the config's loss combinations).
- ``prior_aware``: PaNN's prior-aware loss (:class:`PriorAwareLoss`, the Table 3 baseline) and its organ
  size prior (:func:`organ_size_prior`, :func:`prior_from_site`).
- ``deep_supervision``: :class:`DeepSupervisionLoss` (nnU-Net v2 weights and nearest-downsampled targets)."""

from fedpsmos.losses.compose import SIDES, TERM_NAMES, PartialLoss, build_loss
from fedpsmos.losses.deep_supervision import DeepSupervisionLoss, deep_supervision_weights, downsample_target
from fedpsmos.losses.prior_aware import PriorAwareLoss, organ_size_prior, prior_from_site

__all__ = [
    "SIDES",
    "TERM_NAMES",
    "DeepSupervisionLoss",
    "PartialLoss",
    "PriorAwareLoss",
    "build_loss",
    "deep_supervision_weights",
    "downsample_target",
    "organ_size_prior",
    "prior_from_site",
]
