"""The training loop :func:`train`: set up (checks, resume, state), then steps, logs, callbacks and
checkpoints until the end, a stop request or a signal.

Step numbering: ``step`` counts completed optimiser steps (1 .. total_steps); the objective
receives the 0-based index ``step - 1`` for the iCT curriculum, and the ``N`` logged is the
number of grid intervals of that step. The loop seeds the global RNGs (dropout, python, numpy)
from the run's seed and hands the caller's states back when it returns. Under ``torchrun`` it joins
the process group when none exists and leaves it again on return (a group the caller created is
used and left alone); it claims ``out_dir`` for its lifetime (docs/reliability.md). Nothing else
global is changed: signal handlers are restored, the thread count is the caller's.

Interrupts: SIGINT / SIGTERM (in the main thread) let the current step finish, write a
checkpoint (when the run has an ``out_dir``) and raise :class:`TrainingInterrupted` (exit code
130 / 143 for scripts); a second signal acts as it would without ``train``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from gcflows.atomic import claim_folder
from gcflows.checks import bad, integer
from gcflows.ema import EMA
from gcflows.processes import get_process
from gcflows.training.batches import DataSource
from gcflows.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    PREVIOUS_NAME,
    CorruptCheckpointError,
    check_resume_compatible,
    find_checkpoint,
    load_checkpoint,
    load_payload,
    save_checkpoint,
)
from gcflows.training.config import RUN_ONLY, TrainConfig, config_fingerprint
from gcflows.training.distributed import (
    DistInfo,
    all_max_flag,
    dist_on,
    resolve_device,
    setup_distributed,
)
from gcflows.training.rng import (
    STREAM_DATA,
    STREAM_NOISE,
    STREAM_SAMPLER,
    capture_global_rng,
    capture_rng,
    derive_seed,
    restore_global_rng,
    restore_rng,
    seed_everything,
)
from gcflows.training.rundir import (
    clear_run,
    remove_temporaries,
    run_files,
    run_record,
    save_samples,
    trim_metrics,
    write_config_json,
)
from gcflows.training.step import (
    StepOutput,
    TrainState,
    build_optimizer,
    make_ema,
    make_objective,
    step_metrics,
    train_step,
    without_input_checks,
)

__all__ = ["train", "TrainResult", "StepInfo", "NonFiniteLossError", "TrainingInterrupted"]


class NonFiniteLossError(FloatingPointError):
    """A NaN / inf loss (or data batch) at ``step``; the run stopped before updating the weights,
    and the last checkpoint written (``last_checkpoint``, step ``last_good_step``) is intact."""

    def __init__(self, message: str, step: int, last_checkpoint: str | None, last_good_step: int):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint
        self.last_good_step = last_good_step


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the run after ``step`` (a checkpoint of that step was written to
    ``checkpoint`` when the run has an out_dir); ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + int(signum)


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
    device), the ``ema`` (the EMA), the ``optimizer``, the last completed ``step``, the run
    folder, the path of the last checkpoint and the logged metrics (rank 0). ``resumed_from``: the
    checkpoint the run continued from; ``already_done``: it was at the end already, so nothing
    was trained and nothing written."""

    model: nn.Module
    ema_model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    step: int
    run_dir: Path | None
    checkpoint: Path | None
    history: list[dict[str, Any]]
    resumed_from: Path | None = None
    already_done: bool = False


