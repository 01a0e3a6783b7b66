"""Exactness, properties, input errors and deep supervision of the partial-supervision losses."""

from __future__ import annotations

import math

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.loss.robust_ce_loss import TopKLoss

from fedpsmos.losses import (
    TERM_NAMES,
    DeepSupervisionLoss,
    PartialLoss,
    build_loss,
    deep_supervision_weights,
    downsample_target,
)
from fedpsmos.losses import conventional as conv
from fedpsmos.losses.lovasz import lovasz_extension
from fedpsmos.losses.marginal import marginal_prepare
from fedpsmos.network import build_network
from tests.conftest import tiny_spec

K = 6  # background + five organs
PAPER = {
    "marginal": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
    "exclusion": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
}
ALL_TERMS = {name: 1.0 for name in TERM_NAMES}


def _random_batch(
    seed: int, batch: int = 2, channels: int = K, shape: tuple[int, int, int] = (6, 7, 5), scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, channels, *shape, generator=gen, dtype=torch.float64) * scale
    target = torch.randint(0, channels, (batch, 1, *shape), generator=gen)
    return logits, target


def _mask(rows: list[list[int]], channels: int = K) -> torch.Tensor:
    """bool [B, K] with background and the listed organs labelled."""
    mask = torch.zeros(len(rows), channels, dtype=torch.bool)
    mask[:, 0] = True
    for b, organs in enumerate(rows):
        mask[b, organs] = True
    return mask


