"""PIPO: a U-Net with pyramid input and pyramid output, the Table 3 baseline of Fang and Yan (IEEE TMI 2020).

Fang and Yan segment organs over partially labelled data sets with a U-Net whose encoder receives the image at
several scales (pyramid input) and whose decoder predicts at several scales (pyramid output), every output
trained with their "target adaptive loss", which is the marginal loss of :mod:`fedpsmos.losses.marginal`.
This module builds that network from the same ``dynamic_network_architectures`` blocks as the plain
nnU-Net (:func:`fedpsmos.network.build_network`), with the plain spec's features, strides, kernels and
convolutions per stage, so Table 3 compares the architectures, not their sizes or training.

Pyramid input
    Encoder stage 0 is the plain stem. Every later stage ``s`` starts as in the plain net with its strided
    convolution (features ``F[s-1] -> F[s]``, stride ``strides[s]``), which takes the place of the original's
    max pooling. The input image, average-pooled to the stage's resolution (the cumulative strides of stages
    ``0..s``, pooled stage by stage with ``kernel = stride``), goes through one conv-norm-nonlinearity block
    with ``F[s]`` output channels and is **concatenated** with the strided convolution's output; the stage's
    remaining ``conv_per_stage - 1`` convolutions take the ``2 F[s]`` channels back to ``F[s]``. That is where
    the original fuses too (after the pooling, before the level's convolutions), and concatenation is what
    the original does (its summation variant is commented out), the same equal-width concatenation the U-Net
    decoder uses for its skips. The convolutions per stage stay those of the plain net; only the first
    of a stage's remaining convolutions gets wider. Stages must therefore have at least two convolutions.

Pyramid output
    The decoder is nnU-Net's ``UNetDecoder`` unchanged: one 1x1x1 segmentation head per decoder scale. With
    deep supervision on, the forward pass returns their logits from finest to coarsest (a list), with it off
    only the finest (a tensor), exactly as ``PlainConvUNet`` does, and the ``decoder.deep_supervision`` switch
    works the same way. The project's trainer therefore wraps the loss in
    :class:`~fedpsmos.losses.DeepSupervisionLoss` and sliding-window inference takes the finest head, with no
    change.

Where it differs from the original PIPO, and why
    - 3D, not 2D: the original is a 2D network on axial slices; every other model of Table 3 is 3D nnU-Net,
      so a 3D PIPO isolates the architecture's contribution.
    - nnU-Net's plain convolution stages (conv, instance norm, leaky ReLU, strided convolutions) instead of
      the original's pre-activation residual blocks with batch norm and max pooling, and transposed
      convolutions instead of bilinear upsampling: same building blocks and size as the plain baseline.
    - Multi-scale feature abstraction: the original passes a coarser pyramid input through more residual
      blocks (so every scale reaches the encoder at a matching depth) and gives every decoder output its own
      stack of residual blocks of matching depth. Here each pyramid input has one conv block and every
      output is nnU-Net's 1x1x1 head: the multi-scale input and output are kept, the extra depth (which
      would make PIPO several times larger than the other models) is not.
    - Fusion of outputs: the original upsamples every scale's prediction to full resolution and fuses them
      with learned, image-adaptive scale weights (attention with global pooling and a softmax over scales).
      Here the scales are trained against nearest-downsampled targets with nnU-Net's deep-supervision
      weights (``1/2^i``, the coarsest weight 0) and inference uses the finest output, like every other
      model of the project, so sliding-window inference and evaluation stay shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_pool_op
from dynamic_network_architectures.building_blocks.simple_conv_blocks import (
    ConvDropoutNormReLU,
    StackedConvBlocks,
)
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn


def _layer_kwargs(encoder_like: Any) -> dict[str, Any]:
    """Conv bias, norm, dropout and nonlinearity settings in the keyword form of the building blocks."""
    return {
        "conv_bias": encoder_like.conv_bias,
        "norm_op": encoder_like.norm_op,
        "norm_op_kwargs": encoder_like.norm_op_kwargs,
        "dropout_op": encoder_like.dropout_op,
        "dropout_op_kwargs": encoder_like.dropout_op_kwargs,
        "nonlin": encoder_like.nonlin,
        "nonlin_kwargs": encoder_like.nonlin_kwargs,
    }


def _image_pool(conv_op: type[nn.Module], stride: Sequence[int]) -> nn.Module:
    """Average pooling by ``stride`` (``kernel = stride``), or the identity for a unit stride.

    ``ceil_mode`` gives ``ceil(n / stride)`` voxels, the size of a strided convolution's output with
    ``padding = (kernel - 1) // 2``, so odd sizes line up with the encoder's features too.
    """
    if all(int(s) == 1 for s in stride):
        return nn.Identity()
    pool = get_matching_pool_op(conv_op, pool_type="avg")
    return pool(kernel_size=list(stride), stride=list(stride), ceil_mode=True)


class PyramidInputStage(nn.Module):
    """Encoder stage ``s > 0``: strided convolution, concatenated pyramid input, remaining convolutions."""

    def __init__(
        self,
        settings: Any,
        in_features: int,
        features: int,
        image_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        n_convs: int,
    ) -> None:
        """Build the stage.

        Parameters
        ----------
        settings:
            object with the encoder's layer settings (``conv_op``, ``conv_bias``, ``norm_op`` ...).
        in_features:
            channels of the previous stage's output.
        features:
            channels of this stage (``F[s]``).
        image_channels:
            channels of the input image.
        kernel_size, stride:
            the stage's kernel and stride (z, y, x).
        n_convs:
            convolutions of the stage in the plain net, at least 2.
        """
        super().__init__()
        if n_convs < 2:
            raise ValueError(f"a pyramid-input stage needs at least 2 convolutions, got {n_convs}")
        conv_op = settings.conv_op
        kw = _layer_kwargs(settings)
        self.down = ConvDropoutNormReLU(conv_op, in_features, features, list(kernel_size), list(stride), **kw)
        self.image_pool = _image_pool(conv_op, stride)
        self.image_conv = ConvDropoutNormReLU(conv_op, image_channels, features, list(kernel_size), 1, **kw)
        kernel = list(kernel_size)
        self.convs = StackedConvBlocks(n_convs - 1, conv_op, 2 * features, features, kernel, 1, **kw)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the stage's features and the image pooled to its resolution (the next stage's input).

        Parameters
        ----------
        x:
            the previous stage's features.
        image:
            the input image at the previous stage's resolution.
        """
        image = self.image_pool(image)
        fused = torch.cat((self.down(x), self.image_conv(image)), dim=1)
        return self.convs(fused), image


