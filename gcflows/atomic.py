"""Atomic file writes, and the claim that makes one process the owner of a run folder.

Atomic writes: readers see the old file or the complete new one, never a torn one.

``atomic_write(path, write)`` calls ``write(file)`` on a temporary file in the target folder,
fsyncs it, ``os.replace``-s it onto ``path`` and fsyncs the folder. A crash (or an exception in
``write``) at any point leaves ``path`` as it was and no temporary file behind. Used by the
training checkpoints (``gcflows.training.checkpoint``) and the classifier cache
(``gcflows.classifier``).

Run folders: :func:`claim_folder` makes the calling process the one owner of a folder (a lock
file ``.gcflows.lock`` holding an exclusive ``flock`` and the owner's pid, host, command and start
time). A second process that claims the same folder while the owner lives gets
:class:`FolderInUseError` (a ``ValueError``) naming the owner, before it writes anything; the
kernel drops the ``flock`` when the owner exits or dies (SIGKILL, out of memory), so a lock left
by a dead process is stale and taken over without a word. A claim is re-entrant within a
process. A folder that cannot be created or written (read-only ``--out``, a file in the way) is a
:class:`UnusableFolderError`. Used by ``gcflows.training.train`` (its ``out_dir``),
``gcflows.records.make_run_dir`` and the image scripts. Standard library plus torch only (layer 0
of docs/design.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_torch_save",
    "fsync_dir",
    "LOCK_NAME",
    "FolderInUseError",
    "UnusableFolderError",
    "FolderClaim",
    "claim_folder",
    "unusable",
]


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


# ------------------------------------------------------------------------------------------------
# one owner per run folder
# ------------------------------------------------------------------------------------------------
LOCK_NAME = ".gcflows.lock"


class UnusableFolderError(ValueError, SystemExit):
    """A folder that cannot hold a run (read-only, a file in the way). A ``ValueError`` for
    library callers; a script that does not catch it exits with status 2 and one ``error:``
    line, no traceback (it is also a ``SystemExit``, whose ``code`` prints the message)."""

    @property
    def code(self) -> int:  # read by the interpreter only when the error ends the program
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "gcflows"
        print(f"{prog}: error: {self}", file=sys.stderr, flush=True)
        return 2


class FolderInUseError(UnusableFolderError):
    """Another live process owns the folder (:func:`claim_folder`); ``owner``: what its lock
    file says (pid, host, command, start time)."""

    def __init__(self, message: str, owner: dict[str, Any]) -> None:
        super().__init__(message)
        self.owner = owner

    def __reduce__(self) -> tuple:  # sent back from a pool worker intact
        return (type(self), (str(self), self.owner))


def unusable(folder: str | os.PathLike, why: str) -> UnusableFolderError:
    """The error for a folder that cannot hold a run (``why``: the operating system's reason)."""
    return UnusableFolderError(
        f"output folder {str(folder)!r} cannot hold a run folder ({why}): pass a writable --out"
    )


_HELD: dict[str, FolderClaim] = {}
_HELD_LOCK = threading.Lock()


class FolderClaim:
    """This process's ownership of a folder (:func:`claim_folder`); :meth:`release` (or leaving
    the ``with`` block) ends it once every nested claim has been released."""

    def __init__(self, folder: Path, fd: int, created: bool) -> None:
        self.folder, self.fd, self.created, self.depth = folder, fd, created, 1
        self.pid = os.getpid()  # a forked child does not inherit the claim

    def release(self) -> None:
        with _HELD_LOCK:
            self.depth -= 1
            if self.depth > 0 or self.fd < 0:
                return
            _HELD.pop(str(self.folder), None)
            with contextlib.suppress(OSError):
                os.unlink(self.folder / LOCK_NAME)  # still under the flock: no one else has it
            os.close(self.fd)
            self.fd = -1
            if self.created:  # a claim that wrote nothing leaves nothing behind
                with contextlib.suppress(OSError):
                    self.folder.rmdir()

    def __enter__(self) -> FolderClaim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _owner(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _in_use(folder: Path, what: str) -> FolderInUseError:
    owner = _owner(folder / LOCK_NAME)
    who = f"process {owner.get('pid', '?')}"
    if owner.get("host") and owner["host"] != socket.gethostname():
        who += f" on {owner['host']}"
    if owner.get("command"):
        who += f" ({' '.join(map(str, owner['command']))[:200]})"
    if owner.get("started"):
        who += f", started {owner['started']}"
    return FolderInUseError(
        f"{str(folder)!r} is in use by {who}: a second {what} there would mix two runs' files. "
        "Wait for it to finish, or choose another output folder (nothing was written)",
        owner,
    )


def claim_folder(folder: str | os.PathLike, what: str = "run") -> FolderClaim:
    """Make this process the owner of ``folder`` (created if missing) until the claim is
    released (module doc). Raises :class:`FolderInUseError` when another live process owns it
    and :class:`UnusableFolderError` when it cannot be created or written. ``what`` names the
    work in the message (``"training"``, ``"evaluation"``). A released claim on a folder it
    created, which is still empty, removes the folder."""
    folder = Path(folder)
    key = str(folder.resolve())
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None and held.pid == os.getpid():
            held.depth += 1
            return held
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise unusable(folder, "it is not a folder") from None
    except OSError as err:
        raise unusable(folder, err.strerror or str(err)) from None
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise unusable(folder, err.strerror or str(err)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(folder, what) from None
        try:  # the file we locked must still be the one at ``path`` (a releasing owner unlinks)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(record) + "\n").encode())
    claim = FolderClaim(folder.resolve(), fd, created)
    with _HELD_LOCK:
        _HELD[key] = claim
    return claim
