"""Deep supervision (nnU-Net v2): the same loss on every decoder output, against a nearest-downsampled target.

``PlainConvUNet(deep_supervision=True)`` returns one logit map per decoder stage, highest resolution first.
As in nnU-Net v2 (``nnUNetTrainer._build_loss`` and batchgeneratorsv2's ``DownsampleSegForDSTransform``):

- the target of output i is the full-resolution label map resampled to that output's spatial shape with
  ``interpolate(mode="nearest-exact")`` (labels are never averaged or max-pooled, so every downsampled voxel
  copies one full-resolution voxel and the ignore label ``IGNORE_CLASS`` stays itself, never blended);
- the default weights are ``w_i = 1 / 2^i``, the lowest resolution gets weight 0, and the weights are
  normalised to sum to one; outputs with weight 0 are not evaluated.

The wrapped loss sees ``(output_i, target_i, labelled)``: the labelled mask is per sample, not per voxel, so
it is the same at every resolution. Any loss with that signature works,
:class:`~fedpsmos.losses.PartialLoss` included."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.functional import interpolate


def deep_supervision_weights(count: int) -> list[float]:
    """nnU-Net v2's deep-supervision weights: ``1 / 2^i``, the last one 0, normalised to sum to 1.

    Parameters
    ----------
    count:
        number of network outputs (>= 1); a single output gets weight 1.
    """
    if count < 1:
        raise ValueError(f"deep supervision needs at least one output, got {count}")
    if count == 1:
        return [1.0]
    weights = [1.0 / 2**i for i in range(count)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-exact resampling of a label map ``[B, 1, *spatial]`` to ``shape`` (nnU-Net's DS targets).

    Parameters
    ----------
    target:
        integer label map ``[B, 1, *spatial]`` at full resolution.
    shape:
        the spatial shape of the output it is compared with.
    """
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    # interpolate is not defined for integer dtypes; class indices up to 2^24 survive float32 unchanged
    resampled = interpolate(target.float(), size=tuple(shape), mode="nearest-exact")
    return resampled.to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a loss over deep-supervision outputs (nnU-Net v2 ``DeepSupervisionWrapper``)."""

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None) -> None:
        """Wrap ``loss``.

        Parameters
        ----------
        loss:
            module called as ``loss(logits, target, labelled)``.
        weights:
            one weight per output, highest resolution first; ``None`` uses
            :func:`deep_supervision_weights` for however many outputs arrive.
        """
        super().__init__()
        if weights is not None:
            weights = [float(w) for w in weights]
            if not weights or any(w < 0 for w in weights) or not any(w > 0 for w in weights):
                raise ValueError(f"deep supervision weights must be >= 0, at least one > 0, got {weights}")
        self.loss = loss
        self.weights = None if weights is None else tuple(weights)

    def forward(
        self, outputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
    ) -> torch.Tensor:
        """Loss summed over outputs with their weights.

        Parameters
        ----------
        outputs:
            logits per decoder stage, highest resolution first (a single tensor counts as one output).
        target:
            integer ``[B, 1, Z, Y, X]`` at the resolution of ``outputs[0]``.
        labelled:
            bool ``[B, C+1]`` passed unchanged to the wrapped loss.
        """
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        if len(outputs) == 0:
            raise ValueError("deep supervision got no network output")
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(outputs))
        if len(weights) != len(outputs):
            raise ValueError(
                f"deep supervision has {len(weights)} weights but the network gave {len(outputs)} outputs"
            )
        if target.ndim != outputs[0].ndim or tuple(target.shape[2:]) != tuple(outputs[0].shape[2:]):
            raise ValueError(
                f"target shape {tuple(target.shape)} must match the highest-resolution output "
                f"{tuple(outputs[0].shape)} in its spatial axes"
            )
        # a float32 total for half-precision outputs (autocast): the wrapped losses return float32
        total = outputs[0].new_zeros((), dtype=torch.promote_types(outputs[0].dtype, torch.float32))
        for weight, output in zip(weights, outputs, strict=True):
            if weight == 0.0:
                continue
            total = total + weight * self.loss(output, downsample_target(target, output.shape[2:]), labelled)
        return total
