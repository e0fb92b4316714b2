"""The default image comparison: IC, batch-OT and GC (mu = 0.5) consistency training on the 8x8
scikit-learn digits, same budget, several seeds, evaluated along training (docs/paper.md
section 5 scaled down to a CPU).

    python experiments/digits_comparison.py                       # 3 seeds, about 12 min on 2 cores
    python experiments/digits_comparison.py --quick               # smoke run, under a minute
    python experiments/digits_comparison.py --seeds 0 1 2 3 4 --steps 6000 --figures docs/figures

For every seed, the three runs (presets ``digits_base``, ``digits_ot``, ``digits_gc_mix50``) start
from the same initial weights and see the same data batches and training noise (all derived from
the seed), so they differ only in the coupling; the budget is the same number of steps (GC costs
one extra gradient-free forward pass per step, docs/paper.md section 2). Runs go to ``--workers``
processes with one torch thread each.

Every ``--eval-every`` steps (and at step 0) the EMA model draws ``--n-eval`` one-step samples from
a fixed noise (per seed, shared by the couplings), clipped to [-1, 1], and is scored against the
held-out digits test split (359 images) with the protocol of ``experiments/eval_images.py``:
Frechet distance in the features of the cached digits classifier (``fd_classifier``), sliced W2
in pixel space (``sw2_pixels``), and the share of samples the classifier places with probability
>= 0.9 (``confident_fraction``). At the end, each final EMA model is also scored with two-step
sampling. The data floor is the same metrics for ``--n-eval`` real training images.

Writes, in ``--out/digits_comparison_<time>/``: ``config.json`` (arguments, seeds, presets,
classifier hash, git SHA, versions, device), one training run folder per (coupling, seed),
``results.json`` / ``results.csv`` (every evaluation: coupling, seed, step, metrics),
``metrics_vs_step.png`` (mean over seeds, band = min..max over seeds), ``samples_final.png``
(one-step samples of each coupling, seed 0, same noise) and ``samples_along_training.png``; with
``--figures DIR`` the two sample figures and the curves are also copied there. A summary table
(mean [95 % Student-t interval] over seeds) is printed last, with the total wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcflows import checks
from gcflows.classifier import load_classifier
from gcflows.data import load_digits
from gcflows.evaluation import ImageMetrics, generate, samplers, seed_interval
from gcflows.progress import Interrupted, JobFailed, JobPool, Progress, signals_interrupt
from gcflows.records import (
    check_writable,
    jsonable,
    make_run_dir,
    print_table,
    write_config,
    write_results,
)
from gcflows.training import train
from gcflows.training.images import (
    GridCallback,
    build_model,
    image_grid,
    load_images,
    resolve_run,
)

PRESETS = {"ic": "digits_base", "ot": "digits_ot", "gc": "digits_gc_mix50"}
LABELS = {"ic": "IC (iCT)", "ot": "batch-OT", "gc": "GC, mu = 0.5"}
CURVE_METRICS = ("fd_classifier", "sw2_pixels", "confident_fraction")
N_GRID = 16  # samples kept per evaluation for the along-training figure (4 x 4)


def _metrics_for(classifier) -> ImageMetrics:
    ref, labels = load_digits("test")
    return ImageMetrics(
        "digits",
        ref,
        classifier=classifier,
        label_distribution=torch.bincount(labels, minlength=10).double(),
    )


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (coupling, seed) run with evaluations along training; returns its records."""
    torch.set_num_threads(1)
    t_start, c_start = time.perf_counter(), time.process_time()
    classifier, _ = load_classifier(cache_dir=job["classifier_cache"])
    metrics = _metrics_for(classifier)
    run = resolve_run(
        PRESETS[job["coupling"]],
        seed=job["seed"],
        overrides=[*job["overrides"], "progress=false"],
        out_dir=job["run_dir"],
    )
    images = load_images("digits", None)
    model = build_model(run.config)
    shape = run.image_shape
    n_eval, eval_every = job["n_eval"], job["eval_every"]
    one_step = samplers(run.config, "digits")["one_step"]
    evals: list[dict[str, Any]] = []
    grids: dict[int, np.ndarray] = {}

    def evaluate(ema_model, step: int) -> None:
        t0 = time.perf_counter()
        x = generate(ema_model, n_eval, shape, one_step, job["eval_seed"])
        vals = metrics(x)
        grids[step] = x[:N_GRID].numpy()
        evals.append(
            {
                "coupling": job["coupling"],
                "seed": job["seed"],
                "step": step,
                "sampler": "one_step",
                **vals,
                "eval_s": time.perf_counter() - t0,
            }
        )

    def callback(info) -> bool:
        if info.step % eval_every == 0 or info.step == info.total_steps:
            was_training = info.ema_model.training
            evaluate(info.ema_model, info.step)
            info.ema_model.train(was_training)
        return False

    evaluate(model.eval(), 0)  # the initial weights (the EMA starts from them)
    model.train()
    grid_cb = GridCallback(run.config, shape)
    result = train(run.config, model, images, resume=None, callbacks=[callback, grid_cb])
    train_wall = time.perf_counter() - t_start
    final = {}
    for name, sigmas in samplers(run.config, "digits").items():
        x = generate(result.ema_model, n_eval, shape, sigmas, job["eval_seed"])
        final[name] = metrics(x, details=True)
        if name == "one_step":
            final_grid = x[:100].numpy()
    return {
        "coupling": job["coupling"],
        "seed": job["seed"],
        "run_dir": str(result.run_dir),
        "evals": evals,
        "final": final,
        "grids": grids,
        "final_grid": final_grid,
        "wall_s": train_wall,
        "cpu_s": time.process_time() - c_start,
        "steps": result.step,
    }


