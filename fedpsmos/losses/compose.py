"""The composed partial-supervision loss: weighted marginal-side and exclusion-side terms (paper Sec. 4.1).

A loss combination is configuration (``config.yaml``, ``losses.combinations``)::

    {"marginal": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
     "exclusion": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0}}

(the paper's best, Sec. 4.2). Term names: dice, ce, focal, topk, lovasz. For a batch of B samples of which
B_p are partially labelled (their labelled mask misses at least one organ):

    loss = sum_t w_t^marg * M_t(batch) + (B_p / B) * sum_t w_t^excl * E_t(partial samples)

- ``M_t`` is the marginal form of term t (``fedpsmos.losses.marginal``) over the whole batch. A fully
  labelled sample merges nothing, so it gets exactly the conventional form (docs/design.md "Losses":
  fully labelled samples use the conventional losses); a batch may mix both kinds.
- ``E_t`` is the exclusion form (``fedpsmos.losses.exclusion``) over the partially labelled samples only.
  Choice of this project: exclusion terms do not apply to fully labelled samples, so with every organ
  labelled the composed loss is exactly the conventional composition of the marginal-side terms (tested).
  The factor ``B_p / B`` makes a mixed batch weigh exclusion by the share of samples it concerns; it is 1
  for a batch from one partially labelled site.

A model with fewer output channels (a site-alone binary model: C + 1 = 2 and a full mask) gets the
conventional losses through the same class.

Ignore label (``fedpsmos.losses.ignore``): voxels whose target is ``IGNORE_CLASS`` are left out of every term
on both sides. A sample all of whose voxels are ignored is dropped from the batch (from B and B_p alike), so
the loss equals that of the batch without it; a batch of such samples gives a zero that keeps the graph. A
batch without ignored voxels takes the unchanged code path."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedpsmos.losses import conventional, exclusion
from fedpsmos.losses.checks import validate_inputs
from fedpsmos.losses.conventional import (
    DEFAULT_GAMMA,
    DEFAULT_SMOOTH,
    DEFAULT_TOPK_PERCENT,
    Prepared,
    accumulation_dtype,
)
from fedpsmos.losses.exclusion import ExclusionPrepared, exclusion_prepare
from fedpsmos.losses.ignore import fill_ignored, ignored_voxels, keep_exclusion_prepared, keep_prepared
from fedpsmos.losses.marginal import marginal_prepare
from fedpsmos.losses.prior_aware import PriorAwareLoss

TERM_NAMES: tuple[str, ...] = ("dice", "ce", "focal", "topk", "lovasz")
SIDES: tuple[str, ...] = ("marginal", "exclusion")
PRIOR_AWARE = "prior_aware"  # spec key of PaNN's prior term (fedpsmos.losses.prior_aware)


def _check_terms(side: str, terms: Mapping[str, float]) -> dict[str, float]:
    """Validated ``{term: weight}`` of one side, zero weights dropped."""
    if not isinstance(terms, Mapping):
        raise ValueError(f"loss spec side {side!r} must map term names to weights, not {type(terms)}")
    checked: dict[str, float] = {}
    for name, weight in terms.items():
        if name not in TERM_NAMES:
            raise ValueError(f"unknown {side} loss term {name!r} (known: {', '.join(TERM_NAMES)})")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"weight of {side} loss term {name!r} must be a finite number, got {weight!r}")
        if weight < 0:
            raise ValueError(f"weight of {side} loss term {name!r} must be >= 0, got {weight}")
        if weight > 0:
            checked[name] = float(weight)
    return checked


class PartialLoss(nn.Module):
    """Conventional / marginal + exclusion loss of a partially labelled batch (paper Sec. 4.1, Eq. 3-13)."""

    def __init__(
        self,
        marginal: Mapping[str, float] | None = None,
        exclusion: Mapping[str, float] | None = None,
        *,
        smooth: float = DEFAULT_SMOOTH,
        gamma: float = DEFAULT_GAMMA,
        topk_percent: float = DEFAULT_TOPK_PERCENT,
    ) -> None:
        """Weighted loss terms on each side.

        Parameters
        ----------
        marginal:
            ``{term: weight}`` applied in marginal form (conventional form on fully labelled samples).
        exclusion:
            ``{term: weight}`` applied in exclusion form to partially labelled samples.
        smooth:
            Dice smoothing (nnU-Net: 1e-5).
        gamma:
            focal focusing parameter (paper: 2).
        topk_percent:
            top-k share of voxels in percent (paper: 10).
        """
        super().__init__()
        self.marginal_weights = _check_terms("marginal", marginal or {})
        self.exclusion_weights = _check_terms("exclusion", exclusion or {})
        if not self.marginal_weights and not self.exclusion_weights:
            raise ValueError("loss spec names no term with a positive weight on either side")
        if not (0.0 < topk_percent <= 100.0):
            raise ValueError(f"topk_percent must lie in (0, 100], got {topk_percent}")
        self.smooth, self.gamma, self.topk_percent = float(smooth), float(gamma), float(topk_percent)

    def _marginal_term(self, name: str, prep: Prepared) -> torch.Tensor:
        """One marginal-side term (conventional on fully labelled samples) by name."""
        if name == "dice":
            return conventional.dice_term(prep, self.smooth)
        if name == "ce":
            return conventional.ce_term(prep)
        if name == "focal":
            return conventional.focal_term(prep, self.gamma)
        if name == "topk":
            return conventional.topk_term(prep, self.topk_percent)
        return conventional.lovasz_term(prep)

    def _exclusion_term(self, name: str, prep: ExclusionPrepared) -> torch.Tensor:
        """One exclusion-side term by name."""
        if name == "dice":
            return exclusion.exclusion_dice_term(prep, self.smooth)
        if name == "ce":
            return exclusion.exclusion_ce_term(prep)
        if name == "focal":
            return exclusion.exclusion_focal_term(prep, self.gamma)
        if name == "topk":
            return exclusion.exclusion_topk_term(prep, self.topk_percent)
        return exclusion.exclusion_lovasz_term(prep)

    def extra_repr(self) -> str:
        """Weights of both sides, for ``print(model)``."""
        return f"marginal={self.marginal_weights}, exclusion={self.exclusion_weights}"

    def terms(
        self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Unweighted value of every configured term, keyed ``marginal/<name>`` and ``exclusion/<name>``.

        Parameters
        ----------
        logits, target, labelled:
            as for :meth:`forward`. Exclusion terms are omitted when the batch holds no partially labelled
            sample (with at least one voxel that is not ignored); their values are over the partially
            labelled samples (before the ``B_p / B`` factor).
        """
        return self._terms_and_share(logits, target, labelled)[0]

    def _terms_and_share(
        self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The terms of :meth:`terms` and the exclusion factor ``B_p / B`` of the samples that count."""
        target_long, mask = validate_inputs(logits, target, labelled)
        batch, channels = logits.shape[:2]
        flat_logits = logits.reshape(batch, channels, -1)  # b, k, n
        flat_target = target_long.reshape(batch, -1)  # b, n
        ignored = ignored_voxels(flat_target)  # b, n
        if not bool(ignored.any()):
            return self._evaluate(flat_logits, flat_target, mask, None), _partial_share(mask)
        counted = ~ignored.all(dim=1)  # b: samples with at least one voxel that is not ignored
        if not bool(counted.any()):
            # every voxel ignored: nothing to learn, keep the graph
            zero = (flat_logits * 0.0).sum().to(accumulation_dtype(logits.dtype))
            return {f"marginal/{name}": zero for name in self.marginal_weights}, 0.0
        if not bool(counted.all()):
            flat_logits, flat_target, mask, ignored = (
                flat_logits[counted],
                flat_target[counted],
                mask[counted],
                ignored[counted],
            )
        values = self._evaluate(flat_logits, fill_ignored(flat_target, ignored), mask, ~ignored)
        return values, _partial_share(mask)

    def _evaluate(
        self,
        flat_logits: torch.Tensor,
        flat_target: torch.Tensor,
        mask: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Both sides' terms on flattened ``[B, K, N]`` logits; ``keep`` (bool ``[B, N]``) drops voxels."""
        values: dict[str, torch.Tensor] = {}
        if self.marginal_weights:
            prep = marginal_prepare(flat_logits, flat_target, mask)
            if keep is not None:
                prep = keep_prepared(prep, keep)
            for name in self.marginal_weights:
                values[f"marginal/{name}"] = self._marginal_term(name, prep)
            del prep  # free the [B, K, N] buffers before the exclusion side builds its own
        partial = (~mask.all(dim=1)).nonzero().flatten()
        if self.exclusion_weights and partial.numel() > 0:
            eprep = exclusion_prepare(flat_logits[partial], flat_target[partial], mask[partial])
            if keep is not None:
                eprep = keep_exclusion_prepared(eprep, keep[partial])
            for name in self.exclusion_weights:
                values[f"exclusion/{name}"] = self._exclusion_term(name, eprep)
        return values

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Scalar loss of a batch.

        Parameters
        ----------
        logits:
            float ``[B, C+1, Z, Y, X]`` (any number of spatial axes), C + 1 >= 2.
        target:
            integer ``[B, 1, Z, Y, X]`` global classes, or ``IGNORE_CLASS`` where the class is unknown;
            unlabelled organs read as background.
        labelled:
            bool ``[B, C+1]``: classes each sample labels, column 0 True; all True = fully labelled.
        """
        values, partial_share = self._terms_and_share(logits, target, labelled)
        total = logits.new_zeros((), dtype=accumulation_dtype(logits.dtype))
        for key, value in values.items():
            side, name = key.split("/")
            if side == "marginal":
                total = total + self.marginal_weights[name] * value
            else:
                total = total + self.exclusion_weights[name] * partial_share * value
        return total


def _partial_share(mask: torch.Tensor) -> float:
    """``B_p / B``: the share of samples whose labelled mask (bool ``[B, K]``) misses an organ."""
    return float((~mask.all(dim=1)).sum()) / mask.shape[0]


def build_loss(
    spec: Mapping[str, Any],
    *,
    smooth: float = DEFAULT_SMOOTH,
    gamma: float = DEFAULT_GAMMA,
    topk_percent: float = DEFAULT_TOPK_PERCENT,
) -> PartialLoss | PriorAwareLoss:
    """Build a :class:`PartialLoss` from a config combination ``{"marginal": {...}, "exclusion": {...}}``.

    A spec with a ``prior_aware`` entry, ``{"marginal": {...}, "prior_aware": {"prior": [C + 1 floats],
    "weight": w}}``, builds PaNN's :class:`~fedpsmos.losses.prior_aware.PriorAwareLoss` instead: the marginal
    side is its supervised part, and the exclusion side must be missing or empty.

    Parameters
    ----------
    spec:
        ``{side: {term: weight}}`` with sides ``marginal`` and ``exclusion`` (either may be missing or empty)
        and terms among dice, ce, focal, topk, lovasz; optionally ``prior_aware``.
    smooth, gamma, topk_percent:
        hyper-parameters passed to :class:`PartialLoss` (paper values by default).
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"loss spec must be a mapping of sides to terms, got {type(spec).__name__}")
    unknown = [side for side in spec if side not in (*SIDES, PRIOR_AWARE)]
    if unknown:
        raise ValueError(f"unknown loss spec side {unknown[0]!r} (known: {', '.join((*SIDES, PRIOR_AWARE))})")
    prior_aware = spec.get(PRIOR_AWARE)
    if prior_aware is not None and spec.get("exclusion"):
        raise ValueError("a prior_aware loss spec takes no exclusion-side term (the prior term replaces it)")
    supervised = PartialLoss(
        spec.get("marginal") or {},
        spec.get("exclusion") or {},
        smooth=smooth,
        gamma=gamma,
        topk_percent=topk_percent,
    )
    if prior_aware is None:
        return supervised
    if not isinstance(prior_aware, Mapping) or set(prior_aware) != {"prior", "weight"}:
        raise ValueError(
            f"loss spec {PRIOR_AWARE!r} must be {{'prior': [...], 'weight': w}}, got {prior_aware!r}"
        )
    return PriorAwareLoss(supervised, prior_aware["prior"], prior_aware["weight"])
