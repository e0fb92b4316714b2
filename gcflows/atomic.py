"""Atomic file writes: readers see the old file or the complete new one, never a torn one.

``atomic_write(path, write)`` calls ``write(file)`` on a temporary file in the target folder,
fsyncs it, ``os.replace``-s it onto ``path`` and fsyncs the folder. A crash (or an exception in
``write``) at any point leaves ``path`` as it was and no temporary file behind. Used by the
training checkpoints (``gcflows.training.checkpoint``) and the classifier cache
(``gcflows.classifier``). Standard library plus torch only (layer 0 of docs/design.md).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_torch_save", "fsync_dir"]


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so that a rename inside it survives a power loss (a no-op where the
    platform or file system cannot open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(file)`` atomically (module doc); returns ``Path(path)``.

    The file object is opened ``"w+b"`` (``write`` may seek back, e.g. to fill in a header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` by ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (a plain torch file: ``torch.load`` reads it)."""
    return atomic_write(path, lambda f: torch.save(obj, f))
