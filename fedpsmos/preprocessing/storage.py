"""Preprocessed cases on disk: one ``{case}.b2zip`` file that a patch read can seek into.

A case is a ZIP archive of stored (uncompressed) members, the layout of NumPy's ``.npz`` with blosc2 inside:

- ``image.b2nd``: float32 ``[Z, Y, X]``, a blosc2 NDArray frame (LZ4HC level 5, byte shuffle, chunks
  :data:`CHUNKS`, blocks :data:`BLOCKS`, both clipped to the volume), as nnU-Net v2's
  ``nnUNetDatasetBlosc2`` stores its cases;
- ``label.b2nd``: uint8 ``[Z, Y, X]``, chunked the same way;
- ``{key}.npy``: every other (small) array: ``labelled``, ``spacing``, the original and oriented geometry
  (docs/architecture.md "Preprocessed case");
- ``meta.json``: the format version, each member's shape, dtype and SHA-256, ``image_min`` (the value a
  patch is padded with outside the volume) and ``label_values`` (the classes the label map holds), so that a
  reader checks a case without decoding it.

A ZIP member that is stored, not deflated, lies at a fixed offset of the file, so :func:`open_case` hands
blosc2 the offsets of ``image.b2nd`` and ``label.b2nd`` and blosc2 maps them in place (``mmap_mode="r"``): a
patch read decompresses the blocks the patch overlaps and nothing else. :func:`read_case` reads whole arrays
(inference, validation, the patch index).

Integrity: the SHA-256 of every member is recorded in ``meta.json`` when the case is written (the ZIP's own
CRC-32 of ``meta.json`` guards the record itself). The first time a process opens a file (by path, size and
modification time) every member is hashed and compared; a mismatch raises :class:`CaseStorageError` naming
the file and the member. Cases are written atomically (:func:`fedpsmos.atomic.atomic_path`).

Why this format (``bench/bench_case_storage.py``, docs/benchmarks.md "Case storage"): at the paper's patch
[80, 160, 128] from 150 x 230 x 230 CT-like cases, a patch of image and label took 176 ms from the former
``np.savez_compressed`` file (any read inflates both volumes whole), 20 ms cold (pages evicted) and 12 ms
warm from this format (9 ms from a case held open; 47 ms for a process's first open, checksums included),
and 43 ms cold and 16 ms warm from uncompressed ``.npy`` memory maps (6 ms held open); a case took 4.1 MB
as ``.npz``, 9.9 MB here and 40 MB as ``.npy`` (medians on 2 busy CPU cores). blosc2 is chosen over
``.npy``, as nnU-Net v2 chose it: a quarter of the disk and of the bytes a cold read pulls from a shared
file system, and faster cold; the few milliseconds it spends decoding run in the background loader
workers (:mod:`fedpsmos.training.loader`), off the training thread.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blosc2
import numpy as np

from fedpsmos.atomic import atomic_path

CASE_SUFFIX = ".b2zip"
FORMAT = "fedpsmos-case"
VERSION = 1
VOLUMES = ("image", "label")  # stored as blosc2 members; every other array as .npy
# z, y, x voxels: what nnU-Net v2's comp_blosc2_params gives a float32 case at the paper patch [80, 160, 128]
# (a 6 MiB chunk, 128 KiB blocks); fixed here, since the patch size is not known when a case is written.
CHUNKS = (96, 128, 128)
BLOCKS = (32, 32, 32)
CLEVEL = 5
_META = "meta.json"
_DTYPES = {"image": np.dtype(np.float32), "label": np.dtype(np.uint8)}
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a ZIP local file header, up to the name and extra lengths
_VERIFIED: dict[str, tuple[int, int]] = {}  # resolved path -> (size, mtime_ns) verified in this process


class CaseStorageError(ValueError):
    """A preprocessed case file is unreadable, incomplete or corrupt; the message names the file."""


def case_path(folder: str | os.PathLike[str], case: str) -> Path:
    """The file of ``case`` in a site's folder of preprocessed cases (``results/preprocessed/{site}``).

    Parameters
    ----------
    folder:
        The site's folder.
    case:
        The case id.
    """
    return Path(folder) / f"{case}{CASE_SUFFIX}"


def case_id(path: str | os.PathLike[str]) -> str:
    """The case id of a preprocessed case file (its name without :data:`CASE_SUFFIX`).

    Parameters
    ----------
    path:
        ``.../{case}.b2zip``.
    """
    name = Path(path).name
    return name[: -len(CASE_SUFFIX)] if name.endswith(CASE_SUFFIX) else Path(path).stem


def _clipped(shape: tuple[int, ...], chunks: tuple[int, ...], blocks: tuple[int, ...]) -> tuple[Any, Any]:
    c = tuple(max(1, min(int(k), int(s))) for k, s in zip(chunks, shape, strict=True))
    b = tuple(max(1, min(int(k), int(s))) for k, s in zip(blocks, c, strict=True))
    return c, b


def _volume_frame(array: np.ndarray, chunks: Sequence[int], blocks: Sequence[int]) -> bytes:
    """The blosc2 frame of a ``[Z, Y, X]`` volume (nnU-Net v2's codec: LZ4HC, level 5)."""
    chunks, blocks = _clipped(array.shape, tuple(chunks), tuple(blocks))
    shuffle = blosc2.Filter.SHUFFLE if array.itemsize > 1 else blosc2.Filter.NOFILTER
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": CLEVEL, "filters": [shuffle], "nthreads": 1}
    packed = blosc2.asarray(np.ascontiguousarray(array), chunks=chunks, blocks=blocks, cparams=cparams)
    return bytes(packed.to_cframe())


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


def _member_name(key: str) -> str:
    return f"{key}.b2nd" if key in VOLUMES else f"{key}.npy"


def write_case(
    path: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    *,
    chunks: Sequence[int] = CHUNKS,
    blocks: Sequence[int] = BLOCKS,
) -> None:
    """Write a preprocessed case atomically: ``image`` and ``label`` as blosc2 volumes, the rest as ``.npy``.

    Parameters
    ----------
    path:
        Output file; must end in :data:`CASE_SUFFIX`.
    arrays:
        ``image`` (float32 after conversion) and ``label`` (integers in 0..255, stored as uint8), both
        ``[Z, Y, X]`` of one shape, plus any small arrays (``labelled``, ``spacing``, ...) by name.
    chunks, blocks:
        blosc2 chunk and block shapes (z, y, x) of the volumes, clipped to the volume (default: the
        benchmarked :data:`CHUNKS` and :data:`BLOCKS`).
    """
    path = Path(path)
    if not path.name.endswith(CASE_SUFFIX):
        raise CaseStorageError(f"{path}: a preprocessed case file must end in {CASE_SUFFIX}")
    missing = [k for k in VOLUMES if k not in arrays]
    if missing:
        raise CaseStorageError(f"{path}: a case needs the arrays {list(VOLUMES)}; missing {missing}")
    image = np.asarray(arrays["image"], dtype=np.float32)
    label = np.asarray(arrays["label"])
    if image.ndim != 3 or image.size == 0 or label.shape != image.shape:
        raise CaseStorageError(
            f"{path}: image {image.shape} and label {label.shape} must be equal, non-empty [Z, Y, X]"
        )
    if label.dtype.kind not in "iub" or (label.size and (label.min() < 0 or label.max() > 255)):
        raise CaseStorageError(f"{path}: label must hold integer classes in 0..255, got dtype {label.dtype}")
    label = label.astype(np.uint8, copy=False)
    members = {
        "image.b2nd": _volume_frame(image, chunks, blocks),
        "label.b2nd": _volume_frame(label, chunks, blocks),
    }
    described: dict[str, Any] = {}
    for key, value in arrays.items():
        if not key.isidentifier():
            raise CaseStorageError(f"{path}: array name {key!r} must be a plain identifier")
        array = {"image": image, "label": label}.get(key, np.asarray(value))
        name = _member_name(key)
        if key not in VOLUMES:
            if array.dtype.hasobject:
                raise CaseStorageError(f"{path}: array {key!r} holds Python objects, which are not stored")
            members[name] = _npy_bytes(array)
        described[key] = {
            "member": name,
            "shape": list(array.shape),
            "dtype": array.dtype.str,
            "sha256": hashlib.sha256(members[name]).hexdigest(),
        }
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "arrays": described,
        "image_min": float(image.min()),
        "label_values": np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist(),
    }
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(_zip_info(_META), json.dumps(meta, indent=1).encode())
            for name, data in members.items():
                archive.writestr(_zip_info(name), data)


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # same arrays, same bytes
    info.compress_type = zipfile.ZIP_STORED
    return info


