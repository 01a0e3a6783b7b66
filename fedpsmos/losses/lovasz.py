"""The Lovasz extension of the Jaccard loss (Berman, Rannen Triki, Blaschko, CVPR 2018), batched over classes.

For one class with binary ground truth ``g`` over ``N`` voxels and a per-voxel error vector ``m`` in
[0, 1], the Jaccard loss of a set ``M`` of mispredicted voxels is

    Delta(M) = 1 - |g \\ M| / |g u M|,

and its Lovasz extension (Berman et al., Eq. 8-9) sorts the errors in decreasing order ``m_(1) >= ... >=
m_(N)`` and sums

    ext(m) = sum_i m_(i) * (Delta({1..i}) - Delta({1..i-1})),     Delta({}) = 0.

This module is the pure core (like ``lovasz_softmax_flat`` of the reference code): it takes the error
vectors of several classes as one ``[C, N]`` tensor, sorts every row with one batched ``torch.sort`` and
returns one value per row. Which errors and which positive set are fed in is the caller's business: the
conventional and marginal Lovasz-softmax losses use ``m = |y_c - q_c|`` with ``y_c`` positive
(``fedpsmos.losses.conventional``); the exclusion Lovasz loss uses ``m = |e_j - p_j|`` with the exclusion
target ``e_j`` positive (``fedpsmos.losses.exclusion``)."""

from __future__ import annotations

import torch


def lovasz_grad(positives_sorted: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Increments of the Jaccard loss along each sorted row (Berman et al., Alg. 1, batched).

    Parameters
    ----------
    positives_sorted:
        bool ``[C, N]``: ground-truth membership of each voxel, in the order of decreasing error.
    dtype:
        floating dtype of the result (float32 or wider).

    Returns
    -------
    ``dtype`` ``[C, N]``: ``Delta({1..i}) - Delta({1..i-1})`` per row. Rows without any positive give
    ``[1, 0, ..., 0]`` (the reference code's behaviour); callers skip such rows.
    """
    # Integer cumulative sums are exact up to 2^31 voxels (a float32 cumsum of 0/1 values stops being exact
    # past 2^24 voxels, which a few patches of 80 x 160 x 128 exceed).
    n_pos = positives_sorted.sum(dim=1, keepdim=True, dtype=torch.int32)  # c, 1
    cum_pos = torch.cumsum(positives_sorted, dim=1, dtype=torch.int32)  # c, n
    position = torch.arange(
        1, positives_sorted.shape[1] + 1, device=positives_sorted.device, dtype=torch.int32
    )  # n
    intersection = n_pos - cum_pos  # c, n: |g \ M_i|
    union = n_pos + (position - cum_pos)  # c, n: |g u M_i| >= 1 for i >= 1
    jaccard = 1.0 - intersection.to(dtype) / union.to(dtype)  # c, n
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


def lovasz_extension(errors: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Lovasz extension of the Jaccard loss of each row of ``errors`` (Berman et al., Eq. 9).

    Parameters
    ----------
    errors:
        float ``[C, N]``: per-voxel errors in [0, 1]; gradients flow through them.
    positives:
        bool ``[C, N]``: the positive (ground-truth) set of each row.

    Returns
    -------
    float ``[C]``: the extension per row; on hard 0/1 errors it equals the Jaccard loss ``1 - IoU``.
    """
    if errors.shape != positives.shape or errors.ndim != 2:
        raise ValueError(
            f"lovasz_extension needs errors and positives of one [C, N] shape, got {tuple(errors.shape)} "
            f"and {tuple(positives.shape)}"
        )
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)  # c, n
    # half-precision errors (autocast) still get float32 increments: 1/N steps vanish in float16
    dtype = torch.promote_types(errors.dtype, torch.float32)
    with torch.no_grad():
        grad = lovasz_grad(torch.gather(positives, 1, order), dtype)  # c, n
    return (errors_sorted.to(dtype) * grad).sum(dim=1)