def _partial_target(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unlabelled organs read as background, as in a partial label map."""
    out = target.clone()
    for b in range(target.shape[0]):
        unlabelled = (~mask[b]).nonzero().flatten()
        out[b][torch.isin(out[b], unlabelled)] = 0
    return out


# ----- exactness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("term", TERM_NAMES)
def test_marginal_with_every_organ_labelled_equals_conventional(term: str) -> None:
    # Prepare
    logits, target = _random_batch(seed=1)
    flat_logits, flat_target = logits.reshape(2, K, -1), target.reshape(2, -1)
    full = torch.ones(2, K, dtype=torch.bool)
    loss = PartialLoss({term: 1.0})
    # Execute
    marginal = loss._marginal_term(term, marginal_prepare(flat_logits, flat_target, full))
    conventional = loss._marginal_term(term, conv.conventional_prepare(flat_logits, flat_target))
    composed = loss(logits, target, full)
    # Assert
    assert float(marginal) == pytest.approx(float(conventional), rel=1e-12, abs=1e-12)
    assert float(composed) == pytest.approx(float(conventional), rel=1e-12, abs=1e-12)


def test_composed_loss_with_every_organ_labelled_equals_conventional_composition() -> None:
    # Prepare
    logits, target = _random_batch(seed=2)
    flat_logits, flat_target = logits.reshape(2, K, -1), target.reshape(2, -1)
    prep = conv.conventional_prepare(flat_logits, flat_target)
    expected = conv.dice_term(prep) + conv.ce_term(prep) + conv.lovasz_term(prep)
    # Execute: the paper's composition; exclusion terms must not touch fully labelled samples
    value = build_loss(PAPER)(logits, target, torch.ones(2, K, dtype=torch.bool))
    # Assert
    assert float(value) == pytest.approx(float(expected), rel=1e-12)


def test_conventional_dice_ce_match_nnunet_dc_and_ce_loss() -> None:
    # Prepare
    logits, target = _random_batch(seed=3)
    nnunet = DC_and_CE_loss(
        {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    # Execute
    ours = build_loss({"marginal": {"dice": 1.0, "ce": 1.0}})(
        logits, target, torch.ones(2, K, dtype=torch.bool)
    )
    theirs = nnunet(logits, target)
    # Assert: our Dice is 1 - dc where nnU-Net returns -dc
    assert float(ours) == pytest.approx(float(theirs) + 1.0, rel=1e-6)  # nnU-Net sums in float32


def test_conventional_topk_matches_nnunet_topk_loss() -> None:
    logits, target = _random_batch(seed=4)
    ours = build_loss({"marginal": {"topk": 1.0}})(logits, target, torch.ones(2, K, dtype=torch.bool))
    theirs = TopKLoss(k=10)(logits, target)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-10)


def test_conventional_focal_matches_explicit_formula() -> None:
    logits, target = _random_batch(seed=5)
    p_y = torch.softmax(logits, 1).gather(1, target)
    expected = -((1 - p_y) ** 2 * torch.log(p_y)).mean()
    ours = build_loss({"marginal": {"focal": 1.0}})(logits, target, torch.ones(2, K, dtype=torch.bool))
    assert float(ours) == pytest.approx(float(expected), rel=1e-10)


# ----- properties ----------------------------------------------------------------------------------------


def test_marginal_ce_is_invariant_to_how_mass_splits_among_merged_classes() -> None:
    # Prepare: same p for the labelled organs 1 and 3, two different splits among {0, 2, 4, 5}
    gen = torch.Generator().manual_seed(6)
    labelled_mass = torch.rand(1, 2, 4, 4, 4, generator=gen, dtype=torch.float64) * 0.4  # p_1, p_3
    rest = 1.0 - labelled_mass.sum(1, keepdim=True)  # b, 1, z, y, x
    splits = []
    for _ in range(2):
        share = torch.rand(1, 4, 4, 4, 4, generator=gen, dtype=torch.float64) + 0.01
        splits.append(rest * share / share.sum(1, keepdim=True))
    mask = _mask([[1, 3]])
    target = _partial_target(torch.randint(0, K, (1, 1, 4, 4, 4), generator=gen), mask)
    values = []
    for merged in splits:
        p = torch.cat(
            [merged[:, :1], labelled_mass[:, :1], merged[:, 1:2], labelled_mass[:, 1:], merged[:, 2:]], 1
        )
        values.append(float(build_loss({"marginal": {"ce": 1.0}})(torch.log(p), target, mask)))
    # Assert
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert not torch.allclose(splits[0], splits[1])


def test_marginal_differs_from_conventional_when_organs_are_unlabelled() -> None:
    logits, target = _random_batch(seed=7)
    mask = _mask([[1], [2, 4]])
    target = _partial_target(target, mask)
    for term in TERM_NAMES:
        marginal = build_loss({"marginal": {term: 1.0}})(logits, target, mask)
        conventional = build_loss({"marginal": {term: 1.0}})(
            logits, target, torch.ones(2, K, dtype=torch.bool)
        )
        assert abs(float(marginal) - float(conventional)) > 1e-4, term


def _exclusion_free_prediction() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Organ A (1) labelled, B (2) not; the prediction puts no mass on any exclusion target."""
    # voxels along x: bg, bg, A, A, bg(B really), bg
    target = torch.tensor([0, 0, 1, 1, 0, 0]).reshape(1, 1, 1, 1, 6)
    probs = torch.tensor(
        [
            [0.5, 0.0, 0.5],  # background voxel: mass split between background and unlabelled B is allowed
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],  # A voxel: all mass on A
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [0.3, 0.0, 0.7],
        ],
        dtype=torch.float64,
    )
    logits = torch.where(probs > 0, torch.log(probs.clamp_min(1e-300)), torch.full_like(probs, -1e4))
    return logits.T.reshape(1, 3, 1, 1, 6), target, _mask([[1]], channels=3)


