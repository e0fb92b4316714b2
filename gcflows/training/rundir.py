"""The run folder of a training run (written by rank 0).

- ``config.json``: config, seed, fingerprint, data shape, git SHA, versions, device, hostname,
  world size, command, start time; on resume the first record is kept and a ``resumes`` entry
  (step, time, git SHA) is appended;
- ``metrics.jsonl``: one JSON line per logged step (step, loss, lr, N, mean pair cost, GC
  fraction, time); on resume the lines logged after the checkpoint are dropped;
- ``checkpoint.pt`` / ``checkpoint.prev.pt`` (``gcflows.training.checkpoint``);
- ``samples/step_<step>.pt``: one-step samples of the EMA model from a fixed noise draw;
- ``results.json`` / ``results.csv``: written by the scripts around ``train``.

A folder "holds a run" when any of these files is there (:func:`run_files`); ``train`` never
starts a new run in such a folder unless told to replace it (:func:`clear_run`).
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcflows.atomic import atomic_torch_save, atomic_write_bytes
from gcflows.records import write_config_record
from gcflows.runrecord import git_info, versions
from gcflows.sampling import one_step_sample
from gcflows.training.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME
from gcflows.training.config import TrainConfig
from gcflows.training.rng import STREAM_SAMPLES, derive_seed

__all__ = [
    "RUN_FILES",
    "run_files",
    "clear_run",
    "remove_temporaries",
    "run_record",
    "write_config_json",
    "trim_metrics",
    "save_samples",
]

RUN_FILES = (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    "checkpoint.corrupt.pt",
    "config.json",
    "metrics.jsonl",
    "results.json",
    "results.csv",
)


def run_files(run_dir: Path) -> list[str]:
    """The names of the run files (``RUN_FILES``, ``checkpoint_*.pt``, ``samples/``) in
    ``run_dir``: non-empty when the folder holds a run."""
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    found += sorted(p.name for p in run_dir.glob("checkpoint_*.pt"))
    if (run_dir / "samples").is_dir():
        found.append("samples/")
    return found


def clear_run(run_dir: Path) -> None:
    """Delete the run files of ``run_dir`` (what :func:`run_files` lists); nothing else."""
    for name in run_files(run_dir):
        target = run_dir / name.rstrip("/")
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


def remove_temporaries(run_dir: Path) -> list[str]:
    """Delete the temporary files that a killed atomic write of a run file left in ``run_dir``
    (``.<name>.*.tmp``); returns their names."""
    gone = []
    for name in (*RUN_FILES, "checkpoint_"):
        for tmp in run_dir.glob(f".{name}*.tmp"):
            tmp.unlink(missing_ok=True)
            gone.append(tmp.name)
    return gone


def run_record(config: TrainConfig, **fields: Any) -> dict[str, Any]:
    """The ``config.json`` record of a run (module doc); ``fields`` add or override entries."""
    return {
        "config": config.to_dict(),
        "seed": config.seed,
        **git_info(),
        "versions": versions(),
        "hostname": socket.gethostname(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
    }


def write_config_json(run_dir: Path, record: dict[str, Any], resumed_at: int | None) -> None:
    """Write ``config.json``; when resuming (``resumed_at``: the step continued from) keep the
    existing record and append a ``resumes`` entry (:func:`gcflows.records.write_config_record`,
    the one config.json writer)."""
    write_config_record(run_dir, record, resumed_at)


def _logged_by(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is complete and was logged at or before ``step``."""
    try:
        rec = json.loads(line)
    except ValueError:  # a line torn by a crash
        return False
    return isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step


def trim_metrics(path: Path, step: int) -> None:
    """Drop the metrics.jsonl lines logged after ``step`` (the checkpoint a run continues from)
    and any line torn by a crash."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if _logged_by(line, step)]
        atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


@torch.no_grad()
def save_samples(
    ema_model: nn.Module,
    process: Any,
    shape: tuple,
    config: TrainConfig,
    gen: torch.Generator,
    run_dir: Path,
    step: int,
) -> None:
    """One-step samples of the EMA model from a fixed noise draw (the same at every save, so
    samples along training are comparable) to ``samples/step_<step>.pt``; does not touch the
    training RNG streams."""
    p = next(ema_model.parameters())
    gen.manual_seed(derive_seed(config.seed, 0, STREAM_SAMPLES))
    noise = torch.randn(
        (config.sample_count, *shape), generator=gen, device=p.device, dtype=p.dtype
    )
    samples = one_step_sample(ema_model, noise, process)
    atomic_torch_save(
        run_dir / "samples" / f"step_{step:08d}.pt", {"step": step, "samples": samples.cpu()}
    )
