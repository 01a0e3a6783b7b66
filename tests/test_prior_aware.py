"""PaNN's prior-aware loss and its organ size prior, against values worked out by hand with ``math``.

The logits are ``log p`` of explicit probability rows, so ``softmax(logits) = p`` and the averages over V can
be written down directly from the module docstring of ``fedpsmos.losses.prior_aware``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedpsmos.losses import (
    DeepSupervisionLoss,
    PartialLoss,
    PriorAwareLoss,
    build_loss,
    downsample_target,
    organ_size_prior,
    prior_from_site,
)
from fedpsmos.organs import IGNORE_CLASS
from fedpsmos.preprocessing.storage import case_path, write_case

MARGINAL = {"dice": 1.0, "ce": 1.0}


def _logits(rows: list[tuple[float, ...]], shape: tuple[int, ...]) -> torch.Tensor:
    """One sample's logits ``log p`` ``[1, K, *shape]`` from per-voxel probability rows in C order."""
    values = torch.tensor([[math.log(v) for v in row] for row in rows], dtype=torch.float64)  # n, k
    return values.T.reshape(1, len(rows[0]), *shape).contiguous()


def _kl(q: list[float], p: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(q, p, strict=True) if a > 0)


def _loss(prior: list[float], weight: float = 1.0) -> PriorAwareLoss:
    return PriorAwareLoss(PartialLoss(MARGINAL), prior, weight)


# ----- two classes: a sample labelling no organ, so U = {0, 1} and V = every voxel
P1 = [0.1, 0.3, 0.2, 0.6]  # p_1 per voxel; pbar_1 = 0.3
TWO = [(1 - a, a) for a in P1]


def test_kl_two_classes_by_hand() -> None:
    logits = _logits(TWO, (1, 2, 2))
    target = torch.zeros(1, 1, 1, 2, 2, dtype=torch.long)
    labelled = torch.tensor([[True, False]])
    expected = _kl([0.8, 0.2], [0.7, 0.3])  # prior first
    loss = _loss([0.8, 0.2], weight=2.0)
    assert float(loss.prior_term(logits, target, labelled)) == pytest.approx(expected, rel=1e-12)
    # the supervised part is 0 here (no labelled organ: q_0 = 1, no Dice class), so the loss is 2 KL
    assert float(loss(logits, target, labelled)) == pytest.approx(2.0 * expected, rel=1e-12)


def test_prior_is_normalised_and_direction_is_prior_first() -> None:
    logits = _logits(TWO, (1, 2, 2))
    target = torch.zeros(1, 1, 1, 2, 2, dtype=torch.long)
    labelled = torch.tensor([[True, False]])
    value = float(_loss([8.0, 2.0]).prior_term(logits, target, labelled))  # same as [0.8, 0.2]
    assert value == pytest.approx(_kl([0.8, 0.2], [0.7, 0.3]), rel=1e-12)
    assert value != pytest.approx(_kl([0.7, 0.3], [0.8, 0.2]), rel=1e-3)


# ----- three classes: organ A (1) labelled, organ B (2) not: U = {0, 2}, V = the background voxels
THREE = [(0.5, 0.2, 0.3), (0.1, 0.8, 0.1), (0.6, 0.1, 0.3), (0.2, 0.3, 0.5)]
THREE_TARGET = [0, 1, 0, IGNORE_CLASS]  # voxel 1 is a labelled organ, voxel 3 is ignored: V = {0, 2}
PRIOR3 = [0.7, 0.2, 0.1]


def _three() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = _logits(THREE, (1, 2, 2))
    target = torch.tensor(THREE_TARGET).reshape(1, 1, 1, 2, 2)
    return logits, target, torch.tensor([[True, True, False]])


def test_kl_restricted_to_unlabelled_classes_by_hand() -> None:
    pbar0, pbar2 = (0.5 + 0.6) / 2, (0.3 + 0.3) / 2  # over V only
    expected = _kl([0.7 / 0.8, 0.1 / 0.8], [pbar0 / (pbar0 + pbar2), pbar2 / (pbar0 + pbar2)])
    value = float(_loss(PRIOR3).prior_term(*_three()))
    assert value == pytest.approx(expected, rel=1e-12)


