"""Training loop for consistency models: CT, CD, batch-OT and GC (PAPER.md section 2).

One loop serves the toy (2D) and the image experiments. The loss of every step is
:class:`gcflows.consistency.ConsistencyObjective` (CT Eq. 6, CD Eq. 4-5, batch-OT, GC Eq. 13-15 with
the per-sample mixing of Eq. 21); this module adds what a run needs around it:

- :class:`TrainConfig`, a dataclass validated at construction (a bad field raises ``ValueError``
  naming the field and the fix, before any work), with a JSON round trip (``to_dict`` /
  ``from_dict``);
- the optimiser (Adam, RAdam from ``torch.optim``; Lion from ``lion_pytorch``), an optional linear
  learning-rate warm-up and gradient clipping;
- the EMA of the weights through ``torch.optim.swa_utils.AveragedModel`` with
  ``get_ema_multi_avg_fn(decay)`` (``use_buffers=True``); the EMA model is the GC generator
  (PAPER.md section 5: "the EMA model as GC generator") unless a frozen generator is passed;
- a run folder: ``config.json`` (config, seed, git SHA, versions, device, hostname, world size),
  ``metrics.jsonl`` (step, loss, lr, N, mean pair cost, GC fraction, time), ``checkpoint.pt``
  (model, EMA, optimiser, step, every RNG state, config), one-step samples of the EMA model in
  ``samples/``; a tqdm progress bar;
- checkpoints written atomically (temporary file in the same folder, fsync, ``os.replace``), so a
  crash mid-write leaves the previous checkpoint intact; exact resume (a run of K steps and a run
  stopped at K/2 and resumed agree bit for bit on CPU); a corrupt checkpoint or one written by a
  different configuration raises ``ValueError`` before training;
- a NaN / inf loss (or data batch) stops the run with :class:`NonFiniteLossError` (a
  ``FloatingPointError``) naming the step, before the bad step touches the weights; the last
  checkpoint is left as it was;
- DDP under ``torchrun`` (gloo on CPU, nccl on CUDA): per-rank data / noise generators seeded by
  ``(seed, rank)``, and the batch-OT coupling solved over the *global* batch
  (:func:`distributed_ot_coupling`: all_gather, one solve on rank 0, broadcast of the permutation,
  each rank keeps its rows). Metrics, samples and checkpoints are written by rank 0 only; the
  checkpoint holds the RNG states of every rank. The run folder must be visible to every rank
  (one node: always).

Randomness: the data generator (CPU), the noise generator (on the training device: noise, interval
indices, GC mask) and the global RNGs (dropout; python, numpy) are seeded from
``derive_seed(seed, rank, stream)``; :func:`train` hands the caller's global RNG states back when
it returns. Step numbering: ``step`` counts completed optimiser steps (1 .. total_steps); the
objective receives the 0-based index ``step - 1`` for the iCT curriculum, and the ``N`` logged is
the number of grid intervals of that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from gcflows.consistency import CD_STEPS, DISTANCES, METHODS, ConsistencyObjective
from gcflows.couplings import CouplingResult, ot_coupling
from gcflows.data import TensorSampler
from gcflows.processes import get_process
from gcflows.runrecord import git_info, versions
from gcflows.sampling import one_step_sample

__all__ = [
    "TrainConfig",
    "TrainResult",
    "StepInfo",
    "NonFiniteLossError",
    "train",
    "distributed_ot_coupling",
    "build_optimizer",
    "make_ema",
    "config_fingerprint",
    "save_checkpoint",
    "load_checkpoint",
    "load_weights",
    "atomic_write_bytes",
    "derive_seed",
    "METHODS",
    "OPTIMIZERS",
    "DISTANCES",
]

OPTIMIZERS = ("adam", "radam", "lion")
PROCESS_NAMES = ("ve", "linear")
DATA_SAMPLING = ("epoch", "replacement")
PROCESS_DEFAULTS = {"ve": (0.002, 80.0), "linear": (1e-3, 0.999)}
CHECKPOINT_FORMAT = "gcflows-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
# Config fields that define the problem and the model: a checkpoint written under other values of
# these cannot be resumed (its weights or optimiser state do not fit, or it trains something else).
FINGERPRINT_FIELDS = (
    "preset",
    "model",
    "data_shape",
    "method",
    "process",
    "t_min",
    "t_max",
    "optimizer",
)
# Fields that do not change the trajectory of a run (no warning when they change on resume).
_RUN_ONLY = (
    "out_dir",
    "progress",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "sample_count",
)
# Random streams derived from (seed, rank, stream); see derive_seed.
_STREAM_DATA, _STREAM_NOISE, _STREAM_GLOBAL, _STREAM_SAMPLES, _STREAM_SAMPLER = 1, 2, 3, 4, 5
_STATUS_BYTES = 1024  # the solver status travels from rank 0 as a fixed-size byte tensor
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
def _bad(name: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"TrainConfig.{name}={value!r} is invalid: {fix}")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclass
class TrainConfig:
    """Everything that defines a training run; validated at construction.

    Objective (PAPER.md section 2): ``method`` ct | cd | ot | gc; ``mu`` = probability that a sample
    is generator-induced (GC only, in [0, 1]); ``process`` ve | linear on
    ``[t_min, t_max]`` (``None``: the process default, ve 0.002..80, linear 1e-3..0.999);
    ``distance`` pseudo_huber | pseudo_huber_elementwise | squared_l2 | l2_norm; the iCT curriculum
    ``s0 <= s1``; lognormal index sampling ``p_mean``, ``p_std``; Karras ``rho``; ``cd_step``
    euler | heun (CD only).

    Optimisation: ``batch_size`` (per process under DDP), ``total_steps``, ``lr``, ``optimizer``
    adam | radam | lion, ``betas`` (``None``: the optimiser's default), ``weight_decay``,
    ``warmup_steps`` (linear warm-up of the learning rate, 0 = none), ``grad_clip`` (max global
    gradient norm, 0 = none), ``ema_decay`` in [0, 1).

    Record (not used by the loop, part of the checkpoint fingerprint): ``preset`` (a name),
    ``model`` (a JSON dict describing how the caller built the model, e.g. its kwargs), ``dropout``
    (the dropout the caller built the model with), ``data_shape`` (checked against the data if set).

    Data: ``data_sampling`` for a tensor data source: ``"epoch"`` (rows without replacement within
    an epoch, per-rank order) or ``"replacement"`` (i.i.d. rows); a sampler function is called as
    given.

    Run: ``seed``, ``device`` cpu | cuda | cuda:N | auto, ``out_dir`` (``None``: write nothing),
    ``checkpoint_every`` (steps; 0 = only at the end), ``keep_checkpoints`` (also keep
    ``checkpoint_<step>.pt`` files), ``log_every``, ``sample_every`` (0 = never; one-step samples of
    the EMA model saved to ``samples/``), ``sample_count``, ``progress`` (tqdm bar on rank 0).
    """

    # objective
    method: str = "ct"
    mu: float = 0.5
    process: str = "ve"
    t_min: float | None = None
    t_max: float | None = None
    distance: str = "pseudo_huber"
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0
    rho: float = 7.0
    cd_step: str = "euler"
    # optimisation
    batch_size: int = 256
    total_steps: int = 10_000
    lr: float = 1e-4
    optimizer: str = "adam"
    betas: tuple[float, float] | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0
    ema_decay: float = 0.999
    # record
    preset: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    dropout: float = 0.0
    data_shape: tuple[int, ...] | None = None
    # run
    data_sampling: str = "epoch"
    seed: int = 0
    device: str = "cpu"
    out_dir: str | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: bool = False
    log_every: int = 100
    sample_every: int = 0
    sample_count: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        self._check_choice("method", METHODS)
        self._check_choice("process", PROCESS_NAMES)
        self._check_choice("distance", DISTANCES)
        self._check_choice("optimizer", OPTIMIZERS)
        self._check_choice("cd_step", CD_STEPS)
        self._check_real("mu", lo=0.0, hi=1.0, fix="mu is a probability: use a value in [0, 1]")
        lo, hi = PROCESS_DEFAULTS[self.process]
        if self.t_min is None:
            self.t_min = lo
        if self.t_max is None:
            self.t_max = hi
        self._check_real("t_min", lo_open=0.0, fix="use a positive, finite t_min")
        self._check_real("t_max", lo_open=0.0, fix="use a positive, finite t_max")
        self.t_min, self.t_max = float(self.t_min), float(self.t_max)
        if not self.t_min < self.t_max:
            raise _bad(
                "t_min",
                self.t_min,
                f"need t_min < t_max (t_max={self.t_max}); data sits at t_min",
            )
        if self.process == "linear" and self.t_max >= 1.0:
            raise _bad("t_max", self.t_max, "the linear process needs t_max < 1")
        self._check_int("s0", lo=1, fix="use a positive number of grid intervals")
        self._check_int("s1", lo=1, fix="use a positive number of grid intervals")
        if self.s0 > self.s1:
            raise _bad("s0", self.s0, f"need s0 <= s1 (s1={self.s1}): s0 is the initial N")
        self._check_real("p_mean", fix="use a finite p_mean")
        self._check_real("p_std", lo_open=0.0, fix="use a positive p_std")
        self._check_real("rho", lo_open=0.0, fix="use a positive rho (7 in the paper)")
        self._check_int("batch_size", lo=1, fix="use batch_size >= 1")
        self._check_int("total_steps", lo=1, fix="use total_steps >= 1")
        self._check_real("lr", lo_open=0.0, fix="use a positive, finite learning rate")
        if self.betas is not None:
            betas = tuple(self.betas)
            if len(betas) != 2 or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas):
                raise _bad("betas", self.betas, "use two numbers in [0, 1), or None for defaults")
            self.betas = (float(betas[0]), float(betas[1]))
        self._check_real("weight_decay", lo=0.0, fix="use weight_decay >= 0")
        self._check_int("warmup_steps", lo=0, fix="use warmup_steps >= 0 (0 = no warm-up)")
        self._check_real("grad_clip", lo=0.0, fix="use grad_clip >= 0 (0 = no clipping)")
        self._check_real(
            "ema_decay", lo=0.0, hi_open=1.0, fix="use a decay in [0, 1) (e.g. 0.999, 0.9999)"
        )
        if not isinstance(self.preset, str):
            raise _bad("preset", self.preset, "use a string (a preset name, or '')")
        if not isinstance(self.model, dict):
            raise _bad("model", self.model, "use a dict describing the model (e.g. its kwargs)")
        try:
            self.model = json.loads(json.dumps(self.model, sort_keys=True))
        except (TypeError, ValueError) as err:
            raise _bad("model", self.model, f"must be JSON-serialisable ({err})") from None
        self._check_real("dropout", lo=0.0, hi_open=1.0, fix="use a dropout rate in [0, 1)")
        if self.data_shape is not None:
            shape = tuple(self.data_shape)
            if not shape or not all(_is_int(s) and s >= 1 for s in shape):
                raise _bad(
                    "data_shape", self.data_shape, "use a tuple of positive ints, e.g. (2,) or None"
                )
            self.data_shape = tuple(int(s) for s in shape)
        self._check_choice("data_sampling", DATA_SAMPLING)
        self._check_int("seed", lo=0, fix="use a non-negative integer seed")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise _bad("device", self.device, "use 'cpu', 'cuda', 'cuda:N' or 'auto'")
        if self.out_dir is not None:
            if not isinstance(self.out_dir, (str, os.PathLike)) or not str(self.out_dir):
                raise _bad("out_dir", self.out_dir, "use a folder path, or None to write nothing")
            self.out_dir = str(self.out_dir)
        self._check_int("checkpoint_every", lo=0, fix="use checkpoint_every >= 0 (0 = at the end)")
        self._check_int("log_every", lo=1, fix="use log_every >= 1")
        self._check_int("sample_every", lo=0, fix="use sample_every >= 0 (0 = never)")
        self._check_int("sample_count", lo=1, fix="use sample_count >= 1")
        for name in ("keep_checkpoints", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "use True or False")

    # --- validation helpers -------------------------------------------------------------------
    def _check_choice(self, name: str, choices: Sequence[str]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise _bad(name, value, f"use one of {list(choices)}")

    def _check_int(self, name: str, *, lo: int, fix: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < lo:
            raise _bad(name, value, fix)
        setattr(self, name, int(value))

    def _check_real(
        self,
        name: str,
        *,
        fix: str,
        lo: float | None = None,
        lo_open: float | None = None,
        hi: float | None = None,
        hi_open: float | None = None,
    ) -> None:
        value = getattr(self, name)
        ok = _is_real(value) and math.isfinite(float(value))
        if ok:
            v = float(value)
            ok = (
                (lo is None or v >= lo)
                and (lo_open is None or v > lo_open)
                and (hi is None or v <= hi)
                and (hi_open is None or v < hi_open)
            )
        if not ok:
            raise _bad(name, value, fix)
        setattr(self, name, float(value))

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists); ``from_dict`` inverts it."""
        out = dataclasses.asdict(self)
        for key in ("betas", "data_shape"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build a config from ``to_dict`` output (e.g. read from config.json); validates it."""
        if not isinstance(d, dict):
            raise ValueError(f"from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown TrainConfig fields {unknown}; remove them (known: {sorted(known)})"
            )
        kw = dict(d)
        for key in ("betas", "data_shape"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _fingerprint_fields(config: TrainConfig, data_shape: Sequence[int] | None) -> dict[str, Any]:
    d = config.to_dict()
    fields = {k: d[k] for k in FINGERPRINT_FIELDS}
    fields["data_shape"] = list(data_shape) if data_shape is not None else d["data_shape"]
    return fields


def _model_signature(model: nn.Module) -> list[list[Any]]:
    return [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]


def config_fingerprint(
    config: TrainConfig, data_shape: Sequence[int] | None = None, model: nn.Module | None = None
) -> str:
    """SHA-256 of the fields that define the problem and the model (``FINGERPRINT_FIELDS``), the
    data shape and, if given, the model's parameter names / shapes / dtypes."""
    payload = {"fields": _fingerprint_fields(config, data_shape)}
    if model is not None:
        payload["model_signature"] = _model_signature(model)
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


# ------------------------------------------------------------------------------------------------
# small pieces: seeds, optimiser, EMA, atomic files
# ------------------------------------------------------------------------------------------------
def derive_seed(seed: int, *words: int) -> int:
    """A well-mixed 63-bit seed from ``(seed, *words)`` (numpy SeedSequence): per-rank streams
    ``(seed, rank, stream)`` that do not overlap for neighbouring seeds or ranks."""
    state = np.random.SeedSequence([int(seed), *map(int, words)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def build_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """Adam / RAdam (``torch.optim``) or Lion (``lion_pytorch``) with ``config.lr``, ``betas``
    (the optimiser's default when ``None``) and ``weight_decay``."""
    kw: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.betas is not None:
        kw["betas"] = tuple(config.betas)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, **kw)
    if config.optimizer == "radam":
        return torch.optim.RAdam(params, **kw)
    if config.optimizer == "lion":
        from lion_pytorch import Lion  # imported here: it is slow to import and only Lion needs it

        return Lion(params, **kw)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {config.optimizer!r}")


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """EMA of ``model`` (parameters and buffers): ``AveragedModel`` with
    ``get_ema_multi_avg_fn(decay)``; kept in eval mode (no dropout in the GC generator)."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.eval()
    ema.requires_grad_(False)
    return ema


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Write through ``write(file)`` into a temporary file in the target folder, fsync it, then
    ``os.replace`` it onto ``path``: readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` by ``data`` (temporary file, fsync, ``os.replace``)."""
    return _atomic_write(path, lambda f: f.write(data))


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """``torch.save(payload)`` to ``path`` atomically; a crash mid-write leaves the old file."""
    return _atomic_write(path, lambda f: torch.save(payload, f))


_REQUIRED_KEYS = ("format", "version", "step", "config", "fingerprint", "model", "ema", "optimizer")


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (``weights_only`` loading: plain tensors and
    containers only). Raises ``ValueError`` if it is missing, unreadable or not a gcflows
    checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; check the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, unpickling errors...
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt or unreadable ({type(err).__name__}: {err}); "
            "delete it or resume from another checkpoint"
        ) from None
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
    """Load the ``"ema"`` (default) or ``"model"`` (online) weights of a checkpoint into ``model``
    (built as for training); returns the model. For evaluation scripts."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
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


# ------------------------------------------------------------------------------------------------
# distributed
# ------------------------------------------------------------------------------------------------
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def distributed_ot_coupling(
    data: Tensor, noise: Tensor, *, solver: str = "lsa", group: Any = None
) -> CouplingResult:
    """Batch-OT coupling of the global batch under DDP (PAPER.md section 2, batch-OT baseline).

    Each rank passes its local ``data``, ``noise`` of the same shape ``(B, *dims)``. The batches of
    all ranks are all-gathered in rank order into ``(W B, *dims)``; rank 0 of ``group`` solves the
    exact assignment with :func:`gcflows.couplings.ot_coupling` and broadcasts the permutation, so
    every rank uses one and the same solution; rank r keeps rows ``r B .. (r + 1) B``: its own data
    and the global noise rows assigned to them. The result equals rows ``r B .. (r + 1) B`` of the
    single-process ``ot_coupling`` of the concatenated batch.

    Returns a :class:`~gcflows.couplings.CouplingResult` whose ``permutation`` ``(B,)`` indexes the
    *global* (all-gathered) noise, ``cost_before`` / ``cost_after`` are means over the global batch
    and ``status`` is rank 0's solver status. Without an initialised process group (or with one
    process) it is ``ot_coupling(data, noise, solver=solver)``.
    """
    if not _dist_on() or dist.get_world_size(group) == 1:
        return ot_coupling(data, noise, solver=solver)
    if data.shape != noise.shape:
        raise ValueError(
            f"data and noise must have the same shape, got {tuple(data.shape)} and "
            f"{tuple(noise.shape)}"
        )
    if data.dim() > 8:
        raise ValueError(f"data may have at most 8 dims, got {data.dim()}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dev = data.device
    # every rank must contribute the same shape, otherwise all_gather hangs or garbles rows
    shape = torch.full((8,), -1, dtype=torch.int64, device=dev)
    shape[: data.dim()] = torch.tensor(data.shape, dtype=torch.int64)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if not all(torch.equal(s, shape) for s in shapes):
        raise ValueError(
            "distributed_ot_coupling needs the same batch shape on every rank, got "
            f"{[s[s >= 0].tolist() for s in shapes]}; use equal per-rank batch sizes"
        )
    data_c, noise_c = data.contiguous(), noise.contiguous()
    all_data = [torch.empty_like(data_c) for _ in range(world)]
    all_noise = [torch.empty_like(noise_c) for _ in range(world)]
    dist.all_gather(all_data, data_c, group=group)
    dist.all_gather(all_noise, noise_c, group=group)
    global_data, global_noise = torch.cat(all_data), torch.cat(all_noise)
    n = global_data.shape[0]
    perm = torch.empty(n, dtype=torch.int64, device=dev)
    stats = torch.zeros(3, dtype=torch.float64, device=dev)
    status = torch.zeros(_STATUS_BYTES, dtype=torch.uint8, device=dev)
    if rank == 0:
        res = ot_coupling(global_data, global_noise, solver=solver)
        if res.permutation is None:
            raise RuntimeError("ot_coupling returned no permutation; cannot split it by rank")
        perm.copy_(res.permutation.to(dev, torch.int64))
        stats.copy_(
            torch.tensor(
                [res.cost_before, res.cost_after, float(res.fell_back)], dtype=torch.float64
            )
        )
        code = res.status.encode()[:_STATUS_BYTES]
        status[: len(code)] = torch.tensor(list(code), dtype=torch.uint8)
    dist.broadcast(perm, src=src, group=group)
    dist.broadcast(stats, src=src, group=group)
    dist.broadcast(status, src=src, group=group)
    b = data.shape[0]
    mine = perm[rank * b : (rank + 1) * b]
    cost_before, cost_after, fell_back = stats.tolist()
    return CouplingResult(
        data=data,
        noise=global_noise[mine],
        permutation=mine,
        plan=None,
        cost_before=cost_before,
        cost_after=cost_after,
        status=bytes(status.cpu().tolist()).rstrip(b"\0").decode(errors="replace"),
        fell_back=bool(fell_back),
        gc_mask=None,
    )


@dataclass(frozen=True)
class _Dist:
    rank: int
    world_size: int
    local_rank: int
    initialized_here: bool


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"TrainConfig.device={name!r} but CUDA is not available; use device='cpu' or 'auto'"
        )
    return torch.device(name)


def _setup_distributed(device: torch.device) -> tuple[_Dist, torch.device]:
    """Join the process group that torchrun describes (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if world > 1 and not _dist_on():
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        here = True
    if _dist_on():
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, here), device
    return _Dist(0, 1, 0, False), device


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
class _Data:
    """Minibatches from a sampler ``fn(batch_size, generator) -> (B, *dims)`` or from a tensor
    ``(N, *dims)``: ``"epoch"`` sampling (rows without replacement within an epoch,
    :class:`gcflows.data.TensorSampler`, its state checkpointed) or ``"replacement"`` (i.i.d.
    indices drawn with the data generator)."""

    def __init__(
        self,
        source: Any,
        device: torch.device,
        dtype: torch.dtype,
        mode: str,
        batch_size: int,
        sampler_seed: int,
    ) -> None:
        self.device, self.dtype = device, dtype
        self.sampler: TensorSampler | None = None
        if torch.is_tensor(source):
            if source.dim() < 2 or source.shape[0] < 1 or not source.is_floating_point():
                raise ValueError(
                    "data_source tensor must be floating point with shape (N, *dims), N >= 1, got "
                    f"{tuple(source.shape)} {source.dtype}"
                )
            if not bool(torch.isfinite(source).all()):
                raise ValueError("data_source tensor contains NaN or inf; clean the data first")
            if mode == "epoch" and batch_size > source.shape[0]:
                raise ValueError(
                    f"TrainConfig.batch_size={batch_size} exceeds the {source.shape[0]} rows of "
                    "the data tensor; lower batch_size or use data_sampling='replacement'"
                )
            self.tensor: Tensor | None = source.to(device=device, dtype=dtype)
            self.fn = None
            self.shape = tuple(source.shape[1:])
            if mode == "epoch":
                gen = torch.Generator().manual_seed(sampler_seed)
                self.sampler = TensorSampler(self.tensor, generator=gen)
        elif callable(source):
            self.tensor, self.fn = None, source
            probe = source(2, torch.Generator().manual_seed(0))
            if not torch.is_tensor(probe) or probe.dim() < 2 or probe.shape[0] != 2:
                raise ValueError(
                    "data_source(batch_size, generator) must return a tensor (batch_size, *dims); "
                    f"for batch_size=2 it returned {getattr(probe, 'shape', type(probe).__name__)}"
                )
            self.shape = tuple(probe.shape[1:])
        else:
            raise ValueError(
                "data_source must be a tensor (N, *dims) or a callable (batch_size, generator) -> "
                f"(batch_size, *dims), got {type(source).__name__}"
            )

    def draw(self, batch: int, generator: torch.Generator) -> Tensor:
        if self.sampler is not None:
            return self.sampler.sample(batch)
        if self.tensor is not None:
            idx = torch.randint(self.tensor.shape[0], (batch,), generator=generator)
            return self.tensor[idx.to(self.device)]
        out = self.fn(batch, generator)
        if not torch.is_tensor(out) or tuple(out.shape) != (batch, *self.shape):
            raise ValueError(
                f"data_source returned shape {tuple(getattr(out, 'shape', ()))}, expected "
                f"{(batch, *self.shape)}"
            )
        return out.to(device=self.device, dtype=self.dtype)

    def state_dict(self) -> dict[str, int] | None:
        return self.sampler.state_dict() if self.sampler is not None else None

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        if self.sampler is not None and state is not None:
            self.sampler.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# run record
# ------------------------------------------------------------------------------------------------
def _run_record(
    config: TrainConfig, device: torch.device, dinfo: _Dist, data_shape: tuple, fp: str, **extra
) -> dict[str, Any]:
    rec = {
        "config": config.to_dict(),
        "seed": config.seed,
        "fingerprint": fp,
        "data_shape": list(data_shape),
        **git_info(),
        "versions": versions(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "hostname": socket.gethostname(),
        "world_size": dinfo.world_size,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rec.update(extra)
    return rec


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# ------------------------------------------------------------------------------------------------
# RNG state
# ------------------------------------------------------------------------------------------------
def _capture_rng(data_gen: torch.Generator, noise_gen: torch.Generator, device: torch.device):
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


def _restore_rng(state: dict, data_gen, noise_gen, device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"].cpu())
    data_gen.set_state(state["data"].cpu())
    noise_gen.set_state(state["noise"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
    """A NaN / inf loss (or data batch) at ``step``; the run stopped before updating the weights,
    and the last checkpoint written (``last_checkpoint``, step ``last_good_step``) is intact."""

    def __init__(self, message: str, step: int, last_checkpoint: str | None, last_good_step: int):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint
        self.last_good_step = last_good_step


@dataclass
class StepInfo:
    """What a callback sees after each optimiser step (on every rank).

    ``metrics`` is the dict written to metrics.jsonl on log steps (else ``None``); ``sample_due``
    is true on ``sample_every`` steps. ``model`` is the online network (unwrapped from DDP) and
    ``ema_model`` the EMA network (eval mode). A callback returning ``True`` stops the run after a
    checkpoint (the same decision must be taken on every rank; it is all-reduced under DDP).
    """

    step: int
    total_steps: int
    loss: float
    metrics: dict[str, Any] | None
    model: nn.Module
    ema_model: nn.Module
    config: TrainConfig
    run_dir: Path | None
    rank: int
    sample_due: bool


@dataclass
class TrainResult:
    """Outcome of :func:`train`: the online ``model`` and ``ema_model`` (unwrapped, on the training
    device), the ``ema`` AveragedModel, the ``optimizer``, the last completed ``step``, the run
    folder, the path of the last checkpoint and the logged metrics (rank 0)."""

    model: nn.Module
    ema_model: nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    step: int
    run_dir: Path | None
    checkpoint: Path | None
    history: list[dict[str, Any]]


def _lr_at(config: TrainConfig, k: int) -> float:
    """Learning rate of the 0-based step k: linear warm-up over ``warmup_steps``, then constant."""
    if config.warmup_steps > 0:
        return config.lr * min(1.0, (k + 1) / config.warmup_steps)
    return config.lr


def _check_resume_compatible(
    ckpt: dict, path: Path, config: TrainConfig, data_shape: tuple, model: nn.Module
) -> None:
    try:
        old = TrainConfig.from_dict(ckpt["config"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"checkpoint {str(path)!r} holds an invalid config ({err})") from None
    fp = config_fingerprint(config, data_shape, model)
    if ckpt["fingerprint"] == fp:
        return
    before = _fingerprint_fields(old, ckpt.get("data_shape"))
    now = _fingerprint_fields(config, data_shape)
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


def train(
    config: TrainConfig,
    model: nn.Module,
    data_source: Tensor | Callable[[int, torch.Generator], Tensor],
    *,
    velocity: Callable[..., Tensor] | None = None,
    gc_model: Callable[[Tensor, Tensor], Tensor] | None = None,
    resume: str | os.PathLike | None = "auto",
    callbacks: Sequence[Callable[[StepInfo], bool | None]] = (),
    stop_after: int | None = None,
) -> TrainResult:
    """Train the consistency model ``model`` (``f(x (B, *dims), t (B,)) -> (B, *dims)``, e.g. a
    :class:`gcflows.consistency.ConsistencyModel`) with the objective ``config.method``.

    data_source: a sampler ``fn(batch_size, generator) -> (batch_size, *dims)`` (e.g. a
        ``GaussianMixture.sample``; called with the per-rank CPU data generator) or a tensor
        ``(N, *dims)`` drawn from i.i.d. with replacement. Batches are cast to the model's dtype.
    velocity: the CD velocity estimator (``method="cd"`` only, required there).
    gc_model: a frozen GC generator ``g(x_t, t) -> data estimate`` (``method="gc"`` only; an
        ``nn.Module`` is moved to the device, put in eval mode and frozen); by default the EMA
        model.
    resume: ``"auto"`` continues from ``out_dir/checkpoint.pt`` if it exists; a path resumes from
        that checkpoint; ``None`` starts fresh and refuses an ``out_dir`` that already holds one.
    callbacks: called after every step with a :class:`StepInfo`; returning True stops the run.
    stop_after: stop (after a checkpoint) once this many steps are done, e.g. to split a run; the
        curriculum still uses ``config.total_steps``.

    Every argument, the data shape and the checkpoint are checked before any file is written.
    Raises :class:`NonFiniteLossError` on a NaN / inf loss or data batch.
    """
    # ---- validation: nothing is written before it passes --------------------------------------
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module f(x, t), got {type(model).__name__}")
    if config.method == "cd" and velocity is None:
        raise ValueError(
            "method='cd' needs a velocity estimator: pass velocity=TrueVelocity(...) or "
            "DistilledVelocity(...) from gcflows.velocity"
        )
    if config.method != "cd" and velocity is not None:
        raise ValueError(f"velocity is only used by method='cd', not {config.method!r}; drop it")
    if gc_model is not None and config.method != "gc":
        raise ValueError(f"gc_model is only used by method='gc', not {config.method!r}; drop it")
    if gc_model is not None and not callable(gc_model):
        raise ValueError("gc_model must be callable as gc_model(x_t, t) -> data estimate")
    if stop_after is not None and (not _is_int(stop_after) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    callbacks = list(callbacks)
    if not all(callable(c) for c in callbacks):
        raise ValueError("callbacks must be callables taking a StepInfo")
    if resume is not None and not isinstance(resume, (str, os.PathLike)):
        raise ValueError(f"resume must be 'auto', a checkpoint path or None, got {resume!r}")
    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters to train")
    dtype = params[0].dtype
    device = _resolve_device(config.device)

    dinfo, device = _setup_distributed(device)
    # the loop seeds the global RNGs (dropout, python, numpy); the caller gets its own back
    saved = _capture_global_rng(device)
    try:
        return _train(
            config,
            model,
            data_source,
            velocity=velocity,
            gc_model=gc_model,
            resume=resume,
            callbacks=callbacks,
            stop_after=stop_after,
            device=device,
            dtype=dtype,
            dinfo=dinfo,
        )
    finally:
        _restore_global_rng(saved, device)
        if dinfo.initialized_here and _dist_on():
            dist.destroy_process_group()


def _capture_global_rng(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _restore_global_rng(saved: tuple, device: torch.device) -> None:
    cpu, cuda, py, npst = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    random.setstate(py)
    np.random.set_state(npst)


def _train(
    config: TrainConfig,
    model: nn.Module,
    data_source: Any,
    *,
    velocity: Any,
    gc_model: Any,
    resume: Any,
    callbacks: list,
    stop_after: int | None,
    device: torch.device,
    dtype: torch.dtype,
    dinfo: _Dist,
) -> TrainResult:
    rank, world = dinfo.rank, dinfo.world_size
    main = rank == 0
    source = _Data(
        data_source,
        device,
        dtype,
        config.data_sampling,
        config.batch_size,
        derive_seed(config.seed, rank, _STREAM_SAMPLER),
    )
    if config.data_shape is not None and tuple(config.data_shape) != source.shape:
        raise ValueError(
            f"TrainConfig.data_shape={config.data_shape} but the data has shape {source.shape}; "
            "fix the config or the data source"
        )
    mproc = getattr(model, "process", None)
    if mproc is not None and hasattr(mproc, "t_min"):
        if (mproc.name, mproc.t_min, mproc.t_max) != (
            config.process,
            config.t_min,
            config.t_max,
        ):
            raise ValueError(
                f"the model was built for the {mproc.name} process on [{mproc.t_min}, "
                f"{mproc.t_max}] but TrainConfig has process={config.process!r} on "
                f"[{config.t_min}, {config.t_max}]; build both from the same values"
            )
    run_dir = Path(config.out_dir) if config.out_dir is not None else None
    latest = run_dir / CHECKPOINT_NAME if run_dir is not None else None

    # ---- which checkpoint to resume from ------------------------------------------------------
    ckpt_path: Path | None = None
    if resume == "auto":
        if latest is not None and latest.exists():
            ckpt_path = latest
    elif resume is None:
        if latest is not None and latest.exists():
            raise ValueError(
                f"{str(run_dir)!r} already holds a run ({CHECKPOINT_NAME}); pass resume='auto' to "
                "continue it, or choose a new out_dir (nothing was overwritten)"
            )
    else:
        ckpt_path = Path(resume)
        if not ckpt_path.is_file():
            raise ValueError(f"resume={str(resume)!r}: no such checkpoint file")

    model.to(device)
    ckpt = None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        _check_resume_compatible(ckpt, ckpt_path, config, source.shape, model)
        if ckpt["step"] > config.total_steps:
            raise ValueError(
                f"checkpoint {str(ckpt_path)!r} is at step {ckpt['step']}, beyond "
                f"total_steps={config.total_steps}; raise total_steps"
            )
        old = TrainConfig.from_dict(ckpt["config"]).to_dict()
        changed = [k for k, v in config.to_dict().items() if old[k] != v and k not in _RUN_ONLY]
        if changed:
            warnings.warn(
                f"resuming {str(ckpt_path)!r} with changed fields {changed}: the run will not "
                "reproduce an uninterrupted one",
                stacklevel=3,
            )
    fp = config_fingerprint(config, source.shape, model)

    process = get_process(config.process, t_min=config.t_min, t_max=config.t_max)
    objective = ConsistencyObjective(
        process,
        config.method,
        distance=config.distance,
        mu=config.mu,
        s0=config.s0,
        s1=config.s1,
        total_steps=config.total_steps,
        p_mean=config.p_mean,
        p_std=config.p_std,
        rho=config.rho,
        velocity=velocity,
        cd_step=config.cd_step,
        ot_coupling_fn=distributed_ot_coupling if world > 1 else None,
    )
    ema = make_ema(model, config.ema_decay)
    optimizer = build_optimizer(config, model.parameters())
    data_gen = torch.Generator().manual_seed(derive_seed(config.seed, rank, _STREAM_DATA))
    noise_gen = torch.Generator(device=device).manual_seed(
        derive_seed(config.seed, rank, _STREAM_NOISE)
    )
    start, elapsed0 = 0, 0.0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ValueError(
                f"checkpoint {str(ckpt_path)!r} does not fit this model / optimiser ({err})"
            ) from None
        start, elapsed0 = int(ckpt["step"]), float(ckpt.get("elapsed", 0.0))
        states = ckpt.get("rng")
        if isinstance(states, list) and len(states) == world:
            _restore_rng(states[rank], data_gen, noise_gen, device)
            source.load_state_dict(states[rank].get("sampler"))
        else:
            warnings.warn(
                f"checkpoint {str(ckpt_path)!r} has RNG states for {len(states or [])} ranks, "
                f"this run has {world}: generators are re-seeded from (seed, rank, step), so the "
                "run is not an exact continuation",
                stacklevel=3,
            )
            _seed_everything(config.seed, rank, data_gen, noise_gen, start)
    else:
        _seed_everything(config.seed, rank, data_gen, noise_gen, 0)

    if isinstance(gc_model, nn.Module):
        gc_model.to(device).eval().requires_grad_(False)
    if gc_model is not None:
        gc_model: Callable | None = gc_model
    else:
        gc_model = ema.module if config.method == "gc" else None
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # the networks here have no running statistics
        )
    model.train()

    # ---- run folder (rank 0) --------------------------------------------------------------------
    metrics_path = run_dir / "metrics.jsonl" if run_dir is not None else None
    if main and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        rec_path = run_dir / "config.json"
        extra = {"gc_generator": "frozen (passed to train)" if gc_model is not None else "ema"}
        record = _run_record(config, device, dinfo, source.shape, fp, **extra)
        if ckpt is not None and rec_path.exists():
            try:
                previous = json.loads(rec_path.read_text())
            except (OSError, ValueError):
                previous = {}
            resumes = list(previous.get("resumes", []))
            resumes.append(
                {"step": start, "started": record["started"], "git_sha": record["git_sha"]}
            )
            record = (
                {**previous, "resumes": resumes} if previous else {**record, "resumes": resumes}
            )
        atomic_write_bytes(rec_path, _json_bytes(record))
        if metrics_path.exists():  # drop lines logged after the checkpoint we continue from
            kept = [
                line for line in metrics_path.read_text().splitlines() if _logged_by(line, start)
            ]
            atomic_write_bytes(metrics_path, "".join(f"{line}\n" for line in kept).encode())
    metrics_file = open(metrics_path, "a") if (main and metrics_path is not None) else None

    end = config.total_steps if stop_after is None else min(config.total_steps, stop_after)
    history: list[dict[str, Any]] = []
    last_ckpt: Path | None = ckpt_path if ckpt is not None else None
    last_ckpt_step = start if ckpt is not None else 0
    step = start
    t0 = time.perf_counter()
    sample_noise_gen = torch.Generator(device=device)
    pbar = tqdm(
        total=config.total_steps,
        initial=start,
        disable=True if (not main or not config.progress) else None,
        dynamic_ncols=True,
        desc=f"{config.method}",
    )

    def write_checkpoint(at: int) -> None:
        nonlocal last_ckpt, last_ckpt_step
        rng = _capture_rng(data_gen, noise_gen, device)
        rng["sampler"] = source.state_dict()
        if world > 1:
            states: list[Any] = [None] * world
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if main and run_dir is not None:
            payload = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "step": at,
                "config": config.to_dict(),
                "fingerprint": fp,
                "data_shape": list(source.shape),
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": states,
                "world_size": world,
                "elapsed": elapsed0 + time.perf_counter() - t0,
            }
            save_checkpoint(latest, payload)
            if config.keep_checkpoints:
                save_checkpoint(run_dir / f"checkpoint_{at:08d}.pt", payload)
        if world > 1:
            dist.barrier()
        last_ckpt, last_ckpt_step = latest, at

    # The loop draws every time from the grid inside [t_min, t_max] (checked against the
    # model's process above), so the per-call time-domain check of ConsistencyModel (a host sync
    # and a dozen small ops per forward pass) is switched off while training and restored after.
    # Callbacks and sample saving see the models with their checks on.
    checked = [m for m in (model, ema.module) if getattr(m, "check_inputs", None) is True]

    def set_checks(flag: bool) -> None:
        for m in checked:
            m.check_inputs = flag

    set_checks(False)
    try:
        while step < end:
            k = step  # 0-based index of this step
            lr = _lr_at(config, k)
            for group in optimizer.param_groups:
                group["lr"] = lr
            data = source.draw(config.batch_size, data_gen)
            # a NaN / inf batch is caught here (the objective would reject it with a ValueError);
            # under DDP every rank takes the same decision
            data_bad = (~torch.isfinite(data)).any().double()
            if world > 1:
                dist.all_reduce(data_bad)
            if bool(data_bad):
                raise _non_finite(k + 1, "a data batch with NaN / inf", last_ckpt, last_ckpt_step)
            out = objective(net, data, k, generator=noise_gen, gc_model=gc_model)
            loss = out.loss
            loss_sum_t = loss.detach().double()
            if world > 1:
                dist.all_reduce(loss_sum_t)
            loss_sum = float(loss_sum_t)
            if not math.isfinite(loss_sum):
                raise _non_finite(
                    k + 1, f"a non-finite loss ({loss_sum})", last_ckpt, last_ckpt_step
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
            step = k + 1
            loss_value = loss_sum / world

            metrics = None
            if step % config.log_every == 0 or step == config.total_steps:
                metrics = _metrics(out, step, k, config, loss_value, lr, world)
                metrics["time"] = elapsed0 + time.perf_counter() - t0
                if main:
                    history.append(metrics)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(metrics) + "\n")
                        metrics_file.flush()
                    pbar.set_postfix(loss=f"{loss_value:.4g}", N=metrics["N"])
            pbar.update(1)
            set_checks(True)
            sample_due = config.sample_every > 0 and (step % config.sample_every == 0)
            if sample_due and main and run_dir is not None:
                _save_samples(
                    ema.module, process, source.shape, config, sample_noise_gen, run_dir, step
                )
            stop = False
            if callbacks:
                info = StepInfo(
                    step=step,
                    total_steps=config.total_steps,
                    loss=loss_value,
                    metrics=metrics,
                    model=model,
                    ema_model=ema.module,
                    config=config,
                    run_dir=run_dir,
                    rank=rank,
                    sample_due=sample_due,
                )
                stop = any([bool(cb(info)) for cb in callbacks])  # every callback runs
                if world > 1:
                    flag = torch.tensor([float(stop)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop = bool(flag.item())
            set_checks(False)
            at_end = stop or step == end
            periodic = config.checkpoint_every > 0 and step % config.checkpoint_every == 0
            if run_dir is not None and (periodic or at_end):
                write_checkpoint(step)
            if stop:
                break
    finally:
        set_checks(True)
        pbar.close()
        if metrics_file is not None:
            metrics_file.close()
    return TrainResult(
        model=model,
        ema_model=ema.module,
        ema=ema,
        optimizer=optimizer,
        step=step,
        run_dir=run_dir,
        checkpoint=last_ckpt if run_dir is not None else None,
        history=history,
    )


def _logged_by(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is complete and was logged at or before ``step``."""
    try:
        rec = json.loads(line)
    except ValueError:  # a line torn by a crash
        return False
    return isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step


def _non_finite(step: int, what: str, last_ckpt: Path | None, last_step: int) -> NonFiniteLossError:
    where = (
        f"checkpoint {str(last_ckpt)!r} (step {last_step}) is intact"
        if last_ckpt is not None
        else "no checkpoint had been written"
    )
    return NonFiniteLossError(
        f"training stopped at step {step}: {what}; the weights were not updated and {where}. "
        "Lower lr, set grad_clip, or check the data",
        step=step,
        last_checkpoint=str(last_ckpt) if last_ckpt is not None else None,
        last_good_step=last_step,
    )


def _seed_everything(seed: int, rank: int, data_gen, noise_gen, step: int) -> None:
    """Seed the per-rank data / noise generators and the global RNGs (dropout, python, numpy)."""
    data_gen.manual_seed(derive_seed(seed, rank, _STREAM_DATA, step))
    noise_gen.manual_seed(derive_seed(seed, rank, _STREAM_NOISE, step))
    glob = derive_seed(seed, rank, _STREAM_GLOBAL, step)
    torch.manual_seed(glob)
    random.seed(glob)
    np.random.seed(glob % 2**32)


def _metrics(out, step: int, k: int, config: TrainConfig, loss: float, lr: float, world: int):
    diag = out.diagnostics
    pair = diag.get("pair_cost")
    gc = diag.get("gc_mask")
    vals = torch.stack(
        [
            pair.detach().double().mean()
            if pair is not None
            else torch.zeros((), dtype=torch.float64),
            gc.double().mean() if gc is not None else torch.zeros((), dtype=torch.float64),
        ]
    )
    if world > 1:
        vals = vals.to(out.loss.device)
        dist.all_reduce(vals)
        vals = vals / world
    pair_mean, gc_frac = vals.tolist()
    return {
        "step": step,
        "loss": loss,
        "lr": lr,
        "N": int(out.num_intervals),
        "pair_cost": pair_mean,
        "gc_fraction": gc_frac,
    }


@torch.no_grad()
def _save_samples(ema_model, process, shape, config, gen, run_dir: Path, step: int) -> None:
    """One-step samples of the EMA model from a fixed noise draw (the same at every save, so
    samples along training are comparable); does not touch the training RNG streams."""
    device = next(ema_model.parameters()).device
    dtype = next(ema_model.parameters()).dtype
    gen.manual_seed(derive_seed(config.seed, 0, _STREAM_SAMPLES))
    noise = torch.randn((config.sample_count, *shape), generator=gen, device=device, dtype=dtype)
    samples = one_step_sample(ema_model, noise, process)
    buf = {"step": step, "samples": samples.cpu()}
    save_checkpoint(run_dir / "samples" / f"step_{step:08d}.pt", buf)
