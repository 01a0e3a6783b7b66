"""PIPO (Table 3 baseline): shapes, pyramid-input gradients, spec round trip, training, freezing, size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fedpsmos.inference.sliding_window import predict_logits
from fedpsmos.network import (
    NetworkSpec,
    NetworkSpecError,
    build_network,
    decoder_parameters,
    encoder_parameters,
)
from fedpsmos.pipo import PipoUNet, PyramidInputEncoder
from fedpsmos.training.trainer import Trainer, TrainSettings
from tests.conftest import tiny_spec, tiny_training
from tests.test_sampler import write_site

REPO = Path(__file__).resolve().parent.parent
ALL = ("liver", "spleen", "pancreas", "kidney_left", "kidney_right")
MARGINAL = {"marginal": {"dice": 1.0, "ce": 1.0}}  # PIPO's target adaptive loss: the marginal loss
TRAINING = tiny_training(pretrain_epochs=6)


def ci_network() -> dict:
    """config.yaml's network section with config/ci.yaml's overrides (the CI-sized network)."""
    base = yaml.safe_load((REPO / "config.yaml").read_text())["network"]
    ci = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())["network"]
    return {**base, **ci}


def ci_spec(architecture: str = "pipo", **overrides: object) -> NetworkSpec:
    return NetworkSpec.from_config({**ci_network(), "architecture": architecture, **overrides}, num_classes=6)


@pytest.mark.parametrize("deep", [True, False])
def test_outputs_match_the_plain_net_with_and_without_deep_supervision(deep: bool) -> None:
    # Prepare
    x = torch.randn(1, 1, 16, 32, 32)
    pipo = build_network(ci_spec(deep_supervision=deep), seed=0)
    plain = build_network(ci_spec("plain", deep_supervision=deep), seed=0)
    # Execute
    with torch.no_grad():
        out, ref = pipo(x), plain(x)
    # Assert
    assert isinstance(pipo, PipoUNet)
    if deep:
        assert isinstance(out, list) and [o.shape for o in out] == [r.shape for r in ref]
        assert [tuple(o.shape) for o in out] == [(1, 6, 16, 32, 32), (1, 6, 8, 16, 16)]
    else:
        assert isinstance(out, torch.Tensor) and out.shape == ref.shape == (1, 6, 16, 32, 32)


def test_decoder_switch_and_sliding_window_use_the_finest_head() -> None:
    # Prepare
    net = build_network(ci_spec(), seed=0).eval()
    image = torch.randn(16, 32, 40)
    # Execute
    with torch.no_grad():
        deep = net(image[None, None, :, :, :32])
        net.decoder.deep_supervision = False
        single = net(image[None, None, :, :, :32])
        net.decoder.deep_supervision = True
        logits = predict_logits(net, image, patch_size=(16, 32, 32), device="cpu")
    # Assert: the switch returns the finest output alone; inference restores the switch
    assert torch.equal(single, deep[0])
    assert logits.shape == (6, 16, 32, 40) and net.decoder.deep_supervision is True


def test_pyramid_input_reaches_every_stage_and_gets_gradients() -> None:
    # Prepare
    net = build_network(ci_spec(), seed=0)
    encoder = net.encoder
    # Execute
    out = net(torch.randn(2, 1, 16, 32, 32))
    sum(o.square().mean() for o in out).backward()
    # Assert: one pyramid branch per stage after the stem, each trained
    assert isinstance(encoder, PyramidInputEncoder) and len(encoder.stages) == 2
    for stage in encoder.stages:
        grad = stage.image_conv.conv.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_pyramid_input_is_the_image_average_pooled_to_each_stage() -> None:
    # Prepare
    encoder = build_network(ci_spec(), seed=0).encoder
    x = torch.randn(1, 1, 16, 32, 32)
    seen: list[torch.Tensor] = []
    hooks = [s.image_conv.register_forward_hook(lambda m, i, o: seen.append(i[0])) for s in encoder.stages]
    # Execute
    with torch.no_grad():
        skips = encoder(x)
    for h in hooks:
        h.remove()
    # Assert: cumulative strides 2 and 4, each at its stage's resolution
    for factor, image, skip in zip((2, 4), seen, skips[1:], strict=True):
        assert torch.allclose(image, torch.nn.functional.avg_pool3d(x, factor), atol=1e-6)
        assert image.shape[2:] == skip.shape[2:]


def test_odd_sizes_keep_pyramid_and_features_aligned() -> None:
    # Prepare: the encoder alone (the U-Net decoder needs sizes divisible by the total stride)
    encoder = build_network(ci_spec(), seed=0).encoder
    # Execute
    with torch.no_grad():
        skips = encoder(torch.randn(1, 1, 7, 9, 11))
    # Assert: ceil(n / stride), as the strided convolutions give
    assert [tuple(s.shape[2:]) for s in skips] == [(7, 9, 11), (4, 5, 6), (2, 3, 3)]


def test_spec_round_trips_and_old_metas_read_as_plain() -> None:
    # Prepare
    pipo = ci_spec()
    plain = ci_spec("plain")
    old_meta = plain.to_dict()
    # Execute / Assert
    assert NetworkSpec.from_dict(pipo.to_dict()) == pipo and pipo.to_dict()["architecture"] == "pipo"
    assert "architecture" not in old_meta  # a plain spec writes the same dict as before the key existed
    assert NetworkSpec.from_dict(old_meta).architecture == "plain"
    assert NetworkSpec.from_config(ci_network(), 6) == plain
    with pytest.raises(NetworkSpecError, match="unknown 'unet3'"):
        ci_spec("unet3")
    with pytest.raises(NetworkSpecError, match="at least 2 convolutions"):
        ci_spec(conv_per_stage=1)


def test_checkpoint_weights_load_into_a_network_rebuilt_from_the_meta() -> None:
    # Prepare
    spec = ci_spec()
    net = build_network(spec, seed=3)
    # Execute
    again = build_network(NetworkSpec.from_dict(spec.to_dict()), seed=4)
    again.load_state_dict(net.state_dict(), strict=True)
    # Assert: a plain network cannot take PIPO weights
    with pytest.raises(RuntimeError):
        build_network(ci_spec("plain")).load_state_dict(net.state_dict(), strict=True)


def make_trainer(tmp_path: Path, mode: str = "full") -> Trainer:
    sites = [write_site(tmp_path, "site1", ALL), write_site(tmp_path, "site2", ("liver",), seed=1)]
    spec = tiny_spec(6, conv_per_stage=2, architecture="pipo")  # PIPO needs two convolutions a stage
    return Trainer(
        model=build_network(spec, seed=0),
        sites=sites,
        loss_spec=MARGINAL,
        settings=TrainSettings.from_config(TRAINING),
        seed=0,
        device="cpu",
        freeze_mode=mode,
        patch_size=(4, 8, 8),
    )


def test_one_trainer_step_lowers_the_marginal_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    # Prepare
    trainer = make_trainer(tmp_path)
    batch = trainer.sampler.next_batch()
    trainer.sampler.next_batch = lambda: batch  # type: ignore[method-assign]

    def loss_now() -> float:
        with torch.no_grad():
            return float(trainer.loss(trainer.model(batch[0]), batch[1], batch[2]))

    first = loss_now()
    # Execute
    trainer.train_iterations(1)
    # Assert
    assert type(trainer.loss).__name__ == "DeepSupervisionLoss"
    assert loss_now() < first


def test_decoder_freeze_keeps_the_pyramid_branches_fixed(tmp_path: Path) -> None:
    # Prepare
    trainer = make_trainer(tmp_path, mode="decoder")
    enc, dec = encoder_parameters(trainer.model), decoder_parameters(trainer.model)
    branch = trainer.model.encoder.stages[0].image_conv.conv.weight
    before = [p.detach().clone() for p in enc], [p.detach().clone() for p in dec]
    # Execute
    trainer.train_iterations(1)
    # Assert: the pyramid branches belong to the encoder
    assert any(branch is p for p in enc)
    assert all(torch.equal(a, p) for a, p in zip(before[0], enc, strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(before[1], dec, strict=True))


def test_parameter_count_against_plain(capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    config = yaml.safe_load((REPO / "config.yaml").read_text())["network"]
    rows = []
    for name, network in (("ci", ci_network()), ("default", config)):
        counts = {}
        for arch in ("plain", "pipo"):
            spec = NetworkSpec.from_config({**network, "architecture": arch}, 6)
            counts[arch] = sum(p.numel() for p in build_network(spec).parameters())
        # Execute: the extra parameters are the pyramid branches and the widened second convolutions
        extra = 0
        for f in network["features"][1:]:
            extra += 27 * f + f + 2 * f  # image conv (1 -> F, 3x3x3) with bias, instance-norm affine
            extra += 27 * f * f  # second conv of the stage takes 2F channels instead of F
        ratio = counts["pipo"] / counts["plain"]
        rows.append(f"{name}: plain {counts['plain']}, pipo {counts['pipo']} ({ratio:.2f}x)")
        # Assert
        assert counts["pipo"] - counts["plain"] == extra
    with capsys.disabled():
        print("\nparameters " + "; ".join(rows))
