"""Run folders of the experiments (docs/design.md): each run writes config.json with seed, git SHA,
versions and device; results.json / results.csv; PNG figures; and prints a summary table last.

    run_dir = make_run_dir(args.out, "toy_discrepancy")
    write_config(run_dir, args, seed=args.seed)
    ...
    write_results(run_dir, results, rows)
    print_table(rows)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gcflows import checks, runrecord
from gcflows.atomic import atomic_write_bytes, unusable

__all__ = [
    "make_run_dir",
    "check_writable",
    "check_output_file",
    "given_options",
    "git_info",
    "git_sha",
    "cpu_model",
    "environment",
    "jsonable",
    "write_config",
    "write_config_record",
    "write_results",
    "format_value",
    "print_table",
]

REPO = Path(__file__).resolve().parents[1]


def make_run_dir(out: str | os.PathLike, name: str) -> Path:
    """Create and return ``out/<name>_<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... if taken).

    A folder that cannot be created (read-only ``out``, a file in the way) is a ``ValueError``
    (:class:`gcflows.atomic.UnusableFolderError`) that names ``out`` and says what to do, not a
    raw ``PermissionError``; a script that does not catch it exits with status 2 and that one
    ``error:`` line. ``mkdir`` without ``exist_ok`` is an atomic claim: two studies started
    together into one ``out`` get two folders.
    """
    if not name or any(c in name for c in "/\\"):
        raise checks.bad("name", name, "use a plain folder name (not empty, no / or \\)")
    base = Path(out) / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, k = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            if not Path(out).is_dir():
                raise _unwritable(out, "it is not a folder") from None
            k += 1
            run_dir = base.with_name(f"{base.name}-{k}")
        except OSError as err:
            raise _unwritable(out, err.strerror or str(err)) from None


def _unwritable(out: str | os.PathLike, why: str) -> ValueError:
    return unusable(out, why)  # a ValueError; uncaught in a script: one error line, exit 2


def check_writable(out: str | os.PathLike) -> Path:
    """Raise ``ValueError`` unless a run folder can be created under ``out`` (checked before any
    work, so a run never fails at the end for a read-only output folder). Creates ``out``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise _unwritable(out, "it is not a folder") from None
    except OSError as err:
        raise _unwritable(out, err.strerror or str(err)) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise _unwritable(out, "permission denied")
    return out


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Raise ``ValueError`` unless the file ``path`` can be written at the end of a run (not a
    folder; its folder can be created and written), checked before any work. Creates the
    folder."""
    path = Path(path)
    if path.is_dir():
        raise checks.bad(flag, str(path), "it is a folder: name a file for the results")
    try:
        check_writable(path.parent if str(path.parent) else ".")
    except ValueError as err:
        raise ValueError(f"{flag} {str(path)!r} cannot be written: {err}") from None
    return path


def given_options(parser: Any, argv: Sequence[str] | None) -> set[str]:
    """The ``dest`` of every option written on the command line ``argv`` (``sys.argv[1:]`` when
    None), abbreviations and ``--opt=value`` included: what ``--quick`` must not replace."""
    argv = sys.argv[1:] if argv is None else argv
    dests = set()
    for arg in argv:
        if not arg.startswith("-") or arg == "--":
            continue
        name = arg.split("=", 1)[0]
        matches = [
            action
            for option, action in parser._option_string_actions.items()
            if option == name or (name.startswith("--") and option.startswith(name))
        ]
        exact = [a for o, a in parser._option_string_actions.items() if o == name]
        for action in exact or matches:
            dests.add(action.dest)
    return dests


def git_info() -> dict[str, Any]:
    """``{"git_sha": ..., "git_dirty": ...}`` of this repository (None where git is unavailable)."""
    return runrecord.git_info(REPO)


def git_sha() -> str:
    """``<sha>`` or ``<sha>+dirty`` of this repository (``unknown`` without git)."""
    return runrecord.git_sha(REPO)


cpu_model = runrecord.cpu_model


def environment() -> dict[str, Any]:
    """Versions (python, torch, numpy, gcflows), platform, CPU count, device and host."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "versions": runrecord.versions(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "hostname": socket.gethostname(),
    }