@dataclass
class _Run:
    """The loop's context: the step state plus what checkpoints and logs need."""

    state: TrainState
    dinfo: DistInfo
    device: torch.device
    run_dir: Path | None
    process: Any
    shape: tuple
    fingerprint: str
    start: int = 0
    elapsed0: float = 0.0
    resumed_from: Path | None = None
    last_ckpt: Path | None = None
    last_ckpt_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
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
    overwrite: bool = False,
) -> TrainResult:
    """Train the consistency model ``model`` (``f(x (B, *dims), t (B,)) -> (B, *dims)``, e.g. a
    :class:`gcflows.consistency.ConsistencyModel`) with the objective ``config.method``.

    data_source: a sampler ``fn(batch_size, generator) -> (batch_size, *dims)`` (e.g. a
        ``GaussianMixture.sample``; called with the per-rank CPU data generator) or a tensor
        ``(N, *dims)`` (``config.data_sampling``). Batches are cast to the model's dtype.
    velocity: the CD velocity estimator (``method="cd"`` only, required there).
    gc_model: a frozen network ``gc_model(x_t, t) -> data estimate`` that produces the GC pairs
        (``method="gc"`` only; an ``nn.Module`` is moved to the device, put in eval mode and
        frozen); by default the EMA model.
    resume: ``"auto"`` continues from ``out_dir/checkpoint.pt`` if it exists (from
        ``checkpoint.prev.pt``, with a warning, if the latest one is corrupt); a path resumes from
        that checkpoint (``out_dir`` must then hold no other run); ``None`` starts fresh and
        refuses an ``out_dir`` that holds a run.
    callbacks: called after every step with a :class:`StepInfo`; returning True stops the run.
    stop_after: stop (after a checkpoint) once this many steps are done, e.g. to split a run; the
        curriculum still uses ``config.total_steps``.
    overwrite: allow a fresh start (or a resume from elsewhere) into an ``out_dir`` that holds a
        run: its run files are deleted first.

    The run folder is owned by this call while it runs (:func:`gcflows.atomic.claim_folder`): a
    second training into an ``out_dir`` that a live process trains in (or evaluates into) is
    refused with a ``ValueError`` naming that process, before anything is read or written.
    Every argument, the data shape and the checkpoint are checked before any file is written.
    A run already at its end returns at once (``already_done``) and writes nothing. Raises
    :class:`NonFiniteLossError` on a NaN / inf loss or data batch and
    :class:`TrainingInterrupted` on SIGINT / SIGTERM (module doc).
    """
    callbacks = _check_arguments(
        config, model, velocity, gc_model, resume, callbacks, stop_after, overwrite
    )
    device = resolve_device(config.device)
    dinfo, device = setup_distributed(device)
    claim = None
    saved = capture_global_rng(device)
    try:
        claim = _claim_run_dir(config, dinfo, device)
        run = _start(
            config, model, data_source, velocity, gc_model, resume, overwrite, dinfo, device
        )
        end = config.total_steps if stop_after is None else min(config.total_steps, stop_after)
        if run.start >= end and run.resumed_from is not None:
            return _result(run, already_done=True)
        _open_run_dir(run, overwrite, gc_model is not None)
        _loop(run, callbacks, end)
        return _result(run)
    finally:
        restore_global_rng(saved, device)
        if claim is not None:
            claim.release()
        if dinfo.initialized_here and dist_on():
            dist.destroy_process_group()


def _claim_run_dir(config: TrainConfig, dinfo: DistInfo, device: torch.device):
    """Rank 0 claims ``out_dir`` (one owner per run folder); a refusal stops every rank."""
    claim, refused = None, None
    if config.out_dir is not None and dinfo.rank == 0:
        try:
            claim = claim_folder(config.out_dir, "training")
        except ValueError as err:
            refused = err
    if all_max_flag(refused is not None, dinfo.world_size, device):
        if refused is not None:
            raise refused
        raise ValueError(f"rank 0 could not claim the run folder {config.out_dir!r} (its error)")
    return claim


