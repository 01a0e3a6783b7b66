"""Apply a trained model to new CT scans: ``fedpsmos predict`` (docs/predict.md).

Every scan goes through the steps the workflow applies to its test cases, with the settings the model was
trained with (its checkpoint's ``meta["preprocessing"]`` and ``meta["patch_size"]``):

1. read it (NIfTI, MetaImage, NRRD, or a DICOM series folder read with ``sitk.ImageSeriesReader``);
2. reorient it to LPS, clip, normalise and resample it to the model's spacing
   (:func:`fedpsmos.preprocessing.scan.image_to_network_grid`, the code preprocessing runs);
3. sliding window and softmax (:func:`fedpsmos.inference.predict.predict_probabilities`);
4. resample the probabilities to the scan's oriented grid class by class and take the argmax there
   (:func:`fedpsmos.inference.predict.oriented_label`), map channels to the global class values;
5. undo the orientation and write ``{case}{ending}`` (uint8) with the scan's exact size, spacing, origin and
   direction; with ``save_probabilities`` also ``{case}.npz``.

The output folder is written whole: a temporary sibling renamed at the end, so a failure on any scan leaves
no output (and an existing output folder untouched).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn
from tqdm import tqdm

from fedpsmos.atomic import atomic_directory
from fedpsmos.inference.predict import (
    class_lookup,
    load_model,
    oriented_label,
    oriented_to_image,
    predict_probabilities,
)
from fedpsmos.io import check_scan, read_image, resolve_device
from fedpsmos.precision import PRECISIONS
from fedpsmos.preprocessing.fingerprint import SETTING_KEYS
from fedpsmos.preprocessing.orientation import array_to_original, orientation_record, reorient
from fedpsmos.preprocessing.scan import image_to_network_grid
from fedpsmos.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

SCAN_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
OUTPUT_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
CHANNEL_SUFFIX = "_0000"  # nnU-Net's channel suffix of a single-channel input, dropped from case names


class ApplyError(ValueError):
    """A model or scan cannot be used by :func:`predict_folder`; the message names the file."""


@dataclass(frozen=True)
class Scan:
    """One scan of the input: its case name, its file (or DICOM folder), and whether it is a DICOM series."""

    name: str
    path: Path
    dicom: bool


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1].strip() if text else type(error).__name__


def scan_name(path: Path) -> str:
    """Case name of a scan file: the file name without its ending and without a trailing ``_0000``.

    Parameters
    ----------
    path:
        A file with one of :data:`SCAN_ENDINGS`.
    """
    name = path.name
    for ending in SCAN_ENDINGS:
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    if name.endswith(CHANNEL_SUFFIX) and len(name) > len(CHANNEL_SUFFIX):
        name = name[: -len(CHANNEL_SUFFIX)]
    return name


def _is_scan_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SCAN_ENDINGS)


def _dicom_series(folder: Path) -> list[str]:
    """The DICOM series ids GDCM finds directly in ``folder``."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def find_scans(input_path: str | os.PathLike[str], skip: Sequence[Path] = ()) -> list[Scan]:
    """The scans of an input: a scan file, a DICOM series folder, or a folder of files and series folders.

    In a folder, files ending in :data:`SCAN_ENDINGS` are scans; each subfolder must hold exactly one DICOM
    series, named by the subfolder. A folder holding no scan files and no subfolders is itself one DICOM
    series. Hidden entries and other files are ignored.

    Parameters
    ----------
    input_path:
        The file or folder.
    skip:
        Folders to leave out (the output folder when it lies inside the input).
    """
    path = Path(input_path)
    if path.is_file():
        if not _is_scan_file(path):
            raise ApplyError(
                f"{path}: not a scan file (endings {', '.join(SCAN_ENDINGS)}; "
                "give a DICOM series as its folder)"
            )
        return [Scan(scan_name(path), path, dicom=False)]
    if not path.is_dir():
        raise ApplyError(f"{path}: input not found")
    skipped = {p.resolve() for p in skip}
    entries = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.resolve() not in skipped)
    files = [p for p in entries if _is_scan_file(p)]
    folders = [p for p in entries if p.is_dir()]
    if not files and not folders:
        ids = _dicom_series(path)
        if len(ids) == 1:
            return [Scan(path.resolve().name, path, dicom=True)]
        if len(ids) > 1:
            raise ApplyError(f"{path}: holds {len(ids)} DICOM series; put each series in its own folder")
        raise ApplyError(f"{path}: no scans ({', '.join(SCAN_ENDINGS)} files or DICOM series folders)")
    scans = [Scan(scan_name(p), p, dicom=False) for p in files]
    for folder in folders:
        ids = _dicom_series(folder)
        if len(ids) != 1:
            raise ApplyError(
                f"{folder}: a subfolder must hold exactly one DICOM series, found {len(ids)}"
                + ("; put each series in its own folder" if ids else "")
            )
        scans.append(Scan(folder.name, folder, dicom=True))
    seen: dict[str, Path] = {}
    for scan in scans:
        if scan.name in seen:
            raise ApplyError(f"{scan.path}: case name {scan.name!r} also belongs to {seen[scan.name]}")
        seen[scan.name] = scan.path
    return scans


