"""Sliding-window inference time: fedpsmos's predictor against nnU-Net v2's own, same network and settings.

Baseline: ``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor.predict_sliding_window_return_logits``
(tile step 0.5, Gaussian weighting, no mirroring), configured by hand with the same PlainConvUNet. Measured
in one process with the same torch threads: one warm-up of each, then ``--repeats`` rounds in which every
predictor runs once in turn, and the median of each is reported (alternation spreads a shared machine's load
over all of them). Two of ours are timed: the default (two tiles a forward pass) and ``batch_size=1`` (tile
for tile what nnU-Net does). Prints a ``RESULT {json}`` line with the times, their ratios over nnU-Net (goal
<= 1) and the largest absolute logit difference where the summed tile weight is representable in nnU-Net's
float16 accumulator.

Default: one paper-size volume (160 x 240 x 240 voxels at the paper spacing, the paper network and patch
[80, 160, 128]): meant for a GPU. ``--quick``: a small volume and the CPU-default network, seconds on a CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch

from fedpsmos.inference.sliding_window import compute_gaussian, compute_steps, predict_logits
from fedpsmos.network import NetworkSpec, build_network, paper_network_spec


def coverage(shape: tuple[int, ...], patch: tuple[int, ...], step: float = 0.5) -> torch.Tensor:
    """Summed Gaussian tile weight of each voxel: where it is tiny (image corners), nnU-Net's float16
    accumulator loses precision, so logits are compared only where it is representable."""
    gaussian = torch.from_numpy(compute_gaussian(patch)).double()
    weights = torch.zeros(shape, dtype=torch.float64)
    for start in itertools.product(*compute_steps(shape, patch, step)):
        weights[tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))] += gaussian
    return weights


def timed_alternating(
    fns: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median wall time and last output of each function, run in turn ``repeats`` times after a warm-up.

    Parameters
    ----------
    fns:
        Named zero-argument functions returning a tensor.
    device:
        Synchronised around each call when CUDA.
    repeats:
        Timed rounds; each round runs every function once.
    """
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up: allocator, oneDNN primitives, cuDNN plans
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def main() -> None:
    """Parse arguments, run both predictors, print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volume and network (CPU, seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds, median reported (default 3 quick, 5 full)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, for all predictors")
    args = parser.parse_args()
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.quick:
        shape, patch = (40, 72, 72), (24, 48, 48)
        spec = NetworkSpec(
            features=(8, 16, 32, 64),
            strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
            kernel_sizes=((3, 3, 3),) * 4,
            conv_per_stage=2,
            deep_supervision=True,
            num_classes=6,
        )
    else:
        shape, patch = (160, 240, 240), (80, 160, 128)
        spec = paper_network_spec(6)
    net = build_network(spec, seed=0).to(device).eval()
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=False,
        device=device,
        perform_everything_on_device=device.type == "cuda",
        allow_tqdm=False,
    )
    predictor.network = net
    predictor.configuration_manager = SimpleNamespace(patch_size=list(patch))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=spec.num_classes)
    predictor.allowed_mirroring_axes = None
    net.decoder.deep_supervision = False  # nnU-Net's predictor expects one output; ours handles both

    image_t = torch.from_numpy(image)[None]
    seconds, outputs = timed_alternating(
        {
            "nnunet": lambda: predictor.predict_sliding_window_return_logits(image_t),
            "ours": lambda: predict_logits(net, image, patch_size=patch, step=0.5, device=device),
            "ours_batch1": lambda: predict_logits(
                net, image, patch_size=patch, step=0.5, device=device, batch_size=1
            ),
        },
        device,
        repeats,
    )
    ours, theirs = outputs["ours"].float().cpu(), outputs["nnunet"].float().cpu()
    diff = (ours - theirs).abs().amax(dim=0)
    trusted = coverage(shape, patch) > 1e-3
    result = {
        "benchmark": "sliding_window_inference",
        "baseline": "nnUNetPredictor.predict_sliding_window_return_logits",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "shape": list(shape),
        "patch": list(patch),
        "seconds_ours": round(seconds["ours"], 3),
        "seconds_ours_batch1": round(seconds["ours_batch1"], 3),
        "seconds_nnunet": round(seconds["nnunet"], 3),
        "ratio_ours_over_nnunet": round(seconds["ours"] / seconds["nnunet"], 3),
        "ratio_ours_batch1_over_nnunet": round(seconds["ours_batch1"] / seconds["nnunet"], 3),
        "max_abs_logit_diff_trusted": float(diff[trusted].max()),
        "max_abs_logit_diff_all": float(diff.max()),
        "max_abs_logit_diff_batch1_vs_default": float((outputs["ours_batch1"] - outputs["ours"]).abs().max()),
        "argmax_agreement": float((ours.argmax(0) == theirs.argmax(0)).float().mean()),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
