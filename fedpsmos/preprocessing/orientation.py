"""One canonical anatomical orientation for every preprocessed case, and its exact inverse.

The same CT can be stored with its voxels in any order: LPS (identity direction), RAS (x and y flipped, as
many NIfTI writers do), or with the slice axis first (KiTS19's ``SPL``/``IPL``). Training on the stored voxel
order would show the network the same anatomy flipped or transposed from file to file, so preprocessing
brings image and label to :data:`CANONICAL` with SimpleITK's ``DICOMOrient`` before resampling. With
``"LPS"`` the SimpleITK array axes (z, y, x) run inferior -> superior, anterior -> posterior and the
patient's right -> left, whatever the file stored; the last array axis is therefore always the left-right
axis (:mod:`fedpsmos.training.augmentation` relies on it).

``DICOMOrient`` only permutes and flips axes: the physical position of every voxel is unchanged, an oblique
direction keeps its residual obliqueness, and the geometries of the two grids are related by a signed
permutation matrix ``M = round(D_original^T @ D_oriented)``. :func:`array_to_original` applies its inverse to
a NumPy array, so a prediction made on the oriented grid is written back voxel for voxel in the input file's
own order and geometry. The preprocessed case file records the original orientation code and the oriented
grid (:func:`orientation_record`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

CANONICAL = "LPS"

# Every DICOM orientation code: one letter of each pair (L/R, P/A, S/I), in any axis order.
ORIENTATION_CODES: tuple[str, ...] = tuple(
    "".join(letters[i] for i in order)
    for order in itertools.permutations(range(3))
    for letters in itertools.product("LR", "PA", "SI")
)

RECORD_KEYS = ("orientation", "oriented_size", "oriented_spacing", "oriented_origin", "oriented_direction")


def check_orientation_code(code: str) -> str:
    """Return ``code`` if it is a 3-letter DICOM orientation code (e.g. ``"LPS"``, ``"RAS"``), else raise.

    Parameters
    ----------
    code:
        Upper-case letters naming where each image axis points (one of L/R, one of P/A, one of S/I).
    """
    if code not in ORIENTATION_CODES:
        raise ValueError(
            f"orientation {code!r} is not a DICOM orientation code: 3 letters, one each of L/R, P/A and "
            "S/I, e.g. LPS, RAS or SPL"
        )
    return code


def orientation_code(direction: Sequence[float]) -> str:
    """The DICOM orientation code closest to a SimpleITK direction (9 values, row-major).

    Parameters
    ----------
    direction:
        ``image.GetDirection()``; an oblique direction gives the code of its nearest axes.
    """
    return str(sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in direction]))


def reorient(image: sitk.Image, code: str = CANONICAL) -> sitk.Image:
    """Permute and flip ``image``'s axes so they point as ``code`` says; physical positions are unchanged.

    Parameters
    ----------
    image:
        A 3-D SimpleITK image.
    code:
        Target DICOM orientation code (default :data:`CANONICAL`).
    """
    return sitk.DICOMOrient(image, check_orientation_code(code))


def orientation_record(original: sitk.Image, oriented: sitk.Image) -> dict[str, np.ndarray]:
    """The case file's arrays that let a prediction on ``oriented``'s grid go back to ``original``'s.

    ``orientation`` is the original code (a NumPy string, loadable without pickle); ``oriented_size``,
    ``oriented_spacing``, ``oriented_origin`` and ``oriented_direction`` are the oriented grid in SimpleITK
    (x, y, z) order.

    Parameters
    ----------
    original:
        The image as read from its file.
    oriented:
        ``reorient(original)``.
    """
    return {
        "orientation": np.asarray(orientation_code(original.GetDirection())),
        "oriented_size": np.asarray(oriented.GetSize(), dtype=np.int64),
        "oriented_spacing": np.asarray(oriented.GetSpacing(), dtype=np.float64),
        "oriented_origin": np.asarray(oriented.GetOrigin(), dtype=np.float64),
        "oriented_direction": np.asarray(oriented.GetDirection(), dtype=np.float64),
    }


def axis_map(
    original_direction: Sequence[float], oriented_direction: Sequence[float]
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """For each NumPy (z, y, x) axis of the original array: the oriented array axis it is, and if flipped.

    Parameters
    ----------
    original_direction, oriented_direction:
        SimpleITK directions (9 values, row-major) of the two grids, related by ``DICOMOrient``.

    Raises
    ------
    ValueError
        If the directions are not orthonormal or not related by an axis permutation and flips.
    """
    d0 = np.asarray(original_direction, dtype=np.float64).reshape(3, 3)
    d1 = np.asarray(oriented_direction, dtype=np.float64).reshape(3, 3)
    for name, d in (("original", d0), ("oriented", d1)):
        if not np.allclose(d @ d.T, np.eye(3), atol=1e-4):
            raise ValueError(f"{name} direction {d.ravel().tolist()} is not orthonormal")
    # Column a of a direction is where SimpleITK index axis a points, so M[a, b] = +-1 when original axis a
    # is oriented axis b (same or opposite sense).
    product = d0.T @ d1
    signed = np.rint(product)
    is_permutation = np.array_equal(np.abs(signed).sum(axis=0), np.ones(3)) and np.array_equal(
        np.abs(signed).sum(axis=1), np.ones(3)
    )
    if not is_permutation or not np.allclose(product, signed, atol=1e-4):
        raise ValueError(
            f"directions {d0.ravel().tolist()} and {d1.ravel().tolist()} are not related by an axis "
            "permutation and flips"
        )
    source, flipped = [], []
    for k in range(3):  # NumPy axis k is SimpleITK axis 2 - k
        a = 2 - k
        b = int(np.flatnonzero(signed[a])[0])
        source.append(2 - b)
        flipped.append(bool(signed[a, b] < 0))
    return tuple(source), tuple(flipped)


def array_to_original(
    array_zyx: np.ndarray, *, original_direction: Sequence[float], oriented_direction: Sequence[float]
) -> np.ndarray:
    """Bring an array on the oriented grid back to the original file's voxel order (exact, no resampling).

    Parameters
    ----------
    array_zyx:
        ``[Z, Y, X]`` array on the oriented grid (e.g. a prediction resampled to ``oriented_size``).
    original_direction, oriented_direction:
        The case file's arrays ``sitk_direction`` and ``oriented_direction``.
    """
    if array_zyx.ndim != 3:
        raise ValueError(f"expected a [Z, Y, X] array, got shape {array_zyx.shape}")
    source, flipped = axis_map(original_direction, oriented_direction)
    out = np.transpose(array_zyx, source)
    flip_axes = tuple(k for k in range(3) if flipped[k])
    return np.ascontiguousarray(np.flip(out, flip_axes) if flip_axes else out)


def array_to_oriented(
    array_zyx: np.ndarray, *, original_direction: Sequence[float], oriented_direction: Sequence[float]
) -> np.ndarray:
    """The inverse of :func:`array_to_original`: an original-order array in the oriented grid's order.

    Parameters
    ----------
    array_zyx:
        ``[Z, Y, X]`` array in the original file's voxel order.
    original_direction, oriented_direction:
        As in :func:`array_to_original`.
    """
    if array_zyx.ndim != 3:
        raise ValueError(f"expected a [Z, Y, X] array, got shape {array_zyx.shape}")
    source, flipped = axis_map(original_direction, oriented_direction)
    flip_axes = tuple(k for k in range(3) if flipped[k])
    unflipped = np.flip(array_zyx, flip_axes) if flip_axes else array_zyx
    return np.ascontiguousarray(np.transpose(unflipped, np.argsort(source)))