def read_scan(scan: Scan) -> sitk.Image:
    """Read a scan as a 3-D scalar image, raising :class:`ApplyError` naming its file or folder.

    Parameters
    ----------
    scan:
        From :func:`find_scans`.
    """
    if not scan.dicom:
        try:
            return read_image(scan.path, "scan")
        except ValueError as err:
            raise ApplyError(str(err)) from err
    reader = sitk.ImageSeriesReader()
    try:
        ids = _dicom_series(scan.path)
        if len(ids) != 1:
            raise ApplyError(f"{scan.path}: expected one DICOM series, found {len(ids)}")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(scan.path), ids[0]))
        image = reader.Execute()
    except RuntimeError as err:
        raise ApplyError(f"{scan.path}: cannot read the DICOM series: {_first_line(err)}") from err
    try:
        return check_scan(image, scan.path, "DICOM series")
    except ValueError as err:
        raise ApplyError(str(err)) from err


def model_settings(
    meta: dict[str, Any], model_path: str | os.PathLike[str]
) -> tuple[dict[str, Any], list[int]]:
    """The preprocessing settings and patch size a checkpoint's meta records, checked.

    Parameters
    ----------
    meta:
        The checkpoint's ``meta``.
    model_path:
        The checkpoint, named in errors.
    """
    settings = meta.get("preprocessing")
    if not isinstance(settings, dict):
        raise ApplyError(
            f"{model_path}: the checkpoint does not record its preprocessing settings (meta "
            "'preprocessing'); it was written by a workflow version from before they were recorded: "
            "rerun its training (or federated) rules with this version to get a model for new scans"
        )
    missing = [k for k in SETTING_KEYS if k not in settings]
    if missing:
        raise ApplyError(f"{model_path}: meta 'preprocessing' lacks {', '.join(missing)}")
    patch = meta.get("patch_size")
    if not isinstance(patch, list | tuple) or len(patch) != 3 or not all(int(p) > 0 for p in patch):
        raise ApplyError(f"{model_path}: meta 'patch_size' must be 3 positive ints, got {patch!r}")
    resolved = {
        "spacing": [float(s) for s in settings["spacing"]],
        "image_order": int(settings["image_order"]),
        "clip": [float(c) for c in settings["clip"]],
        "mean": float(settings["mean"]),
        "std": float(settings["std"]),
    }
    return resolved, [int(p) for p in patch]


