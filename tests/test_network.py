"""The network: nnU-Net's PlainConvUNet from a spec, deep supervision, encoder/decoder split and freezing."""

from __future__ import annotations

import pytest
import torch

from fedpsmos.network import (
    NetworkSpec,
    NetworkSpecError,
    build_network,
    decoder_parameters,
    encoder_parameters,
    freeze,
    paper_network_spec,
    parameter_part,
)

CONFIG_NETWORK = {
    "features": [4, 8, 16],
    "strides": [[1, 1, 1], [2, 2, 2], [1, 2, 2]],
    "kernel_sizes": [[3, 3, 3], [3, 3, 3], [1, 3, 3]],
    "conv_per_stage": 2,
    "deep_supervision": True,
}


def test_spec_round_trips_through_plain_data_and_config() -> None:
    # Prepare
    spec = NetworkSpec.from_config(CONFIG_NETWORK, num_classes=6)
    # Execute
    again = NetworkSpec.from_dict(spec.to_dict())
    # Assert
    assert again == spec and spec.strides[2] == (1, 2, 2) and spec.total_stride() == (2, 4, 4)
    assert spec.to_dict()["strides"] == CONFIG_NETWORK["strides"]


def test_malformed_spec_is_refused() -> None:
    with pytest.raises(NetworkSpecError, match="one entry per stage"):
        NetworkSpec.from_config({**CONFIG_NETWORK, "strides": [[1, 1, 1]]}, num_classes=6)
    with pytest.raises(NetworkSpecError, match="missing key"):
        NetworkSpec.from_dict({"features": [4, 8]})


def test_deep_supervision_outputs_highest_resolution_first() -> None:
    # Prepare
    net = build_network(NetworkSpec.from_config(CONFIG_NETWORK, num_classes=6), seed=0)
    # Execute
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, 8, 16, 16))
    # Assert
    assert [tuple(o.shape) for o in outputs] == [(1, 6, 8, 16, 16), (1, 6, 4, 8, 8)]


def test_seeded_build_is_reproducible_and_uses_nnunet_layers() -> None:
    # Prepare
    spec = NetworkSpec.from_config(CONFIG_NETWORK, num_classes=3)
    # Execute
    a, b, c = build_network(spec, seed=1), build_network(spec, seed=1), build_network(spec, seed=2)
    # Assert
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(
        a.state_dict()["encoder.stages.0.0.convs.0.conv.weight"],
        c.state_dict()["encoder.stages.0.0.convs.0.conv.weight"],
    )
    norms = [m for m in a.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(n.affine and n.eps == 1e-5 for n in norms)
    assert all(m.bias is not None for m in a.modules() if isinstance(m, torch.nn.Conv3d))


def test_encoder_and_decoder_parameters_partition_the_network() -> None:
    # Prepare
    net = build_network(NetworkSpec.from_config(CONFIG_NETWORK, num_classes=6), seed=0)
    # Execute
    enc = {id(p) for p in encoder_parameters(net)}
    dec = {id(p) for p in decoder_parameters(net)}
    parts = dict(parameter_part(net))
    # Assert: the decoder's reference to the encoder does not leak encoder weights into "decoder"
    assert enc and dec and not enc & dec
    assert enc | dec == {id(p) for p in net.parameters()}
    assert (
        parts["decoder.seg_layers.0.weight"] == "decoder"
        and parts["encoder.stages.0.0.convs.0.conv.weight"] == "encoder"
    )


@pytest.mark.parametrize(
    ("mode", "encoder_trains", "decoder_trains"),
    [("full", True, True), ("decoder", False, True), ("encoder", True, False)],
)
def test_freeze_sets_requires_grad_by_mode(mode: str, encoder_trains: bool, decoder_trains: bool) -> None:
    # Prepare
    net = build_network(NetworkSpec.from_config(CONFIG_NETWORK, num_classes=6), seed=0)
    # Execute
    trainable = freeze(net, mode)
    # Assert
    assert all(p.requires_grad == encoder_trains for p in encoder_parameters(net))
    assert all(p.requires_grad == decoder_trains for p in decoder_parameters(net))
    assert len(trainable) == encoder_trains * len(encoder_parameters(net)) + decoder_trains * len(
        decoder_parameters(net)
    )
    with pytest.raises(ValueError, match="unknown freeze mode"):
        freeze(net, "head")


def test_paper_network_fits_the_paper_patch() -> None:
    # Prepare
    spec = paper_network_spec()
    # Execute
    net = build_network(spec, seed=0)
    # Assert
    assert spec.total_stride() == (8, 32, 32)
    assert [p // s for p, s in zip((80, 160, 128), spec.total_stride(), strict=True)] == [10, 5, 4]
    assert len(spec.features) == 6 and net.decoder.deep_supervision
    assert 30e6 < sum(p.numel() for p in net.parameters()) < 32e6
