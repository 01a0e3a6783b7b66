"""Reading the project's input files: images with their checks, the image/label grid check, file digests,
and the device a stage computes on.

Every stage that opens a CT image or a label file reads it with :func:`read_image`, and every stage that
pairs them checks them with :func:`check_same_grid`, so a case accepted by ``validate_site`` is accepted by
preprocessing and the fingerprint too. Outputs are written by :mod:`fedpsmos.atomic` (files and folders that
appear whole or not at all).

Grid tolerance: spacing and origin agree within ``rtol = atol =`` :data:`GRID_TOLERANCE_MM` (1e-3, mm), the
direction cosines within :data:`DIRECTION_TOLERANCE` (1e-4), the size exactly. These are the tolerances the
site validation has always applied, the strictest the project used; preprocessing used a looser origin
(1e-2 mm) and direction (1e-3) tolerance, which can only matter for a pair that validation had already
refused. One tolerance, the validation's, therefore accepts exactly the cases that reached preprocessing
before, and a pair accepted at the front door is never refused later. Writers round-trip a geometry to
float32 (NIfTI's ``pixdim`` and ``qoffset``): 1e-3 mm is far above that rounding and far below a voxel.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:  # torch is imported when a device is resolved, not by every stage that reads images
    import torch

GRID_TOLERANCE_MM = 1e-3  # relative and absolute, for spacing and origin
DIRECTION_TOLERANCE = 1e-4  # absolute, for the direction cosines


class ImageError(ValueError):
    """An image file is unreadable or unusable, or a label does not lie on its image's grid.

    The message is one line, ``"{path}: {problem}"``.
    """


def _one_line(text: str) -> str:
    """The useful line of an ITK error message (the one after ``ITK ERROR:``), at most 300 characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in lines:
        if "ERROR" in line or "error" in line:
            return line[:300]
    return (lines[-1] if lines else "unknown error")[:300]


