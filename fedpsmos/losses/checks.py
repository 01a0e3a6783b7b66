"""Input checks of the partial-supervision losses: a bad batch fails with one clear line, not a NaN later."""

from __future__ import annotations

import torch

from fedpsmos.organs import IGNORE_CLASS


def validate_inputs(
    logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a batch and return ``(target as int64, labelled as bool on the logits' device)``.

    Parameters
    ----------
    logits:
        float ``[B, C + 1, *spatial]``, finite.
    target:
        ``[B, 1, *spatial]`` global classes in ``[0, C]`` or :data:`~fedpsmos.organs.IGNORE_CLASS` (class
        unknown, left out of every term); integer dtype, or float holding whole numbers (as
        nearest-neighbour resampling of a label map leaves them).
    labelled:
        bool (or 0/1) ``[B, C + 1]``; column 0 (background) True; every class occurring in a sample's target
        must be labelled for that sample (an unlabelled organ reads as background in a partial label map).

    Raises
    ------
    ValueError
        naming the offending argument, sample or class.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {type(logits).__name__}")
    if logits.ndim < 3 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [B, C+1 >= 2, *spatial], got shape {tuple(logits.shape)}")
    batch, channels = logits.shape[:2]
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a tensor, got {type(target).__name__}")
    expected = (batch, 1, *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)} "
            f"(expected {expected})"
        )
    if target.is_floating_point():
        if not torch.equal(target, torch.round(target)):
            raise ValueError("target holds non-integer values; it must be a label map of global classes")
    elif target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    ignored = target == IGNORE_CLASS
    has_ignored = bool(ignored.any())
    counted = target[~ignored] if has_ignored else target  # ignored voxels may hold the out-of-range 255
    if counted.numel() > 0:
        low, high = int(counted.min()), int(counted.max())
        if low < 0 or high >= channels:
            raise ValueError(
                f"target values must lie in [0, {channels - 1}] for {channels} channels (or be the ignore "
                f"label {IGNORE_CLASS}), got [{low}, {high}]"
            )
    labelled = torch.as_tensor(labelled, device=logits.device)
    if tuple(labelled.shape) != (batch, channels):
        raise ValueError(f"labelled must be [B, C+1] = {(batch, channels)}, got {tuple(labelled.shape)}")
    if labelled.dtype != torch.bool:
        if labelled.is_floating_point() or not bool(((labelled == 0) | (labelled == 1)).all()):
            raise ValueError(f"labelled must be a bool (or 0/1 integer) mask, got dtype {labelled.dtype}")
        labelled = labelled.bool()
    if not bool(labelled[:, 0].all()):
        bad = (~labelled[:, 0]).nonzero().flatten().tolist()
        raise ValueError(f"labelled[:, 0] (background) must be True for every sample; False for {bad}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits hold NaN or inf values")
    target_long = target.long()
    # ignored voxels count as background here (always labelled): they never make a class "present"
    scattered = target_long.masked_fill(ignored, 0) if has_ignored else target_long
    present = torch.zeros(batch, channels, dtype=torch.bool, device=logits.device)
    present.scatter_(1, scattered.reshape(batch, -1), True)  # b, k: classes occurring in each sample
    unlabelled_present = present & ~labelled
    if bool(unlabelled_present.any()):
        sample = int(unlabelled_present.any(dim=1).nonzero()[0])
        classes = unlabelled_present[sample].nonzero().flatten().tolist()
        if not bool(labelled[sample, 1:].any()):
            raise ValueError(
                f"labelled mask of sample {sample} marks no organ but its target has foreground {classes}"
            )
        raise ValueError(
            f"target of sample {sample} holds classes {classes} that its labelled mask marks unlabelled"
        )
    return target_long, labelled
