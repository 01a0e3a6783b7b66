"""The ignore label (``IGNORE_CLASS``) in the losses, deep supervision, augmentation, sampling and validation.

Voxels whose target is the ignore label must count for nothing: each loss term equals the same term on the
batch with those voxels deleted, their gradient is exactly zero, an all-ignored patch adds zero without NaN,
and a batch without ignored voxels keeps the values it had before ignore support existed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedpsmos.losses import TERM_NAMES, build_loss, downsample_target
from fedpsmos.losses.checks import validate_inputs
from fedpsmos.organs import IGNORE_CLASS, NUM_CLASSES, ORGANS
from fedpsmos.preprocessing.storage import read_case, write_case
from fedpsmos.training.augmentation import _spatial
from fedpsmos.training.sampler import PatchSampler
from fedpsmos.training.selection import ValidationCase, case_dice
from fedpsmos.training.site_data import SamplerError
from tests.test_sampler import PATCH, write_site

K = 6
SIDES_TERMS = [(side, term) for side in ("marginal", "exclusion") for term in TERM_NAMES]
TOPK_PERCENT = 25.0


def _loss(side: str, term: str) -> nn.Module:
    return build_loss({side: {term: 1.0}}, topk_percent=TOPK_PERCENT)


def _mixed_batch(seed: int, shape: tuple[int, int, int] = (3, 4, 5)) -> tuple[torch.Tensor, ...]:
    """Two samples: sample 0 labels organs 1 and 3 only (partial), sample 1 labels every organ."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, K, *shape, generator=gen, dtype=torch.float64) * 2.0
    target = torch.randint(0, K, (2, 1, *shape), generator=gen)
    mask = torch.ones(2, K, dtype=torch.bool)
    mask[0, [2, 4, 5]] = False
    target[0][torch.isin(target[0], torch.tensor([2, 4, 5]))] = 0
    return logits, target, mask