def data_floor(classifier, n: int, seeds: Sequence[int]) -> dict[str, Any]:
    """The metrics of ``n`` real training images (one draw per seed) against the test split."""
    metrics = _metrics_for(classifier)
    train_images, _ = load_digits("train")
    rows = []
    for seed in seeds:
        g = torch.Generator().manual_seed(10_000 + int(seed))
        idx = torch.randperm(train_images.shape[0], generator=g)[: min(n, train_images.shape[0])]
        rows.append(metrics(train_images[idx]))
    return {k: seed_interval([r[k] for r in rows]) for k in rows[0]}


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def plot_curves(rows: list[dict], floor: dict, path: Path) -> Path:
    from gcflows.plotting import Curve, plot_panels

    panels: dict[str, list] = {}
    hlines: dict[str, list] = {}
    for metric in CURVE_METRICS:
        curves = []
        for coupling in PRESETS:
            sub = [r for r in rows if r["coupling"] == coupling]
            steps = sorted({r["step"] for r in sub})
            vals = [[r[metric] for r in sub if r["step"] == s] for s in steps]
            curves.append(
                Curve(
                    steps,
                    [float(np.mean(v)) for v in vals],
                    lo=[float(np.min(v)) for v in vals],
                    hi=[float(np.max(v)) for v in vals],
                    label=LABELS[coupling],
                )
            )
        panels[metric] = curves
        f = floor[metric]
        hlines[metric] = [{"y": f["mean"], "label": "real data (floor)", "color": "gray"}]
    ylabels = {
        "fd_classifier": "Frechet distance (classifier features)",
        "sw2_pixels": "sliced W2 (pixels)",
        "confident_fraction": "share classified with p >= 0.9",
    }
    return plot_panels(
        panels,
        path,
        xlabel="training step",
        ylabel=ylabels,
        logy={"fd_classifier": True, "sw2_pixels": True, "confident_fraction": False},
        hlines=hlines,
        ncols=3,
        suptitle="digits: one-step samples of the EMA model vs the test split "
        "(mean over seeds, band = min..max)",
    )


