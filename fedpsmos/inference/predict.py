"""Predict a site's test cases and write them in the original geometry (docs/design.md "Inference").

For each test case of a site's manifest: load its preprocessed case file, run the Gaussian sliding window
(:mod:`fedpsmos.inference.sliding_window`), turn the logits into softmax probabilities, resample them class
by class to the canonically oriented original grid and take the argmax there
(:func:`fedpsmos.inference.probabilities.argmax_on_grid`; ``resample="labels"`` instead takes the argmax on
the preprocessed grid and resamples the label map by nearest neighbour), map the channels to the global class
values (a site-alone model outputs only its site's organs, named in its checkpoint's ``meta["organs"]``),
undo the canonical orientation exactly (:func:`fedpsmos.preprocessing.orientation.array_to_original`, a
permutation and flip of the axes) and write ``{case}.nii.gz`` (uint8) with the original size, spacing,
origin and direction, voxel for voxel in the input file's own order. The output directory appears whole or
not at all. :mod:`fedpsmos.inference.apply` runs the same steps on scans that were never preprocessed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from fedpsmos.atomic import atomic_directory
from fedpsmos.data.manifest import Manifest
from fedpsmos.inference.probabilities import argmax_on_grid, check_resample
from fedpsmos.inference.sliding_window import predict_logits
from fedpsmos.io import resolve_device
from fedpsmos.network import NetworkSpec, build_network
from fedpsmos.organs import CLASS_INDEX, CLASSES
from fedpsmos.precision import check_precision
from fedpsmos.preprocessing.orientation import RECORD_KEYS, array_to_original
from fedpsmos.preprocessing.resample import resample_label_to_geometry
from fedpsmos.preprocessing.storage import case_path, read_case
from fedpsmos.training.checkpoint import load_checkpoint, load_model_state

NPZ_KEYS = ("image", "spacing", "sitk_size", "sitk_spacing", "sitk_origin", "sitk_direction", *RECORD_KEYS)


def output_classes(organs: Sequence[str]) -> tuple[str, ...]:
    """Class names of a model's output channels, background first, from its checkpoint's ``meta["organs"]``.

    Parameters
    ----------
    organs:
        Global organ names the model outputs, with or without a leading ``"background"``.
    """
    names = tuple(organs)
    if not names or names[0] != "background":
        names = ("background", *names)
    unknown = [n for n in names[1:] if n not in CLASS_INDEX or n == "background"]
    if unknown:
        raise ValueError(f"unknown organ(s) {unknown} in model classes (known: {', '.join(CLASSES[1:])})")
    return names


def class_lookup(classes: Sequence[str]) -> np.ndarray:
    """Output channel index -> global class value (uint8), for mapping an argmax to global labels.

    Parameters
    ----------
    classes:
        Channel names, background first (:func:`output_classes`).
    """
    return np.asarray([CLASS_INDEX[name] for name in classes], dtype=np.uint8)


def load_model(model_path: str | os.PathLike[str], device: torch.device) -> tuple[nn.Module, tuple[str, ...]]:
    """Build the network recorded in a checkpoint, load its weights, and return it with its class names.

    Parameters
    ----------
    model_path:
        A checkpoint written by :func:`fedpsmos.training.checkpoint.save_checkpoint`.
    device:
        Where the network is placed.
    """
    payload = load_checkpoint(Path(model_path))
    meta = payload.get("meta", {})
    if "network" not in meta or "organs" not in meta:
        raise ValueError(f"{model_path}: checkpoint meta lacks 'network' or 'organs'")
    spec = NetworkSpec.from_dict(meta["network"])
    classes = output_classes(meta["organs"])
    if spec.num_classes != len(classes):
        raise ValueError(f"{model_path}: network has {spec.num_classes} outputs, meta names {list(classes)}")
    net = build_network(spec)
    load_model_state(net, payload["model"], source=Path(model_path))
    net.to(device).eval()
    return net, classes


def load_case(npz_path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read the arrays inference needs from a preprocessed case (docs/architecture.md, "Preprocessed case").

    Parameters
    ----------
    npz_path:
        ``results/preprocessed/{site}/{case}.b2zip``.
    """
    path = Path(npz_path)
    case = read_case(path, NPZ_KEYS)  # FileNotFoundError, or CaseStorageError naming the file
    missing = [k for k in NPZ_KEYS if k not in case]
    if missing:
        raise ValueError(
            f"{path}: preprocessed case lacks keys {missing} (written before canonical orientation? "
            "preprocess it again)"
        )
    if case["image"].ndim != 3:
        raise ValueError(f"{path}: image must be [Z, Y, X], got shape {case['image'].shape}")
    return case


def predict_probabilities(
    net: nn.Module,
    classes: Sequence[str],
    image: np.ndarray,
    *,
    patch_size: Sequence[int],
    step: float,
    mirror: bool,
    device: torch.device,
    precision: str = "auto",
) -> torch.Tensor:
    """Softmax class probabilities ``[C, Z, Y, X]`` (float32, on ``device``) of a preprocessed image.

    Parameters
    ----------
    net, classes:
        The network and its channel names (:func:`load_model`).
    image:
        Normalised image ``[Z, Y, X]`` on the preprocessed grid.
    patch_size, step, mirror, device, precision:
        Sliding-window settings (:func:`fedpsmos.inference.sliding_window.predict_logits`).
    """
    logits = predict_logits(
        net,
        image.astype(np.float32, copy=False),
        patch_size=patch_size,
        step=step,
        mirror=mirror,
        device=device,
        precision=precision,
    )
    if logits.shape[0] != len(classes):
        raise ValueError(
            f"network outputs {logits.shape[0]} channels but its checkpoint names {len(classes)}"
        )
    return torch.softmax(logits, dim=0)