@dataclass(frozen=True)
class CaseFile:
    """A preprocessed case opened for patch reads: its volumes stay on disk, its small arrays are read.

    ``image`` and ``label`` are blosc2 NDArrays mapped from the file; slicing one (``case.image[z0:z1, ...]``)
    decodes the blocks the slice overlaps and returns a NumPy array.
    """

    path: Path
    meta: Mapping[str, Any]
    image: Any
    label: Any
    arrays: Mapping[str, np.ndarray]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The volume shape (z, y, x)."""
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def image_min(self) -> float:
        """The image's minimum intensity (the padding value outside the volume)."""
        return float(self.meta["image_min"])

    @property
    def label_values(self) -> tuple[int, ...]:
        """The classes the label map holds."""
        return tuple(int(v) for v in self.meta["label_values"])


def _read_meta(archive: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(archive.read(_META))
    except KeyError:
        raise CaseStorageError(f"{path}: no {_META}; not a preprocessed case (preprocess it again)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CaseStorageError(f"{path}: {_META} does not describe a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise CaseStorageError(
            f"{path}: case format version {meta.get('version')}, this code reads {VERSION}"
        )
    arrays = meta.get("arrays")
    if not isinstance(arrays, dict) or any(k not in arrays for k in VOLUMES):
        raise CaseStorageError(f"{path}: {_META} lists no {list(VOLUMES)} arrays")
    return meta


def _verify(archive: zipfile.ZipFile, meta: Mapping[str, Any], path: Path) -> None:
    for key, entry in meta["arrays"].items():
        digest = hashlib.sha256()
        try:
            with archive.open(entry["member"]) as handle:  # also checks the member's CRC-32 at its end
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except zipfile.BadZipFile as error:
            raise CaseStorageError(
                f"{path}: array {key!r} ({entry['member']}) is corrupt ({error}); preprocess the case again"
            ) from None
        if digest.hexdigest() != entry["sha256"]:
            raise CaseStorageError(
                f"{path}: array {key!r} ({entry['member']}) does not match the checksum recorded when it was "
                "written; the file is corrupt (preprocess the case again)"
            )


def _checked(archive: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    """The case's meta, every member verified against it once per process and file version."""
    meta = _read_meta(archive, path)
    stat = path.stat()
    key, version = str(path.resolve()), (stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(key) != version:
        _verify(archive, meta, path)
        _VERIFIED[key] = version
    return meta


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, name and extra field."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CaseStorageError(f"{path}: member {info.filename} is compressed; it cannot be mapped in place")
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(_LOCAL_HEADER.size)
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != b"PK\x03\x04":
        raise CaseStorageError(f"{path}: bad ZIP local header for member {info.filename}")
    return info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]


def _open_volume(path: Path, archive: zipfile.ZipFile, meta: Mapping[str, Any], key: str) -> Any:
    entry = meta["arrays"][key]
    volume = blosc2.open(
        str(path),
        mode="r",
        offset=_data_offset(path, archive.getinfo(entry["member"])),
        mmap_mode="r",
        dparams={"nthreads": 1},  # loader workers are the parallelism; one decoding thread each
    )
    if list(volume.shape) != list(entry["shape"]) or np.dtype(volume.dtype) != _DTYPES[key]:
        raise CaseStorageError(
            f"{path}: {key} is {volume.dtype} {list(volume.shape)}, "
            f"its meta says {entry['dtype']} {entry['shape']}"
        )
    return volume


def _small_arrays(
    archive: zipfile.ZipFile, meta: Mapping[str, Any], keys: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    wanted = [k for k in meta["arrays"] if k not in VOLUMES and (keys is None or k in keys)]
    out = {}
    for key in wanted:
        with archive.open(meta["arrays"][key]["member"]) as handle:
            out[key] = np.lib.format.read_array(handle, allow_pickle=False)
    return out


def _failure(path: Path, error: BaseException) -> CaseStorageError:
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CaseStorageError(f"{path}: cannot read preprocessed case ({first})")


def open_case(path: str | os.PathLike[str]) -> CaseFile:
    """Open a preprocessed case for patch reads (verified against its checksums on a process's first open).

    Parameters
    ----------
    path:
        ``results/preprocessed/{site}/{case}.b2zip``.

    Raises
    ------
    FileNotFoundError
        when the file does not exist.
    CaseStorageError
        when it is not a readable case or does not match its checksums.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: preprocessed case not found")
    try:
        with zipfile.ZipFile(path) as archive:
            meta = _checked(archive, path)
            image = _open_volume(path, archive, meta, "image")
            label = _open_volume(path, archive, meta, "label")
            arrays = _small_arrays(archive, meta)
    except CaseStorageError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile, struct.error) as error:
        raise _failure(path, error) from None
    if image.shape != label.shape or len(image.shape) != 3:
        raise CaseStorageError(f"{path}: image {image.shape} and label {label.shape} must be equal [Z, Y, X]")
    return CaseFile(path=path, meta=meta, image=image, label=label, arrays=arrays)


def read_case(path: str | os.PathLike[str], keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read whole arrays of a preprocessed case (verified against its checksums on a process's first read).

    Parameters
    ----------
    path:
        ``results/preprocessed/{site}/{case}.b2zip``.
    keys:
        The arrays to read (default: all); a key the case lacks is left out of the result, so callers
        check for the keys they need.

    Raises
    ------
    FileNotFoundError, CaseStorageError
        as :func:`open_case`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: preprocessed case not found")
    wanted = None if keys is None else set(keys)
    try:
        with zipfile.ZipFile(path) as archive:
            meta = _checked(archive, path)
            out = _small_arrays(archive, meta, wanted)
            for key in VOLUMES:
                if wanted is None or key in wanted:
                    out[key] = np.asarray(_open_volume(path, archive, meta, key)[...])
    except CaseStorageError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile, struct.error) as error:
        raise _failure(path, error) from None
    order = list(meta["arrays"])
    return {k: out[k] for k in order if k in out}
