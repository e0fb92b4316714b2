"""Consistency training on images with the independent (IC), batch-OT or generator-induced (GC)
coupling (docs/paper.md sections 2 and 5): a thin script over ``gcflows.training.train``.

    # 8x8 scikit-learn digits on a CPU (bundled, no download), about two minutes on one core:
    python experiments/train_images.py --preset digits_base --coupling gc --mu 0.5 --out runs/dg
    # split a run over two job slots: stop after step 1500, then continue it (same --out)
    python experiments/train_images.py --preset digits_gc_mix50 --out runs/dg2 --stop-after 1500
    python experiments/train_images.py --preset digits_gc_mix50 --out runs/dg2 --resume
    # the paper's CIFAR-10 settings on 8 GPUs (global batch 512 = 64 per process; local data):
    torchrun --nproc_per_node=8 experiments/train_images.py --preset cifar10_gc_mix50 \
        --data-root ~/data/cifar10 --out runs/cifar10_gc

Presets live in ``gcflows.presets.IMAGE_PRESETS`` (``digits_base``, ``digits_ot``,
``digits_gc_mix50``, ``digits_tiny``, ``cifar10_base``, ``cifar10_ot``, ``cifar10_gc_mix50``).
``--coupling ic|ot|gc`` and ``--mu`` replace the preset's objective; trailing ``key=value`` pairs
override ``TrainConfig`` fields (``lr=2e-4``, ``total_steps=500``, ``betas=[0.9,0.99]``) or the
U-Net (``net.base_channels=32``, ``net.dropout=0.1``); values are read as JSON, else as strings.
``batch_size`` is the global batch: each of the N torchrun processes gets ``batch_size / N`` rows,
and the batch-OT coupling is solved over the global batch.

Checked before any work (nothing is built or written until these pass; a failure exits with
status 2 and one message): every flag (``--threads``, ``--steps``, ``--stop-after`` >= 1;
``--mu`` only with the GC coupling; ``--data-root`` is ignored, with a warning, by the digits),
the preset, the overrides and the ``TrainConfig``; that the U-Net's input size matches the data
set's image size; that ``--out`` can be written; the run folder: a fresh start into a folder that
holds a run, or ``--resume-from A`` into a ``--out`` that holds another run, is refused unless
``--overwrite`` (which replaces that run); ``--resume`` needs a checkpoint in ``--out`` (its
digest is verified; a corrupt latest one falls back to ``checkpoint.prev.pt``, saying so) written
by the same preset, coupling, network and image size; then the data (``--data-root`` for MNIST /
CIFAR-10: a missing folder is reported with how to get the data; nothing is ever downloaded).
``--resume`` on a run already at its last step reports it and changes nothing. The run folder
has one owner while the script runs (``gcflows.atomic.claim_folder``): a second training or an
evaluation started into it meanwhile is refused with one ``error:`` line naming the process.
A resume whose settings that define the run (``continuous``, ``optimizer``, the process and its
times, ...) differ from the checkpoint's is refused with the values to pass.

Ctrl-C (SIGINT) or SIGTERM: the current step finishes, a checkpoint is written, the command that
resumes the run is printed, and the script exits with status 130 / 143.

The run folder (``--out``) gets what ``gcflows.training`` writes (``config.json``: config, seed,
git SHA, versions, device; ``metrics.jsonl``; ``checkpoint.pt``; one-step samples
``samples/step_*.pt``), PNG sample grids of the EMA model from a fixed noise draw every
``sample_every`` steps (``samples/grid_*.png``), and ``results.json`` / ``results.csv``; a summary
table is printed last. After a resume, ``results.json`` describes the whole run: ``segments``
lists each part (from / to step, wall time, checkpoint resumed from) and ``train_time_s`` is the
training time since step 0. Evaluate a checkpoint with ``experiments/eval_images.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gcflows.atomic import claim_folder
from gcflows.presets import IMAGE_PRESETS
from gcflows.records import print_table, write_results
from gcflows.training import (
    TrainConfig,
    TrainingInterrupted,
    find_checkpoint,
    load_checkpoint,
    train,
)
from gcflows.training.config import fingerprint_fields
from gcflows.training.images import (
    COUPLINGS,
    METHOD_TO_COUPLING,
    GridCallback,
    ImageRun,
    build_model,
    load_images,
    resolve_run,
)
from gcflows.training.rundir import run_files

__all__ = [
    "check_resume",
    "check_writable",
    "Plan",
    "prepare",
    "resume_command",
    "build_parser",
    "main",
]


def check_resume(
    run: ImageRun, resume: str | None, overwrite: bool = False
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint a run would continue from, and its contents, checked against ``run`` before
    any work: ``(None, None)`` for a fresh start.

    ``resume``: ``None`` (start fresh: refuse an ``out_dir`` that holds a run unless
    ``overwrite``), ``"auto"`` (the run in ``out_dir``: its ``checkpoint.pt``, or the previous
    one if that is corrupt; an error saying where it looked when there is none) or a path (the
    ``out_dir`` must not hold another run unless ``overwrite``). Raises ``ValueError`` if the
    checkpoint was written by another preset, coupling, network or image size.
    """
    out = Path(run.config.out_dir)
    held = run_files(out)
    if resume is None:
        if held and not overwrite:
            raise ValueError(
                f"{str(out)!r} already holds a run ({', '.join(held)}): pass --resume to "
                "continue it, --overwrite to replace it, or choose a new --out (nothing was "
                "overwritten)"
            )
        return None, None
    if resume == "auto":
        found = find_checkpoint(out)
        if found is None:
            raise ValueError(
                f"--resume: nothing to resume in {str(out)!r} (looked for checkpoint.pt and "
                "checkpoint.prev.pt there); check --out, or start a new run without --resume"
            )
        path, ckpt = found
    else:
        path = Path(resume)
        if held and path.resolve().parent != out.resolve() and not overwrite:
            raise ValueError(
                f"--out {str(out)!r} already holds another run ({', '.join(held)}): resuming "
                f"{str(path)!r} there would overwrite it; choose a new --out, or pass "
                "--overwrite to replace it (nothing was overwritten)"
            )
        ckpt = load_checkpoint(path)  # ValueError if missing / corrupt / not a gcflows checkpoint
    _check_same_run(run, path, ckpt["config"], ckpt.get("data_shape"))
    return path, ckpt


