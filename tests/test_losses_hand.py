"""Hand-computed values of every loss variant on one 2 x 2 x 2 volume with three classes.

Classes: 0 background, 1 organ A, 2 organ B. The logits are ``log p`` of the explicit probability rows below,
so ``softmax(logits) = p``. The expected values are worked out with ``math`` from the formulas in the module
docstrings of ``fedpsmos.losses.conventional``, ``.marginal`` and ``.exclusion``; nothing here calls the code
under test except to get the value that is checked.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedpsmos.losses import build_loss

SMOOTH = 1e-5
GAMMA = 2.0
TOPK_PERCENT = 25.0  # 25% of 8 voxels = 2 voxels: a non-trivial top-k on this tiny volume

# voxel: (p_background, p_A, p_B), full label, in C order over (z, y, x)
PROBS = [
    (0.7, 0.2, 0.1),
    (0.5, 0.1, 0.4),
    (0.2, 0.6, 0.2),
    (0.1, 0.8, 0.1),
    (0.3, 0.1, 0.6),
    (0.2, 0.2, 0.6),
    (0.6, 0.3, 0.1),
    (0.4, 0.4, 0.2),
]
FULL_LABEL = [0, 0, 1, 1, 2, 2, 0, 1]
# The partial site labels A only: its B voxels read as background.
PARTIAL_LABEL = [0 if y == 2 else y for y in FULL_LABEL]  # [0, 0, 1, 1, 0, 0, 0, 1]


def _batch(label: list[int], labelled: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-sample batch: logits = log p, shape [1, 3, 2, 2, 2]."""
    logits = torch.tensor([[math.log(v) for v in row] for row in PROBS], dtype=torch.float64)  # 8, 3
    logits = logits.T.reshape(1, 3, 2, 2, 2)
    target = torch.tensor(label).reshape(1, 1, 2, 2, 2)
    return logits, target, torch.tensor([labelled])


def _loss(side: str, term: str, label: list[int], labelled: list[bool]) -> float:
    loss = build_loss({side: {term: 1.0}}, smooth=SMOOTH, gamma=GAMMA, topk_percent=TOPK_PERCENT)
    return float(loss(*_batch(label, labelled)))


def _lovasz_from_sets(errors: list[float], positives: list[bool]) -> float:
    """Lovasz extension of the Jaccard loss from its definition with Python sets (Berman et al., Eq. 8-9)."""
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    gt = {i for i, g in enumerate(positives) if g}

    def jaccard_loss(mispredicted: set[int]) -> float:
        return 1.0 - len(gt - mispredicted) / len(gt | mispredicted) if mispredicted else 0.0

    total, previous = 0.0, 0.0
    for rank in range(len(order)):
        current = jaccard_loss(set(order[: rank + 1]))
        total += errors[order[rank]] * (current - previous)
        previous = current
    return total


def _top_mean(values: list[float], count: int) -> float:
    return sum(sorted(values, reverse=True)[:count]) / count


# ----- conventional (every organ labelled): q = p, y = FULL_LABEL
FULL = [True, True, True]
P = PROBS
Y = FULL_LABEL
P_Y = [P[v][Y[v]] for v in range(8)]  # [0.7, 0.5, 0.6, 0.8, 0.6, 0.6, 0.6, 0.4]


def test_conventional_ce() -> None:
    expected = -sum(math.log(p) for p in P_Y) / 8
    assert _loss("marginal", "ce", Y, FULL) == pytest.approx(expected, rel=1e-9)


def test_conventional_dice() -> None:
    # class 1 (A): voxels 2, 3, 7; class 2 (B): voxels 4, 5
    inter_a = 0.6 + 0.8 + 0.4  # 1.8
    pred_a = 0.2 + 0.1 + 0.6 + 0.8 + 0.1 + 0.2 + 0.3 + 0.4  # 2.7
    inter_b = 0.6 + 0.6  # 1.2
    pred_b = 0.1 + 0.4 + 0.2 + 0.1 + 0.6 + 0.6 + 0.1 + 0.2  # 2.3
    dc_a = (2 * inter_a + SMOOTH) / (3 + pred_a + SMOOTH)
    dc_b = (2 * inter_b + SMOOTH) / (2 + pred_b + SMOOTH)
    expected = 1 - (dc_a + dc_b) / 2
    assert _loss("marginal", "dice", Y, FULL) == pytest.approx(expected, rel=1e-9)