@pytest.mark.parametrize("term", TERM_NAMES)
def test_exclusion_is_zero_without_mass_on_exclusion_targets_and_grows_with_it(term: str) -> None:
    # Prepare
    logits, target, mask = _exclusion_free_prediction()
    loss = build_loss({"exclusion": {term: 1.0}})
    values = [float(loss(logits, target, mask))]
    for eps in (0.05, 0.2, 0.45):
        # move eps of the A voxels' mass onto B (B's exclusion target is A) and of a background voxel onto A
        probs = torch.softmax(logits, 1).clone()
        probs[0, :, 0, 0, 2] = torch.tensor([0.0, 1 - eps, eps])
        probs[0, :, 0, 0, 3] = torch.tensor([0.0, 1 - eps, eps])
        probs[0, :, 0, 0, 1] = torch.tensor([1 - eps, eps, 0.0])
        moved = torch.where(probs > 0, torch.log(probs.clamp_min(1e-300)), torch.full_like(probs, -1e4))
        values.append(float(loss(moved, target, mask)))
    # Assert
    assert values[0] == 0.0
    assert all(later > earlier for earlier, later in zip(values, values[1:], strict=False)), values


@pytest.mark.parametrize("spec", [{"marginal": ALL_TERMS}, {"exclusion": ALL_TERMS}])
def test_gradients_are_finite_at_saturated_softmax(spec: dict[str, dict[str, float]]) -> None:
    # Prepare: logits of +-1e4, wrong on purpose half of the time, float32 as in training
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randint(0, 2, (2, K, 4, 5, 6), generator=gen).float() * 2 - 1) * 1e4
    logits.requires_grad_(True)
    mask = _mask([[1, 2], [5]])
    target = _partial_target(torch.randint(0, K, (2, 1, 4, 5, 6), generator=gen), mask)
    # Execute
    value = build_loss(spec)(logits, target, mask)
    value.backward()
    # Assert
    assert torch.isfinite(value)
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    assert float(logits.grad.abs().sum()) > 0.0


def test_lovasz_equals_jaccard_loss_on_hard_one_hot_predictions() -> None:
    # Prepare: hard predictions via logits of +-1e4
    gen = torch.Generator().manual_seed(9)
    target = torch.randint(0, 4, (2, 1, 5, 5, 5), generator=gen)
    prediction = torch.randint(0, 4, (2, 5, 5, 5), generator=gen)
    logits = torch.nn.functional.one_hot(prediction, 4).permute(0, 4, 1, 2, 3).double() * 2e4 - 1e4
    # Execute
    value = build_loss({"marginal": {"lovasz": 1.0}})(logits, target, torch.ones(2, 4, dtype=torch.bool))
    # Assert: mean over present classes of 1 - |P n G| / |P u G|
    jaccard = []
    for c in range(4):
        gt, pred = target[:, 0] == c, prediction == c
        if gt.any():
            jaccard.append(1 - float((gt & pred).sum()) / float((gt | pred).sum()))
    assert float(value) == pytest.approx(sum(jaccard) / len(jaccard), abs=1e-12)


def test_exclusion_lovasz_is_iou_with_exclusion_target_on_hard_predictions() -> None:
    # Prepare: organ 1 labelled; 3 classes; hard prediction
    target = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0]).reshape(1, 1, 2, 2, 2)
    prediction = torch.tensor([2, 1, 2, 0, 1, 1, 2, 0]).reshape(1, 2, 2, 2)
    logits = torch.nn.functional.one_hot(prediction, 3).permute(0, 4, 1, 2, 3).double() * 2e4 - 1e4
    mask = _mask([[1]], channels=3)
    # Execute
    value = build_loss({"exclusion": {"lovasz": 1.0}})(logits, target, mask)
    # Assert: e_0 = e_2 = {target == 1}, e_1 = {target != 1}; loss = mean_j IoU(pred == j, e_j)
    ious = []
    for j, excluded in ((0, target[:, 0] == 1), (1, target[:, 0] != 1), (2, target[:, 0] == 1)):
        pred = prediction == j
        ious.append(float((pred & excluded).sum()) / float((pred | excluded).sum()))
    assert float(value) == pytest.approx(sum(ious) / 3, abs=1e-12)