def nifti_header(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The few NIfTI-1/2 header fields SimpleITK hides, or ``None`` for other formats or unreadable headers.

    Parameters
    ----------
    path:
        A ``.nii`` or ``.nii.gz`` file (any other name gives ``None``).

    Returns
    -------
    dict or None
        ``endian`` (``"<"``/``">"``), ``pixdim`` (the spacings of the image's axes, at most three),
        ``datatype`` (NIfTI code), ``n_voxels``, ``offset`` (of the voxel data) and ``opener`` (``open`` or
        ``gzip.open``).
    """
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(540)
    except (OSError, EOFError):
        return None  # unreadable files are reported by the SimpleITK read
    for e in ("<", ">"):
        if len(head) >= 348 and struct.unpack(e + "i", head[:4])[0] == 348:
            ndim = struct.unpack(e + "h", head[40:42])[0]
            dims = struct.unpack(e + "7h", head[42:56])
            datatype = struct.unpack(e + "h", head[70:72])[0]
            pixdim = struct.unpack(e + "3f", head[80:92])
            offset = int(struct.unpack(e + "f", head[108:112])[0])
        elif len(head) >= 540 and struct.unpack(e + "i", head[:4])[0] == 540:
            ndim = struct.unpack(e + "q", head[16:24])[0]
            dims = struct.unpack(e + "7q", head[24:80])
            datatype = struct.unpack(e + "h", head[12:14])[0]
            pixdim = struct.unpack(e + "3d", head[112:136])
            offset = int(struct.unpack(e + "q", head[168:176])[0])
        else:
            continue
        ndim = max(0, min(7, ndim))
        return {
            "endian": e,
            "pixdim": pixdim[: min(3, ndim)],  # a 2-D image has no third spacing to check
            "datatype": datatype,
            "n_voxels": int(np.prod(dims[:ndim])) if ndim else 0,
            "offset": offset,
            "opener": opener,
        }
    return None


def check_scan(image: sitk.Image, path: str | os.PathLike[str], what: str = "image") -> sitk.Image:
    """Return ``image`` if it is a 3-D scalar image with positive spacing, else raise :class:`ImageError`.

    Parameters
    ----------
    image:
        The image as read (from a file or a DICOM series).
    path, what:
        The file (or DICOM folder) it came from and what it is (``image``, ``label``...), for the message.
    """
    if image.GetDimension() != 3:
        raise ImageError(f"{path}: {what} is {image.GetDimension()}-D, a 3-D image is required")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"{path}: {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel")
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ImageError(f"{path}: {what} spacing must be > 0, got {list(spacing)}")
    return image


def read_image(path: str | os.PathLike[str], what: str = "image") -> sitk.Image:
    """Read a 3-D scalar image file (NIfTI, MetaImage, NRRD...), raising :class:`ImageError` naming it.

    Besides what :func:`check_scan` checks, a ``.gz`` file must be gzip-compressed (SimpleITK reads an
    uncompressed file named ``.nii.gz``, nnU-Net and nibabel do not) and a NIfTI header's ``pixdim`` must be
    positive (ITK silently reads a zero pixdim as 1 mm and a negative one as a flipped axis).

    Parameters
    ----------
    path:
        The file.
    what:
        What the file is (``image``, ``label``, ``scan``), for the message.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: {what} file not found")
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as handle:
            magic = handle.read(2)
        if magic != b"\x1f\x8b":
            raise ImageError(f"{path}: {what} file is named .gz but is not gzip-compressed")
    header = nifti_header(path)
    if header is not None and not all(math.isfinite(p) and p > 0 for p in header["pixdim"]):
        raise ImageError(
            f"{path}: {what} spacing must be > 0, the NIfTI header has pixdim {list(header['pixdim'])}"
        )
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ImageError(f"{path}: cannot read {what} file {path.name}: {_one_line(str(err))}") from err
    return check_scan(image, path, what)


def check_same_grid(image: sitk.Image, label: sitk.Image, label_path: str | os.PathLike[str]) -> None:
    """Raise :class:`ImageError` naming ``label_path`` unless the label lies on the image's grid.

    Size exactly; spacing and origin within :data:`GRID_TOLERANCE_MM`; direction within
    :data:`DIRECTION_TOLERANCE` (the module docstring says why these).

    Parameters
    ----------
    image, label:
        The two images as read.
    label_path:
        The label file, for the message.
    """
    pairs = (
        ("size", image.GetSize(), label.GetSize(), 0.0, 0.0),
        ("spacing", image.GetSpacing(), label.GetSpacing(), GRID_TOLERANCE_MM, GRID_TOLERANCE_MM),
        ("origin", image.GetOrigin(), label.GetOrigin(), GRID_TOLERANCE_MM, GRID_TOLERANCE_MM),
        ("direction", image.GetDirection(), label.GetDirection(), 0.0, DIRECTION_TOLERANCE),
    )
    for name, a, b, rtol, atol in pairs:
        if not np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol, atol=atol):
            fa = [round(v, 6) for v in a]
            fb = [round(v, 6) for v in b]
            raise ImageError(f"{label_path}: label {name} {fb} differs from the image's {fa}")


def read_image_pair(
    image_path: str | os.PathLike[str], label_path: str | os.PathLike[str]
) -> tuple[sitk.Image, sitk.Image]:
    """Read a case's image and label (:func:`read_image`) and check they share one grid.

    Parameters
    ----------
    image_path, label_path:
        The CT image and its label file.
    """
    image = read_image(image_path, "image")
    label = read_image(label_path, "label")
    check_same_grid(image, label, label_path)
    return image, label


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (hex digest).

    Ties a record to the exact file it was made from: a round to the global model it started from, a
    resumed training run to its initial weights.

    Parameters
    ----------
    path:
        The file; an unreadable one raises :class:`OSError` naming it.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``device`` if given, else CUDA when a GPU is visible, else the CPU.

    Rules pass no device, so the hardware a job lands on decides.

    Parameters
    ----------
    device:
        ``None`` (auto), a name such as ``"cpu"``/``"cuda:0"``, or a device. A name torch does not know
        raises :class:`ValueError` naming it.
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device {device!r}: {_one_line(str(err))}") from err
