"""The segmentation network: nnU-Net v2's 3D PlainConvUNet, with separable encoder and decoder.

``NetworkSpec.architecture`` chooses the network: ``plain`` (the default, the paper's nnU-Net) or ``pipo``
(:class:`fedpsmos.pipo.PipoUNet`, the pyramid-input / pyramid-output baseline of Table 3, same topology plus
pyramid-input branches). Specs and checkpoint metas without the key are plain.

docs/design.md "Training": a 3D nnU-Net (``PlainConvUNet`` from ``dynamic_network_architectures``, the
package nnU-Net v2 builds its networks with), instance norm, deep supervision. Site adaptation (paper Sec.
2.3, docs/design.md "Site adaptation and site-alone baselines") trains ``full`` (all layers), ``decoder``
(encoder frozen) or ``encoder`` (decoder frozen); :func:`freeze` sets that up.

The UNetDecoder keeps a reference to the encoder as a submodule (``decoder.encoder``), so
``net.decoder.parameters()`` also yields every encoder parameter and the state dict holds each encoder tensor
twice (``encoder.*`` and ``decoder.encoder.*``, the same storage). :func:`decoder_parameters` excludes the
encoder's parameters so "the decoder" means the transposed convolutions, decoder stages and
segmentation heads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from fedpsmos.pipo import PipoUNet

ADAPTATION_MODES: tuple[str, ...] = ("full", "decoder", "encoder")
# "plain": nnU-Net's PlainConvUNet; "pipo": pyramid input / pyramid output (fedpsmos.pipo, Table 3 baseline).
ARCHITECTURES: tuple[str, ...] = ("plain", "pipo")


class NetworkSpecError(ValueError):
    """A network specification is malformed or does not match a checkpoint."""


def _triples(values: Sequence[Sequence[int]], name: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for v in values:
        t = tuple(int(x) for x in v)
        if len(t) != 3 or min(t) < 1:
            raise NetworkSpecError(f"network {name}: entry {list(v)} is not three positive integers")
        out.append(t)
    return tuple(out)  # type: ignore[return-value]


@dataclass(frozen=True)
class NetworkSpec:
    """The topology of a PlainConvUNet (config ``network`` section plus the number of output classes).

    ``strides[i]`` and ``kernel_sizes[i]`` are per stage in (z, y, x); ``conv_per_stage`` is an int or one
    entry per encoder stage; the decoder uses the same count for its ``n_stages - 1`` stages (nnU-Net
    default). ``architecture`` is ``plain`` or ``pipo`` (same topology with pyramid input, which needs at
    least two convolutions in every stage after the first).
    """

    features: tuple[int, ...]
    strides: tuple[tuple[int, int, int], ...]
    kernel_sizes: tuple[tuple[int, int, int], ...]
    conv_per_stage: int | tuple[int, ...]
    deep_supervision: bool
    num_classes: int
    in_channels: int = 1
    architecture: str = "plain"

    def __post_init__(self) -> None:
        # Normalise lists (from YAML/JSON) to tuples so specs compare and hash by value.
        set_ = object.__setattr__
        set_(self, "features", tuple(int(f) for f in self.features))
        set_(self, "strides", _triples(self.strides, "strides"))
        set_(self, "kernel_sizes", _triples(self.kernel_sizes, "kernel_sizes"))
        cps = self.conv_per_stage
        set_(self, "conv_per_stage", int(cps) if isinstance(cps, int) else tuple(int(c) for c in cps))
        n = len(self.features)
        if n < 2:
            raise NetworkSpecError(f"network features: need at least 2 stages, got {list(self.features)}")
        if len(self.strides) != n or len(self.kernel_sizes) != n:
            raise NetworkSpecError(
                f"network: features ({n}), strides ({len(self.strides)}) and kernel_sizes "
                f"({len(self.kernel_sizes)}) must have one entry per stage"
            )
        if isinstance(self.conv_per_stage, tuple) and len(self.conv_per_stage) != n:
            raise NetworkSpecError(
                f"network conv_per_stage: need {n} entries, got {list(self.conv_per_stage)}"
            )
        if self.num_classes < 2:
            raise NetworkSpecError(
                f"network num_classes: need at least 2 (background + 1), got {self.num_classes}"
            )
        if self.in_channels < 1:
            raise NetworkSpecError(f"network in_channels: need at least 1, got {self.in_channels}")
        if self.architecture not in ARCHITECTURES:
            raise NetworkSpecError(
                f"network architecture: unknown {self.architecture!r} (known: {', '.join(ARCHITECTURES)})"
            )
        if self.architecture == "pipo" and min(self.encoder_convs()[1:]) < 2:
            raise NetworkSpecError(
                "network conv_per_stage: the pipo architecture needs at least 2 convolutions in every stage "
                f"after the first, got {self.conv_per_stage}"
            )

    @property
    def n_stages(self) -> int:
        """Number of resolution stages of the encoder."""
        return len(self.features)

    def encoder_convs(self) -> list[int]:
        """Convolutions of each encoder stage (``conv_per_stage`` expanded to one entry per stage)."""
        cps = self.conv_per_stage
        return [cps] * self.n_stages if isinstance(cps, int) else list(cps)

    def total_stride(self) -> tuple[int, int, int]:
        """Product of the strides per axis: patch sizes must be divisible by it."""
        total = [1, 1, 1]
        for s in self.strides:
            total = [t * x for t, x in zip(total, s, strict=True)]
        return (total[0], total[1], total[2])

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, ints, bools) for checkpoints and JSON.

        ``architecture`` is written only when it is not ``plain``, so a plain spec's dict (and the checkpoint
        metas and resume checks built on it) is the same as before the key existed.
        """
        cps = self.conv_per_stage
        data: dict[str, Any] = {
            "features": list(self.features),
            "strides": [list(s) for s in self.strides],
            "kernel_sizes": [list(k) for k in self.kernel_sizes],
            "conv_per_stage": cps if isinstance(cps, int) else list(cps),
            "deep_supervision": bool(self.deep_supervision),
            "num_classes": int(self.num_classes),
            "in_channels": int(self.in_channels),
        }
        if self.architecture != "plain":
            data["architecture"] = self.architecture
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSpec:
        """Rebuild a spec from :meth:`to_dict` output.

        Parameters
        ----------
        data:
            mapping with every field of the spec (``in_channels`` optional, ``architecture`` optional and
            ``plain`` when missing, as in checkpoints written before it existed).
        """
        missing = [
            k
            for k in ("features", "strides", "kernel_sizes", "conv_per_stage", "num_classes")
            if k not in data
        ]
        if missing:
            raise NetworkSpecError(f"network spec: missing key(s) {', '.join(missing)}")
        return cls(
            features=data["features"],
            strides=data["strides"],
            kernel_sizes=data["kernel_sizes"],
            conv_per_stage=data["conv_per_stage"],
            deep_supervision=bool(data.get("deep_supervision", True)),
            num_classes=int(data["num_classes"]),
            in_channels=int(data.get("in_channels", 1)),
            architecture=str(data.get("architecture", "plain")),
        )

    @classmethod
    def from_config(cls, network: Mapping[str, Any], num_classes: int) -> NetworkSpec:
        """Spec from config.yaml's ``network`` section and the number of output classes (C + 1).

        Parameters
        ----------
        network:
            the ``network`` section (features, strides, kernel_sizes, conv_per_stage, deep_supervision and
            optionally architecture).
        num_classes:
            output channels: background plus the organs the model segments.
        """
        return cls.from_dict({**network, "num_classes": num_classes})