def test_lovasz_extension_core_rows_are_independent() -> None:
    gen = torch.Generator().manual_seed(10)
    errors = torch.rand(3, 50, generator=gen, dtype=torch.float64)
    positives = torch.rand(3, 50, generator=gen) > 0.5
    together = lovasz_extension(errors, positives)
    alone = torch.stack([lovasz_extension(errors[i : i + 1], positives[i : i + 1])[0] for i in range(3)])
    assert torch.allclose(together, alone)


def test_binary_model_with_full_mask_gets_conventional_losses() -> None:
    # Prepare: a site-alone binary model (C + 1 = 2)
    logits, target = _random_batch(seed=11, channels=2)
    full = torch.ones(2, 2, dtype=torch.bool)
    # Execute
    value = build_loss(PAPER)(logits, target, full)
    prep = conv.conventional_prepare(logits.reshape(2, 2, -1), target.reshape(2, -1))
    # Assert
    expected = conv.dice_term(prep) + conv.ce_term(prep) + conv.lovasz_term(prep)
    assert float(value) == pytest.approx(float(expected), rel=1e-12)


def test_mixed_batch_applies_exclusion_to_partial_samples_only() -> None:
    # Prepare: sample 0 fully labelled, sample 1 labels organ 2 only
    logits, target = _random_batch(seed=12)
    mask = torch.ones(2, K, dtype=torch.bool)
    mask[1] = _mask([[2]])[0]
    target = _partial_target(target, mask)
    spec = {"marginal": {"ce": 1.0}, "exclusion": {"ce": 1.0}}
    # Execute
    mixed = float(build_loss(spec)(logits, target, mask))
    full_ce = float(build_loss({"marginal": {"ce": 1.0}})(logits[:1], target[:1], mask[:1]))
    partial_ce = float(build_loss({"marginal": {"ce": 1.0}})(logits[1:], target[1:], mask[1:]))
    partial_excl = float(build_loss({"exclusion": {"ce": 1.0}})(logits[1:], target[1:], mask[1:]))
    # Assert: CE averages voxels over the batch; exclusion weighs by the share of partial samples (1 of 2)
    assert mixed == pytest.approx((full_ce + partial_ce) / 2 + 0.5 * partial_excl, rel=1e-12)


def test_marginal_log_prob_is_stable_for_large_logits() -> None:
    # summing exp of raw logits would overflow: logsumexp must not
    logits = torch.tensor([[[500.0], [0.0], [499.0]]], dtype=torch.float32).reshape(1, 3, 1)
    prep = marginal_prepare(logits, torch.zeros(1, 1, dtype=torch.long), _mask([[1]], channels=3))
    assert torch.isfinite(prep.log_prob[:, :2]).all()
    assert float(prep.prob[0, 0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert float(prep.log_prob[0, 1, 0]) == pytest.approx(-500.0 - math.log1p(math.exp(-1.0)), rel=1e-5)


# ----- spec and input errors -------------------------------------------------------------------------------


def test_build_loss_rejects_unknown_term_naming_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'dicee'.*dice, ce, focal, topk, lovasz"):
        build_loss({"marginal": {"dicee": 1.0}})
    with pytest.raises(ValueError, match="unknown loss spec side 'marginals'"):
        build_loss({"marginals": {"dice": 1.0}})
    with pytest.raises(ValueError, match="no term"):
        build_loss({"marginal": {}, "exclusion": {}})
    with pytest.raises(ValueError, match=">= 0"):
        build_loss({"exclusion": {"ce": -1.0}})


def test_build_loss_accepts_one_side_missing() -> None:
    assert build_loss({"exclusion": {"dice": 1.0}}).marginal_weights == {}
    assert build_loss({"marginal": {"dice": 2.0}}).marginal_weights == {"dice": 2.0}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("shape", "does not match logits shape"),
        ("range", r"must lie in \[0, 5\]"),
        ("no_organ", "marks no organ but its target has foreground"),
        ("unlabelled_class", "marks unlabelled"),
        ("nan", "NaN or inf"),
        ("inf", "NaN or inf"),
        ("background", r"labelled\[:, 0\]"),
        ("mask_shape", "labelled must be"),
        ("fractional", "non-integer"),
    ],
)
def test_bad_input_raises_clear_error(case: str, message: str) -> None:
    # Prepare
    logits, target = _random_batch(seed=13)
    mask = torch.ones(2, K, dtype=torch.bool)
    if case == "shape":
        target = target[:, :, :-1]
    elif case == "range":
        target[0, 0, 0, 0, 0] = K
    elif case == "no_organ":
        mask[1] = _mask([[]])[0]
        target[1, 0, 0, 0, 0] = 3
    elif case == "unlabelled_class":
        mask[1] = _mask([[1]])[0]
        target[1, 0, 0, 0, 0] = 3
    elif case == "nan":
        logits[0, 0, 0, 0, 0] = float("nan")
    elif case == "inf":
        logits[1, 2, 0, 0, 0] = float("inf")
    elif case == "background":
        mask[0, 0] = False
    elif case == "mask_shape":
        mask = mask[:, :3]
    elif case == "fractional":
        target = target.double() + 0.5
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        build_loss(PAPER)(logits, target, mask)


