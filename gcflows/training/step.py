"""The training step: data draw -> coupling + loss -> optimiser -> EMA (docs/paper.md section 2).

:func:`train_step` is one optimiser step on a :class:`TrainState`; the pieces it uses are built
here too: the objective from the config (:func:`make_objective`, which hands ``config.objective``
whole to the discrete or continuous objective; a new method is added in one place,
``gcflows.consistency.register_method``), the optimiser (:func:`build_optimizer`), the EMA
(:func:`make_ema` / :func:`update_ema`: :class:`gcflows.ema.EMA`, the one EMA), the training view
of a model without its per-call input checks (:func:`without_input_checks`) and the learning rate
(:func:`lr_at`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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
    "without_input_checks",
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


def make_ema(model: nn.Module, decay: float, *, warmup: bool = False, every: int = 1) -> EMA:
    """The EMA of ``model`` (:class:`gcflows.ema.EMA`, kept in eval mode: no dropout in the GC
    model): with ``warmup`` the authors' rule (warm-up decay ``min(decay, 1 - (1 + k)^(-2/3))``,
    the network copied at the first two updates), else a plain EMA (the network copied at the first
    update, then the constant ``decay``); averaged every ``every`` steps (docs/paper.md section
    5.3). It offers ``.module``, ``state_dict`` / ``load_state_dict`` and :func:`update_ema`."""
    return EMA(model, beta=decay, update_every=every, warmup=warmup)


def update_ema(ema: EMA, model: nn.Module, step: int) -> None:
    """Fold the online weights into the EMA after optimiser step ``step`` (1-based; the EMA counts
    the 0-based step ``step - 1``, so its first update copies the network)."""
    ema.update(model, step - 1)


def without_input_checks(model: nn.Module) -> nn.Module:
    """What the training step calls in place of ``model``: ``model`` itself, or, for a model with
    ``check_inputs`` on (``ConsistencyModel``: a per-call time-domain check with a host sync), a
    shallow copy with the check off that shares its parameters, buffers and submodules (training
    and updates act on ``model``). The loop draws every time from the grid, checked against the
    model's process once at set-up; ``model`` itself keeps its checks for callbacks and callers.
    A model compiled with ``model.compile()`` is returned as it is (a copy would not be
    compiled)."""
    if getattr(model, "check_inputs", None) is not True:
        return model
    if getattr(model, "_compiled_call_impl", None) is not None:
        return model
    view = copy.copy(model)
    view.check_inputs = False
    return view


def lr_at(config: TrainConfig, k: int) -> float:
    """Learning rate of the 0-based step k: linear warm-up over ``warmup_steps``, then constant."""
    if config.warmup_steps > 0:
        return config.lr * min(1.0, (k + 1) / config.warmup_steps)
    return config.lr


@dataclass
class TrainState:
    """Everything one step reads or advances. ``net`` is what the loss calls
    (:func:`without_input_checks` of ``model``, or its DDP wrapper); ``gc_model`` the network
    that produces GC pairs (the EMA's, also without input checks, or a frozen one; None unless
    GC); ``step`` counts completed optimiser steps."""

    config: TrainConfig
    model: nn.Module
    net: nn.Module
    ema: EMA
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