def _check_arguments(config, model, velocity, gc_model, resume, callbacks, stop_after, overwrite):
    if not isinstance(config, TrainConfig):
        raise bad("type(config)", type(config).__name__, "pass a TrainConfig")
    if not isinstance(model, nn.Module):
        raise bad("type(model)", type(model).__name__, "pass an nn.Module f(x, t)")
    if config.method == "cd" and velocity is None:
        fix = (
            "method='cd' needs a velocity estimator: pass velocity=TrueVelocity(...) or "
            "DistilledVelocity(...) from gcflows.velocity"
        )
        raise bad("velocity", velocity, fix)
    if config.method != "cd" and velocity is not None:
        fix = f"velocity is only used by method='cd', not {config.method!r}; drop it"
        raise bad("type(velocity)", type(velocity).__name__, fix)
    if gc_model is not None and config.method != "gc":
        fix = f"gc_model is only used by method='gc', not {config.method!r}; drop it"
        raise bad("type(gc_model)", type(gc_model).__name__, fix)
    if gc_model is not None and not callable(gc_model):
        raise bad("gc_model", gc_model, "pass a callable gc_model(x_t, t) -> data estimate")
    if stop_after is not None:
        integer(stop_after, "stop_after", lo=1, fix="use a positive int or None")
    callbacks = list(callbacks)
    if not all(callable(c) for c in callbacks):
        raise bad("callbacks", callbacks, "pass callables taking a StepInfo")
    if resume is not None and not isinstance(resume, (str, os.PathLike)):
        raise bad("resume", resume, "use 'auto', a checkpoint path or None")
    if not isinstance(overwrite, bool):
        raise bad("overwrite", overwrite, "use True or False")
    if not list(model.parameters()):
        raise bad("len(list(model.parameters()))", 0, "pass a model with parameters to train")
    return callbacks


# ------------------------------------------------------------------------------------------------
# set-up: nothing is written here
# ------------------------------------------------------------------------------------------------
def _start(config, model, data_source, velocity, gc_model, resume, overwrite, dinfo, device):
    """Check the data, the model and the checkpoint, then build the state (restored or seeded)."""
    rank, world = dinfo.rank, dinfo.world_size
    dtype = next(model.parameters()).dtype
    sampler_seed = derive_seed(config.seed, rank, STREAM_SAMPLER)
    source = DataSource(
        data_source, device, dtype, config.data_sampling, config.batch_size, sampler_seed
    )
    _check_model_fits(config, model, source.shape)
    run_dir = Path(config.out_dir) if config.out_dir is not None else None
    ckpt_path, ckpt = _select_checkpoint(run_dir, resume, overwrite, device)
    model.to(device)
    if ckpt is not None:
        _check_checkpoint(ckpt, ckpt_path, config, source.shape, model)
    process = get_process(config.process, t_min=config.t_min, t_max=config.t_max)
    ema = make_ema(model, config.ema_decay, warmup=config.ema_warmup, every=config.ema_every)
    if isinstance(gc_model, nn.Module):
        gc_model.to(device).eval().requires_grad_(False)
    if gc_model is None and config.method == "gc":
        gc_model = without_input_checks(ema.module)
    state = TrainState(
        config=config,
        model=model,
        net=without_input_checks(model),
        ema=ema,
        optimizer=build_optimizer(config, model.parameters()),
        objective=make_objective(config, process, velocity, world),
        source=source,
        data_gen=torch.Generator().manual_seed(derive_seed(config.seed, rank, STREAM_DATA)),
        noise_gen=torch.Generator(device=device).manual_seed(
            derive_seed(config.seed, rank, STREAM_NOISE)
        ),
        gc_model=gc_model,
        world=world,
    )
    fp = config_fingerprint(config, source.shape, model)
    run = _Run(state, dinfo, device, run_dir, process, source.shape, fp)
    if ckpt is not None:
        _restore(run, ckpt, ckpt_path)
    else:
        seed_everything(config.seed, rank, state.data_gen, state.noise_gen, 0)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        state.net = DistributedDataParallel(
            state.net,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # the networks here have no running statistics
        )
    model.train()
    return run