def test_sample_without_labelled_organ_and_without_foreground_is_accepted() -> None:
    logits, _ = _random_batch(seed=14, batch=1)
    value = build_loss(PAPER)(logits, torch.zeros(1, 1, 6, 7, 5, dtype=torch.long), _mask([[]]))
    assert torch.isfinite(value)


# ----- deep supervision -----------------------------------------------------------------------------------


def test_deep_supervision_weights_follow_nnunet() -> None:
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    assert sum(deep_supervision_weights(5)) == pytest.approx(1.0)


def test_downsample_target_matches_batchgeneratorsv2() -> None:
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    gen = torch.Generator().manual_seed(15)
    seg = torch.randint(0, K, (1, 8, 12, 10), generator=gen, dtype=torch.int16)
    theirs = DownsampleSegForDSTransform([[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]])(segmentation=seg)
    for reference in theirs["segmentation"]:
        ours = downsample_target(seg[None], reference.shape[1:])[0]
        assert torch.equal(ours, reference)


def test_deep_supervision_loss_is_weighted_sum_over_plain_conv_unet_outputs() -> None:
    # Prepare: the tiny network with four stages: deep supervision returns 3 outputs, highest resolution first
    torch.manual_seed(16)
    deeper = {
        "features": [4, 8, 8, 8],
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
        "kernel_sizes": [[3, 3, 3]] * 4,
    }
    net = build_network(tiny_spec(K, **deeper), seed=16)
    image = torch.randn(2, 1, 16, 16, 16)
    mask = _mask([[1, 2, 3, 4, 5], [3]])
    target = _partial_target(torch.randint(0, K, (2, 1, 16, 16, 16)), mask)
    outputs = net(image)
    base = build_loss(PAPER)
    # Execute
    value = DeepSupervisionLoss(base)(outputs, target, mask)
    # Assert
    assert [tuple(o.shape[2:]) for o in outputs] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    expected = (2 / 3) * base(outputs[0], target, mask) + (1 / 3) * base(
        outputs[1], downsample_target(target, (8, 8, 8)), mask
    )
    assert float(value) == pytest.approx(float(expected), rel=1e-6)
    value.backward()


def test_deep_supervision_rejects_weight_count_mismatch() -> None:
    outputs = [torch.randn(1, K, 4, 4, 4), torch.randn(1, K, 2, 2, 2)]
    loss = DeepSupervisionLoss(build_loss(PAPER), weights=[1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="3 weights but the network gave 2 outputs"):
        loss(outputs, torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), torch.ones(1, K, dtype=torch.bool))