def test_labelled_organ_and_ignored_voxels_are_outside_v() -> None:
    logits, target, labelled = _three()
    logits.requires_grad_(True)
    loss = _loss(PRIOR3)
    loss.prior_term(logits, target, labelled).backward()
    assert logits.grad is not None
    grad = logits.grad.reshape(3, 4)
    assert torch.all(grad[:, 1] == 0) and torch.all(grad[:, 3] == 0)  # labelled organ, ignored
    assert torch.any(grad[:, 0] != 0) and torch.any(grad[:, 2] != 0)
    changed = logits.detach().clone().reshape(3, 4)
    changed[:, 1] = torch.tensor([3.0, -2.0, 5.0], dtype=torch.float64)
    changed[:, 3] = torch.tensor([-4.0, 1.0, 0.5], dtype=torch.float64)
    same = loss.prior_term(changed.reshape(1, 3, 1, 2, 2), target, labelled)
    assert float(same) == pytest.approx(float(loss.prior_term(logits.detach(), target, labelled)), rel=1e-12)


def test_zero_when_average_matches_prior() -> None:
    prior = [0.6, 0.3, 0.1]  # q_U = (6/7, 1/7) on U = {0, 2}
    # restricted to U the two V voxels have ratios 5 : 1 and 7 : 1, their average (0.6, 0.1) has 6 : 1
    rows = [(0.5, 0.4, 0.1), (0.1, 0.8, 0.1), (0.7, 0.2, 0.1), (0.01, 0.01, 0.98)]
    logits = _logits(rows, (1, 2, 2))
    target = torch.tensor([0, 1, 0, IGNORE_CLASS]).reshape(1, 1, 1, 2, 2)
    labelled = torch.tensor([[True, True, False]])
    assert float(_loss(prior).prior_term(logits, target, labelled)) == pytest.approx(0.0, abs=1e-12)


def test_gradient_pushes_toward_the_prior() -> None:
    target = torch.zeros(1, 1, 1, 2, 2, dtype=torch.long)
    labelled = torch.tensor([[True, False]])
    for prior, sign in (([0.8, 0.2], 1.0), ([0.5, 0.5], -1.0)):  # pbar_1 = 0.3: above, then below the prior
        logits = _logits(TWO, (1, 2, 2)).requires_grad_(True)
        loss = _loss(prior)
        before = loss.prior_term(logits, target, labelled)
        before.backward()
        before = before.detach()
        assert logits.grad is not None
        # descent on organ logits lowers pbar_1 when it exceeds q_1 and raises it otherwise
        assert torch.all(torch.sign(logits.grad[:, 1]) == sign)
        assert torch.all(torch.sign(logits.grad[:, 0]) == -sign)
        with torch.no_grad():
            stepped = logits - 0.1 * logits.grad
            after = loss.prior_term(stepped, target, labelled).detach()
            pbar1 = float(torch.softmax(stepped, dim=1)[:, 1].mean())
        assert float(after) < float(before)
        assert abs(pbar1 - prior[1]) < abs(0.3 - prior[1])


def test_fully_labelled_batch_is_the_supervised_part() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 1, 2, 2, 2))
    labelled = torch.ones(2, 3, dtype=torch.bool)
    supervised = PartialLoss(MARGINAL)
    loss = PriorAwareLoss(supervised, PRIOR3, 5.0)
    assert torch.equal(loss(logits, target, labelled), supervised(logits, target, labelled))
    assert float(loss.prior_term(logits, target, labelled)) == 0.0


def test_mixed_batch_adds_the_mean_over_partial_samples() -> None:
    torch.manual_seed(1)
    full_logits = torch.randn(1, 3, 1, 2, 2, dtype=torch.float64)
    full_target = torch.tensor([0, 1, 2, 0]).reshape(1, 1, 1, 2, 2)
    logits_p, target_p, labelled_p = _three()
    logits = torch.cat([full_logits, logits_p, logits_p.flip(-1)])
    target = torch.cat([full_target, target_p, target_p.flip(-1)])
    labelled = torch.cat([torch.ones(1, 3, dtype=torch.bool), labelled_p, labelled_p])
    supervised = PartialLoss(MARGINAL)
    loss = PriorAwareLoss(supervised, PRIOR3, 0.5)
    kl = float(loss.prior_term(logits_p, target_p, labelled_p))  # the flipped copy has the same V average
    expected = float(supervised(logits, target, labelled)) + 0.5 * kl
    assert float(loss(logits, target, labelled)) == pytest.approx(expected, rel=1e-12)
    assert loss.terms(logits, target, labelled)["prior/kl"].item() == pytest.approx(kl, rel=1e-12)