def test_conventional_focal() -> None:
    expected = -sum((1 - p) ** 2 * math.log(p) for p in P_Y) / 8
    assert _loss("marginal", "focal", Y, FULL) == pytest.approx(expected, rel=1e-9)


def test_conventional_topk() -> None:
    ce = [-math.log(p) for p in P_Y]  # largest two: -log 0.4, -log 0.5
    expected = (-math.log(0.4) - math.log(0.5)) / 2
    assert _top_mean(ce, 2) == pytest.approx(expected)
    assert _loss("marginal", "topk", Y, FULL) == pytest.approx(expected, rel=1e-9)


def test_conventional_lovasz() -> None:
    per_class = []
    for c in (0, 1, 2):  # all three classes occur in Y
        positives = [y == c for y in Y]
        errors = [abs(float(g) - P[v][c]) for v, g in enumerate(positives)]
        per_class.append(_lovasz_from_sets(errors, positives))
    expected = sum(per_class) / 3
    assert _loss("marginal", "lovasz", Y, FULL) == pytest.approx(expected, rel=1e-6)


# ----- marginal (B unlabelled): q0 = p0 + pB, qA = pA, qB = 0; y' = PARTIAL_LABEL
PARTIAL = [True, True, False]
YP = PARTIAL_LABEL
Q = [(p0 + p2, p1, 0.0) for p0, p1, p2 in P]  # (0.8,.2,0) (0.9,.1,0) (0.4,.6,0) (0.2,.8,0) (0.9,.1,0) ...
Q_Y = [Q[v][YP[v]] for v in range(8)]  # [0.8, 0.9, 0.6, 0.8, 0.9, 0.8, 0.7, 0.4]


def test_marginal_ce() -> None:
    assert Q_Y == pytest.approx([0.8, 0.9, 0.6, 0.8, 0.9, 0.8, 0.7, 0.4])
    expected = -sum(math.log(q) for q in Q_Y) / 8
    assert _loss("marginal", "ce", YP, PARTIAL) == pytest.approx(expected, rel=1e-9)


def test_marginal_dice() -> None:
    # only organ A is labelled: Dice over class 1 alone
    inter_a = 0.6 + 0.8 + 0.4
    pred_a = sum(q[1] for q in Q)  # 2.7
    dc_a = (2 * inter_a + SMOOTH) / (3 + pred_a + SMOOTH)
    assert _loss("marginal", "dice", YP, PARTIAL) == pytest.approx(1 - dc_a, rel=1e-9)


def test_marginal_focal() -> None:
    expected = -sum((1 - q) ** 2 * math.log(q) for q in Q_Y) / 8
    assert _loss("marginal", "focal", YP, PARTIAL) == pytest.approx(expected, rel=1e-9)


def test_marginal_topk() -> None:
    expected = (-math.log(0.4) - math.log(0.6)) / 2  # the two least likely labels
    assert _loss("marginal", "topk", YP, PARTIAL) == pytest.approx(expected, rel=1e-9)


def test_marginal_lovasz() -> None:
    per_class = []
    for c in (0, 1):  # classes present in y'; B never occurs
        positives = [y == c for y in YP]
        errors = [abs(float(g) - Q[v][c]) for v, g in enumerate(positives)]
        per_class.append(_lovasz_from_sets(errors, positives))
    expected = sum(per_class) / 2
    assert _loss("marginal", "lovasz", YP, PARTIAL) == pytest.approx(expected, rel=1e-6)


# ----- exclusion (B unlabelled): e_A = 1 - y_A, e_bg = e_B = y_A (the only labelled organ)
IS_A = [y == 1 for y in YP]  # voxels 2, 3, 7
E = [(IS_A[v], not IS_A[v], IS_A[v]) for v in range(8)]  # per voxel: (e_bg, e_A, e_B)


