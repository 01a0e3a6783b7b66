"""Checkpoints: tensors and plain metadata only, written atomically, verified on load.

docs/architecture.md "Checkpoint": a dict saved with ``torch.save`` and loadable with
``torch.load(weights_only=True)``. :func:`save_checkpoint` records in ``payload["integrity"]`` the byte count
and SHA-256 of every tensor; :func:`load_checkpoint` refuses a file that is missing, truncated, tampered with,
not weights-only (a pickle that would run code is refused by the restricted unpickler before anything uses
it), or whose model holds non-finite values. Federated sites exchange these files, so a site must not be able
to run code on the aggregator or poison it with NaN weights.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpsmos.atomic import atomic_path

INTEGRITY_KEY = "integrity"
_PLAIN = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint file cannot be trusted or used; the message names the file and the problem."""


def _walk(obj: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(path, leaf)`` for every leaf in a stable order (sorted keys, list order)."""
    if isinstance(obj, Mapping):
        for key in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            yield from _walk(obj[key], f"{where}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _walk(item, f"{where}/{i}")
    else:
        yield where, obj


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _integrity(payload: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Byte count and SHA-256 of every tensor of ``payload`` (except the integrity record) by leaf path."""
    record: dict[str, dict[str, Any]] = {}
    content = {k: v for k, v in payload.items() if k != INTEGRITY_KEY}
    for path, leaf in _walk(content, ""):
        if isinstance(leaf, torch.Tensor):
            data = _tensor_bytes(leaf)
            record[path] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        elif not isinstance(leaf, _PLAIN):
            raise TypeError(f"{path}: {type(leaf).__name__} is neither a tensor nor plain metadata")
    return record


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` atomically after recording the integrity of its tensors in ``payload["integrity"]``.

    Parameters
    ----------
    path:
        target file (its folder is created).
    payload:
        ``{"model": state_dict, "meta": {...}, ...}`` (``meta`` required, ``model`` optional for a site's
        private optimiser state): tensors, str/int/float/bool/None, lists, tuples and dicts with str or int
        keys only (anything else is refused, so the file stays weights-only loadable).
    """
    if "meta" not in payload:
        raise CheckpointError(f"{path}: payload needs a 'meta' key, got {sorted(payload)}")
    try:
        payload[INTEGRITY_KEY] = _integrity(payload)
    except TypeError as error:
        raise CheckpointError(f"{path}: cannot save {error}") from None
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path:
        the checkpoint file.
    map_location:
        device the tensors are loaded onto.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a weights-only checkpoint, refused ({first})") from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first})") from None
    if not isinstance(payload, dict) or "meta" not in payload:
        raise CheckpointError(f"{path}: not a fedpsmos checkpoint (needs a dict with 'meta')")
    recorded = payload.get(INTEGRITY_KEY)
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{path}: no integrity record")
    try:
        actual = _integrity(payload)
    except TypeError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if set(actual) != set(recorded):
        extra = sorted(set(actual) ^ set(recorded))[:3]
        raise CheckpointError(f"{path}: integrity mismatch, tensors added or removed ({', '.join(extra)})")
    for key, entry in actual.items():
        if recorded[key] != entry:
            raise CheckpointError(f"{path}: integrity mismatch for tensor {key} (tampered or corrupt)")
    # Model weights are optional: a site's private optimiser state is saved without them.
    model = payload.get("model", {})
    if not isinstance(model, Mapping):
        raise CheckpointError(f"{path}: 'model' is not a state dict")
    for name, tensor in model.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {name} is not a tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: model tensor {name} holds non-finite values")
    return payload


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
    """Load ``state`` into ``model`` strictly; a missing key, extra key or wrong shape raises one clear line.

    Parameters
    ----------
    model:
        the network to load into.
    state:
        a state dict (e.g. a checkpoint's ``model``).
    source:
        where the state came from, named in the error.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: state dict does not match the network ({len(missing)} missing, e.g. "
            f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(tensor.shape)}, "
                f"the network needs {list(own[name].shape)}"
            )
    model.load_state_dict(state, strict=True)


def model_state_to_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict's tensors, so a saved checkpoint does not depend on the device.

    Parameters
    ----------
    state:
        a state dict.
    """
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def to_cpu(obj: Any) -> Any:
    """Recursively move every tensor of nested dicts/lists/tuples to the CPU (e.g. optimiser state).

    Parameters
    ----------
    obj:
        nested plain data and tensors.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


def numpy_generator_state(rng: np.random.Generator) -> dict[str, Any]:
    """A NumPy ``Generator``'s bit-generator state as plain data (dicts of ints and str).

    Parameters
    ----------
    rng:
        the generator.
    """
    return _plain_copy(rng.bit_generator.state)


def set_numpy_generator_state(rng: np.random.Generator, state: Mapping[str, Any]) -> None:
    """Restore a state from :func:`numpy_generator_state`.

    Parameters
    ----------
    rng:
        the generator to restore; must use the same bit generator.
    state:
        the saved state.
    """
    if state.get("bit_generator") != type(rng.bit_generator).__name__:
        raise CheckpointError(
            f"numpy generator state is for {state.get('bit_generator')}, "
            f"not {type(rng.bit_generator).__name__}"
        )
    rng.bit_generator.state = dict(state)


def _plain_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain_copy(v) for k, v in obj.items()}
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
