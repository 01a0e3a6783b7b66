"""Reading inputs (images, the grid check, digests, the device) and writing outputs whole (files, folders)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpsmos.atomic import atomic_directory, write_json
from fedpsmos.data.sources import CaseFiles, DataError
from fedpsmos.data.validation import validate_case
from fedpsmos.io import (
    ImageError,
    check_same_grid,
    file_sha256,
    read_image,
    read_image_pair,
    resolve_device,
)
from fedpsmos.preprocessing import PreprocessingError, preprocess_case
from tests.conftest import Geometry, tiny_ct, write_sitk

SETTINGS = {"spacing": (1.0, 1.0, 1.0), "image_order": 1, "clip": (-100.0, 200.0), "mean": 0.0, "std": 1.0}


def _pair(tmp_path: Path, label_geometry: Geometry) -> tuple[Path, Path]:
    image, label = tiny_ct()
    img = write_sitk(image, tmp_path / "img.nii.gz", Geometry(spacing=(1.0, 1.0, 3.0)))
    lab = write_sitk(label, tmp_path / "lab.nii.gz", label_geometry)
    return img, lab


def test_read_image_returns_the_volume_and_names_the_file_of_each_problem(tmp_path: Path) -> None:
    # Prepare
    image, _ = tiny_ct()
    good = write_sitk(image, tmp_path / "ct.nii.gz", Geometry(spacing=(0.8, 0.8, 2.5)))
    flat = write_sitk(image[0], tmp_path / "flat.nii.gz")
    plain = tmp_path / "plain.nii.gz"
    plain.write_bytes(write_sitk(image, tmp_path / "plain.nii").read_bytes())  # .gz name, not gzip
    # Execute
    read = read_image(good)
    # Assert
    assert read.GetSize() == (8, 6, 4) and read.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    with pytest.raises(ImageError, match=rf"^{tmp_path / 'missing.nii.gz'}: label file not found$"):
        read_image(tmp_path / "missing.nii.gz", "label")
    with pytest.raises(ImageError, match=r"flat\.nii\.gz: image is 2-D, a 3-D image is required"):
        read_image(flat)
    with pytest.raises(ImageError, match=r"plain\.nii\.gz: image file is named \.gz but is not gzip"):
        read_image(plain)


@pytest.mark.parametrize(
    ("label_geometry", "problem"),
    [
        # within the tolerance (1e-3 mm, 1e-4 direction): what writers' float32 rounding leaves
        (Geometry(spacing=(1.0005, 1.0, 3.0), origin=(0.0005, 0.0, 0.0)), None),
        (Geometry(spacing=(1.0, 1.0, 3.0), direction=(1, 0, 0, 0, 1, 2e-5, 0, 0, 1)), None),
        # outside it
        (Geometry(spacing=(1.0, 1.0, 3.01)), "spacing"),
        (Geometry(spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.005, 0.0)), "origin"),
        (Geometry(spacing=(1.0, 1.0, 3.0), direction=(1, 0, 0, 0, 1, 5e-4, 0, 0, 1)), "direction"),
    ],
)
def test_grid_check_tolerance(tmp_path: Path, label_geometry: Geometry, problem: str | None) -> None:
    # Prepare
    img, lab = _pair(tmp_path, label_geometry)
    # Execute / Assert
    if problem is None:
        image, label = read_image_pair(img, lab)
        check_same_grid(image, label, lab)
    else:
        with pytest.raises(ImageError, match=rf"^{lab}: label {problem} .* differs from the image's"):
            read_image_pair(img, lab)


def test_grid_check_refuses_another_size(tmp_path: Path) -> None:
    image, label = tiny_ct()
    img = write_sitk(image, tmp_path / "img.nii.gz")
    lab = write_sitk(label[:, :, :-1], tmp_path / "lab.nii.gz")
    with pytest.raises(
        ImageError, match=r"lab\.nii\.gz: label size \[7, 6, 4\] differs from the image's \[8, 6, 4\]"
    ):
        read_image_pair(img, lab)


def test_validation_and_preprocessing_refuse_the_same_pair(tmp_path: Path) -> None:
    # Prepare: an origin 0.005 mm off, which the site validation refuses (preprocessing once allowed 1e-2)
    img, lab = _pair(tmp_path, Geometry(spacing=(1.0, 1.0, 3.0), origin=(0.005, 0.0, 0.0)))
    # Execute / Assert: one check, one message, in each stage's own error type
    with pytest.raises(DataError, match=rf"^{lab}: label origin"):
        validate_case(CaseFiles("c", img, lab), label_values={1, 2})
    with pytest.raises(PreprocessingError, match=rf"^{lab}: label origin"):
        preprocess_case(img, lab, tmp_path / "c.b2zip", labels={"liver": [1], "spleen": [2]}, **SETTINGS)
    assert not (tmp_path / "c.b2zip").exists()


def test_file_sha256_is_the_digest_of_the_bytes(tmp_path: Path) -> None:
    # Prepare: more than one read chunk (1 MiB)
    data = np.random.default_rng(0).integers(0, 256, size=(1 << 20) + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.pt"
    path.write_bytes(data)
    # Execute / Assert
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        file_sha256(tmp_path / "nope.pt")


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cuda:1")) == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")
    with pytest.raises(ValueError, match="device 'gpu0'"):
        resolve_device("gpu0")


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    # Prepare: an existing output folder
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")

    # Execute: a writer that fails half-way
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("a")
            raise RuntimeError("half-way")
    # Assert: the old folder is untouched and no temporary folder is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]

    # Execute: a writer that finishes
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "a.txt").write_text("a")
        write_json(tmp / "b.json", {"x": 1})
        assert not (target / "a.txt").exists()  # nothing shows before the end
    # Assert: the new folder replaced the old one whole
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_leaves_nothing_when_the_first_write_fails(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        with atomic_directory(tmp_path / "new") as tmp:
            (tmp / "missing" / "a.txt").write_text("a")
    assert list(tmp_path.iterdir()) == []