def _check_model_fits(config: TrainConfig, model: nn.Module, shape: tuple) -> None:
    if config.data_shape is not None and tuple(config.data_shape) != shape:
        fix = f"the data has shape {shape}; fix the config or the data source"
        raise bad("data_shape", config.data_shape, fix, "TrainConfig")
    mproc = getattr(model, "process", None)
    if mproc is None or not hasattr(mproc, "t_min"):
        return
    if (mproc.name, mproc.t_min, mproc.t_max) != (config.process, config.t_min, config.t_max):
        raise ValueError(
            f"the model was built for the {mproc.name} process on [{mproc.t_min}, "
            f"{mproc.t_max}] but TrainConfig has process={config.process!r} on "
            f"[{config.t_min}, {config.t_max}]; build both from the same values"
        )


def _select_checkpoint(run_dir: Path | None, resume, overwrite: bool, device: torch.device):
    """``(path, checkpoint)`` to continue from, or ``(None, None)`` for a fresh start; refuses to
    start in, or resume into, a folder that holds another run unless ``overwrite``."""
    held = run_files(run_dir) if run_dir is not None else []
    if resume == "auto":
        found = find_checkpoint(run_dir, device) if run_dir is not None else None
        return found if found is not None else (None, None)
    if resume is None:
        if held and not overwrite:
            fix = (
                f"it already holds a run ({', '.join(held)}); pass resume='auto' to continue it, "
                "overwrite=True to replace it, or choose a new out_dir (nothing was overwritten)"
            )
            raise bad("out_dir", str(run_dir), fix, "TrainConfig")
        return None, None
    path = Path(resume)
    if not path.is_file():
        raise bad("resume", str(resume), "no such checkpoint file")
    own = run_dir is not None and path.resolve().parent == run_dir.resolve()
    if held and not own and not overwrite:
        fix = (
            f"it would continue another run into {str(run_dir)!r}, which already holds a run "
            f"({', '.join(held)}); choose a new out_dir, or pass overwrite=True to replace it "
            "(nothing was overwritten)"
        )
        raise bad("resume", str(resume), fix)
    return path, load_checkpoint(path, map_location=device)


def _check_checkpoint(ckpt: dict, path: Path, config: TrainConfig, shape: tuple, model) -> None:
    check_resume_compatible(ckpt, path, config, shape, model)
    if ckpt["step"] > config.total_steps:
        fix = f"checkpoint {str(path)!r} is at step {ckpt['step']}, beyond it; raise total_steps"
        raise bad("total_steps", config.total_steps, fix, "TrainConfig")
    old = TrainConfig.from_dict(ckpt["config"]).to_dict()
    changed = [k for k, v in config.to_dict().items() if old[k] != v and k not in RUN_ONLY]
    if changed:
        warnings.warn(
            f"resuming {str(path)!r} with changed fields {changed}: the run will not "
            "reproduce an uninterrupted one",
            stacklevel=4,
        )


def _restore(run: _Run, ckpt: dict, path: Path) -> None:
    """Load weights, EMA, optimiser, step and every RNG stream of the checkpoint."""
    s, rank, world = run.state, run.dinfo.rank, run.dinfo.world_size
    try:
        s.model.load_state_dict(ckpt["model"])
        s.ema.load_state_dict(ckpt["ema"])
        s.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit this model / optimiser ({err})"
        ) from None
    s.step = run.start = int(ckpt["step"])
    run.elapsed0 = float(ckpt.get("elapsed", 0.0))
    run.resumed_from, run.last_ckpt, run.last_ckpt_step = path, path, s.step
    states = ckpt.get("rng")
    if isinstance(states, list) and len(states) == world:
        restore_rng(states[rank], s.data_gen, s.noise_gen, run.device)
        s.source.load_state_dict(states[rank].get("sampler"))
        return
    warnings.warn(
        f"checkpoint {str(path)!r} has RNG states for {len(states or [])} ranks, "
        f"this run has {world}: generators are re-seeded from (seed, rank, step), so the "
        "run is not an exact continuation",
        stacklevel=4,
    )
    seed_everything(s.config.seed, rank, s.data_gen, s.noise_gen, s.step)


