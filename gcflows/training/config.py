"""The configuration of a training run: :class:`TrainConfig` and its fingerprint.

``TrainConfig`` is validated once, at construction (a bad field raises ``ValueError`` naming the
field, its value and the fix, before any work); its objective fields are the
:class:`gcflows.consistency.ObjectiveConfig` that the loss receives whole (``config.objective``).
A checkpoint stores ``to_dict()``; ``from_dict`` reads it back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gcflows.checks import bad, choice, integer, is_int, is_real, real
from gcflows.consistency import CD_STEPS, DISTANCES, METHODS, ContinuousConfig, ObjectiveConfig

__all__ = [
    "TrainConfig",
    "config_fingerprint",
    "fingerprint_fields",
    "METHODS",
    "DISTANCES",
    "CD_STEPS",
    "OPTIMIZERS",
    "PROCESS_NAMES",
    "PROCESS_DEFAULTS",
    "DATA_SAMPLING",
    "FINGERPRINT_FIELDS",
    "RUN_ONLY",
]

OPTIMIZERS = ("adam", "radam", "lion")
PROCESS_NAMES = ("ve", "linear")
DATA_SAMPLING = ("epoch", "replacement")
PROCESS_DEFAULTS = {"ve": (0.002, 80.0), "linear": (1e-3, 0.999)}
# Config fields that define the problem and the model: a checkpoint written under other values of
# these cannot be resumed (its weights or optimiser state do not fit, or it trains something else).
FINGERPRINT_FIELDS = (
    "preset",
    "model",
    "data_shape",
    "method",
    "continuous",
    "process",
    "t_min",
    "t_max",
    "optimizer",
)
# Fields that do not change the trajectory of a run (no warning when they change on resume).
RUN_ONLY = (
    "out_dir",
    "progress",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "sample_count",
)
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
_OWNER = "TrainConfig"


@dataclass
class TrainConfig:
    """Everything that defines a training run; validated at construction.

    Objective (docs/paper.md section 2; handed to the loss as ``config.objective``): ``method``
    ct | cd | ot | gc; ``mu`` = probability that a sample is generator-induced (GC only, in
    [0, 1]); ``process`` ve | linear on ``[t_min, t_max]`` (``None``: the process default, ve
    0.002..80, linear 1e-3..0.999); ``distance`` pseudo_huber | pseudo_huber_elementwise |
    squared_l2 | l2_norm; the iCT curriculum ``s0 <= s1``; lognormal index sampling ``p_mean``,
    ``p_std``; Karras ``rho``; ``cd_step`` euler | heun (CD only). ``continuous=True`` trains the
    same method in continuous time (:class:`gcflows.continuous.ContinuousObjective`, docs/theory.md
    section 6: times drawn from the lognormal of ``p_mean`` / ``p_std``, no grid, no curriculum)
    with sCM's stabilizers ``tangent_norm`` (``c`` of ``g / (||g|| + c)``; None = off) and
    ``tangent_warmup`` (steps of the tangent warm-up; 0 = none; not the learning-rate
    ``warmup_steps``), which travel as the objective's ``ContinuousConfig``
    (``config.objective.continuous``); it needs a distance with alpha = 2. ``method`` may be any
    method registered with ``gcflows.consistency.register_method``.

    Optimisation: ``batch_size`` (per process under DDP), ``total_steps``, ``lr``, ``optimizer``
    adam | radam | lion, ``betas`` (``None``: the optimiser's default), ``weight_decay``,
    ``warmup_steps`` (linear warm-up of the learning rate, 0 = none), ``grad_clip`` (max global
    gradient norm, 0 = none), ``ema_decay`` in [0, 1); ``ema_warmup`` (the authors' warm-up decay
    ``min(ema_decay, 1 - (1 + k)^(-2/3))``, :mod:`gcflows.ema`) and ``ema_every`` (average every
    ``ema_every`` steps; the authors use 5). ``ema_warmup=False, ema_every=1`` is a plain EMA.

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
    continuous: bool = False
    tangent_norm: float | None = 0.1
    tangent_warmup: int = 0
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
    ema_warmup: bool = False
    ema_every: int = 1
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
        self._check_process()
        integer(self.total_steps, "total_steps", lo=1, fix="use total_steps >= 1", where=_OWNER)
        self._check_continuous()
        objective = self.objective  # validates method, mu, distance, s0 / s1, p_*, rho, cd_step
        for name in ("mu", "s0", "s1", "p_mean", "p_std", "rho", "total_steps"):
            setattr(self, name, getattr(objective, name))
        self._check_optimisation()
        self._check_record()
        self._check_run()

    @property
    def objective(self) -> ObjectiveConfig:
        """The objective's settings (an :class:`ObjectiveConfig` that validates itself; its error
        messages name ``TrainConfig.<field>``), with ``continuous`` set (``tangent_norm``,
        ``tangent_warmup``) when ``self.continuous``: ``training.make_objective`` hands it whole
        to the discrete or the continuous objective."""
        return ObjectiveConfig(
            method=self.method,
            mu=self.mu,
            distance=self.distance,
            s0=self.s0,
            s1=self.s1,
            total_steps=self.total_steps,
            p_mean=self.p_mean,
            p_std=self.p_std,
            rho=self.rho,
            cd_step=self.cd_step,
            continuous=self._continuous_config() if self.continuous else None,
            owner=_OWNER,
        )

    def _continuous_config(self) -> ContinuousConfig:
        return ContinuousConfig(
            tangent_norm=self.tangent_norm, tangent_warmup=self.tangent_warmup, owner=_OWNER
        )

    # --- validation, one group of fields each -----------------------------------------------------
    def _real(self, name: str, fix: str, **bounds: float) -> None:
        setattr(self, name, real(getattr(self, name), name, fix=fix, where=_OWNER, **bounds))

    def _int(self, name: str, lo: int, fix: str) -> None:
        setattr(self, name, integer(getattr(self, name), name, lo=lo, fix=fix, where=_OWNER))

    def _check_process(self) -> None:
        choice(self.process, "process", PROCESS_NAMES, _OWNER)
        lo, hi = PROCESS_DEFAULTS[self.process]
        self.t_min = lo if self.t_min is None else self.t_min
        self.t_max = hi if self.t_max is None else self.t_max
        self._real("t_min", "use a positive, finite t_min", lo_open=0.0)
        self._real("t_max", "use a positive, finite t_max", lo_open=0.0)
        if not self.t_min < self.t_max:
            fix = f"need t_min < t_max (t_max={self.t_max}); data sits at t_min"
            raise bad("t_min", self.t_min, fix, _OWNER)
        if self.process == "linear" and self.t_max >= 1.0:
            raise bad("t_max", self.t_max, "the linear process needs t_max < 1", _OWNER)

    def _check_continuous(self) -> None:
        if not isinstance(self.continuous, bool):
            raise bad("continuous", self.continuous, "use True or False", _OWNER)
        sub = self._continuous_config()  # validates tangent_norm, tangent_warmup
        self.tangent_norm, self.tangent_warmup = sub.tangent_norm, sub.tangent_warmup
        if self.continuous and self.distance == "l2_norm":
            fix = "continuous time needs a distance with alpha = 2 (pseudo_huber, squared_l2)"
            raise bad("distance", self.distance, fix, _OWNER)

    def _check_optimisation(self) -> None:
        self._int("batch_size", 1, "use batch_size >= 1")
        self._real("lr", "use a positive, finite learning rate", lo_open=0.0)
        choice(self.optimizer, "optimizer", OPTIMIZERS, _OWNER)
        if self.betas is not None:
            betas = tuple(self.betas)
            if len(betas) != 2 or not all(is_real(b) and 0.0 <= b < 1.0 for b in betas):
                fix = "use two numbers in [0, 1), or None for defaults"
                raise bad("betas", self.betas, fix, _OWNER)
            self.betas = (float(betas[0]), float(betas[1]))
        self._real("weight_decay", "use weight_decay >= 0", lo=0.0)
        self._int("warmup_steps", 0, "use warmup_steps >= 0 (0 = no warm-up)")
        self._real("grad_clip", "use grad_clip >= 0 (0 = no clipping)", lo=0.0)
        self._real("ema_decay", "use a decay in [0, 1) (e.g. 0.999, 0.9999)", lo=0.0, hi_open=1.0)
        if not isinstance(self.ema_warmup, bool):
            raise bad("ema_warmup", self.ema_warmup, "use True or False", _OWNER)
        self._int("ema_every", 1, "use ema_every >= 1 (1 = every step; the authors use 5)")

    def _check_record(self) -> None:
        if not isinstance(self.preset, str):
            raise bad("preset", self.preset, "use a string (a preset name, or '')", _OWNER)
        if not isinstance(self.model, dict):
            fix = "use a dict describing the model (e.g. its kwargs)"
            raise bad("model", self.model, fix, _OWNER)
        try:
            self.model = json.loads(json.dumps(self.model, sort_keys=True))
        except (TypeError, ValueError) as err:
            raise bad("model", self.model, f"must be JSON-serialisable ({err})", _OWNER) from None
        self._real("dropout", "use a dropout rate in [0, 1)", lo=0.0, hi_open=1.0)
        if self.data_shape is not None:
            shape = tuple(self.data_shape)
            if not shape or not all(is_int(s) and s >= 1 for s in shape):
                fix = "use a tuple of positive ints, e.g. (2,) or None"
                raise bad("data_shape", self.data_shape, fix, _OWNER)
            self.data_shape = tuple(int(s) for s in shape)

    def _check_run(self) -> None:
        choice(self.data_sampling, "data_sampling", DATA_SAMPLING, _OWNER)
        self._int("seed", 0, "use a non-negative integer seed")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise bad("device", self.device, "use 'cpu', 'cuda', 'cuda:N' or 'auto'", _OWNER)
        if self.out_dir is not None:
            if not isinstance(self.out_dir, (str, os.PathLike)) or not str(self.out_dir):
                fix = "use a folder path, or None to write nothing"
                raise bad("out_dir", self.out_dir, fix, _OWNER)
            self.out_dir = str(self.out_dir)
        self._int("checkpoint_every", 0, "use checkpoint_every >= 0 (0 = at the end)")
        self._int("log_every", 1, "use log_every >= 1")
        self._int("sample_every", 0, "use sample_every >= 0 (0 = never)")
        self._int("sample_count", 1, "use sample_count >= 1")
        for name in ("keep_checkpoints", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, getattr(self, name), "use True or False", _OWNER)

    # --- serialisation --------------------------------------------------------------------------
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


def fingerprint_fields(config: TrainConfig, data_shape: Sequence[int] | None) -> dict[str, Any]:
    """The ``FINGERPRINT_FIELDS`` of ``config`` (``data_shape`` from the data when given)."""
    d = config.to_dict()
    fields = {k: d[k] for k in FINGERPRINT_FIELDS}
    fields["data_shape"] = list(data_shape) if data_shape is not None else d["data_shape"]
    return fields


def model_signature(model: nn.Module) -> list[list[Any]]:
    """``[name, shape, dtype]`` of every entry of the model's state dict."""
    return [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]


def config_fingerprint(
    config: TrainConfig, data_shape: Sequence[int] | None = None, model: nn.Module | None = None
) -> str:
    """SHA-256 of the fields that define the problem and the model (``FINGERPRINT_FIELDS``), the
    data shape and, if given, the model's parameter names / shapes / dtypes."""
    payload: dict[str, Any] = {"fields": fingerprint_fields(config, data_shape)}
    if model is not None:
        payload["model_signature"] = model_signature(model)
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
