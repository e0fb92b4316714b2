"""Training-step benchmark of the CIFAR-10 U-Net preset on synthetic 32x32 data.

For each of CT, batch-OT and GC (``cifar10_base``, ``cifar10_ot``, ``cifar10_gc_mix50`` of
``gcflows.presets``: U-Net, objective settings, optimizer, EMA; the GC generator is the EMA model,
as in docs/paper.md section 5) it times full training steps: the objective (data draw from a
pool of synthetic batches, coupling, both forward passes, loss), backward, the optimizer step and
the EMA update. Reports steps/s, ms/step, peak device memory (CUDA) and the GC / CT and OT / CT
step-time ratios; writes ``config.json`` and ``results.json`` to ``--out``.

Synthetic data: Gaussian images clipped to [-1, 1] (the speed of a step does not depend on the
pixels). The curriculum is evaluated at ``--at-step`` (default: half of the preset's steps).
If ``lion_pytorch`` is missing (bare GPU images), Adam with the preset's learning rate stands in
for Lion and the results say so: both are one elementwise pass over the weights.

    python experiments/bench_gpu_step.py                     # CUDA: batch 128, 50 steps
    python experiments/bench_gpu_step.py --device cpu --steps 2 --batch 4 --warmup 0  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from gcflows.consistency import ConsistencyModel
from gcflows.networks import UNet
from gcflows.presets import IMAGE_PRESETS
from gcflows.processes import get_process
from gcflows.records import check_writable, cpu_model, git_sha
from gcflows.training import TrainConfig, build_optimizer, make_ema, make_objective, update_ema

PRESETS = {"ct": "cifar10_base", "ot": "cifar10_ot", "gc": "cifar10_gc_mix50"}


def build(method: str, device: torch.device, seed: int):
    """``(model, ema, optimizer, objective, note)`` for one method's preset on ``device``, built by
    the training library from the preset's ``TrainConfig`` (the loss, the EMA with its warm-up)."""
    preset = IMAGE_PRESETS[PRESETS[method]]
    train = dict(preset["train"])
    torch.manual_seed(seed)
    model = ConsistencyModel(
        UNet(**preset["network"]), train["process"], sigma_data=0.5, check_inputs=False
    )
    model.to(device).train()
    note = ""
    try:
        import lion_pytorch  # noqa: F401  (Lion's package is absent from some GPU images)
    except ImportError as err:
        note = f"{train['optimizer']} unavailable ({err}); Adam stands in"
        train["optimizer"] = "adam"
    config = TrainConfig(**train)
    ema = make_ema(model, config.ema_decay, warmup=config.ema_warmup, every=config.ema_every)
    optimizer = build_optimizer(config, model.parameters())
    objective = make_objective(config, get_process(config.process), velocity=None, world=1)
    return model, ema, optimizer, objective, note


def time_method(method: str, args, device: torch.device, pool: list[torch.Tensor]) -> dict:
    model, ema, optimizer, objective, note = build(method, device, args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    at_step = args.at_step if args.at_step >= 0 else objective.config.total_steps // 2

    def step(k: int) -> torch.Tensor:
        out = objective(
            model,
            pool[k % len(pool)],
            at_step,
            generator=gen,
            gc_model=ema.module if method == "gc" else None,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        update_ema(ema, model, k + 1)
        return out.loss.detach()

    for k in range(args.warmup):
        step(k)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for k in range(args.steps):
        loss = step(k)
    loss = float(loss)  # waits for the last step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "method": method,
        "preset": PRESETS[method],
        "steps_per_s": args.steps / seconds,
        "ms_per_step": 1e3 * seconds / args.steps,
        "peak_mem_MiB": peak,
        "last_loss": loss,
        "num_intervals": objective.num_intervals(at_step),
        "note": note,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method first")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--methods", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--at-step", type=int, default=-1, help="curriculum step (-1: half)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", default="runs/bench_gpu_step", help="output folder")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.warmup < 0 or args.threads < 0:
        parser.error(
            f"need --steps >= 1, --batch >= 1, --warmup >= 0 and --threads >= 0, got "
            f"{args.steps}, {args.batch}, {args.warmup}, {args.threads}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device; use --device cpu")
    if args.at_step < -1 or args.seed < 0:
        parser.error(
            f"need --at-step >= 0 (or -1: half way) and --seed >= 0, got {args.at_step}, "
            f"{args.seed}"
        )
    try:
        check_writable(args.out)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    device = torch.device(name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "args": vars(args),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = torch.Generator().manual_seed(args.seed)
    pool = [
        (0.5 * torch.randn(args.batch, 3, 32, 32, generator=gen)).clamp(-1, 1).to(device)
        for _ in range(4)
    ]
    results = []
    for method in args.methods:
        results.append(time_method(method, args, device, pool))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (out / "results.json").write_text(json.dumps({"rows": results}, indent=2) + "\n")
    rate = {r["method"]: r["steps_per_s"] for r in results}
    ratios = {f"{m}/ct": rate["ct"] / rate[m] for m in ("gc", "ot") if m in rate and "ct" in rate}
    (out / "results.json").write_text(
        json.dumps({"rows": results, "step_time_ratios": ratios}, indent=2) + "\n"
    )
    print(f"device: {config['device']}; batch {args.batch}; {args.steps} timed steps per method")
    print(f"{'method':<8}{'steps/s':>10}{'ms/step':>11}{'peak MiB':>11}  note")
    for r in results:
        peak = "-" if r["peak_mem_MiB"] is None else f"{r['peak_mem_MiB']:.0f}"
        print(
            f"{r['method']:<8}{r['steps_per_s']:>10.2f}{r['ms_per_step']:>11.1f}{peak:>11}  "
            f"{r['note']}"
        )
    for k, v in ratios.items():
        print(f"step time {k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
