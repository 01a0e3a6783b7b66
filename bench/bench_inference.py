"""Sliding-window inference time: fedpsmos's predictor against nnU-Net v2's own, same network and settings.

Baseline: ``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor.predict_sliding_window_return_logits``
(tile step 0.5, Gaussian weighting, no mirroring), configured by hand with the same PlainConvUNet. Prints a
``RESULT {json}`` line with both times, their ratio (ours / nnU-Net; goal <= 1) and the largest absolute
logit difference where the summed tile weight is representable in nnU-Net's float16 accumulator.

Default: one paper-size volume (160 x 240 x 240 voxels at the paper spacing, the paper network and patch
[80, 160, 128]): meant for a GPU. ``--quick``: a small volume and the CPU-default network, seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import numpy as np
import torch

from fedpsmos.inference.sliding_window import coverage_weights, predict_logits
from fedpsmos.network import NetworkSpec, build_network, paper_network_spec


def _timed_pair(fn_a, fn_b, device: torch.device, repeats: int) -> tuple[float, float, object, object]:
    """Best wall times of two functions run alternately ``repeats`` times after one warm-up each.

    Alternating and taking the minimum keeps a busy machine's load from favouring whichever ran second.
    """
    out_a, out_b = fn_a(), fn_b()
    best_a = best_b = float("inf")
    for _ in range(repeats):
        for which in ("a", "b"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if which == "a":
                out_a = fn_a()
            else:
                out_b = fn_b()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            best_a, best_b = (
                (min(best_a, elapsed), best_b) if which == "a" else (best_a, min(best_b, elapsed))
            )
    return best_a, best_b, out_a, out_b


def main() -> None:
    """Parse arguments, run both predictors, print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volume and network (CPU, seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
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
    t_ours, t_nnunet, ours, theirs = _timed_pair(
        lambda: predict_logits(net, image, patch_size=patch, step=0.5, device=device),
        lambda: predictor.predict_sliding_window_return_logits(image_t),
        device,
        args.repeats,
    )
    diff = (ours.float().cpu() - theirs.float().cpu()).abs().amax(dim=0)
    trusted = torch.from_numpy(coverage_weights(shape, patch, 0.5) > 1e-3)
    result = {
        "benchmark": "sliding_window_inference",
        "baseline": "nnUNetPredictor.predict_sliding_window_return_logits",
        "device": str(device),
        "shape": list(shape),
        "patch": list(patch),
        "seconds_ours": round(t_ours, 3),
        "seconds_nnunet": round(t_nnunet, 3),
        "ratio_ours_over_nnunet": round(t_ours / t_nnunet, 3),
        "max_abs_logit_diff_trusted": float(diff[trusted].max()),
        "max_abs_logit_diff_all": float(diff.max()),
        "argmax_agreement": float((ours.cpu().argmax(0) == theirs.cpu().argmax(0)).float().mean()),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
