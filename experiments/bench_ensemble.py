"""Seed-steps per second of the vectorized ensemble against one-by-one training, same run.

    python experiments/bench_ensemble.py [--seeds 8] [--steps 10] [--threads 1] [--clock cpu]
        [--backbones mlp unet]

Each configuration (target dimension, hidden width, batch, method) trains ``--seeds`` seeds for
``--steps`` steps both ways (``gcflows.ensemble.train_ensemble`` and, seed after seed,
``train_sequential`` with the library objective) after one untimed warm-up step of each, and
prints seed-steps per second and their ratio (with ``--repeats``, interleaved pairs: the medians
and the median and range of the per-pair ratios). Ratios are measured within one run so that a
loaded machine affects both sides alike (not perfectly: say "under load" when it was).

The tracked numbers (the high-dimensional study's MLP targets and widths, S in {4, 8, 10}, the 4x
goal, repeats and both clocks) come from the ``ensemble`` workload of
``experiments/bench_training.py``; this script times other configurations (2D, batch 512), and
the U-Net ensemble (``EnsembleSpec(backbone="unet")``: the digits presets' U-Net on the 64-D
digits-like mixture read as 8x8 images, the presets' batch 64; its seeds run under
``torch.func.vmap``, docs/performance.md "U-Net seed ensemble").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from gcflows.ensemble import EnsembleSpec, seed_steps_per_second
from gcflows.gmm import get_preset, two_gaussians_1to2

CONFIGS = [
    # (target, hidden, batch, method, gc_model)
    ("2d", 64, 64, "ct", "ema"),
    ("2d", 256, 256, "ct", "ema"),
    ("random_64", 64, 128, "ct", "ema"),
    ("random_64", 64, 128, "gc", "ema"),
    ("random_64", 256, 512, "ct", "ema"),
    ("random_64", 256, 512, "gc", "ema"),
]
UNET_CONFIGS = [
    # (target, batch, method, gc_model, seed_map): the digits presets' network, batch and GC
    # generator; the seeds in a loop (the default) or under vmap
    ("digits_mixture", 64, "ct", "ema", "loop"),
    ("digits_mixture", 64, "ct", "ema", "vmap"),
    ("digits_mixture", 64, "gc", "ema", "loop"),
    ("digits_mixture", 64, "gc", "ema", "vmap"),
]


def _unet_spec(batch: int, method: str, gc_model: str, seed_map: str) -> EnsembleSpec:
    """The digits presets' recipe as far as the ensemble expresses it (gcflows.presets)."""
    return EnsembleSpec(
        method=method,
        gc_model=gc_model,
        backbone="unet",
        seed_map=seed_map,
        batch=batch,
        lr=1e-3,
        s1=160,
        ema_beta=0.995,
        sigma_data=0.5,
    )


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed pairs (vectorized then sequential) per configuration; medians reported",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (robust when cores are shared)",
    )
    p.add_argument(
        "--backbones",
        nargs="+",
        choices=("mlp", "unet"),
        default=["mlp", "unet"],
        help="which configurations: the MLP ones, the U-Net ones (both)",
    )
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.threads < 1 or args.repeats < 1:
        p.error("--seeds, --steps, --threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    rows = []
    jobs = []
    if "mlp" in args.backbones:
        for name, hidden, batch, method, gc_model in CONFIGS:
            spec = EnsembleSpec(
                method=method, gc_model=gc_model, hidden=hidden, depth=3, batch=batch
            )
            jobs.append((name, "mlp", hidden, spec))
    if "unet" in args.backbones:
        for name, batch, method, gc_model, seed_map in UNET_CONFIGS:
            spec = _unet_spec(batch, method, gc_model, seed_map)
            jobs.append((name, f"unet-{seed_map}", "-", spec))
    for name, backbone, hidden, spec in jobs:
        target = two_gaussians_1to2() if name == "2d" else get_preset(name)
        method, gc_model, batch = spec.method, spec.gc_model, spec.batch
        seeds = list(range(args.seeds))
        warm = EnsembleSpec(**{**spec.as_dict(), "steps": 1})
        seed_steps_per_second(target, warm, seeds[:1], True, args.clock)
        seed_steps_per_second(target, warm, seeds[:1], False, args.clock)
        timed = EnsembleSpec(**{**spec.as_dict(), "steps": args.steps})
        start = time.perf_counter()
        vecs, seqs = [], []
        for _ in range(args.repeats):  # interleaved: a load change affects both sides alike
            vecs.append(seed_steps_per_second(target, timed, seeds, True, args.clock))
            seqs.append(seed_steps_per_second(target, timed, seeds, False, args.clock))
        vec, seq = statistics.median(vecs), statistics.median(seqs)
        ratios = [v / q for v, q in zip(vecs, seqs, strict=True)]
        row = dict(
            target=name,
            backbone=backbone,
            hidden=hidden,
            batch=batch,
            method=method,
            gc_model=gc_model,
            seeds=args.seeds,
            steps=args.steps,
            vectorized=round(vec, 2),
            sequential=round(seq, 2),
            ratio=round(statistics.median(ratios), 2),
            ratio_range=[round(min(ratios), 2), round(max(ratios), 2)],
            repeats=args.repeats,
            clock=args.clock,
            wall_s=round(time.perf_counter() - start, 1),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"{'target':>14} {'net':>9} {'hidden':>6} {'batch':>5} {'method':>9} {'vec/s':>7} "
        f"{'seq/s':>7} {'ratio':>6}",
        file=sys.stdout,
    )
    for r in rows:
        m = r["method"] + ("-" + r["gc_model"] if r["method"] == "gc" else "")
        print(
            f"{r['target']:>14} {r['backbone']:>9} {r['hidden']:>6} {r['batch']:>5} {m:>9} "
            f"{r['vectorized']:>7} {r['sequential']:>7} {r['ratio']:>6}"
        )
    return rows


if __name__ == "__main__":
    main()
