"""Outputs appear whole or not at all: write to a temporary file or folder beside the target, then rename.

The one place the project writes its outputs from; inputs are read by :mod:`fedpsmos.io`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    The temporary file keeps the target's suffix (or ``suffix``) so writers that look at extensions
    (SimpleITK, pandas, matplotlib) pick the right format. On any exception the temporary file is removed
    and the target is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(target.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically, UTF-8 whatever the process locale (ITK's readers may have
    switched it to "C")."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``target`` atomically."""
    write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that replaces ``target`` only if the block succeeds.

    On any exception the temporary folder is removed and ``target`` is left untouched; on success an
    existing ``target`` is removed and the temporary folder renamed onto it.

    Parameters
    ----------
    target:
        The folder to produce.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