def test_exclusion_dice() -> None:
    per_channel = []
    for j in range(3):
        overlap = sum(P[v][j] for v in range(8) if E[v][j])
        size = sum(E[v][j] for v in range(8)) + sum(P[v][j] for v in range(8))
        per_channel.append(2 * overlap / (size + SMOOTH))
    # bg: 2 * (0.2 + 0.1 + 0.4) / (3 + 3.0); A: 2 * (0.2+0.1+0.1+0.2+0.3) / (5 + 2.7); B: 2 * 0.5 / (3 + 2.3)
    assert per_channel[0] == pytest.approx(2 * 0.7 / 6.0, rel=1e-5)
    assert per_channel[1] == pytest.approx(2 * 0.9 / 7.7, rel=1e-5)
    assert per_channel[2] == pytest.approx(2 * 0.5 / 5.3, rel=1e-5)
    expected = sum(per_channel) / 3
    assert _loss("exclusion", "dice", YP, PARTIAL) == pytest.approx(expected, rel=1e-9)


def _exclusion_entries(weight: float = 0.0) -> list[float]:
    """log(p + 1) * p^weight for every (voxel, channel) on its exclusion target."""
    return [P[v][j] ** weight * math.log(P[v][j] + 1) for v in range(8) for j in range(3) if E[v][j]]


def test_exclusion_ce() -> None:
    entries = _exclusion_entries()
    assert len(entries) == 3 + 5 + 3  # sum e over channels: bg 3, A 5, B 3
    expected = sum(entries) / 11
    assert _loss("exclusion", "ce", YP, PARTIAL) == pytest.approx(expected, rel=1e-9)


def test_exclusion_focal() -> None:
    expected = sum(_exclusion_entries(weight=GAMMA)) / 11
    assert _loss("exclusion", "focal", YP, PARTIAL) == pytest.approx(expected, rel=1e-9)


def test_exclusion_topk() -> None:
    voxelwise = [sum(math.log(P[v][j] + 1) for j in range(3) if E[v][j]) for v in range(8)]
    # A voxels: log(1 + p_bg) + log(1 + p_B); others: log(1 + p_A). The top two are voxel 7 (0.4, _, 0.2)
    # and voxel 2 (0.2, _, 0.2).
    expected = (math.log(1.4) + math.log(1.2) + 2 * math.log(1.2)) / 2
    assert _top_mean(voxelwise, 2) == pytest.approx(expected)
    assert _loss("exclusion", "topk", YP, PARTIAL) == pytest.approx(expected, rel=1e-9)


def test_exclusion_lovasz() -> None:
    per_channel = []
    for j in range(3):  # every channel has a non-empty exclusion target here
        positives = [E[v][j] for v in range(8)]
        errors = [abs(float(e) - P[v][j]) for v, e in enumerate(positives)]
        per_channel.append(1 - _lovasz_from_sets(errors, positives))
    expected = sum(per_channel) / 3
    assert _loss("exclusion", "lovasz", YP, PARTIAL) == pytest.approx(expected, rel=1e-6)


def test_exclusion_terms_ignore_fully_labelled_sample() -> None:
    # Prepare/Execute: exclusion-only loss on the fully labelled version of the volume
    value = _loss("exclusion", "ce", Y, FULL)
    # Assert: fully labelled samples get conventional losses only (compose.py), so nothing to exclude
    assert value == 0.0


def test_composed_partial_value_is_weighted_sum_of_hand_terms() -> None:
    # Prepare: marginal CE (weight 2) + exclusion Dice (weight 0.5), expected from the hand formulas above
    ce = -sum(math.log(q) for q in Q_Y) / 8
    excl = []
    for j in range(3):
        overlap = sum(P[v][j] for v in range(8) if E[v][j])
        size = sum(E[v][j] for v in range(8)) + sum(P[v][j] for v in range(8))
        excl.append(2 * overlap / (size + SMOOTH))
    expected = 2 * ce + 0.5 * sum(excl) / 3
    # Execute
    loss = build_loss({"marginal": {"ce": 2.0}, "exclusion": {"dice": 0.5}}, smooth=SMOOTH)
    value = float(loss(*_batch(YP, PARTIAL)))
    # Assert
    assert value == pytest.approx(expected, rel=1e-9)