def paper_network_spec(num_classes: int = 6) -> NetworkSpec:
    """The paper's network for patch [80, 160, 128] at spacing (2.41, 1.63, 1.63) mm.

    An nnU-Net v2 3d_fullres topology for that patch: six stages, 32 features doubling up to nnU-Net's cap
    of 320, 3x3x3 kernels everywhere (the spacing anisotropy 2.41 / 1.63 = 1.48 is below the ratio at which
    nnU-Net's planner uses in-plane-only kernels), z pooled three times and y, x five times, so the
    bottleneck is [10, 5, 4] voxels.

    Parameters
    ----------
    num_classes:
        output channels (background plus organs); 6 for the five-organ model.
    """
    return NetworkSpec(
        features=(32, 64, 128, 256, 320, 320),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
        kernel_sizes=((3, 3, 3),) * 6,
        conv_per_stage=2,
        deep_supervision=True,
        num_classes=num_classes,
    )


def build_network(spec: NetworkSpec, *, seed: int | None = None) -> PlainConvUNet | PipoUNet:
    """Build the network of ``spec`` with nnU-Net v2's layers and He initialisation.

    Conv3d with bias, InstanceNorm3d (eps 1e-5, affine), LeakyReLU (slope 1e-2, in place), as nnU-Net v2's
    default 3d_fullres configuration. ``spec.architecture`` picks ``PlainConvUNet`` or
    :class:`fedpsmos.pipo.PipoUNet`.

    Parameters
    ----------
    spec:
        the topology.
    seed:
        seeds the weight initialisation without touching the global torch generator; ``None`` uses it.
    """
    encoder_convs = spec.encoder_convs()
    common: dict[str, Any] = dict(
        input_channels=spec.in_channels,
        features_per_stage=list(spec.features),
        conv_op=nn.Conv3d,
        kernel_sizes=[list(k) for k in spec.kernel_sizes],
        strides=[list(s) for s in spec.strides],
        n_conv_per_stage=encoder_convs,
        num_classes=spec.num_classes,
        n_conv_per_stage_decoder=encoder_convs[:-1],
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=spec.deep_supervision,
    )
    net: PlainConvUNet | PipoUNet
    if spec.architecture == "pipo":
        net = PipoUNet(**common)
    else:
        net = PlainConvUNet(n_stages=spec.n_stages, dropout_op=None, **common)
    if seed is None:
        net.apply(InitWeights_He(1e-2))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net.apply(InitWeights_He(1e-2))
    return net