def oriented_label(
    probabilities: torch.Tensor,
    classes: Sequence[str],
    case: dict[str, np.ndarray],
    *,
    resample: str = "probabilities",
    keep: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Global-class label map (uint8) on the canonically oriented original grid of a case.

    Parameters
    ----------
    probabilities:
        :func:`predict_probabilities` of ``case["image"]``.
    classes:
        Channel names, background first.
    case:
        Arrays from :func:`load_case` (``spacing`` and the ``oriented_*`` grid).
    resample:
        ``"probabilities"`` (resample each class, then argmax) or ``"labels"`` (argmax, then nearest
        neighbour); :mod:`fedpsmos.inference.probabilities`.
    keep:
        Receives each class's resampled probabilities (``"probabilities"`` only).
    """
    channel = argmax_on_grid(
        probabilities,
        from_spacing_zyx=[float(v) for v in case["spacing"]],
        to_spacing_zyx=[float(v) for v in reversed(case["oriented_spacing"].tolist())],
        shape_zyx=[int(v) for v in reversed(case["oriented_size"].tolist())],
        mode=resample,
        keep=keep,
    )
    return class_lookup(classes)[channel]


def oriented_to_image(oriented: np.ndarray, case: dict[str, np.ndarray]) -> sitk.Image:
    """An array on the oriented original grid as an image in the file's own voxel order and geometry.

    Parameters
    ----------
    oriented:
        ``[Z, Y, X]`` global-class label map of ``case["oriented_size"]`` (canonical orientation).
    case:
        Arrays from :func:`load_case` (the ``oriented_*`` grid and the original ``sitk_*`` geometry).
    """
    original = array_to_original(
        oriented,
        original_direction=case["sitk_direction"].tolist(),
        oriented_direction=case["oriented_direction"].tolist(),
    )
    image = sitk.GetImageFromArray(np.ascontiguousarray(original, dtype=np.uint8))
    image.SetSpacing([float(v) for v in case["sitk_spacing"]])
    image.SetOrigin([float(v) for v in case["sitk_origin"]])
    image.SetDirection([float(v) for v in case["sitk_direction"]])
    if list(image.GetSize()) != [int(v) for v in case["sitk_size"]]:
        raise RuntimeError(
            f"resampled size {image.GetSize()} differs from the original {list(case['sitk_size'])}"
        )
    return image


def label_to_image(label_zyx: np.ndarray, case: dict[str, np.ndarray]) -> sitk.Image:
    """Resample a preprocessed-grid label to the original grid, in the file's voxel order and geometry.

    Nearest neighbour on the label map: how a preprocessed reference label goes back to its file's grid
    (the tests' round trip through the canonical orientation); predictions resample probabilities instead.

    Parameters
    ----------
    label_zyx:
        Global-class label map on the preprocessed grid (``case["spacing"]``, canonical orientation).
    case:
        Arrays from :func:`load_case` (the ``oriented_*`` grid and the original ``sitk_*`` geometry).
    """
    oriented = resample_label_to_geometry(
        label_zyx,
        spacing_zyx=case["spacing"].tolist(),
        sitk_size=case["oriented_size"].tolist(),
        sitk_spacing=case["oriented_spacing"].tolist(),
        sitk_origin=case["oriented_origin"].tolist(),
        sitk_direction=case["oriented_direction"].tolist(),
    )
    return oriented_to_image(oriented, case)


def predict_site(
    *,
    model_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    npz_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    patch_size: Sequence[int],
    step: float = 0.5,
    mirror: bool = False,
    device: str | torch.device | None = None,
    resample: str = "probabilities",
    precision: str = "auto",
) -> list[Path]:
    """Predict every test case of a site and write ``{out_dir}/{case}.nii.gz`` in the original geometry.

    Parameters
    ----------
    model_path:
        Checkpoint of the model to apply.
    manifest_path:
        The site's manifest; its ``test`` list selects the cases.
    npz_dir:
        Directory of the site's preprocessed ``{case}.b2zip``.
    out_dir:
        Prediction directory, written whole (temporary sibling renamed at the end).
    patch_size, step, mirror:
        Sliding-window settings (patch as in training, tile step 0.5, optional mirroring).
    device:
        ``"cpu"``, ``"cuda"``...; default CUDA when available.
    resample:
        ``"probabilities"`` (resample the class probabilities to the original grid, then take the argmax) or
        ``"labels"`` (argmax on the preprocessed grid, nearest-neighbour label map); config
        ``inference.resample``.
    precision:
        The network's autocast, ``auto`` (bf16 or fp16 on CUDA, float32 on the CPU), ``bf16``, ``fp16`` or
        ``fp32`` (:mod:`fedpsmos.precision`); the probabilities are float32 whatever it is.
    """
    check_resample(resample)
    check_precision(precision)
    dev = resolve_device(device)
    cases = Manifest.load(manifest_path).test
    if not cases:
        raise ValueError(f"{manifest_path}: the manifest's test split is empty")
    net, classes = load_model(model_path, dev)
    written = []
    with atomic_directory(out_dir) as tmp:
        for case_id in cases:
            case = load_case(case_path(npz_dir, case_id))
            probabilities = predict_probabilities(
                net,
                classes,
                case["image"],
                patch_size=patch_size,
                step=step,
                mirror=mirror,
                device=dev,
                precision=precision,
            )
            label = oriented_label(probabilities, classes, case, resample=resample)
            del probabilities
            image = oriented_to_image(label, case)
            sitk.WriteImage(image, str(tmp / f"{case_id}.nii.gz"), useCompression=True)
            written.append(Path(out_dir) / f"{case_id}.nii.gz")
    return written