def _check_same_run(run: ImageRun, path: Path, old: dict[str, Any], data_shape: Any) -> None:
    if old.get("preset") != run.preset:
        raise ValueError(
            f"checkpoint {str(path)!r} was written by preset {old.get('preset')!r}, this run uses "
            f"preset {run.preset!r}: pass --preset {old.get('preset')} to continue it, or use a "
            "new --out"
        )
    shape = tuple(data_shape or old.get("data_shape") or ())
    if shape != run.image_shape:
        raise ValueError(
            f"checkpoint {str(path)!r} holds a model for images of shape {shape}, this run "
            f"trains on {run.image_shape}: wrong image size for the checkpoint"
        )
    if old.get("method") != run.config.method:
        raise ValueError(
            f"checkpoint {str(path)!r} was trained with coupling "
            f"{METHOD_TO_COUPLING.get(old.get('method'), old.get('method'))!r}, this run asks for "
            f"{run.coupling!r}: resume with the same --coupling or use a new --out"
        )
    if old.get("model") != run.config.model:
        raise ValueError(
            f"checkpoint {str(path)!r} holds another network ({old.get('model')}); remove the "
            "net.* overrides that differ, or use a new --out"
        )
    try:
        before = fingerprint_fields(TrainConfig.from_dict(old), shape)
    except (ValueError, TypeError) as err:
        raise ValueError(f"checkpoint {str(path)!r} holds an invalid config ({err})") from None
    now = fingerprint_fields(run.config, run.image_shape)
    differ = [k for k in now if before.get(k) != now[k]]
    if differ:  # e.g. continuous=true or optimizer=radam given at the start, not on resume
        there = " ".join(f"{k}={json.dumps(before[k])}" for k in differ)
        raise ValueError(
            f"checkpoint {str(path)!r} was written with {there}, which defines the run (this "
            f"command has " + " ".join(f"{k}={json.dumps(now[k])}" for k in differ) + f"): pass "
            f"{there} to continue it, or use a new --out"
        )


def check_writable(folder: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless ``folder`` can be created / written (its nearest existing
    ancestor must be a writable folder)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(
            f"cannot create the output folder {str(folder)!r}: {str(probe)!r} is a file"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"the output folder {str(folder)!r} is not writable (no write permission on "
            f"{str(probe)!r}); choose another --out"
        )


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="digits_base", choices=sorted(IMAGE_PRESETS))
    p.add_argument("--coupling", choices=sorted(COUPLINGS), default=None, help="default: preset's")
    p.add_argument("--mu", type=float, default=None, help="P(sample is generator-induced), GC")
    p.add_argument("--data-root", default=None, help="folder with MNIST / CIFAR-10 (not digits)")
    p.add_argument(
        "--out", default=None, help="run folder (default runs/images/<preset>_<c>_s<seed>)"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="total_steps (same as total_steps=N)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--resume-from", default=None, help="continue from this checkpoint file")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run that --out holds (its run files are deleted) instead of refusing",
    )
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (resumable)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 for digits on CPU, else torch's default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("overrides", nargs="*", help="key=value TrainConfig or net.<U-Net> overrides")
    return p


