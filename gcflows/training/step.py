"""The training step: data draw -> coupling + loss -> optimiser -> EMA (docs/paper.md section 2).

:func:`train_step` is one optimiser step on a :class:`TrainState`; the pieces it uses are built
here too: the objective from the config (:func:`make_objective`, which hands ``config.objective``
whole to the discrete or continuous objective; a new method is added in one place,
``gcflows.consistency.register_method``), the optimiser (:func:`build_optimizer`), the EMA
(:func:`make_ema` / :func:`update_ema`, the one place another EMA class is wired in) and the
learning rate (:func:`lr_at`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gcflows.consistency import ConsistencyObjective, LossOutput
from gcflows.continuous import ContinuousObjective
from gcflows.ema import EMA
from gcflows.processes import Process
from gcflows.training.batches import DataSource
from gcflows.training.config import OPTIMIZERS, TrainConfig
from gcflows.training.distributed import all_sum, distributed_ot_coupling

__all__ = [
    "TrainState",
    "StepOutput",
    "train_step",
    "make_objective",
    "build_optimizer",
    "make_ema",
    "update_ema",
    "lr_at",
    "step_metrics",
]


def make_objective(
    config: TrainConfig, process: Process, velocity: Any, world: int
) -> ConsistencyObjective | ContinuousObjective:
    """The loss of ``config.method``, given ``config.objective`` whole: in discrete time, or in
    continuous time with ``config.continuous`` (the config then carries its continuous
    sub-config). Under DDP the batch-OT coupling is solved over the global batch. Both are called
    as ``objective(net, data, k, generator=, gc_model=, validate=)``. A new method is added in one
    place, ``gcflows.consistency.register_method``: both objectives dispatch on the registry."""
    cls = ContinuousObjective if config.continuous else ConsistencyObjective
    return cls(
        process,
        config.objective,
        velocity=velocity,
        ot_coupling_fn=distributed_ot_coupling if world > 1 else None,
    )


def build_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """Adam / RAdam (``torch.optim``) or Lion (``lion_pytorch``) with ``config.lr``, ``betas``
    (the optimiser's default when ``None``) and ``weight_decay``."""
    kw: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.betas is not None:
        kw["betas"] = tuple(config.betas)
    if config.optimizer in ("adam", "radam"):
        # foreach=True: one multi-tensor kernel per update instead of ~10 per parameter tensor
        # (torch picks it only on CUDA by default; on the CPU the per-tensor loop dominated the
        # step of a small network). The same arithmetic: the final weights are bitwise equal
        # (tests/test_training.py).
        cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.RAdam
        return cls(params, foreach=True, **kw)
    if config.optimizer == "lion":
        from lion_pytorch import Lion  # imported here: it is slow to import and only Lion needs it

        return Lion(params, **kw)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {config.optimizer!r}")


def make_ema(
    model: nn.Module, decay: float, *, warmup: bool = False, every: int = 1
) -> AveragedModel | EMA:
    """EMA of ``model``, kept in eval mode (no dropout in the GC model).

    ``warmup=False, every=1``: a plain EMA of parameters and buffers (``AveragedModel`` with
    ``get_ema_multi_avg_fn(decay)``). Otherwise :class:`gcflows.ema.EMA`: the authors' warm-up
    decay ``min(decay, 1 - (1 + k)^(-2/3))`` (or the constant ``decay``), averaged every ``every``
    steps (docs/paper.md section 5). Both offer ``.module``, ``state_dict`` / ``load_state_dict``
    (keys ``module.*``) and :func:`update_ema`."""
    if warmup or every > 1:
        return EMA(model, beta=decay, update_every=every, warmup=warmup)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.eval()
    ema.requires_grad_(False)
    ema.gcflows_decay = float(decay)  # read by update_ema's fast path
    return ema


# update_ema's fast-path tensor lists per EMA, outside the module so that a deepcopy or pickle of
# an EMA never carries lists that point at another model's tensors
_EMA_PAIRS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ema_pairs(ema: AveragedModel, model: nn.Module) -> tuple[list, list] | None:
    """The (EMA, online) tensor lists of ``update_ema``'s fast path, cached per ``(ema, model)``
    (the Parameter objects survive ``.to()`` and ``load_state_dict``); None when the fast path
    does not apply (mixed devices or dtypes, non-float buffers), which then takes
    ``AveragedModel.update_parameters``."""
    cached = _EMA_PAIRS.get(ema)
    if cached is not None and cached[0]() is model:
        return cached[1]
    mine = [*ema.module.parameters(), *ema.module.buffers()]
    theirs = [*model.parameters(), *model.buffers()]
    kinds = {(t.device, t.dtype) for t in mine + theirs}
    ok = len(mine) == len(theirs) and len(kinds) == 1 and mine and mine[0].is_floating_point()
    pairs = (mine, theirs) if ok else None
    _EMA_PAIRS[ema] = (weakref.ref(model), pairs)
    return pairs


def update_ema(ema: AveragedModel | EMA, model: nn.Module, step: int) -> None:
    """Fold the online weights into the EMA after optimiser step ``step`` (1-based; the warm-up
    EMA counts the 0-based step ``step - 1``, so its first update copies the network)."""
    if isinstance(ema, EMA):
        ema.update(model, step - 1)
        return
    decay = getattr(ema, "gcflows_decay", None)
    pairs = _ema_pairs(ema, model) if decay is not None else None
    if pairs is None or int(ema.n_averaged) == 0:
        ema.update_parameters(model)
        return
    # AveragedModel's EMA update (one foreach lerp with weight 1 - decay) without its per-step
    # walk over both modules: bitwise the same averages (tests/test_training.py)
    with torch.no_grad():
        torch._foreach_lerp_(pairs[0], pairs[1], 1.0 - decay)
    ema.n_averaged += 1


def lr_at(config: TrainConfig, k: int) -> float:
    """Learning rate of the 0-based step k: linear warm-up over ``warmup_steps``, then constant."""
    if config.warmup_steps > 0:
        return config.lr * min(1.0, (k + 1) / config.warmup_steps)
    return config.lr


@dataclass
class TrainState:
    """Everything one step reads or advances. ``net`` is what the loss calls (``model`` or its
    DDP wrapper); ``gc_model`` the network that produces GC pairs (EMA or frozen; None unless
    GC); ``step`` counts completed optimiser steps."""

    config: TrainConfig
    model: nn.Module
    net: nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    objective: ConsistencyObjective | ContinuousObjective
    source: DataSource
    data_gen: torch.Generator
    noise_gen: torch.Generator
    gc_model: Callable | None
    world: int
    step: int = 0


@dataclass
class StepOutput:
    """What a step produced: the loss output, the loss averaged over the ranks, the learning rate,
    and ``bad`` (what was not finite; then nothing was updated)."""

    out: LossOutput | None
    loss: float
    lr: float
    bad: str | None = None


def train_step(s: TrainState) -> StepOutput:
    """One optimiser step at the 0-based index ``k = s.step`` (the iCT curriculum index).

    A NaN / inf data batch or loss (the same decision on every rank) returns ``bad`` before any
    weight, optimiser or EMA state changes."""
    k = s.step
    lr = lr_at(s.config, k)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    data = s.source.draw(s.config.batch_size, s.data_gen)
    if bool(all_sum((~torch.isfinite(data)).any().double(), s.world)):
        return StepOutput(None, math.nan, lr, "a data batch with NaN / inf")
    # the batch was checked above (on every rank): the objective checks nothing again
    out = s.objective(s.net, data, k, generator=s.noise_gen, gc_model=s.gc_model, validate=False)
    loss_sum = float(all_sum(out.loss.detach().double(), s.world))
    if not math.isfinite(loss_sum):
        return StepOutput(out, loss_sum, lr, f"a non-finite loss ({loss_sum})")
    s.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if s.config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.config.grad_clip)
    s.optimizer.step()
    update_ema(s.ema, s.model, k + 1)
    s.step = k + 1
    return StepOutput(out, loss_sum / s.world, lr)


def step_metrics(res: StepOutput, step: int, world: int) -> dict[str, Any]:
    """The metrics.jsonl record of a step: loss, lr, N, mean pair cost, GC fraction (rank means)."""
    diag = res.out.diagnostics
    zero = torch.zeros((), dtype=torch.float64)
    pair, gc = diag.get("pair_cost"), diag.get("gc_mask")
    vals = torch.stack(
        [
            pair.detach().double().mean() if pair is not None else zero,
            gc.double().mean() if gc is not None else zero,
        ]
    )
    if world > 1:
        vals = all_sum(vals.to(res.out.loss.device), world) / world
    pair_mean, gc_frac = vals.tolist()
    return {
        "step": step,
        "loss": res.loss,
        "lr": res.lr,
        "N": int(res.out.num_intervals),
        "pair_cost": pair_mean,
        "gc_fraction": gc_frac,
    }
