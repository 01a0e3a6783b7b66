"""Preprocessed case files: round trip, patch reads from the file, checksums, atomic writes, clear errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedpsmos.preprocessing import storage
from fedpsmos.preprocessing.storage import (
    CaseStorageError,
    case_id,
    case_path,
    open_case,
    read_case,
    write_case,
)
from fedpsmos.training.sampler import crop_patch


def _arrays(shape: tuple[int, int, int] = (20, 30, 40), seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = (rng.random(shape) * 4).astype(np.uint8)
    label[0, 0, 0] = 255  # the ignore label
    return {
        "image": rng.normal(size=shape).astype(np.float32),
        "label": label,
        "labelled": np.array([True, True, False, True, False, False]),
        "spacing": np.array([2.41, 1.63, 1.63]),
        "orientation": np.array("RAS"),
    }


def test_case_round_trips_every_array_exactly(tmp_path: Path) -> None:
    # Prepare
    arrays = _arrays()
    path = case_path(tmp_path / "site1", "site1_000")
    # Execute
    write_case(path, arrays)
    back = read_case(path)
    only = read_case(path, ("label", "labelled"))
    # Assert: same keys, dtypes and values; a key subset reads only those arrays
    assert path.name == "site1_000.b2zip" and case_id(path) == "site1_000"
    assert list(back) == list(arrays)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    assert set(only) == {"label", "labelled"}


def test_patch_reads_match_the_array_and_record_min_and_classes(tmp_path: Path) -> None:
    # Prepare: volumes spanning several chunks and blocks
    arrays = _arrays((40, 70, 50))
    path = tmp_path / "c.b2zip"
    write_case(path, arrays, chunks=(16, 32, 32), blocks=(8, 16, 16))
    corners = [(0, 0, 0), (13, 29, 7), (30, 60, 45), (-3, 5, 40)]  # the last ones overhang
    # Execute
    case = open_case(path)
    patches = [
        (crop_patch(case.image, c, (12, 20, 16), -9.0), crop_patch(case.label, c, (12, 20, 16), 0))
        for c in corners
    ]
    # Assert
    assert case.shape == (40, 70, 50)
    assert case.image_min == float(arrays["image"].min())
    assert case.label_values == (0, 1, 2, 3, 255)
    assert case.arrays["labelled"].tolist() == arrays["labelled"].tolist()
    for corner, (image, label) in zip(corners, patches, strict=True):
        assert np.array_equal(image, crop_patch(arrays["image"], corner, (12, 20, 16), -9.0)), corner
        assert np.array_equal(label, crop_patch(arrays["label"], corner, (12, 20, 16), 0)), corner


def test_volumes_are_stored_uncompressed_in_the_zip_and_checksummed(tmp_path: Path) -> None:
    # Prepare / Execute
    path = tmp_path / "c.b2zip"
    write_case(path, _arrays())
    # Assert: members stored (so they can be mapped in place) and each has a SHA-256 in the meta
    with zipfile.ZipFile(path) as archive:
        infos = {i.filename: i for i in archive.infolist()}
        meta = json.loads(archive.read("meta.json"))
    assert set(infos) == {
        "meta.json",
        "image.b2nd",
        "label.b2nd",
        "labelled.npy",
        "spacing.npy",
        "orientation.npy",
    }
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos.values())
    assert {k: len(v["sha256"]) for k, v in meta["arrays"].items()} == dict.fromkeys(_arrays(), 64)


def _rezip(path: Path, member: str, data: bytes) -> None:
    """Rewrite one member with consistent ZIP CRCs, so only the recorded SHA-256 can tell."""
    with zipfile.ZipFile(path) as archive:
        members = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    members[member] = data
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, value in members.items():
            archive.writestr(name, value)


def test_tampered_member_fails_its_checksum_with_the_file_named(tmp_path: Path) -> None:
    # Prepare: the spacing member replaced by another valid .npy
    path = tmp_path / "tampered.b2zip"
    write_case(path, _arrays())
    other = tmp_path / "other.b2zip"
    write_case(other, {**_arrays(), "spacing": np.array([1.0, 1.0, 1.0])})
    with zipfile.ZipFile(other) as archive:
        _rezip(path, "spacing.npy", archive.read("spacing.npy"))
    # Execute / Assert
    with pytest.raises(CaseStorageError, match=r"tampered\.b2zip: array 'spacing' .*checksum"):
        read_case(path)


def test_flipped_byte_in_a_volume_is_refused_on_first_open(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "flipped.b2zip"
    write_case(path, _arrays())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("image.b2nd")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 200] ^= 0x01
    path.write_bytes(bytes(data))
    # Execute / Assert
    with pytest.raises(CaseStorageError, match=r"flipped\.b2zip: array 'image' .*corrupt"):
        open_case(path)


def test_a_case_is_verified_once_per_process_and_again_when_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: count member verifications
    path = tmp_path / "c.b2zip"
    write_case(path, _arrays())
    calls: list[Path] = []
    real = storage._verify
    monkeypatch.setattr(
        storage, "_verify", lambda archive, meta, p: (calls.append(p), real(archive, meta, p))
    )
    # Execute
    open_case(path)
    open_case(path)
    read_case(path)
    write_case(path, _arrays(seed=1))
    open_case(path)
    # Assert
    assert calls == [path, path]


def test_bad_files_and_inputs_get_clear_errors(tmp_path: Path) -> None:
    # Prepare
    junk = tmp_path / "junk.b2zip"
    junk.write_bytes(b"not a case")
    plain = tmp_path / "plain.b2zip"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("image.npy", b"")
    arrays = _arrays()
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=r"missing\.b2zip: preprocessed case not found"):
        open_case(tmp_path / "missing.b2zip")
    with pytest.raises(CaseStorageError, match=r"junk\.b2zip: cannot read preprocessed case"):
        open_case(junk)
    with pytest.raises(CaseStorageError, match=r"plain\.b2zip: no meta\.json"):
        read_case(plain)
    with pytest.raises(CaseStorageError, match=r"must end in \.b2zip"):
        write_case(tmp_path / "c.npz", arrays)
    with pytest.raises(CaseStorageError, match="missing \\['label'\\]"):
        write_case(tmp_path / "c.b2zip", {"image": arrays["image"]})
    with pytest.raises(CaseStorageError, match="must be equal"):
        write_case(tmp_path / "c.b2zip", {**arrays, "label": arrays["label"][:-1]})
    with pytest.raises(CaseStorageError, match="0..255"):
        write_case(tmp_path / "c.b2zip", {**arrays, "label": arrays["label"].astype(np.int32) + 300})
    assert not list(tmp_path.glob("c.b2zip*")) and not list(tmp_path.glob(".c.b2zip*"))


def test_a_failed_write_leaves_the_previous_case_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a case, then a write that dies half way through the archive
    path = tmp_path / "c.b2zip"
    write_case(path, _arrays())
    before = path.read_bytes()

    def broken(self: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", broken)
    # Execute
    with pytest.raises(OSError, match="disk full"):
        write_case(path, _arrays(seed=1))
    # Assert: the old file untouched, no temporary left
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.b2zip"]
