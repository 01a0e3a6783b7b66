"""Marginal losses (Shi et al. 2021, Eq. 2; paper Sec. 4.1.1, Eq. 2-7): unlabelled organs become background.

For a sample whose labelled organ set is L (background always labelled), the merged probabilities are

    q_0 = p_0 + sum_{c not in L} p_c,     q_c = p_c for c in L,     q_c = 0 for an unlabelled organ c,

and every loss term is the conventional one evaluated on ``(q, y')``, where ``y'`` is the partial label map
(its unlabelled organs already read as background). Only the data-preparation hook differs from
``fedpsmos.losses.conventional``: the terms are the same functions.

``log q`` is computed stably from the logits z, never by summing probabilities or raw logits:

    log q_0 = logsumexp_{j in {0} u (not L)} z_j - logsumexp_j z_j,     log q_c = z_c - logsumexp_j z_j.

With L = every organ the merge set is {0}, ``q = softmax(z)`` and each marginal loss equals its conventional
loss (tested). The marginal Dice and CE are Shi et al.'s; the marginal focal, top-k and Lovasz losses apply
the same merging to the conventional focal, top-k and Lovasz-softmax losses: this project's reading of the
paper's Eq. 5-7, whose symbols the paper's text does not keep.

In a batch mixing samples with different L, each sample merges its own unlabelled organs. The batch Dice
averages over the foreground classes labelled by at least one sample of the batch (a class nobody labels has
q = y' = 0 and would only add a constant); samples that do not label class c add nothing to its sums because
their q_c and y'_c are zero. A fully labelled sample therefore contributes exactly its conventional terms."""

from __future__ import annotations

import torch

from fedpsmos.losses.conventional import Prepared, accumulation_dtype, prepare_from_log_prob


def marginal_log_prob(logits: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Stable ``log q`` of the merged classes (Shi et al. Eq. 2); ``-inf`` on unlabelled organ channels.

    Parameters
    ----------
    logits:
        float ``[B, K, N]``: network outputs z over K = C + 1 channels, flattened over space.
    labelled:
        bool ``[B, K]``: the classes each sample labels; column 0 (background) is True.
    """
    lse_all = torch.logsumexp(logits, dim=1, keepdim=True)  # b, 1, n
    merged = ~labelled  # b, k: unlabelled organs ...
    merged[:, 0] = True  # ... plus background form the merged background class
    lse_merged = torch.logsumexp(logits.masked_fill(~merged[:, :, None], float("-inf")), dim=1, keepdim=True)
    organs = torch.where(labelled[:, 1:, None], logits[:, 1:], float("-inf"))  # b, k-1, n
    return torch.cat([lse_merged, organs], dim=1) - lse_all  # b, k, n


def marginal_prepare(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> Prepared:
    """Marginal preparation: merged ``log q`` and Dice over the foreground classes labelled in the batch.

    Parameters
    ----------
    logits:
        float ``[B, K, N]``: network outputs z, flattened over space.
    target:
        int64 ``[B, N]``: the partial label map y' (only labelled classes occur).
    labelled:
        bool ``[B, K]``: the classes each sample labels; column 0 is True.
    """
    organs_in_batch = labelled[:, 1:].any(dim=0).nonzero().flatten() + 1
    logits = logits.to(accumulation_dtype(logits.dtype))  # logsumexp and the sums after it in float32
    return prepare_from_log_prob(
        marginal_log_prob(logits, labelled), target, tuple(int(c) for c in organs_in_batch.tolist())
    )