def _open_run_dir(run: _Run, overwrite: bool, frozen_gc: bool) -> None:
    """Rank 0: create the folder (clearing a replaced run), write config.json, trim metrics."""
    if run.dinfo.rank != 0 or run.run_dir is None:
        return
    own = (
        run.resumed_from is not None and run.resumed_from.resolve().parent == run.run_dir.resolve()
    )
    if overwrite and not own:  # a fresh start, or a resume from elsewhere: replace the old run
        clear_run(run.run_dir)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run.run_dir)
    _set_aside_corrupt_latest(run)
    record = run_record(
        run.state.config,
        fingerprint=run.fingerprint,
        data_shape=list(run.shape),
        device=str(run.device),
        device_name=(
            torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
        ),
        world_size=run.dinfo.world_size,
        gc_generator="frozen (passed to train)" if frozen_gc else "ema",
    )
    resumed = run.start if run.resumed_from is not None else None
    write_config_json(run.run_dir, record, resumed)
    trim_metrics(run.run_dir / "metrics.jsonl", run.start)


def _set_aside_corrupt_latest(run: _Run) -> None:
    """Resuming from ``checkpoint.prev.pt`` because ``checkpoint.pt`` is corrupt: move the corrupt
    one to ``checkpoint.corrupt.pt`` (kept for inspection), so that the next checkpoint does not
    rotate it into ``checkpoint.prev.pt``."""
    latest = run.run_dir / CHECKPOINT_NAME
    previous = (run.run_dir / PREVIOUS_NAME).resolve()
    if (
        run.resumed_from is None
        or run.resumed_from.resolve() != previous
        or not os.path.lexists(latest)
    ):
        return
    try:
        load_payload(latest)
    except CorruptCheckpointError:  # also a folder or a dangling link in its place
        aside = run.run_dir / "checkpoint.corrupt.pt"
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        elif os.path.lexists(aside):
            aside.unlink()
        os.replace(latest, aside)


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def _loop(run: _Run, callbacks: list, end: int) -> None:
    s, cfg, main = run.state, run.state.config, run.dinfo.rank == 0
    metrics_path = run.run_dir / "metrics.jsonl" if run.run_dir is not None else None
    log = open(metrics_path, "a") if (main and metrics_path is not None) else None
    bar = tqdm(
        total=cfg.total_steps,
        initial=run.start,
        disable=True if (not main or not cfg.progress) else None,
        dynamic_ncols=True,
        desc=f"{cfg.method}",
    )
    try:
        with _Interrupts() as interrupts:
            while s.step < end:
                res = train_step(s)
                if res.bad is not None:
                    raise _non_finite(s.step + 1, res.bad, run.last_ckpt, run.last_ckpt_step)
                metrics = _log(run, res, log, bar)
                stop = _after_step(run, callbacks, res, metrics)
                signalled = all_max_flag(interrupts.signum is not None, s.world, run.device)
                periodic = cfg.checkpoint_every > 0 and s.step % cfg.checkpoint_every == 0
                if run.run_dir is not None and (periodic or stop or signalled or s.step == end):
                    _write_checkpoint(run)
                if signalled:
                    raise _interrupted(run, interrupts.signum or signal.SIGTERM)
                if stop:
                    break
    finally:
        bar.close()
        if log is not None:
            log.close()


def _log(run: _Run, res: StepOutput, log, bar) -> dict[str, Any] | None:
    """Metrics of a log step (written to metrics.jsonl and the bar on rank 0), else None."""
    s, cfg = run.state, run.state.config
    metrics = None
    if s.step % cfg.log_every == 0 or s.step == cfg.total_steps:
        metrics = step_metrics(res, s.step, s.world)
        metrics["time"] = run.elapsed0 + time.perf_counter() - run.t0
        if run.dinfo.rank == 0:
            run.history.append(metrics)
            if log is not None:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{res.loss:.4g}", N=metrics["N"])
    bar.update(1)
    return metrics


