"""Federated averaging (McMahan et al. 2017; the paper's Alg. 1 and its objective, Sec. 4.2).

The global model after a round is the weighted mean of the sites' local models,

    w_{t+1} = sum_k (n_k / n) w_{t+1}^k,   n = sum_k n_k,

with ``n_k`` the number of training cases of site ``k`` (docs/design.md, "Federated averaging": weights
n_k / n by training cases, all floating-point tensors of the state dict averaged). Floating tensors are
accumulated in float64 and cast back to their own dtype, so float16/bfloat16 parameters do not lose precision
in the sum.

Integer and boolean buffers (e.g. BatchNorm's ``num_batches_tracked``) are not parameters and have no
meaningful mean. Policy: they take the element-wise **maximum** over sites (``any`` for booleans). Every
site starts a round from the same global buffer, so the maximum is "the most updates any site made", which
is what a step counter means; instance norm (the project's network) keeps no running statistics, so no such
buffer exists there.

This module is pure: no files, no devices. :func:`check_states` is the validation the aggregator runs before
averaging (keys, shapes, dtypes, finiteness) and names the offending site and round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


class AggregationError(ValueError):
    """Site states cannot be averaged: mismatched keys/shapes/dtypes, non-finite values or bad weights."""


def fedavg_weights(counts: Sequence[int]) -> list[float]:
    """FedAvg weights ``n_k / n`` (McMahan 2017, Eq. in Sec. 2; the paper's objective in Sec. 4.2).

    Parameters
    ----------
    counts:
        Training cases ``n_k`` per site; each must be a positive integer.
    """
    if not counts:
        raise AggregationError("no site to aggregate")
    if any(int(c) != c or c <= 0 for c in counts):
        raise AggregationError(f"site case counts must be positive integers, got {list(counts)}")
    total = float(sum(counts))
    return [c / total for c in counts]


def aggregate(states: Sequence[Mapping[str, Tensor]], counts: Sequence[int]) -> dict[str, Tensor]:
    """Weighted average of site state dicts with weights ``n_k / n`` (FedAvg).

    Parameters
    ----------
    states:
        One state dict per site, all with the same keys, shapes and dtypes (see :func:`check_states`).
    counts:
        Training cases ``n_k`` per site, in the order of ``states``.
    """
    if len(states) != len(counts):
        raise AggregationError(f"{len(states)} states but {len(counts)} case counts")
    weights = fedavg_weights(counts)
    averaged: dict[str, Tensor] = {}
    # PlainConvUNet's state dict lists each encoder tensor twice (encoder.* and decoder.encoder.*, one
    # storage): average a storage once and let both keys share the result, as they did in the sites' models.
    done: dict[tuple[object, ...], Tensor] = {}
    for key, first in states[0].items():
        stacked = [state[key] for state in states]
        alias = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in stacked)
        if first.numel() and alias in done:
            averaged[key] = done[alias]
            continue
        if first.is_floating_point() or first.is_complex():
            wide = torch.complex128 if first.is_complex() else torch.float64
            total = torch.zeros(first.shape, dtype=wide, device=first.device)
            for weight, tensor in zip(weights, stacked, strict=True):
                total.add_(tensor.to(wide), alpha=weight)
            averaged[key] = total.to(first.dtype)
        elif first.dtype == torch.bool:
            averaged[key] = torch.stack(stacked).any(dim=0)
        else:  # integer buffers: the maximum over sites (module docstring)
            averaged[key] = torch.stack(stacked).amax(dim=0)
        done[alias] = averaged[key]
    return averaged


def check_states(
    states: Sequence[Mapping[str, Tensor]],
    reference: Mapping[str, Tensor],
    names: Sequence[str],
    round_index: int,
) -> None:
    """Refuse site states that do not match the reference (previous global) model exactly.

    Checks, per site: the same keys as ``reference`` (no missing, no extra), each tensor's shape and dtype
    equal to the reference's, and every floating value finite. The error names the site, the round and the
    first offending key.

    Parameters
    ----------
    states:
        Site state dicts to be averaged.
    reference:
        The state dict every site started the round from (the previous global model).
    names:
        Site names, in the order of ``states`` (used in error messages).
    round_index:
        The round being aggregated (used in error messages).
    """
    if len(states) != len(names):
        raise AggregationError(f"round {round_index}: {len(states)} states but {len(names)} site names")
    ref_keys = list(reference)
    for name, state in zip(names, states, strict=True):
        seen: set[tuple[int, object, object]] = set()  # storages already scanned (encoder.* aliases)
        where = f"round {round_index}, site {name}"
        missing = [k for k in ref_keys if k not in state]
        extra = [k for k in state if k not in reference]
        if missing:
            raise AggregationError(f"{where}: missing key(s) {missing[:3]} of {len(missing)}")
        if extra:
            raise AggregationError(f"{where}: unexpected key(s) {extra[:3]} of {len(extra)}")
        for key in ref_keys:
            tensor, ref = state[key], reference[key]
            if not isinstance(tensor, Tensor):
                raise AggregationError(f"{where}: {key} is a {type(tensor).__name__}, not a tensor")
            if tensor.shape != ref.shape:
                raise AggregationError(
                    f"{where}: {key} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
                )
            if tensor.dtype != ref.dtype:
                raise AggregationError(f"{where}: {key} has dtype {tensor.dtype}, expected {ref.dtype}")
            alias = (tensor.data_ptr(), tensor.shape, tensor.stride())
            if tensor.numel() and alias in seen:
                continue
            seen.add(alias)
            if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
                raise AggregationError(f"{where}: {key} holds non-finite values")
