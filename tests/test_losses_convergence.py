"""A tiny 3-D conv net learns an organ labelled at one site only with the partial losses, not with plain ones.

Synthetic patches: background, organ A and organ B are blobs of distinct but overlapping intensities (noise
wider than half the gap between their means). The "full" site labels A and B; the "partial" site labels A
only, so its B voxels read as background. Trained on both sites, the composed loss (marginal + exclusion)
must reduce and learn B; the same net trained with conventional losses, treating the partial site's
unlabelled B as background, must predict B as background more often on the partial site's images.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpsmos.losses import build_loss

PAPER = {
    "marginal": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
    "exclusion": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0},
}
CONVENTIONAL = {"marginal": {"dice": 1.0, "ce": 1.0, "lovasz": 1.0}}
SIZE = 12
STEPS = 60
LR = 0.02


def _volume(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One [1, S, S, S] image and its full [1, S, S, S] label: a ball of A (1) and a ball of B (2)."""
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float32)] * 3, indexing="ij")
    )  # 3,s,s,s
    label = torch.zeros(SIZE, SIZE, SIZE, dtype=torch.long)
    flip = bool(torch.rand(1, generator=gen) < 0.5)  # A left or right, so position does not tell the organ
    for organ, half in ((1, 0), (2, 1)):
        side = half ^ int(flip)
        centre = SIZE / 4 + torch.rand(3, generator=gen) * SIZE / 2
        centre[2] = SIZE / 4 + SIZE / 2 * side + torch.rand(1, generator=gen).item() * 0.5
        radius = SIZE / 6 + torch.rand(1, generator=gen).item() * SIZE / 10
        inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2
        label[inside] = organ
    means = torch.tensor([0.0, 1.0, 2.0])
    image = means[label] + 0.45 * torch.randn(SIZE, SIZE, SIZE, generator=gen)
    return image[None], label[None]


def _site(
    gen: torch.Generator, count: int, labels_b: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, full_labels = zip(*(_volume(gen) for _ in range(count)), strict=True)
    image, full = torch.stack(images), torch.stack(full_labels)  # n, 1, s, s, s
    partial = full if labels_b else torch.where(full == 2, 0, full)
    return image, partial, full


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 16, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv3d(16, 16, 1),
        nn.LeakyReLU(0.1),
        nn.Conv3d(16, 3, 1),
    )


def _train(
    spec: dict[str, dict[str, float]], use_partial_masks: bool
) -> tuple[list[float], dict[str, float]]:
    """Train on 1 full + 3 partial patches a step; return losses and B's prediction on held-out images."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    full_img, full_lab, _ = _site(gen, 4, labels_b=True)
    part_img, part_lab, _ = _site(gen, 12, labels_b=False)
    test_img, _, test_full = _site(gen, 4, labels_b=False)
    net = _net()
    loss_fn = build_loss(spec)
    optimiser = torch.optim.Adam(net.parameters(), lr=LR)
    full_mask = torch.tensor([True, True, True])
    partial_mask = torch.tensor([True, True, False]) if use_partial_masks else full_mask
    losses = []
    for step in range(STEPS):
        f, p = step % 4, [(3 * step + i) % 12 for i in range(3)]
        image = torch.cat([full_img[f : f + 1], part_img[p]])
        target = torch.cat([full_lab[f : f + 1], part_lab[p]])
        labelled = torch.stack([full_mask, partial_mask, partial_mask, partial_mask])
        loss = loss_fn(net(image), target, labelled)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        prob = torch.softmax(net(test_img), 1)  # n, 3, s, s, s
    is_b = test_full[:, 0] == 2
    predicted = prob.argmax(1)[is_b]
    return losses, {
        "recall_b": float((predicted == 2).float().mean()),
        "b_as_background": float((predicted == 0).float().mean()),
        "mean_prob_b": float(prob[:, 2][is_b].mean()),
    }


def test_partial_losses_learn_organ_labelled_at_one_site_only() -> None:
    # Execute (seeds fixed inside _train; over init seeds 0-3 the partial net scored recall 0.85-0.98 and mean
    # p_B 0.83-0.96, the conventional one mean p_B 0.50-0.60: the margins below leave room for that spread)
    partial_losses, partial = _train(PAPER, use_partial_masks=True)
    _, conventional = _train(CONVENTIONAL, use_partial_masks=False)
    # Assert: the composed loss falls; B is found at the partial site, where plain losses call it background
    assert sum(partial_losses[-5:]) < 0.5 * sum(partial_losses[:5]), partial_losses
    assert partial["recall_b"] > 0.7, partial
    assert partial["mean_prob_b"] > conventional["mean_prob_b"] + 0.15, (partial, conventional)
    assert conventional["b_as_background"] > partial["b_as_background"], (partial, conventional)
