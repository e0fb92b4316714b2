"""Random streams of a training run: derived seeds, and the RNG state a checkpoint carries.

Every random draw of a run comes from a stream seeded by ``derive_seed(seed, rank, stream)``:
the data generator (CPU), the noise generator (on the training device: noise, interval indices,
GC mask), the global RNGs (dropout; python, numpy), the sample-saving and the epoch-sampler
streams. A checkpoint stores the state of each (per rank), so a resumed run continues them
exactly.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = [
    "derive_seed",
    "STREAM_DATA",
    "STREAM_NOISE",
    "STREAM_GLOBAL",
    "STREAM_SAMPLES",
    "STREAM_SAMPLER",
    "capture_rng",
    "restore_rng",
    "seed_everything",
    "capture_global_rng",
    "restore_global_rng",
]

STREAM_DATA, STREAM_NOISE, STREAM_GLOBAL, STREAM_SAMPLES, STREAM_SAMPLER = 1, 2, 3, 4, 5


def derive_seed(seed: int, *words: int) -> int:
    """A well-mixed 63-bit seed from ``(seed, *words)`` (numpy SeedSequence): per-rank streams
    ``(seed, rank, stream)`` that do not overlap for neighbouring seeds or ranks."""
    state = np.random.SeedSequence([int(seed), *map(int, words)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def capture_rng(
    data_gen: torch.Generator, noise_gen: torch.Generator, device: torch.device
) -> dict[str, Any]:
    """The state of the run's generators and of the global RNGs (stored in a checkpoint)."""
    py = random.getstate()
    npst = np.random.get_state(legacy=True)
    state = {
        "torch_cpu": torch.get_rng_state(),
        "data": data_gen.get_state(),
        "noise": noise_gen.get_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(
    state: dict[str, Any],
    data_gen: torch.Generator,
    noise_gen: torch.Generator,
    device: torch.device,
) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch_cpu"].cpu())
    data_gen.set_state(state["data"].cpu())
    noise_gen.set_state(state["noise"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def seed_everything(
    seed: int, rank: int, data_gen: torch.Generator, noise_gen: torch.Generator, step: int
) -> None:
    """Seed the per-rank data / noise generators and the global RNGs (dropout, python, numpy)."""
    data_gen.manual_seed(derive_seed(seed, rank, STREAM_DATA, step))
    noise_gen.manual_seed(derive_seed(seed, rank, STREAM_NOISE, step))
    glob = derive_seed(seed, rank, STREAM_GLOBAL, step)
    torch.manual_seed(glob)
    random.seed(glob)
    np.random.seed(glob % 2**32)


def capture_global_rng(device: torch.device) -> tuple:
    """The caller's global RNG states (``train`` hands them back when it returns)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def restore_global_rng(saved: tuple, device: torch.device) -> None:
    """Inverse of :func:`capture_global_rng`."""
    cpu, cuda, py, npst = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    random.setstate(py)
    np.random.set_state(npst)