def _after_step(run: _Run, callbacks: list, res: StepOutput, metrics) -> bool:
    """Save samples when due and run the callbacks; True if one asks to stop (on any rank)."""
    s, cfg, rank = run.state, run.state.config, run.dinfo.rank
    sample_due = cfg.sample_every > 0 and s.step % cfg.sample_every == 0
    if sample_due and rank == 0 and run.run_dir is not None:
        gen = torch.Generator(device=run.device)
        save_samples(s.ema.module, run.process, run.shape, cfg, gen, run.run_dir, s.step)
    if not callbacks:
        return False
    info = StepInfo(
        step=s.step,
        total_steps=cfg.total_steps,
        loss=res.loss,
        metrics=metrics,
        model=s.model,
        ema_model=s.ema.module,
        config=cfg,
        run_dir=run.run_dir,
        rank=rank,
        sample_due=sample_due,
    )
    stop = any([bool(cb(info)) for cb in callbacks])  # every callback runs
    return all_max_flag(stop, s.world, run.device)


def _write_checkpoint(run: _Run) -> None:
    """Every rank's RNG states to rank 0, which writes ``checkpoint.pt`` (keeping the one before
    as ``checkpoint.prev.pt``)."""
    s, world = run.state, run.state.world
    rng = capture_rng(s.data_gen, s.noise_gen, run.device)
    rng["sampler"] = s.source.state_dict()
    states: list[Any] = [rng]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, rng)
    latest = run.run_dir / CHECKPOINT_NAME
    if run.dinfo.rank == 0:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": s.step,
            "config": s.config.to_dict(),
            "fingerprint": run.fingerprint,
            "data_shape": list(run.shape),
            "model": s.model.state_dict(),
            "ema": s.ema.state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "rng": states,
            "world_size": world,
            "elapsed": run.elapsed0 + time.perf_counter() - run.t0,
        }
        save_checkpoint(latest, payload, previous=run.run_dir / PREVIOUS_NAME)
        if s.config.keep_checkpoints:
            save_checkpoint(run.run_dir / f"checkpoint_{s.step:08d}.pt", payload)
    if world > 1:
        dist.barrier()
    run.last_ckpt, run.last_ckpt_step = latest, s.step


def _result(run: _Run, already_done: bool = False) -> TrainResult:
    s = run.state
    return TrainResult(
        model=s.model,
        ema_model=s.ema.module,
        ema=s.ema,
        optimizer=s.optimizer,
        step=s.step,
        run_dir=run.run_dir,
        checkpoint=run.last_ckpt if run.run_dir is not None else None,
        history=run.history,
        resumed_from=run.resumed_from,
        already_done=already_done,
    )


# ------------------------------------------------------------------------------------------------
# small pieces
# ------------------------------------------------------------------------------------------------
class _Interrupts:
    """Records the first SIGINT / SIGTERM instead of acting on it (main thread only); then puts
    the previous handlers back, so a second signal acts as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._put_back()
        print(
            f"\n{signal.Signals(signum).name} received: finishing the current step and writing "
            "a checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def _put_back(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._old = {}

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(ValueError):
            self._put_back()


def _interrupted(run: _Run, signum: int) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    step = run.state.step
    if run.run_dir is None:
        how = "the run has no out_dir, so nothing was saved"
    else:
        how = (
            f"checkpoint {str(run.last_ckpt)!r} (step {step}) was written; continue with "
            f"resume='auto' and out_dir={str(run.run_dir)!r} (scripts: --resume)"
        )
    return TrainingInterrupted(
        f"training stopped by {name} after step {step}: {how}",
        signum,
        step,
        run.last_ckpt if run.run_dir is not None else None,
    )


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