def test_empty_v_is_finite_and_adds_nothing() -> None:
    logits = _logits(THREE, (1, 2, 2)).requires_grad_(True)
    target = torch.tensor([1, 1, IGNORE_CLASS, 1]).reshape(1, 1, 1, 2, 2)  # no background voxel: V empty
    labelled = torch.tensor([[True, True, False]])
    supervised = PartialLoss(MARGINAL)
    loss = PriorAwareLoss(supervised, PRIOR3, 1.0)
    value = loss(logits, target, labelled)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(supervised(logits, target, labelled).item(), rel=1e-12)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # a partial sample with empty V is not counted in the mean over partially labelled samples
    logits2, target2, labelled2 = _three()
    both = loss.prior_term(
        torch.cat([logits.detach(), logits2]), torch.cat([target, target2]), torch.cat([labelled, labelled2])
    )
    assert float(both) == pytest.approx(float(loss.prior_term(logits2, target2, labelled2)), rel=1e-12)


def test_float32_logits_give_float32_loss_and_no_overflow() -> None:
    logits = torch.tensor(
        [[[[[80.0, -80.0], [0.0, 30.0]]], [[[-80.0, 80.0], [0.0, -30.0]]]]]
    )  # 1, 2, 1, 2, 2
    target = torch.zeros(1, 1, 1, 2, 2, dtype=torch.long)
    value = _loss([0.8, 0.2]).prior_term(logits, target, torch.tensor([[True, False]]))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    pbar = torch.softmax(logits.double(), dim=1).mean(dim=(2, 3, 4))[0].tolist()
    assert float(value) == pytest.approx(_kl([0.8, 0.2], pbar), rel=1e-5)


def test_prior_must_match_the_channels() -> None:
    with pytest.raises(ValueError, match="prior has 3 classes"):
        _loss(PRIOR3)(_logits(TWO, (1, 2, 2)), torch.zeros(1, 1, 1, 2, 2), torch.tensor([[True, False]]))


@pytest.mark.parametrize(
    "prior, weight",
    [
        ([0.0, 1.0], 1.0),
        ([0.5, -0.1, 0.6], 1.0),
        ([0.5, float("nan")], 1.0),
        ([0.5, 0.5], -1.0),
        ([1.0], 1.0),
    ],
)
def test_bad_prior_or_weight(prior: list[float], weight: float) -> None:
    with pytest.raises(ValueError):
        _loss(prior, weight)


# ----- build_loss and deep supervision


