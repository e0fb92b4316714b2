"""Checkpoints of a training run: atomic writes with a digest, verified loads, resume checks.

File layout: one header line ``GCFLOWS-CHECKPOINT sha256=<64 hex>\\n`` followed by the bytes of
``torch.save(payload)``; the digest is the SHA-256 of those bytes, so a flipped, lost or added
byte anywhere after the header changes it, and one inside the header breaks the header or the
digest. Every load (:func:`load_payload`, :func:`load_checkpoint`, :func:`load_weights`, resume)
re-hashes the file and refuses a mismatch with a ``CorruptCheckpointError`` (a ``ValueError``)
naming the file, before unpickling anything (``weights_only`` loading: plain tensors and
containers only). A file without the header (written by an older gcflows) is read with a
warning that its integrity cannot be checked.

Writes are atomic (:func:`gcflows.atomic.atomic_write`: temporary file, fsync, ``os.replace``):
a crash mid-write leaves the previous file. With ``previous=`` the file being replaced is first
kept as ``previous`` (a hard link, else a copy), so ``checkpoint.prev.pt`` always holds the
checkpoint before ``checkpoint.pt``; :func:`find_checkpoint` falls back to it, saying so, when
the latest one is corrupt.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import warnings
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from gcflows.atomic import atomic_write, fsync_dir
from gcflows.checks import bad, choice
from gcflows.training.config import TrainConfig, config_fingerprint, fingerprint_fields

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CHECKPOINT_NAME",
    "PREVIOUS_NAME",
    "CorruptCheckpointError",
    "save_checkpoint",
    "load_payload",
    "load_checkpoint",
    "load_weights",
    "find_checkpoint",
    "check_resume_compatible",
]

CHECKPOINT_FORMAT = "gcflows-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
_MAGIC = b"GCFLOWS-CHECKPOINT sha256="
_HEADER_LEN = len(_MAGIC) + 64 + 1
_REQUIRED_KEYS = ("format", "version", "step", "config", "fingerprint", "model", "ema", "optimizer")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be trusted (digest mismatch, truncated, unreadable)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
class _HashingWriter:
    """Forwards writes to ``f`` and hashes them (``torch.save`` writes its zip sequentially)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _write_with_digest(f: IO[bytes], payload: Any) -> None:
    f.write(_MAGIC + b"0" * 64 + b"\n")
    writer = _HashingWriter(f)
    torch.save(payload, writer)
    f.seek(len(_MAGIC))
    f.write(writer.sha.hexdigest().encode())
    f.seek(0, os.SEEK_END)