def jsonable(obj: Any, where: str = "results") -> Any:
    """A JSON-ready copy of ``obj``; raises ``TypeError`` on an object it does not know.

    Known: ``None``, ``bool``, ``int``, ``str``; floats (non-finite ones become ``None``);
    mappings (keys made ``str``); lists, tuples and sets; objects with an ``as_dict()`` method
    (e.g. :class:`gcflows.stats.Interval` and the result types of gcflows); other dataclasses
    (field by field); torch tensors and numpy arrays / scalars (as lists / numbers); paths
    (``str``). Anything else (a module, a model, a function, ...) is an error naming its type and
    where it sits (``where``, e.g. ``results.theorem1.gaps[3]``): its ``repr`` is never written.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    as_dict = getattr(obj, "as_dict", None)
    if callable(as_dict) and not isinstance(obj, type):
        return jsonable(as_dict(), where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: jsonable(getattr(obj, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, (np.generic, np.ndarray)):
        return jsonable(obj.tolist(), where)
    if _is_tensor(obj):
        return jsonable(obj.detach().cpu().tolist(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which gcflows.records "
        "does not know how to write as JSON: convert it to numbers, lists or dicts, or give its "
        "class an as_dict() method"
    )


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.is_tensor(obj)


def write_config(run_dir: str | os.PathLike, args: Any, seed: int | Sequence[int], **extra) -> Path:
    """Write ``config.json`` (atomically): arguments, seed(s), command, git SHA, versions, device,
    start time."""
    argd = vars(args) if hasattr(args, "__dict__") else dict(args)
    record = {
        "args": jsonable(argd),
        "seed": jsonable(seed),
        "command": [sys.executable, *sys.argv],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **git_info(),
        **environment(),
        **jsonable(extra),
    }
    return write_config_record(run_dir, record)


def write_config_record(
    run_dir: str | os.PathLike, record: Mapping[str, Any], resumed_at: int | None = None
) -> Path:
    """The one writer of ``config.json`` (of the scripts and of ``gcflows.training``), atomic.
    When a run resumes (``resumed_at``: the step it continues from), the first record is kept
    and a ``resumes`` entry (step, start time, git SHA of this segment) is appended."""
    path = Path(run_dir) / "config.json"
    record = dict(record)
    if resumed_at is not None and path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        if not isinstance(previous, dict):
            previous = {}
        resumes = list(previous.get("resumes", []))
        resumes.append(
            {"step": resumed_at, "started": record.get("started"), "git_sha": record.get("git_sha")}
        )
        record = {**(previous or record), "resumes": resumes}
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return path


def write_results(
    run_dir: str | os.PathLike,
    results: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] = (),
    *,
    json_name: str = "results.json",
    csv_name: str = "results.csv",
) -> tuple[Path, Path]:
    """Write ``results.json`` (the nested dict) and ``results.csv`` (one line per row; columns =
    the union of the rows' keys in first-seen order), each atomically
    (:func:`gcflows.atomic.atomic_write`: a crash leaves the old file or the new one). Returns
    both paths."""
    run_dir = Path(run_dir)
    jpath = run_dir / json_name
    text = json.dumps(jsonable(results), indent=2, allow_nan=False) + "\n"
    cpath = run_dir / csv_name
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for i, row in enumerate(rows):
        writer.writerow({k: jsonable(v, f"{csv_name}[{i}].{k}") for k, v in row.items()})
    atomic_write_bytes(jpath, text.encode())  # both built first: a bad value writes neither
    atomic_write_bytes(cpath, buffer.getvalue().encode())
    return jpath, cpath


def format_value(value: Any, digits: int = 4) -> str:
    """Floats with ``digits`` significant digits, everything else ``str``."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    if value is None:
        return "-"
    return str(value)


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    title: str = "",
    digits: int = 4,
    file=None,
) -> str:
    """Print ``rows`` as an aligned text table (columns default to the union of keys); return it."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    cells = [[format_value(row.get(c), digits) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells)
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text