def test_build_loss_dispatch() -> None:
    spec = {"marginal": MARGINAL, "prior_aware": {"prior": PRIOR3, "weight": 0.25}}
    loss = build_loss(spec)
    assert isinstance(loss, PriorAwareLoss) and loss.weight == 0.25
    assert loss.supervised.marginal_weights == MARGINAL and not loss.supervised.exclusion_weights
    assert isinstance(build_loss({**spec, "exclusion": {}}), PriorAwareLoss)
    assert isinstance(build_loss({"marginal": MARGINAL}), PartialLoss)
    logits, target, labelled = _three()
    expected = float(PartialLoss(MARGINAL)(logits, target, labelled))
    expected += 0.25 * float(loss.prior_term(logits, target, labelled))
    assert float(loss(logits, target, labelled)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "spec, match",
    [
        (
            {"marginal": MARGINAL, "exclusion": {"dice": 1.0}, "prior_aware": {"prior": PRIOR3, "weight": 1}},
            "excl",
        ),
        ({"marginal": MARGINAL, "prior_aware": {"prior": PRIOR3}}, "prior_aware"),
        ({"marginal": MARGINAL, "prior_aware": [0.5, 0.5]}, "prior_aware"),
        ({"marginal": MARGINAL, "prior": {"prior": PRIOR3, "weight": 1}}, "unknown loss spec side"),
    ],
)
def test_build_loss_errors(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_loss(spec)


def test_under_deep_supervision() -> None:
    torch.manual_seed(2)
    outputs = [torch.randn(2, 3, *(4 // 2**i,) * 3, dtype=torch.float64) for i in range(3)]
    target = torch.randint(0, 2, (2, 1, 4, 4, 4))
    target[0, 0, 0] = IGNORE_CLASS
    labelled = torch.tensor([[True, True, False], [True, True, True]])
    loss = build_loss({"marginal": MARGINAL, "prior_aware": {"prior": PRIOR3, "weight": 1.0}})
    wrapped = DeepSupervisionLoss(loss)
    weights = [4 / 6, 2 / 6, 0.0]  # nnU-Net v2: 1, 1/2, 0, normalised
    expected = sum(
        w * float(loss(o, downsample_target(target, o.shape[2:]), labelled))
        for w, o in zip(weights, outputs, strict=True)
        if w > 0
    )
    assert float(wrapped(outputs, target, labelled)) == pytest.approx(expected, rel=1e-12)
    kl_terms = [
        float(loss.prior_term(o, downsample_target(target, o.shape[2:]), labelled)) for o in outputs[:2]
    ]
    assert all(k > 0 for k in kl_terms)


# ----- the prior


def test_organ_size_prior_by_hand() -> None:
    labels = [np.array([[0, 0], [1, IGNORE_CLASS]]), np.array([2, 0, IGNORE_CLASS, 1], dtype=np.uint8)]
    prior = organ_size_prior(labels, num_classes=3)  # counts 3, 2, 1 over 6 kept voxels
    np.testing.assert_allclose(prior, [3 / 6, 2 / 6, 1 / 6], rtol=1e-12)


def test_organ_size_prior_is_strictly_positive() -> None:
    prior = organ_size_prior([np.array([0, 0, 1, 1])], num_classes=4)
    assert (prior > 0).all() and prior.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(prior, [0.5, 0.5, 0, 0], atol=3e-6)
    assert prior[2] == pytest.approx(1e-6, rel=1e-5)


@pytest.mark.parametrize("labels", [[np.array([0, 3])], [np.array([IGNORE_CLASS])], []])
def test_organ_size_prior_errors(labels: list[np.ndarray]) -> None:
    with pytest.raises(ValueError):
        organ_size_prior(labels, num_classes=3)


def _write_site(root: Path, label: np.ndarray, corner: tuple[int, int, int], labelled: np.ndarray) -> Path:
    """A one-case site: its case file, a one-row patch index at ``corner``, its manifest (returned)."""
    (root / "npz").mkdir()
    image = label.astype(np.float32)
    write_case(case_path(root / "npz", "c0"), {"image": image, "label": label, "labelled": labelled})
    pd.DataFrame([{"case": "c0", "z": corner[0], "y": corner[1], "x": corner[2]}]).to_parquet(
        root / "p.parquet"
    )
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"site": "s1", "train": ["c0"], "test": []}))
    return manifest


def test_prior_from_site_counts_padded_training_patches(tmp_path: Path) -> None:
    label = np.array([[[0, 1], [2, 3]], [[4, 5], [IGNORE_CLASS, 1]]], dtype=np.uint8)  # 2 x 2 x 2
    manifest = _write_site(tmp_path, label, (0, 0, 1), np.ones(6, dtype=bool))
    # the patch (2, 2, 2) at x = 1 holds x = 1 of the volume (1, 3, 5, 1; not the ignored voxel) plus a
    # padded background column of 4 voxels: counts 0: 4, 1: 2, 3: 1, 5: 1 over 8 kept voxels
    prior = prior_from_site(
        manifest, tmp_path / "npz", tmp_path / "p.parquet", (2, 2, 2), n_patches=3, seed=0
    )
    np.testing.assert_allclose(prior, [4 / 8, 2 / 8, 0, 1 / 8, 0, 1 / 8], atol=3e-6)
    assert (prior > 0).all() and prior.sum() == pytest.approx(1.0)


def test_prior_from_site_needs_full_labels(tmp_path: Path) -> None:
    labelled = np.array([True, True, False, False, False, False])
    manifest = _write_site(tmp_path, np.zeros((2, 2, 2), dtype=np.uint8), (0, 0, 0), labelled)
    with pytest.raises(ValueError, match="label every class"):
        prior_from_site(manifest, tmp_path / "npz", tmp_path / "p.parquet", (2, 2, 2), n_patches=1, seed=0)
