"""Laterality experiment: does left-right mirroring augmentation cost the kidneys their side?

After canonical orientation (``fedpsmos.preprocessing.orientation``) the last array axis x runs from the
patient's right to left. The phantom here has two identical kidneys, one each side of the spine, that differ
only by side; the liver (large, patient's right, low x) and spleen (small, left, high x) give the anatomical
context. A tiny PlainConvUNet is trained on random patches narrower than the body, with mirroring of

- ``no_lr_flip``: z and y only (fedpsmos' default ``AugmentationSettings.mirror_axes = (0, 1)``);
- ``flip_swap``: z, y and x, swapping kidney_left <-> kidney_right in the label when x is flipped;
- ``flip``: z, y and x without swapping (nnU-Net's default, which mislabels a mirrored kidney),

each p 0.5, and evaluated by Dice per kidney on held-out phantoms with the Gaussian sliding window
(no test-time mirroring). Not part of ``bench/run_all.py`` (it measures accuracy, not speed):

    python bench/laterality_experiment.py                      # 300 iterations, seeds 0 1, ~1 min a run
    python bench/laterality_experiment.py --iterations 150 --seeds 0 --modes no_lr_flip
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedpsmos.inference.sliding_window import predict_logits
from fedpsmos.network import NetworkSpec, build_network
from fedpsmos.organs import CLASS_INDEX
from fedpsmos.training.augmentation import DEFAULT_AUGMENTATION

MODES = ("no_lr_flip", "flip_swap", "flip")
SHAPE = (12, 40, 64)  # z, y, x voxels (about 8 x 6 x 6 mm)
PATCH = (12, 32, 32)  # half the body's width: many patches do not reach the midline
LEFT, RIGHT = CLASS_INDEX["kidney_left"], CLASS_INDEX["kidney_right"]
NUM_CLASSES = 6


def phantom(rng: np.random.Generator, shape: Sequence[int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One canonical (LPS) phantom ``(image float32 [Z, Y, X], label uint8)``; the kidneys differ by side."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    cx = nx / 2 - 0.5 + rng.uniform(-6, 6)  # the patient is not centred in the field of view
    cy = ny / 2 - 0.5 + rng.uniform(-3, 3)
    cz = nz / 2 - 0.5 + rng.uniform(-1, 1)
    scale = rng.uniform(0.9, 1.1)
    image = np.full(shape, -1.5, dtype=np.float32)  # air
    label = np.zeros(shape, dtype=np.uint8)

    def blob(dx: float, dy: float, dz: float, semi: Sequence[float]) -> np.ndarray:
        r = ((x - cx - dx * scale) / (semi[0] * scale)) ** 2 + (
            (y - cy - dy * scale) / (semi[1] * scale)
        ) ** 2
        return r + ((z - cz - dz) / semi[2]) ** 2 < 1

    body = blob(0, 0, 0, (29, 17, 1e6))
    image[body] = -0.5  # fat
    image[blob(0, 9, 0, (4, 4, 1e6))] = 2.5  # spine, posterior midline
    liver, spleen = blob(-17, -3, 1, (11, 10, 5)), blob(19, 3, 1, (6, 6, 4))
    image[liver], label[liver] = 0.5, CLASS_INDEX["liver"]
    image[spleen], label[spleen] = 0.5, CLASS_INDEX["spleen"]
    # Identical kidneys mirrored about the midline: only their side tells them apart.
    dy, dz = 7 + rng.uniform(-1, 1), rng.uniform(-1, 1)
    for side, value in ((1.0, LEFT), (-1.0, RIGHT)):
        kidney = blob(side * (11 + rng.uniform(-1, 1)), dy, dz, (4.5, 5.5, 4))
        image[kidney], label[kidney] = 1.2, value
    image += rng.normal(0, 0.25, size=shape).astype(np.float32)
    return image, label


def tiny_network(seed: int) -> torch.nn.Module:
    """A three-stage PlainConvUNet (features 8, 16, 32), six outputs, no deep supervision."""
    spec = NetworkSpec(
        features=(8, 16, 32),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
        kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
        conv_per_stage=1,
        deep_supervision=False,
        num_classes=NUM_CLASSES,
    )
    return build_network(spec, seed=seed)


def _batch(
    cases: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, mode: str, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches of random cases, mirrored per ``mode`` (module docstring)."""
    images, labels = [], []
    axes = DEFAULT_AUGMENTATION.mirror_axes if mode == "no_lr_flip" else (0, 1, 2)
    for _ in range(batch_size):
        image, label = cases[int(rng.integers(len(cases)))]
        start = [int(rng.integers(0, n - p + 1)) for n, p in zip(image.shape, PATCH, strict=True)]
        window = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
        img, lab = image[window], label[window]
        flips = tuple(a for a in axes if rng.random() < 0.5)
        if flips:
            img, lab = np.flip(img, flips), np.flip(lab, flips)
            if mode == "flip_swap" and 2 in flips:
                lab = np.where(lab == LEFT, RIGHT, np.where(lab == RIGHT, LEFT, lab))
        images.append(np.ascontiguousarray(img)[None])
        labels.append(np.ascontiguousarray(lab).astype(np.int64))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def train(
    mode: str, *, iterations: int = 300, seed: int = 0, n_train: int = 8, batch_size: int = 2
) -> torch.nn.Module:
    """Train the tiny network with ``mode``'s mirroring (cross-entropy plus soft Dice, Adam 1e-2)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rng = np.random.default_rng([seed, 1])
    cases = [phantom(rng) for _ in range(n_train)]
    net = tiny_network(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(iterations):
        image, target = _batch(cases, rng, mode, batch_size)
        logits = net(image)
        probs = torch.softmax(logits, 1)
        onehot = F.one_hot(target, NUM_CLASSES).permute(0, 4, 1, 2, 3).float()
        inter = (probs * onehot).sum((0, 2, 3, 4))
        dice = (2 * inter + 1e-5) / (probs.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4)) + 1e-5)
        loss = F.cross_entropy(logits, target) + 1 - dice[1:].mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net


def kidney_dice(net: torch.nn.Module, *, seed: int = 100, n_test: int = 4) -> dict[str, float]:
    """Mean Dice of kidney_left and kidney_right on ``n_test`` held-out phantoms (sliding window, no TTA)."""
    rng = np.random.default_rng([seed, 2])
    scores: dict[str, list[float]] = {"kidney_left": [], "kidney_right": []}
    for _ in range(n_test):
        image, label = phantom(rng)
        logits = predict_logits(net, image, patch_size=PATCH, step=0.5, device="cpu")
        pred = logits.argmax(0).numpy()
        for name, value in (("kidney_left", LEFT), ("kidney_right", RIGHT)):
            a, b = pred == value, label == value
            scores[name].append(
                2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))
            )
    return {name: float(np.mean(v)) for name, v in scores.items()}


def main() -> None:
    """Run the modes and seeds given on the command line and print a table and one ``RESULT`` line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, float]]] = {}
    for mode in args.modes:
        for seed in args.seeds:
            start = time.perf_counter()
            scores = kidney_dice(train(mode, iterations=args.iterations, seed=seed))
            scores["seconds"] = time.perf_counter() - start
            results.setdefault(mode, []).append(scores)
            print(
                f"{mode:11s} seed {seed}: Dice kidney_left {scores['kidney_left']:.3f} "
                f"kidney_right {scores['kidney_right']:.3f} ({scores['seconds']:.0f} s)",
                flush=True,
            )
    summary = {
        mode: {k: round(float(np.mean([r[k] for r in runs])), 3) for k in ("kidney_left", "kidney_right")}
        for mode, runs in results.items()
    }
    print("RESULT " + json.dumps({"iterations": args.iterations, "seeds": args.seeds, "dice": summary}))


if __name__ == "__main__":
    main()
