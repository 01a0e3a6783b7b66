"""Mixed precision: the floating-point format training and inference compute in (``training.precision``).

The paper's budget is about 3 million iterations of the paper network at patch [80, 160, 128]; at nnU-Net's
speed that is some 85 GPU-hours, and mixed precision is what gives nnU-Net v2 its speed on a GPU. The choices:

- ``fp32``: no autocast, every operation in float32 (the CPU default: CPU runs stay bit-identical to the
  float32 trainer they replace).
- ``bf16``: ``torch.autocast`` with bfloat16. Same exponent range as float32, so no loss scaling is needed;
  convolutions run in bfloat16 on tensor cores (CUDA compute capability 8.0 or newer: A100, H100, ...).
- ``fp16``: ``torch.autocast`` with float16 and a ``torch.amp.GradScaler``, exactly nnU-Net v2's
  ``nnUNetTrainer.train_step`` on a GPU (init scale 2^16, x2 every 2000 finite steps, x0.5 and the step
  skipped on an overflow; gradients unscaled before clipping). For GPUs without bfloat16 (V100, T4).
- ``auto`` (the default): bf16 on a CUDA device of compute capability 8.0 or newer, fp16 on an older CUDA
  device, fp32 on anything else (the CPU). nnU-Net v2 always uses float16 on CUDA; bfloat16 is preferred here
  where the hardware has it because it cannot overflow, so a long run never loses steps to the scaler.

What stays float32 whatever the precision (:mod:`fedpsmos.losses`): every loss casts the logits to at least
float32 before its softmax, so the sums over voxels (Dice, exclusion, cross-entropy, Lovasz, the prior term)
accumulate in float32; a float16 sum of a paper patch's probabilities passes float16's maximum 65,504 and
gives inf, then NaN. Sliding-window inference accumulates tiles in float32 as well. Under autocast the model
weights, the optimiser state and the gradients stay float32 (autocast casts copies for each operation).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_MIN_CAPABILITY = 8  # CUDA compute capability major version with native bfloat16 (Ampere)


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`, else raise ``ValueError`` naming it.

    Parameters
    ----------
    precision:
        ``auto``, ``bf16``, ``fp16`` or ``fp32``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def choose_precision(precision: str, device_type: str, cuda_bf16: bool) -> str:
    """The precision to run in: ``precision`` itself unless it is ``auto`` (the rule of the module docstring).

    Parameters
    ----------
    precision:
        the requested precision, one of :data:`PRECISIONS`.
    device_type:
        ``"cuda"``, ``"cpu"``, ... (``torch.device.type``).
    cuda_bf16:
        whether the CUDA device computes bfloat16 natively (ignored on other devices).
    """
    if check_precision(precision) != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp16"
    return "fp32"


def cuda_supports_bf16(device: torch.device) -> bool:
    """Whether a CUDA device computes bfloat16 natively (compute capability 8.0 or newer, or any ROCm GPU).

    Parameters
    ----------
    device:
        a CUDA device; ``torch.cuda.is_bf16_supported()`` would also count slow emulation on older GPUs.
    """
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= BF16_MIN_CAPABILITY


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``bf16``, ``fp16`` or ``fp32`` for ``precision`` on ``device`` (:func:`choose_precision`).

    Parameters
    ----------
    precision:
        one of :data:`PRECISIONS`.
    device:
        where the model runs.
    """
    device = torch.device(device)
    needs_query = check_precision(precision) == "auto" and device.type == "cuda"
    return choose_precision(precision, device.type, cuda_supports_bf16(device) if needs_query else False)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of a resolved precision: none for ``fp32``, ``torch.autocast`` otherwise.

    Parameters
    ----------
    precision:
        ``bf16``, ``fp16`` or ``fp32`` (:func:`resolve_precision`).
    device:
        where the model runs.
    """
    if check_precision(precision) == "auto":
        raise ValueError("resolve the precision 'auto' for a device first (resolve_precision)")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """nnU-Net v2's loss scaler for ``fp16``; a disabled scaler (every call a pass-through) otherwise.

    Parameters
    ----------
    precision:
        ``bf16``, ``fp16`` or ``fp32`` (:func:`resolve_precision`).
    device:
        where the model runs.
    """
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