def plot_final_grids(records: list[dict], seed: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PRESETS), figsize=(3.2 * len(PRESETS), 3.5))
    for ax, coupling in zip(axes, PRESETS, strict=True):
        rec = next(r for r in records if r["coupling"] == coupling and r["seed"] == seed)
        ax.imshow(
            image_grid(torch.from_numpy(rec["final_grid"]), nrow=10),
            cmap="gray",
            vmin=0,
            vmax=255,
            interpolation="nearest",
        )
        fd = rec["final"]["one_step"]["fd_classifier"]
        ax.set_title(f"{LABELS[coupling]}\nFD {fd:.1f}, step {rec['steps']}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"one-step samples (seed {seed}, same noise for the three couplings)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_along_training(records: list[dict], seed: int, path: Path, n_cols: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [next(r for r in records if r["coupling"] == c and r["seed"] == seed) for c in PRESETS]
    steps = sorted(recs[0]["grids"])
    pick = sorted({steps[round(i * (len(steps) - 1) / (n_cols - 1))] for i in range(n_cols)})
    fig, axes = plt.subplots(
        len(recs), len(pick), figsize=(1.6 * len(pick), 1.75 * len(recs)), squeeze=False
    )
    for i, rec in enumerate(recs):
        for j, step in enumerate(pick):
            ax = axes[i, j]
            ax.imshow(
                image_grid(torch.from_numpy(rec["grids"][step]), nrow=4, scale=3),
                cmap="gray",
                vmin=0,
                vmax=255,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"step {step}", fontsize=8)
            if j == 0:
                ax.set_ylabel(LABELS[rec["coupling"]], fontsize=8)
    fig.suptitle(f"one-step samples along training (seed {seed})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def fmt(s: dict) -> str:
    """``mean [lo, hi]`` of a :func:`gcflows.evaluation.seed_interval` record (just the mean for
    one seed)."""
    if s["mean"] is None:
        return "-"
    if s["lo"] is None:
        return f"{s['mean']:.3g}"
    return f"{s['mean']:.3g} [{s['lo']:.3g}, {s['hi']:.3g}]"


def _per_seed(records: list[dict], rows: list[dict], final_rows: list[dict], mid_step: int):
    """Per (coupling, seed): final FD (both samplers), FD at ``mid_step`` and the mean log FD over
    the evaluations after step 0 (a convergence-speed summary: lower = faster / better)."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for r in records:
        c, s = r["coupling"], r["seed"]
        fin = {f["sampler"]: f for f in final_rows if f["coupling"] == c and f["seed"] == s}
        curve = [e for e in rows if e["coupling"] == c and e["seed"] == s and e["step"] > 0]
        out[(c, s)] = {
            "fd_one_step": fin["one_step"]["fd_classifier"],
            "fd_two_step": fin["two_step"]["fd_classifier"],
            "fd_mid": next(e["fd_classifier"] for e in curve if e["step"] == mid_step),
            "mean_log_fd": float(np.mean([np.log(e["fd_classifier"]) for e in curve])),
        }
    return out


def summarize(records, rows, final_rows, floor, seeds) -> tuple[dict, list[dict]]:
    """Mean [95 % t-interval] over seeds per coupling, and the paired differences to IC (the runs
    of a seed share initial weights, data batches and noise, so seed-to-seed variation cancels)."""
    steps_all = sorted({r["step"] for r in rows})
    mid_step = steps_all[len(steps_all) // 2]
    per_seed = _per_seed(records, rows, final_rows, mid_step)
    keys = ("fd_one_step", "fd_two_step", "fd_mid", "mean_log_fd")
    summary: dict[str, Any] = {"mid_step": mid_step}
    table = []
    for coupling in PRESETS:
        fin = {
            name: {
                k: seed_interval(
                    [r[k] for r in final_rows if r["coupling"] == coupling and r["sampler"] == name]
                )
                for k in ("fd_classifier", "sw2_pixels", "confident_fraction", "classes_covered")
            }
            for name in ("one_step", "two_step")
        }
        recs = [r for r in records if r["coupling"] == coupling]
        own = {k: seed_interval([per_seed[(coupling, s)][k] for s in seeds]) for k in keys}
        paired = {
            k: seed_interval([per_seed[(coupling, s)][k] - per_seed[("ic", s)][k] for s in seeds])
            for k in keys
        }
        summary[coupling] = {
            "final": fin,
            "per_seed": {str(s): per_seed[(coupling, s)] for s in seeds},
            "curve": own,
            "minus_ic_paired": paired if coupling != "ic" else None,
            "wall_s_per_run": float(np.mean([r["wall_s"] for r in recs])),
            "cpu_s_per_run": float(np.mean([r["cpu_s"] for r in recs])),
            "per_class_seed0": next(r for r in recs if r["seed"] == seeds[0])["final"]["one_step"][
                "per_class"
            ],
        }
        table.append(
            {
                "coupling": LABELS[coupling],
                f"FD@{mid_step}": fmt(own["fd_mid"]),
                "FD 1-step": fmt(fin["one_step"]["fd_classifier"]),
                "FD 2-step": fmt(fin["two_step"]["fd_classifier"]),
                "1-step FD - IC (paired)": "" if coupling == "ic" else fmt(paired["fd_one_step"]),
                "mean log FD - IC": "" if coupling == "ic" else fmt(paired["mean_log_fd"]),
                "confident 1-step": fmt(fin["one_step"]["confident_fraction"]),
                "SW2 1-step": fmt(fin["one_step"]["sw2_pixels"]),
                "cpu s/run": f"{summary[coupling]['cpu_s_per_run']:.0f}",
            }
        )
    table.append(
        {
            "coupling": "real train images",
            "FD 1-step": fmt(floor["fd_classifier"]),
            "confident 1-step": fmt(floor["confident_fraction"]),
            "SW2 1-step": fmt(floor["sw2_pixels"]),
        }
    )
    return summary, table


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
QUICK = {"seeds": [0, 1], "steps": 40, "eval_every": 20, "n_eval": 200}
DEFAULTS = {"seeds": [0, 1, 2], "steps": None, "eval_every": 250, "n_eval": 1000}
QUICK_OVERRIDES = ["batch_size=32", "s1=20", "sample_every=20"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs", help="parent folder of the run folder")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0 1)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the presets')")
    p.add_argument("--eval-every", type=int, default=None, help="default 250 (quick: 20)")
    p.add_argument("--n-eval", type=int, default=None, help="samples per evaluation (1000)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--figures", default=None, help="also copy the figures to this folder")
    p.add_argument("--classifier-cache", default=None, help="default ~/.cache/gcflows")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 40 steps, 200 samples")
    p.add_argument("--quiet", action="store_true", help="one log line per run, no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value overrides for all runs (train_images)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument before any work (argparse's error and exit 2 otherwise).

    Explicit values win over ``--quick``'s; the runs' configs are resolved here (an unknown or
    bad ``key=value`` override fails now, not in a worker)."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def check_args(args: argparse.Namespace) -> None:
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:  # before the user's overrides, so that theirs win
        args.overrides = [*QUICK_OVERRIDES, *args.overrides]
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ValueError(f"--seeds={args.seeds} is invalid: use distinct integers >= 0")
    if args.steps is not None:
        checks.integer(args.steps, "--steps", lo=1)
    checks.integer(args.eval_every, "--eval-every", lo=1)
    checks.integer(args.n_eval, "--n-eval", lo=2)
    checks.integer(args.workers, "--workers", lo=1)
    args.run_overrides = run_overrides(args)
    for coupling in PRESETS:  # every run's config, validated before any work
        resolve_run(PRESETS[coupling], overrides=args.run_overrides, seed=args.seeds[0])
    check_writable(args.out)
    if args.figures:
        check_writable(args.figures)


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides of every run: the user's, then ``--steps``."""
    steps = [] if args.steps is None else [f"total_steps={args.steps}"]
    return [*args.overrides, *steps]


def run_all(jobs: list[dict], args: argparse.Namespace) -> list[dict]:
    """Every (coupling, seed) run in ``--workers`` processes with progress on stderr; SIGINT /
    SIGTERM terminate the workers (no orphan keeps training) and exit non-zero."""
    records = []
    try:
        with (
            signals_interrupt(),
            Progress(len(jobs), "digits_comparison", quiet=args.quiet) as progress,
            JobPool(run_job, min(args.workers, len(jobs)), progress) as pool,
        ):
            for job in jobs:
                pool.submit(job, f"{job['coupling']} seed {job['seed']}")
            for _, rec in pool.results():
                records.append(rec)
    except Interrupted as err:
        print(
            f"[digits_comparison] {err}: the workers were stopped; the runs' folders keep what "
            "they wrote",
            file=sys.stderr,
        )
        raise SystemExit(128 + err.signum) from None
    except JobFailed as err:  # a job's error, or its worker killed (the out-of-memory killer)
        print(f"digits_comparison.py: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    records.sort(key=lambda r: (list(PRESETS).index(r["coupling"]), r["seed"]))
    return records


def make_jobs(args: argparse.Namespace, run_dir: Path) -> list[dict[str, Any]]:
    return [
        {
            "coupling": c,
            "seed": s,
            "overrides": args.run_overrides,
            "run_dir": str(run_dir / f"{c}_s{s}"),
            "n_eval": args.n_eval,
            "eval_every": args.eval_every,
            "eval_seed": s,
            "classifier_cache": args.classifier_cache,
        }
        for s in args.seeds
        for c in ("gc", "ot", "ic")  # the slowest first, so the workers finish together
    ]


def write_figures(records, rows, floor, args, run_dir: Path) -> dict[str, Path]:
    figs = {
        "curves": plot_curves(rows, floor, run_dir / "metrics_vs_step.png"),
        "final": plot_final_grids(records, args.seeds[0], run_dir / "samples_final.png"),
        "along": plot_along_training(
            records, args.seeds[0], run_dir / "samples_along_training.png"
        ),
    }
    if args.figures:
        dest = Path(args.figures)
        dest.mkdir(parents=True, exist_ok=True)
        for path in figs.values():
            shutil.copy(path, dest / f"digits_comparison_{path.name}")
    return figs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    classifier, clf_info = load_classifier(cache_dir=args.classifier_cache, verbose=True)
    run_dir = make_run_dir(args.out, "digits_comparison")
    config0 = resolve_run(PRESETS["ic"], overrides=args.run_overrides, seed=args.seeds[0]).config
    write_config(
        run_dir,
        args,
        seed=args.seeds,
        presets={c: PRESETS[c] for c in PRESETS},
        train_config_ic_seed0=config0.to_dict(),
        classifier={k: clf_info[k] for k in ("hash", "test_accuracy", "path")},
        two_step_sigmas=samplers(config0, "digits"),
    )
    jobs = make_jobs(args, run_dir)
    print(
        f"{len(jobs)} runs ({', '.join(PRESETS)} x seeds {args.seeds}), {config0.total_steps} "
        f"steps each, {args.workers} worker(s) -> {run_dir}",
        flush=True,
    )
    records = run_all(jobs, args)
    floor = data_floor(classifier, args.n_eval, args.seeds)
    rows = [e for r in records for e in r["evals"]]
    final_rows = [
        {"coupling": r["coupling"], "seed": r["seed"], "step": r["steps"], "sampler": name, **m}
        for r in records
        for name, m in r["final"].items()
    ]
    for row in final_rows:
        row.pop("per_class", None)
    figs = write_figures(records, rows, floor, args, run_dir)
    summary, table = summarize(records, rows, final_rows, floor, args.seeds)
    wall = time.perf_counter() - t_start
    results = {
        "wall_time_s": wall,
        "steps": config0.total_steps,
        "seeds": args.seeds,
        "n_eval": args.n_eval,
        "eval_every": args.eval_every,
        "floor": floor,
        "summary": summary,
        "final": final_rows,
        "runs": [
            {k: r[k] for k in ("coupling", "seed", "run_dir", "wall_s", "cpu_s", "steps")}
            for r in records
        ],
        "figures": {k: str(v) for k, v in figs.items()},
    }
    write_results(run_dir, results, rows + final_rows)
    (run_dir / "summary.json").write_text(json.dumps(jsonable(results["summary"]), indent=2) + "\n")
    print(f"results in {run_dir}")
    print_table(
        table,
        title=f"digits comparison: {len(args.seeds)} seeds x {config0.total_steps} steps, "
        f"{args.n_eval} one-step samples vs the test split, mean [95% interval]; "
        f"total wall time {wall:.0f} s",
    )
    return results


if __name__ == "__main__":
    main()