def _keep_as_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` a copy of ``path`` (hard link where possible), replacing it atomically."""
    tmp = previous.with_name(f".{previous.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this file system
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)
    fsync_dir(previous.parent)


def save_checkpoint(
    path: str | os.PathLike, payload: Any, *, previous: str | os.PathLike | None = None
) -> Path:
    """Write ``payload`` to ``path`` atomically with its digest (module doc). With ``previous``,
    the checkpoint being replaced is kept there first. ``path`` exists at every moment."""
    path = Path(path)
    if previous is not None and path.exists():
        _keep_as_previous(path, Path(previous))
    return atomic_write(path, lambda f: _write_with_digest(f, payload))


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
class _Window(io.RawIOBase):
    """The bytes of an open file from ``offset`` on, as a seekable file (for ``torch.load``)."""

    def __init__(self, f: IO[bytes], offset: int) -> None:
        self.f, self.offset = f, offset
        self.size = f.seek(0, os.SEEK_END) - offset
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.f.tell() - self.offset

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self.f.seek(self.offset + pos)
        elif whence == os.SEEK_CUR:
            self.f.seek(pos, os.SEEK_CUR)
        else:
            self.f.seek(self.offset + self.size + pos)
        return self.tell()

    def readinto(self, b: Any) -> int:
        return self.f.readinto(b)


def _corrupt(path: Path, why: str) -> CorruptCheckpointError:
    msg = f"checkpoint {str(path)!r} is corrupt or unreadable ({why}); "
    prev = path.with_name(PREVIOUS_NAME)
    if path.name == CHECKPOINT_NAME and prev.is_file():
        msg += f"the previous checkpoint {str(prev)!r} may be intact: resume from it"
    else:
        msg += "delete it or resume from another checkpoint"
    return CorruptCheckpointError(msg, path)


def _verify(f: IO[bytes], path: Path) -> int:
    """Check the header digest against the bytes after it; returns where the payload starts (0
    for a file without a header)."""
    head = f.read(_HEADER_LEN)
    if not head.startswith(_MAGIC):
        if head.startswith(b"PK\x03\x04"):  # a plain torch zip: written by an older gcflows
            warnings.warn(
                f"checkpoint {str(path)!r} carries no digest (written by an older gcflows): its "
                "integrity cannot be checked",
                stacklevel=4,
            )
            return 0
        raise _corrupt(path, "no gcflows checkpoint header")
    expected = head[len(_MAGIC) : len(_MAGIC) + 64]
    sha = hashlib.sha256()
    while chunk := f.read(1 << 22):
        sha.update(chunk)
    if len(head) != _HEADER_LEN or head[-1:] != b"\n" or sha.hexdigest().encode() != expected:
        raise _corrupt(path, "its bytes do not match the SHA-256 digest written with it")
    return _HEADER_LEN


def load_payload(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Read what :func:`save_checkpoint` wrote, after checking its digest (module doc)."""
    path = Path(path)
    if not path.is_file():
        if os.path.lexists(path):  # a folder, a link to nothing, a device...
            raise _corrupt(path, _not_a_file(path))
        raise bad("path", str(path), "the checkpoint does not exist; check the path")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as err:  # no read permission, an I/O error
        raise _corrupt(path, f"it cannot be read: {err.strerror or err}") from None
    with f:
        try:
            offset = _verify(f, path)
        except OSError as err:
            raise _corrupt(path, f"it cannot be read: {err.strerror or err}") from None
        try:
            return torch.load(_Window(f, offset), map_location=map_location, weights_only=True)
        except Exception as err:  # truncated zip, garbage bytes, unpickling errors...
            raise _corrupt(path, f"{type(err).__name__}: {err}") from None


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return "it is a folder, not a file"
    if path.is_symlink():
        return f"it is a link to {os.readlink(path)!r}, which does not exist"
    return "it is not a regular file"


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`gcflows.training.train` (digest verified). Raises
    ``ValueError`` if it is missing, corrupt, unreadable or not a gcflows checkpoint."""
    path = Path(path)
    ckpt = load_payload(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a gcflows training checkpoint (no format tag "
            f"{CHECKPOINT_FORMAT!r}); pass a checkpoint written by gcflows.training.train"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
    if ckpt["version"] != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {ckpt['version']}, this gcflows reads "
            f"version {CHECKPOINT_VERSION}"
        )
    return ckpt


def load_weights(
    model: nn.Module, checkpoint: str | os.PathLike | dict[str, Any], which: str = "ema"
) -> nn.Module:
    """Load the ``"ema"`` (default) or ``"model"`` (online) weights of a checkpoint (a path,
    digest verified, or a dict from :func:`load_checkpoint`) into ``model`` (built as for
    training); returns the model. For evaluation scripts."""
    choice(which, "which", ("ema", "model"))
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    state = ckpt[which]
    if which == "ema":
        state = {k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"the checkpoint's {which} weights do not fit this model ({err}); build the model "
            "with the checkpoint's config['model'] / preset"
        ) from None
    return model


def find_checkpoint(
    run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a run in ``run_dir`` continues from: ``checkpoint.pt``, or, when that one is
    corrupt, unreadable, missing or no regular file (a folder, a dangling link) and
    ``checkpoint.prev.pt`` is intact, the previous one, with a warning that says so. ``None``
    when the folder holds neither; ``CorruptCheckpointError`` when no intact one is left."""
    run_dir = Path(run_dir)
    latest, prev = run_dir / CHECKPOINT_NAME, run_dir / PREVIOUS_NAME
    if not os.path.lexists(latest) and not os.path.lexists(prev):
        return None
    try:
        if os.path.lexists(latest):  # a folder or a dangling link there counts as corrupt
            return latest, load_checkpoint(latest, map_location)
    except CorruptCheckpointError as err:
        if not os.path.lexists(prev):
            raise
        first = str(err)
    else:
        first = f"{str(latest)!r} is missing"
    try:
        ckpt = load_checkpoint(prev, map_location)
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(
            f"no intact checkpoint in {str(run_dir)!r}: {first}; and {err}", latest
        ) from None
    warnings.warn(
        f"{first.split(';')[0]}; resuming from the previous checkpoint {str(prev)!r} (step "
        f"{ckpt['step']}): the steps after it are trained again",
        stacklevel=3,
    )
    return prev, ckpt


def check_resume_compatible(
    ckpt: dict[str, Any], path: Path, config: TrainConfig, data_shape: tuple, model: nn.Module
) -> None:
    """Raise ``ValueError`` (listing the differences) unless ``ckpt`` was written by a run of the
    same problem and model (``config_fingerprint``)."""
    try:
        old = TrainConfig.from_dict(ckpt["config"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"checkpoint {str(path)!r} holds an invalid config ({err})") from None
    if ckpt["fingerprint"] == config_fingerprint(config, data_shape, model):
        return
    before = fingerprint_fields(old, ckpt.get("data_shape"))
    now = fingerprint_fields(config, data_shape)
    diffs = [f"{k}: {before[k]!r} there, {now[k]!r} here" for k in now if before.get(k) != now[k]]
    if not diffs and "model" in ckpt:
        theirs = {k: list(v.shape) for k, v in ckpt["model"].items()}
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        diffs = [
            f"parameter {k}: {theirs.get(k)} there, {ours.get(k)} here"
            for k in sorted(set(theirs) | set(ours))
            if theirs.get(k) != ours.get(k)
        ][:5] or ["parameter dtypes differ"]
    raise ValueError(
        f"checkpoint {str(path)!r} was written by a different configuration ("
        + "; ".join(diffs)
        + "): use a new out_dir, or resume=None with an empty out_dir to start over"
    )