def scan_case(image: sitk.Image, source: Path, settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """A scan as the arrays :func:`fedpsmos.inference.predict.load_case` gives for a preprocessed case.

    Parameters
    ----------
    image:
        The scan as read (Hounsfield units).
    source:
        Its file or folder, named in errors.
    settings:
        The model's preprocessing settings (:func:`model_settings`).
    """
    oriented = reorient(image)
    try:
        network_image = image_to_network_grid(oriented, source, **settings)
    except ValueError as err:
        raise ApplyError(str(err)) from err
    return {
        "image": network_image,
        "spacing": np.asarray(settings["spacing"], dtype=np.float64),
        "sitk_size": np.asarray(image.GetSize(), dtype=np.int64),
        "sitk_spacing": np.asarray(image.GetSpacing(), dtype=np.float64),
        "sitk_origin": np.asarray(image.GetOrigin(), dtype=np.float64),
        "sitk_direction": np.asarray(image.GetDirection(), dtype=np.float64),
        **orientation_record(image, oriented),
    }


def _predict_scan(
    scan: Scan,
    net: nn.Module,
    classes: Sequence[str],
    settings: dict[str, Any],
    patch_size: Sequence[int],
    *,
    out_dir: Path,
    ending: str,
    step: float,
    mirror: bool,
    device: torch.device,
    precision: str,
    save_probabilities: bool,
) -> None:
    """Predict one scan and write its label file (and probabilities) into ``out_dir``."""
    image = read_scan(scan)
    case = scan_case(image, scan.path, settings)
    probabilities = predict_probabilities(
        net,
        classes,
        case["image"],
        patch_size=patch_size,
        step=step,
        mirror=mirror,
        device=device,
        precision=precision,
    )
    # The probabilities go into the scan's own voxel order as each class is resampled (float16 halves them).
    kept = np.empty((len(classes), *reversed(image.GetSize())), np.float16) if save_probabilities else None
    directions = {
        "original_direction": case["sitk_direction"].tolist(),
        "oriented_direction": case["oriented_direction"].tolist(),
    }

    def keep(c: int, p: np.ndarray) -> None:
        assert kept is not None
        kept[c] = array_to_original(p, **directions)

    label = oriented_label(probabilities, classes, case, keep=keep if save_probabilities else None)
    del probabilities
    written = oriented_to_image(label, case)
    written.CopyInformation(image)  # the scan's geometry, bit for bit
    sitk.WriteImage(written, str(out_dir / f"{scan.name}{ending}"), useCompression=True)
    if kept is not None:
        np.savez_compressed(
            out_dir / f"{scan.name}.npz",
            probabilities=kept,
            classes=np.asarray(list(classes)),
            labels=class_lookup(classes),
        )


def predict_folder(
    model_path: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    device: str | torch.device | None = None,
    step: float = 0.5,
    mirror: bool = False,
    save_probabilities: bool = False,
    ending: str = ".nii.gz",
    progress: bool = True,
    precision: str = "auto",
) -> list[Path]:
    """Segment every scan of ``input_path`` with a workflow model; return the label files written.

    Parameters
    ----------
    model_path:
        A checkpoint the workflow wrote, with ``meta["preprocessing"]`` and ``meta["patch_size"]``.
    input_path:
        A scan file, a DICOM series folder, or a folder of scan files and DICOM series folders
        (:func:`find_scans`).
    output_dir:
        Folder of ``{case}{ending}`` label maps (uint8, global class values, the scan's own geometry); written
        whole, replacing an existing folder.
    device:
        ``cpu``, ``cuda``, ``cuda:1``, ``mps``; default CUDA when available.
    step, mirror:
        Sliding-window tile step (fraction of the patch) and test-time mirroring (never left-right).
    save_probabilities:
        Also write ``{case}.npz``: ``probabilities`` ``[C, Z, Y, X]`` float16 on the scan's grid in its own
        voxel order, ``classes`` (channel names) and ``labels`` (their values in the label map).
    ending:
        Label file ending: ``.nii.gz``, ``.nii``, ``.mha`` or ``.nrrd``.
    progress:
        Show a tqdm progress bar.
    precision:
        The network's autocast: ``auto`` (bf16 or fp16 on CUDA, float32 elsewhere), ``bf16``, ``fp16`` or
        ``fp32`` (:mod:`fedpsmos.precision`).
    """
    if ending not in OUTPUT_ENDINGS:
        raise ApplyError(f"ending must be one of {', '.join(OUTPUT_ENDINGS)}, got {ending!r}")
    if not 0 < step <= 1:
        raise ApplyError(f"step must be in (0, 1], got {step}")
    if precision not in PRECISIONS:
        raise ApplyError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = Path(output_dir)
    source = Path(input_path)
    if source.exists() and (out.resolve() == source.resolve() or out.resolve() in source.resolve().parents):
        raise ApplyError(f"{out}: the output folder would replace the input {source}; choose another folder")
    try:
        dev = resolve_device(device)
    except ValueError as err:
        raise ApplyError(f"--{err}") from err  # "--device 'name': why", the option as typed
    model_file = Path(model_path)
    try:
        meta = load_checkpoint(model_file).get("meta", {})
    except ValueError as err:
        raise ApplyError(str(err)) from err
    settings, patch_size = model_settings(meta, model_file)
    net, classes = load_model(model_file, dev)
    scans = find_scans(source, skip=[out])
    written = []
    with atomic_directory(out) as tmp:
        for scan in tqdm(scans, desc="fedpsmos predict", unit="scan", disable=not progress):
            try:
                _predict_scan(
                    scan,
                    net,
                    classes,
                    settings,
                    patch_size,
                    out_dir=tmp,
                    ending=ending,
                    step=step,
                    mirror=mirror,
                    device=dev,
                    precision=precision,
                    save_probabilities=save_probabilities,
                )
            except ApplyError:
                raise
            except (ValueError, RuntimeError, OSError) as err:
                raise ApplyError(f"{scan.path}: {_first_line(err)}") from err
            written.append(out / f"{scan.name}{ending}")
    log.info("wrote %d label maps to %s", len(written), out)
    return written