class PyramidInputEncoder(nn.Module):
    """Plain-conv encoder whose stages after the first also see the image at their own resolution.

    Exposes the attributes ``UNetDecoder`` reads from an encoder (``output_channels``, ``strides``,
    ``kernel_sizes``, ``conv_op`` and the layer settings) and returns the skips, bottleneck last.
    """

    def __init__(
        self,
        input_channels: int,
        features_per_stage: Sequence[int],
        conv_op: type[nn.Module],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_conv_per_stage: Sequence[int],
        conv_bias: bool,
        norm_op: type[nn.Module] | None,
        norm_op_kwargs: dict[str, Any] | None,
        nonlin: type[nn.Module] | None,
        nonlin_kwargs: dict[str, Any] | None,
    ) -> None:
        """Build the stem and the pyramid-input stages.

        Parameters
        ----------
        input_channels:
            image channels.
        features_per_stage, kernel_sizes, strides, n_conv_per_stage:
            one entry per stage, as for ``PlainConvEncoder``.
        conv_op, conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs:
            layer settings, as for ``PlainConvEncoder`` (no dropout).
        """
        super().__init__()
        n = len(features_per_stage)
        if not (len(kernel_sizes) == len(strides) == len(n_conv_per_stage) == n) or n < 2:
            raise ValueError("features, kernels, strides and convolutions need one entry per stage (>= 2)")
        # What UNetDecoder reads from its encoder.
        self.output_channels = [int(f) for f in features_per_stage]
        self.strides = [[int(x) for x in s] for s in strides]
        self.kernel_sizes = [[int(x) for x in k] for k in kernel_sizes]
        self.conv_op = conv_op
        self.conv_bias = conv_bias
        self.norm_op = norm_op
        self.norm_op_kwargs = norm_op_kwargs
        self.dropout_op = None
        self.dropout_op_kwargs = None
        self.nonlin = nonlin
        self.nonlin_kwargs = nonlin_kwargs
        self.return_skips = True

        self.stem = StackedConvBlocks(
            int(n_conv_per_stage[0]),
            conv_op,
            input_channels,
            self.output_channels[0],
            self.kernel_sizes[0],
            self.strides[0],
            **_layer_kwargs(self),
        )
        self.stem_image_pool = _image_pool(conv_op, self.strides[0])
        self.stages = nn.ModuleList(
            PyramidInputStage(
                self,
                self.output_channels[s - 1],
                self.output_channels[s],
                input_channels,
                self.kernel_sizes[s],
                self.strides[s],
                int(n_conv_per_stage[s]),
            )
            for s in range(1, n)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Skips of every stage, highest resolution first, bottleneck last.

        Parameters
        ----------
        x:
            image ``[B, C, Z, Y, X]``.
        """
        image = self.stem_image_pool(x)
        features = self.stem(x)
        skips = [features]
        for stage in self.stages:
            features, image = stage(features, image)
            skips.append(features)
        return skips


class PipoUNet(nn.Module):
    """The PIPO network: :class:`PyramidInputEncoder` and nnU-Net's ``UNetDecoder`` (pyramid output).

    Same interface as ``PlainConvUNet``: ``encoder`` and ``decoder`` attributes (the decoder holds the encoder
    as a submodule, as there), ``decoder.deep_supervision`` chooses between the list of logits (finest
    first) and the finest logits alone.
    """

    def __init__(
        self,
        input_channels: int,
        features_per_stage: Sequence[int],
        conv_op: type[nn.Module],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_conv_per_stage: Sequence[int],
        num_classes: int,
        n_conv_per_stage_decoder: Sequence[int],
        conv_bias: bool = True,
        norm_op: type[nn.Module] | None = None,
        norm_op_kwargs: dict[str, Any] | None = None,
        nonlin: type[nn.Module] | None = None,
        nonlin_kwargs: dict[str, Any] | None = None,
        deep_supervision: bool = False,
    ) -> None:
        """Build encoder and decoder.

        Parameters
        ----------
        input_channels, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage:
            the encoder, see :class:`PyramidInputEncoder`.
        num_classes:
            output channels.
        n_conv_per_stage_decoder:
            convolutions per decoder stage (one entry fewer than the encoder's stages).
        conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs:
            layer settings shared by encoder and decoder.
        deep_supervision:
            return one output per decoder scale (finest first) instead of the finest only.
        """
        super().__init__()
        self.encoder = PyramidInputEncoder(
            input_channels,
            features_per_stage,
            conv_op,
            kernel_sizes,
            strides,
            n_conv_per_stage,
            conv_bias,
            norm_op,
            norm_op_kwargs,
            nonlin,
            nonlin_kwargs,
        )
        self.decoder = UNetDecoder(
            self.encoder,  # type: ignore[arg-type]  # duck-typed: it has every attribute UNetDecoder reads
            num_classes,
            list(n_conv_per_stage_decoder),
            deep_supervision,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits: a list finest to coarsest with deep supervision, else the finest tensor.

        Parameters
        ----------
        x:
            image ``[B, C, Z, Y, X]``.
        """
        return self.decoder(self.encoder(x))  # type: ignore[no-any-return]