def encoder_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Parameters of the encoder (``net.encoder``).

    Parameters
    ----------
    net:
        a network from :func:`build_network`.
    """
    return list(net.encoder.parameters())  # type: ignore[union-attr, operator]


def decoder_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Parameters of the decoder proper, excluding the encoder it holds a reference to.

    Parameters
    ----------
    net:
        a network from :func:`build_network`.
    """
    encoder_ids = {id(p) for p in encoder_parameters(net)}
    return [p for p in net.decoder.parameters() if id(p) not in encoder_ids]  # type: ignore[union-attr, operator]


def parameter_part(net: nn.Module) -> Iterator[tuple[str, str]]:
    """Yield ``(name, part)`` for every named parameter, ``part`` being ``"encoder"`` or ``"decoder"``.

    Parameters
    ----------
    net:
        a network from :func:`build_network`.
    """
    encoder_ids = {id(p) for p in encoder_parameters(net)}
    for name, p in net.named_parameters():
        yield name, "encoder" if id(p) in encoder_ids else "decoder"


def freeze(net: nn.Module, mode: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for an adaptation mode and return the trainable parameters.

    ``full`` trains all layers, ``decoder`` trains the decoder with the encoder frozen, ``encoder`` trains the
    encoder with the decoder frozen (paper Sec. 2.3). Only ``requires_grad`` needs setting: instance norm
    keeps no running statistics and the network has no dropout, so train/eval mode does not change a frozen
    part.
    The optimiser must be built over the returned parameters only, so weight decay and momentum leave the
    frozen part untouched.

    Parameters
    ----------
    net:
        a network from :func:`build_network`.
    mode:
        one of ``full``, ``decoder``, ``encoder``.
    """
    if mode not in ADAPTATION_MODES:
        raise ValueError(f"unknown freeze mode {mode!r} (known: {', '.join(ADAPTATION_MODES)})")
    encoder = encoder_parameters(net)
    decoder = decoder_parameters(net)
    for p in encoder:
        p.requires_grad_(mode in ("full", "encoder"))
    for p in decoder:
        p.requires_grad_(mode in ("full", "decoder"))
    return [p for p in net.parameters() if p.requires_grad]