def _ignore_some(target: torch.Tensor, per_sample: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``target`` with ``per_sample`` random voxels of every sample set to the ignore label, and the mask."""
    gen = torch.Generator().manual_seed(seed)
    flat = target.reshape(target.shape[0], -1).clone()
    ignored = torch.zeros_like(flat, dtype=torch.bool)
    for b in range(flat.shape[0]):
        ignored[b, torch.randperm(flat.shape[1], generator=gen)[:per_sample]] = True
    flat[ignored] = IGNORE_CLASS
    return flat.reshape(target.shape), ignored


def _delete(logits: torch.Tensor, target: torch.Tensor, ignored: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The batch with the ignored voxels deleted (the same count per sample), one spatial axis left."""
    batch, channels = logits.shape[:2]
    keep = ~ignored
    kept_logits = torch.stack([logits.reshape(batch, channels, -1)[b][:, keep[b]] for b in range(batch)])
    kept_target = torch.stack([target.reshape(batch, -1)[b][keep[b]] for b in range(batch)])[:, None]
    return kept_logits, kept_target


# ----- no ignored voxel: the values of the implementation before ignore support --------------------------

# Computed with the loss code as it was before the ignore label existed, on _mixed_batch(0).
REFERENCE = {
    ("marginal", "dice"): 0.7971529239131738,
    ("marginal", "ce"): 2.023458121611348,
    ("marginal", "focal"): 1.7322061694854942,
    ("marginal", "topk"): 6.07046564345413,
    ("marginal", "lovasz"): 0.7766873703830878,
    ("exclusion", "dice"): 0.09095016865775961,
    ("exclusion", "ce"): 0.06366737407448039,
    ("exclusion", "focal"): 0.01780104006457297,
    ("exclusion", "topk"): 0.40342686180583964,
    ("exclusion", "lovasz"): 0.05988790451096656,
}


@pytest.mark.parametrize(("side", "term"), SIDES_TERMS)
def test_batch_without_ignored_voxels_keeps_its_previous_value(side: str, term: str) -> None:
    # Prepare
    logits, target, mask = _mixed_batch(0)
    # Execute
    value = float(build_loss({side: {term: 1.0}})(logits, target, mask))
    # Assert
    assert value == pytest.approx(REFERENCE[(side, term)], rel=1e-12, abs=0.0)


# ----- ignored voxels are deleted voxels ---------------------------------------------------------------


@pytest.mark.parametrize(("side", "term"), SIDES_TERMS)
def test_loss_with_ignored_voxels_equals_loss_without_them(side: str, term: str) -> None:
    # Prepare: 17 of 60 voxels of each sample ignored
    logits, target, mask = _mixed_batch(1)
    ignored_target, ignored = _ignore_some(target, 17, seed=2)
    kept_logits, kept_target = _delete(logits, target, ignored)
    loss = _loss(side, term)
    # Execute
    with_ignore = loss(logits, ignored_target, mask)
    deleted = loss(kept_logits, kept_target, mask)
    # Assert
    assert float(with_ignore) == pytest.approx(float(deleted), rel=1e-12, abs=1e-15)
    assert float(with_ignore) != pytest.approx(float(loss(logits, target, mask)), rel=1e-6)


@pytest.mark.parametrize(("side", "term"), SIDES_TERMS)
def test_gradient_is_exactly_zero_at_ignored_voxels(side: str, term: str) -> None:
    # Prepare
    logits, target, mask = _mixed_batch(3)
    ignored_target, ignored = _ignore_some(target, 20, seed=4)
    logits = logits.float().requires_grad_()
    # Execute
    _loss(side, term)(logits, ignored_target, mask).backward()
    grad = logits.grad.reshape(2, K, -1).transpose(0, 1)  # k, b, n
    # Assert
    assert torch.equal(grad[:, ignored], torch.zeros_like(grad[:, ignored]))
    assert bool(torch.isfinite(grad).all()) and bool(grad[:, ~ignored].abs().sum() > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_ignored_batch_gives_zero_without_nan(dtype: torch.dtype) -> None:
    # Prepare
    logits, _, mask = _mixed_batch(5)
    logits = logits.to(dtype).requires_grad_()
    target = torch.full((2, 1, 3, 4, 5), IGNORE_CLASS)
    spec = {"marginal": dict.fromkeys(TERM_NAMES, 1.0), "exclusion": dict.fromkeys(TERM_NAMES, 1.0)}
    # Execute
    value = build_loss(spec)(logits, target, mask)
    value.backward()
    # Assert
    assert float(value.detach()) == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(("side", "term"), SIDES_TERMS)
def test_all_ignored_patch_is_dropped_from_the_batch(side: str, term: str) -> None:
    # Prepare: three samples, the middle one partial and fully ignored
    logits, target, mask = _mixed_batch(6)
    logits = torch.cat([logits, logits[:1] * 0.5])
    target = torch.cat([target, target[:1]])
    mask = torch.cat([mask, mask[:1]])
    ignored_target = target.clone()
    ignored_target[1] = IGNORE_CLASS
    mask[1, 1:] = torch.tensor([True, False, False, False, False])
    others = torch.tensor([0, 2])
    loss = _loss(side, term)
    # Execute
    value = loss(logits, ignored_target, mask)
    without = loss(logits[others], target[others], mask[others])
    # Assert
    assert math.isfinite(float(value))
    assert float(value) == pytest.approx(float(without), rel=1e-12, abs=1e-15)


# ----- hand-computed values ---------------------------------------------------------------------------

# One sample, two classes, six voxels in one row; (p_background, p_organ) per voxel and the target.
HAND_PROBS = [(0.9, 0.1), (0.6, 0.4), (0.3, 0.7), (0.2, 0.8), (0.5, 0.5), (0.4, 0.6)]
HAND_TARGET = [0, 0, 1, IGNORE_CLASS, IGNORE_CLASS, 1]
KEPT = [0, 1, 2, 5]


def _hand(term: str) -> float:
    logits = torch.tensor([[math.log(p) for p in row] for row in HAND_PROBS], dtype=torch.float64).T[None]
    target = torch.tensor(HAND_TARGET)[None, None]
    loss = build_loss({"marginal": {term: 1.0}}, topk_percent=TOPK_PERCENT)
    return float(loss(logits, target, torch.ones(1, 2, dtype=torch.bool)))


def test_hand_computed_ce_dice_and_topk_skip_ignored_voxels() -> None:
    p_y = [HAND_PROBS[v][HAND_TARGET[v]] for v in KEPT]  # 0.9, 0.6, 0.7, 0.6
    organ = [HAND_PROBS[v][1] for v in KEPT]  # 0.1, 0.4, 0.7, 0.6
    overlap, size = 0.7 + 0.6, 2 + sum(organ)
    smooth = 1e-5
    assert _hand("ce") == pytest.approx(-sum(math.log(p) for p in p_y) / 4, rel=1e-12)
    assert _hand("dice") == pytest.approx(1 - (2 * overlap + smooth) / (size + smooth), rel=1e-12)
    assert _hand("topk") == pytest.approx(-math.log(0.6), rel=1e-12)  # 25% of 4 kept voxels: 1 voxel
    focal = -sum((1 - p) ** 2 * math.log(p) for p in p_y) / 4
    assert _hand("focal") == pytest.approx(focal, rel=1e-12)


def test_hand_computed_exclusion_ce_skips_ignored_voxels() -> None:
    # Prepare: three classes, the sample labels organ 1 only; organ-2 channel must stay off organ-1 voxels
    probs = [(0.7, 0.2, 0.1), (0.2, 0.5, 0.3), (0.1, 0.3, 0.6), (0.3, 0.3, 0.4)]
    target = [0, 1, IGNORE_CLASS, 1]
    logits = torch.tensor([[math.log(p) for p in row] for row in probs], dtype=torch.float64).T[None]
    mask = torch.tensor([[True, True, False]])
    loss = build_loss({"exclusion": {"ce": 1.0}})
    # Execute
    value = float(loss(logits, torch.tensor(target)[None, None], mask))
    # Assert: e_1 = 1 - y_1 on kept voxels {0}; e_0 = e_2 = y_1 on kept voxels {1, 3}
    terms = [math.log1p(0.2), math.log1p(0.2), math.log1p(0.3), math.log1p(0.3), math.log1p(0.4)]
    assert value == pytest.approx(sum(terms) / len(terms), rel=1e-12)


# ----- input checks and deep supervision ---------------------------------------------------------------


def test_validate_inputs_accepts_the_ignore_label_and_still_rejects_other_values() -> None:
    # Prepare
    logits, target, mask = _mixed_batch(7)
    ignored_target, _ = _ignore_some(target, 5, seed=8)
    # Execute
    checked, _ = validate_inputs(logits, ignored_target.double(), mask)
    # Assert
    assert torch.equal(checked, ignored_target)
    for bad in (K, IGNORE_CLASS - 1, IGNORE_CLASS + 1, -1):
        wrong = ignored_target.clone()
        wrong[1, 0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"must lie in \[0, 5\]"):
            validate_inputs(logits, wrong, mask)


def test_downsampled_target_keeps_the_ignore_label_unblended() -> None:
    # Prepare
    target = torch.randint(0, K, (1, 1, 8, 8, 8))
    target[0, 0, :4, :4, :4] = IGNORE_CLASS
    # Execute
    small = downsample_target(target, (4, 4, 4))
    # Assert
    assert set(small.unique().tolist()) <= set(target.unique().tolist())
    assert bool((small[0, 0, :2, :2, :2] == IGNORE_CLASS).all())
    assert int((small == IGNORE_CLASS).sum()) == 8


# ----- augmentation, sampler, validation Dice ----------------------------------------------------------


def test_spatial_augmentation_moves_ignored_voxels_without_blending() -> None:
    # Prepare
    label = torch.randint(0, 3, (1, 6, 10, 10))
    label[:, 2:4, 3:7, 3:7] = IGNORE_CLASS
    image = torch.randn(1, 6, 10, 10)
    angle = math.radians(25.0)
    rotation = np.array(
        [[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]]
    )
    # Execute
    _, rotated = _spatial(image, label, rotation * 1.2)
    # Assert
    assert set(rotated.unique().tolist()) <= {0, 1, 2, IGNORE_CLASS}
    assert bool((rotated == IGNORE_CLASS).any())


def _put_ignore(site_npz: Path) -> None:
    arrays = read_case(site_npz)
    arrays["label"] = arrays["label"].copy()
    arrays["label"][:, :6, :] = IGNORE_CLASS
    write_case(site_npz, arrays)


def test_sampler_keeps_the_ignore_label_also_under_a_class_map(tmp_path: Path) -> None:
    # Prepare
    site = write_site(tmp_path, "site1", ("liver", "spleen"), cases=1)
    _put_ignore(next(iter(site.npz_paths.values())))
    class_map = np.array([0, 1, 0, 0, 0, 0])
    # Execute
    plain = PatchSampler([site], patch_size=PATCH, patches_per_iteration=8, seed=0, augment=False)
    mapped = PatchSampler(
        [site], patch_size=PATCH, patches_per_iteration=8, seed=0, augment=False, class_map=class_map
    )
    plain_target, mapped_target = plain.next_batch()[1], mapped.next_batch()[1]
    # Assert
    assert bool((plain_target == IGNORE_CLASS).any())
    assert torch.equal(plain_target == IGNORE_CLASS, mapped_target == IGNORE_CLASS)
    assert set(mapped_target.unique().tolist()) <= {0, 1, IGNORE_CLASS}


def test_sampler_still_refuses_other_out_of_range_labels(tmp_path: Path) -> None:
    # Prepare
    site = write_site(tmp_path, "site1", ("liver",), cases=1)
    path = next(iter(site.npz_paths.values()))
    arrays = read_case(path)
    arrays["label"] = arrays["label"].copy()
    arrays["label"][0, 0, 0] = NUM_CLASSES
    write_case(path, arrays)
    sampler = PatchSampler([site], patch_size=PATCH, patches_per_iteration=1, seed=0, augment=False)
    # Execute / Assert
    with pytest.raises(SamplerError, match=f"label holds class {NUM_CLASSES}"):
        sampler.next_batch()


class _NearestClass(nn.Module):
    """1x1 convolution whose argmax is the class nearest to the image value: logit_k = 2 k x - k^2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, channels, 1)
        with torch.no_grad():
            k = torch.arange(channels, dtype=torch.float32)
            self.conv.weight.copy_((2 * k).reshape(channels, 1, 1, 1, 1))
            self.conv.bias.copy_(-(k**2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_validation_dice_leaves_ignored_voxels_out(tmp_path: Path) -> None:
    # Prepare: prediction = image value; liver predicted on 4 + 4 voxels, 4 of them under the ignore label
    label = np.zeros((2, 4, 4), dtype=np.uint8)
    label[0, :2, :2] = 1  # liver, 4 voxels, all predicted
    label[1, :2, :2] = IGNORE_CLASS  # unknown class, predicted liver: must not count as false positive
    label[1, 2:, 2:] = 2  # spleen, 4 voxels, half predicted
    image = np.zeros(label.shape, dtype=np.float32)
    image[0, :2, :2] = 1.0
    image[1, :2, :2] = 1.0
    image[1, 2:, 2] = 2.0
    labelled = np.array([True, True, True, False, False, False])
    npz = tmp_path / "case.b2zip"
    write_case(npz, {"image": image, "label": label, "labelled": labelled})
    case = ValidationCase("site1", "case", npz)
    # Execute
    scores = case_dice(
        _NearestClass(NUM_CLASSES),
        [case],
        organs=ORGANS,
        patch_size=label.shape,
        device="cpu",
    )
    # Assert
    assert scores == [{"liver": 1.0, "spleen": pytest.approx(2 * 2 / (2 + 4))}]
