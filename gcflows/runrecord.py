"""What a run record needs to repeat a number: the commit, the versions, the machine.

Used by ``gcflows.training`` (config.json of every training run) and by the experiment and
benchmark scripts. Standard library plus torch / numpy only, so a benchmark can record itself on
a machine where the rest of gcflows' dependencies are missing.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["git_info", "git_sha", "versions", "cpu_model"]


def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"git_sha": ..., "git_dirty": ...}`` of the repository holding ``path`` (default: this
    package's checkout); both None where git or a repository is unavailable. Untracked files do
    not make a checkout dirty."""
    here = Path(path) if path is not None else Path(__file__).resolve().parent
    info: dict[str, Any] = {"git_sha": None, "git_dirty": None}
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if sha.returncode == 0:
            info["git_sha"] = sha.stdout.strip()
            st = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=10,
            )
            if st.returncode == 0:
                info["git_dirty"] = bool(st.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def git_sha(path: str | os.PathLike | None = None) -> str:
    """The commit as one string, ``<sha>`` or ``<sha>+dirty`` (``unknown`` without git)."""
    info = git_info(path)
    if info["git_sha"] is None:
        return "unknown"
    return info["git_sha"] + ("+dirty" if info["git_dirty"] else "")


def versions() -> dict[str, str | None]:
    """Versions of python, torch, numpy and gcflows."""
    from importlib import metadata

    import numpy as np
    import torch

    try:
        gc_version: str | None = metadata.version("gcflows")
    except metadata.PackageNotFoundError:
        gc_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "gcflows": gc_version,
    }


def cpu_model() -> str:
    """The CPU as ``lscpu`` names it: model, CPU count, family / model, L2 and L3 sizes."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = {}
    for line in out.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return (
        f"{fields.get('Model name', platform.processor())}, {fields.get('CPU(s)', '?')} CPUs "
        f"(family {fields.get('CPU family', '?')} model {fields.get('Model', '?')}), "
        f"L2 {fields.get('L2 cache', '?')}, L3 {fields.get('L3 cache', '?')}"
    )