@dataclass
class Plan:
    """A checked command line: the run, its training images, the checkpoint it continues from
    (``None``: a fresh start) and the step it stops at."""

    run: ImageRun
    images: torch.Tensor
    resume_path: Path | None
    checkpoint: dict[str, Any] | None
    end: int
    world: int
    rank: int
    overwrite: bool = False


def _check_flags(args: argparse.Namespace) -> None:
    for flag in ("threads", "stop_after", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.resume and args.resume_from:
        raise ValueError("use --resume (the run in --out) or --resume-from FILE, not both")
    if args.overwrite and args.resume:
        raise ValueError(
            "--overwrite starts the run in --out over, --resume continues it: pick one"
        )


# TrainConfig fields that only one kind of run uses: an override of one elsewhere would be ignored
_APPLIES_TO = {
    "mu": (lambda c: c.method == "gc", "the GC coupling (--coupling gc)"),
    "cd_step": (lambda c: c.method == "cd", "consistency distillation"),
    "tangent_norm": (lambda c: c.continuous, "continuous time (continuous=true)"),
    "tangent_warmup": (lambda c: c.continuous, "continuous time (continuous=true)"),
    "s0": (lambda c: not c.continuous, "discrete time (the curriculum; not continuous=true)"),
    "s1": (lambda c: not c.continuous, "discrete time (the curriculum; not continuous=true)"),
    "rho": (lambda c: not c.continuous, "discrete time (the Karras grid; not continuous=true)"),
}


def _check_overrides_apply(overrides: Sequence[str], run: ImageRun) -> None:
    """Refuse a ``key=value`` override that this run would silently ignore (``mu`` with IC)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        applies = _APPLIES_TO.get(key)
        if applies is not None and not applies[0](run.config):
            raise ValueError(
                f"{item!r} does not apply: {key} is used by {applies[1]} only, and this run uses "
                f"coupling {run.coupling!r}"
                + (" in continuous time" if run.config.continuous else "")
                + f"; drop {key}=..."
            )


def prepare(args: argparse.Namespace, world: int = 1, rank: int = 0) -> Plan:
    """Check every argument, the output folder, the checkpoint and the data; create nothing.
    Raises ``ValueError`` (or ``FileNotFoundError`` for missing data) with one clear message."""
    _check_flags(args)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"total_steps={args.steps}")
    if args.no_progress:
        overrides.append("progress=false")
    run = resolve_run(
        args.preset,
        coupling=args.coupling,
        mu=args.mu,
        overrides=overrides,
        seed=args.seed,
        device=args.device,
        world_size=world,
        out_dir=args.out,
    )
    if args.mu is not None and run.config.method != "gc":
        raise ValueError(
            f"--mu applies to the GC coupling only; this run uses coupling {run.coupling!r}: "
            "drop --mu or pass --coupling gc"
        )
    _check_overrides_apply(args.overrides, run)
    if args.data_root is not None and run.data == "digits" and rank == 0:
        print("warning: --data-root is ignored: the digits are bundled", file=sys.stderr)
    if args.out is None:
        name = f"{run.preset}_{run.coupling}_s{run.config.seed}"
        run.config = run.config.replace(out_dir=str(Path("runs") / "images" / name))
    check_writable(run.config.out_dir)
    mode = args.resume_from or ("auto" if args.resume else None)
    resume_path, ckpt = check_resume(run, mode, args.overwrite)
    threads = args.threads
    if threads is None and run.data == "digits" and run.config.device == "cpu":
        threads = 1  # 8x8 images: extra threads only add synchronisation (measured, see docs)
    if threads is not None:
        torch.set_num_threads(threads)
    images = load_images(run.data, args.data_root, "train")  # FileNotFoundError when missing
    end = run.config.total_steps
    if args.stop_after is not None:
        end = min(end, args.stop_after)
    return Plan(run, images, resume_path, ckpt, end, world, rank, args.overwrite)


def resume_command(argv: Sequence[str], out: str) -> str:
    """The command line that continues the run of ``argv`` in ``out``."""
    keep: list[str] = []
    it = iter(argv)
    for a in it:
        if a in ("--resume-from", "--out"):
            next(it, None)
        elif not a.startswith(("--resume", "--out=", "--overwrite")):
            keep.append(a)
    cmd = ["python", "experiments/train_images.py", *keep, "--out", out, "--resume"]
    return " ".join(shlex.quote(x) for x in cmd)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command line ``argv``; returns the results dict (rank 0; ``{}`` on other ranks).
    A bad argument exits with status 2 and one message before anything is created; SIGINT /
    SIGTERM exit with 130 / 143 after a checkpoint (the message says how to resume)."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    claim = None
    try:
        plan = prepare(args, world, rank)
        if rank == 0:  # one owner per run folder: a second training (or evaluation) is refused
            claim = claim_folder(plan.run.config.out_dir, "training")
            if plan.resume_path is None:  # another run may have finished there meanwhile
                check_resume(plan.run, None, args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        if claim is not None:
            claim.release()
        parser.error(str(err))
    try:
        if plan.checkpoint is not None and plan.checkpoint["step"] >= plan.end:
            return _already_done(plan)
        return _train(plan)
    except TrainingInterrupted as stop:
        if rank == 0:
            print(
                f"{stop}\nresume with: {resume_command(_argv(argv), plan.run.config.out_dir)}",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(stop.exit_code) from None
    finally:
        if claim is not None:
            claim.release()


def _argv(argv: Sequence[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def _already_done(plan: Plan) -> dict[str, Any]:
    """``--resume`` of a run already at its last step: report it, change nothing."""
    out = Path(plan.run.config.out_dir)
    step = plan.checkpoint["step"]
    if plan.rank == 0:
        print(
            f"the run in {str(out)!r} is already at step {step} (of {plan.run.config.total_steps}"
            f"; stop at {plan.end}): nothing to train, nothing changed",
            flush=True,
        )
    results = out / "results.json"
    if plan.rank != 0:
        return {}
    return json.loads(results.read_text()) if results.is_file() else {"step": step}


def _earlier_segments(resume_path: Path | None, start: int) -> list[dict[str, Any]]:
    """The segments before ``start`` that the run's results.json recorded (a run resumed from a
    checkpoint continues that run's record; a segment killed before writing results.json is
    missing, which the step ranges show)."""
    if resume_path is None:
        return []
    try:
        old = json.loads((resume_path.parent / "results.json").read_text())
    except (OSError, ValueError):
        return []
    segments = old.get("segments") if isinstance(old, dict) else None
    if not isinstance(segments, list):  # a record from before segments were written
        step = old.get("step") if isinstance(old, dict) else None
        segments = [{"from_step": 0, "to_step": step}] if isinstance(step, int) else []
    return [s for s in segments if isinstance(s, dict) and (s.get("to_step") or 0) <= start]


def _train(plan: Plan) -> dict[str, Any]:
    run, rank, world = plan.run, plan.rank, plan.world
    model = build_model(run.config)
    grid = GridCallback(run.config, run.image_shape)
    if rank == 0:
        print(
            f"preset {run.preset}: {run.data} {tuple(plan.images.shape)}, coupling {run.coupling}"
            + (f" (mu={run.config.mu})" if run.config.method == "gc" else "")
            + f", global batch {run.global_batch} = {world} x {run.config.batch_size}, "
            f"{run.config.total_steps} steps -> {run.config.out_dir}",
            flush=True,
        )
    t0 = time.perf_counter()
    result = train(
        run.config,
        model,
        plan.images,
        resume=str(plan.resume_path) if plan.resume_path is not None else None,
        callbacks=[grid],
        stop_after=plan.end,
        overwrite=plan.overwrite,
    )
    wall = time.perf_counter() - t0
    if rank != 0:
        return {}
    last = result.history[-1] if result.history else {}
    start = int(plan.checkpoint["step"]) if plan.checkpoint is not None else 0
    segment = {
        "from_step": start,
        "to_step": result.step,
        "wall_time_s": wall,
        "resumed_from": str(plan.resume_path) if plan.resume_path else None,
    }
    results = {
        "preset": run.preset,
        "data": run.data,
        "coupling": run.coupling,
        "mu": run.config.mu if run.config.method == "gc" else None,
        "seed": run.config.seed,
        "step": result.step,
        "total_steps": run.config.total_steps,
        "resumed_from": str(plan.resume_path) if plan.resume_path else None,
        "world_size": world,
        "global_batch": run.global_batch,
        "final_loss": last.get("loss"),
        "final_N": last.get("N"),
        "final_pair_cost": last.get("pair_cost"),
        "wall_time_s": wall,
        "train_time_s": last.get("time"),  # since step 0, over every segment
        "segments": [*_earlier_segments(plan.resume_path, start), segment],
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "grids": [str(p) for p in grid.paths],
        "device": str(next(result.model.parameters()).device),
        "n_parameters": int(sum(p.numel() for p in result.model.parameters())),
    }
    row = {k: v for k, v in results.items() if k not in ("grids", "segments")}
    if result.run_dir is not None:
        write_results(result.run_dir, results, [row])
    print_table(
        [
            {
                "preset": run.preset,
                "coupling": run.coupling,
                "step": result.step,
                "loss": results["final_loss"],
                "N": results["final_N"],
                "pair_cost": results["final_pair_cost"],
                "wall_s": wall,
                "run": str(result.run_dir),
            }
        ],
        title="train_images summary",
    )
    return results


if __name__ == "__main__":
    main()
