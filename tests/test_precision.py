"""Mixed precision: losses on half-precision logits at paper patch size, the precision rule, autocast training
on the CPU, the GradScaler in the trainer state, inference under autocast.

Tolerances of the paper-size loss tests. A term computed from half-precision logits differs from the float64
term of the same (unrounded) logits by (a) the rounding of the inputs, at most 2^-9 (bfloat16) or 2^-12
(float16) of each logit, and (b) the arithmetic. The losses compute in float32, whose pairwise sums over the
3.3 million voxels of the batch keep a relative error near 1e-6 at worst; the input rounding is unbiased and
averages out over the voxels (measured: at most 5e-6 relative for bfloat16 inputs, 6e-7 for float16). A term
that summed in its input's precision is off by at least that format's rounding of the result, about 4e-3
(bfloat16: the Dice is 0.7% off) or 5e-4 (float16, when it does not overflow to inf first). The tolerances
1e-4 (bfloat16) and 1e-5 (float16) sit 20x above what is measured and 40-50x below a half-precision sum.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fedpsmos.config import ConfigError, validate_config
from fedpsmos.inference.sliding_window import predict_logits
from fedpsmos.losses import TERM_NAMES, DeepSupervisionLoss, PriorAwareLoss, build_loss
from fedpsmos.network import NetworkSpec, build_network
from fedpsmos.organs import IGNORE_CLASS
from fedpsmos.precision import autocast, check_precision, choose_precision, grad_scaler, resolve_precision
from fedpsmos.training.checkpoint import load_checkpoint, save_checkpoint
from fedpsmos.training.epochs import train_model
from fedpsmos.training.trainer import Trainer, TrainSettings
from tests.conftest import tiny_spec
from tests.test_sampler import write_site
from tests.test_trainer import ALL, LOSS, NETWORK, PATCH, TRAINING

ROOT = Path(__file__).resolve().parents[1]
PAPER_PATCH = (80, 160, 128)
NUM_CLASSES = 6
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp16": 1e-5, "bf16": 1e-4}  # relative; module docstring
EVERY_TERM = {name: 1.0 for name in TERM_NAMES}


def paper_batch(*, ignored: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two paper-size patches in float64: sample 0 labels every organ, sample 1 only liver and spleen."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, NUM_CLASSES, (2, 1, *PAPER_PATCH), generator=generator)  # b, 1, z, y, x
    target[1][target[1] > 2] = 0  # unlabelled organs read as background
    if ignored:
        target[:, :, :4] = IGNORE_CLASS  # a slab of unknown class: the ignore-label path
    labelled = torch.ones(2, NUM_CLASSES, dtype=torch.bool)
    labelled[1, 3:] = False
    onehot = torch.nn.functional.one_hot(target[:, 0].clamp_max(NUM_CLASSES - 1), NUM_CLASSES)
    noise = torch.randn(2, NUM_CLASSES, *PAPER_PATCH, generator=generator, dtype=torch.float64)
    logits = 2.0 * noise + 3.0 * onehot.permute(0, 4, 1, 2, 3)  # b, k, z, y, x: a half-trained network
    return logits, target, labelled


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return paper_batch(ignored=False)


@pytest.fixture(scope="module")
def every_term_float64(batch) -> dict[str, float]:
    loss = build_loss({"marginal": EVERY_TERM, "exclusion": EVERY_TERM})
    return {key: float(value) for key, value in loss.terms(*batch).items()}


def assert_close(values: dict[str, torch.Tensor], reference: dict[str, float], precision: str) -> None:
    assert values.keys() == reference.keys()
    for key, value in values.items():
        assert value.dtype == torch.float32, key  # computed in float32, not in the input's precision
        assert torch.isfinite(value), key
        assert float(value) == pytest.approx(reference[key], rel=TOLERANCE[precision]), key


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_every_loss_term_on_half_precision_logits_matches_float64_at_paper_size(
    batch, every_term_float64, precision: str
) -> None:
    # Prepare: every marginal and exclusion term
    logits, target, labelled = batch
    loss = build_loss({"marginal": EVERY_TERM, "exclusion": EVERY_TERM})
    # Execute
    values = loss.terms(logits.to(HALF[precision]), target, labelled)
    # Assert
    assert len(values) == 2 * len(TERM_NAMES)
    assert_close(values, every_term_float64, precision)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_prior_aware_term_on_half_precision_logits_matches_float64_at_paper_size(
    batch, precision: str
) -> None:
    # Prepare
    logits, target, labelled = batch
    loss = PriorAwareLoss(build_loss({"marginal": {"ce": 1.0}}), [0.7, 0.1, 0.05, 0.05, 0.05, 0.05], 1.0)
    reference = float(loss.prior_term(logits, target, labelled))
    # Execute
    value = loss.prior_term(logits.to(HALF[precision]), target, labelled)
    # Assert
    assert reference > 0.01
    assert_close({"prior/kl": value}, {"prior/kl": reference}, precision)


def test_deep_supervision_and_ignored_voxels_on_half_precision_match_float64_at_paper_size() -> None:
    # Prepare: three outputs as the network gives them; ignored voxels take the ignore-label path
    logits, target, labelled = paper_batch(ignored=True, seed=1)
    outputs = [logits, torch.nn.functional.avg_pool3d(logits, 2), torch.nn.functional.avg_pool3d(logits, 4)]
    loss = DeepSupervisionLoss(build_loss({"marginal": {"dice": 1.0}, "exclusion": {"dice": 1.0}}))
    reference = float(loss(outputs, target, labelled))
    for precision, dtype in HALF.items():
        # Execute
        value = loss([o.to(dtype) for o in outputs], target, labelled)
        # Assert
        assert_close({"total": value}, {"total": reference}, precision)


@pytest.mark.parametrize(
    ("requested", "device_type", "cuda_bf16", "chosen"),
    [
        ("auto", "cuda", True, "bf16"),
        ("auto", "cuda", False, "fp16"),
        ("auto", "cpu", True, "fp32"),
        ("auto", "mps", False, "fp32"),
        ("fp32", "cuda", True, "fp32"),
        ("fp16", "cuda", True, "fp16"),
        ("bf16", "cpu", False, "bf16"),
    ],
)
def test_precision_rule(requested: str, device_type: str, cuda_bf16: bool, chosen: str) -> None:
    assert choose_precision(requested, device_type, cuda_bf16) == chosen


def test_precision_resolves_on_the_cpu_and_refuses_unknown_names() -> None:
    # Execute / Assert
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, fp32, got 'fp8'"):
        check_precision("fp8")
    with pytest.raises(ValueError, match="resolve the precision 'auto'"):
        autocast("auto", torch.device("cpu"))
    assert grad_scaler("fp16", torch.device("cpu")).is_enabled()
    assert not grad_scaler("bf16", torch.device("cpu")).is_enabled()


def test_settings_and_config_take_the_precision_key() -> None:
    # Prepare
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    # Execute / Assert
    assert config["training"]["precision"] == "auto"
    assert TrainSettings.from_config(TRAINING).precision == "auto"
    assert TrainSettings.from_config({**TRAINING, "precision": "bf16"}).precision == "bf16"
    with pytest.raises(ValueError, match="got 'half'"):
        TrainSettings.from_config({**TRAINING, "precision": "half"})
    validate_config(config)
    config["training"]["precision"] = "half"
    with pytest.raises(ConfigError, match="training.precision"):
        validate_config(config)


def make_trainer(tmp_path: Path, precision: str) -> Trainer:
    sites = [write_site(tmp_path, "site1", ALL), write_site(tmp_path, "site2", ("liver",), seed=1)]
    return Trainer(
        model=build_network(NetworkSpec.from_config(NETWORK, num_classes=NUM_CLASSES), seed=0),
        sites=sites,
        loss_spec=LOSS,
        settings=TrainSettings.from_config({**TRAINING, "precision": precision}),
        seed=0,
        device="cpu",
        patch_size=PATCH,
    )


def test_bf16_autocast_training_step_on_the_cpu_lowers_the_loss(tmp_path: Path) -> None:
    # Prepare: one fixed batch; record the dtype the first convolution computes in
    trainer = make_trainer(tmp_path, "bf16")
    batch = trainer.sampler.next_batch()
    trainer.sampler.next_batch = lambda: batch  # type: ignore[method-assign]
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv3d))
    seen: list[torch.dtype] = []
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))

    def loss_now() -> float:  # in float32, without autocast
        with torch.no_grad():
            return float(trainer.loss(trainer.model(batch[0]), batch[1], batch[2]))

    first = loss_now()
    # Execute
    reported = trainer.train_iterations(3)
    # Assert
    assert trainer.precision == "bf16" and not trainer.scaler.is_enabled()
    assert seen[1:] == [torch.bfloat16] * 3  # seen[0] is loss_now's float32 forward
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay float32
    assert reported == pytest.approx(first, rel=0.05)
    assert loss_now() < first


def test_grad_scaler_state_round_trips_through_the_trainer_state(tmp_path: Path) -> None:
    # Prepare: an fp16 trainer (autocast float16 on the CPU) a few steps in
    a = make_trainer(tmp_path / "a", "fp16")
    a.train_iterations(3)
    state = a.scaler.state_dict()
    assert state and state != make_trainer(tmp_path / "fresh", "fp16").scaler.state_dict()
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"trainer": a.state_dict(), "meta": {}})
    b = make_trainer(tmp_path / "b", "fp16")
    b.model.load_state_dict(a.model.state_dict())
    # Execute
    b.load_state_dict(load_checkpoint(path)["trainer"])
    # Assert: same scale, growth tracker and settings; resumed training is exact
    assert b.scaler.state_dict() == state
    assert a.train_iterations(2) == b.train_iterations(2)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
    plain = make_trainer(tmp_path / "c", "fp32")
    assert plain.state_dict()["grad_scaler"] == {}
    plain.load_state_dict(load_checkpoint(path)["trainer"])  # another precision's scaler state is ignored
    assert not plain.scaler.is_enabled()


def test_trained_model_records_its_precision(tmp_path: Path) -> None:
    # Prepare
    site = write_site(tmp_path, "site1", ALL)
    out = tmp_path / "model" / "model.pt"
    # Execute
    train_model(
        network=NetworkSpec.from_config(NETWORK, num_classes=NUM_CLASSES),
        init=None,
        sites=[site],
        loss_spec=LOSS,
        settings=TrainSettings.from_config({**TRAINING, "iterations_per_epoch": 1}),
        epochs=1,
        seed=0,
        out_model=out,
        out_curve_csv=tmp_path / "curve.csv",
        out_curve_png=tmp_path / "curve.png",
        meta={"kind": "test"},
        patch_size=PATCH,
        device="cpu",
    )
    # Assert
    meta = load_checkpoint(out)["meta"]
    assert meta["precision"] == "fp32" and meta["settings"]["precision"] == "auto"


def test_sliding_window_runs_the_network_in_the_requested_precision() -> None:
    # Prepare
    net = build_network(tiny_spec(3), seed=0)
    image = torch.randn(8, 16, 16, generator=torch.Generator().manual_seed(0)).numpy()
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    seen: list[torch.dtype] = []
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))

    def predict(precision: str) -> torch.Tensor:
        seen.clear()
        return predict_logits(net, image, patch_size=(8, 8, 8), device="cpu", precision=precision)

    # Execute
    fp32, auto, bf16 = predict("fp32"), predict("auto"), predict("bf16")
    # Assert: auto is float32 on the CPU, bit for bit; bf16 computes in bfloat16 and accumulates in float32
    assert torch.equal(fp32, auto)
    assert set(seen) == {torch.bfloat16} and bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)
    assert torch.allclose(bf16, fp32, atol=0.05 * float(fp32.abs().max()))
    with pytest.raises(ValueError, match="precision must be one of"):
        predict("float16")
