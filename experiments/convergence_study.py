"""Convergence study: CD (positive control), CT, batch-OT and GC trained to a plateau, with curves.

    python experiments/convergence_study.py [--quick | --full] [--seeds 10] [--out runs] [--quiet]
    python experiments/convergence_study.py --report RUN_DIR   # (re)write RUN_DIR/tables.md

Design (docs/convergence.md): on the 64-D random mixture and the digits-like mixture (``--full``
adds the 256-D random mixture), every method of ``METHODS`` (CD with the exact velocity, CT,
batch-OT at the training batch, GC with the authors' warm-up EMA at mu = 0.3 and 0.5, with the
online network and with the ideal generator at mu = 0.5) is trained for ``--seeds`` seeds through
the vectorized ensemble (``gcflows.ensemble``; seeds paired across methods: the same initial
weights and draws where the methods draw alike) with one recipe (``RECIPE``: network, steps,
learning-rate schedule, curriculum). Every model is read through an EMA of its weights
(``EnsembleSpec.eval_ema``) at ``N_CHECKPOINTS`` checkpoints (consistency error, one-step sample
metrics) and at the end (``gcflows.mixture_eval.evaluate``: one- and two-step samples; the online
weights too, to show what the EMA removes).

Reported (``results.json``, tables on stdout and in ``tables.md``, ``learning_curves.png``):

- the **positive control**: CD - CT per metric at the end, paired by seed (95 % t-interval), and
  CT's last-quarter improvement (``gcflows.curves.last_quarter_improvement``) per metric: the
  recipe is accepted when CT improves by < 5 % over the last quarter on a primary metric and
  CD - CT excludes zero there;
- every method against CT (paired differences, all final metrics);
- **speed-up factors** on each primary metric (``gcflows.curves.speedup``): steps to reach CT's
  final quality and CT's quality at half the budget, as a ratio to CT's, bootstrap interval;
- ``--robustness``: GC (mu = 0.5) against CT at half and twice the learning rate, and GC with a
  constant 0.9999 EMA generator.

The primary metrics are ``PRIMARY`` (named in docs/convergence.md before the GC rows were run).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gcflows import checks
from gcflows.atomic import atomic_write_bytes
from gcflows.curves import band, last_quarter_improvement, paired_difference, speedup
from gcflows.ensemble import VARIANTS, EnsembleSpec, train_ensemble
from gcflows.gmm import GaussianMixture, get_preset
from gcflows.mixture_eval import METRICS, consistency_error, evaluate, make_eval_set
from gcflows.mixture_eval import sample_metrics as _sample_metrics
from gcflows.mixture_eval import samples as _samples
from gcflows.progress import JobPool, Progress, signals_interrupt
from gcflows.records import (
    check_writable,
    make_run_dir,
    print_table,
    write_config,
    write_results,
)

TARGETS = ["random_64", "digits_mixture"]
FULL_TARGETS = ["random_256"]
# name -> (method, mu, gc_model): the library's named variants, in this study's order
METHODS = {
    name: VARIANTS[name]
    for name in ("cd", "ct", "ot", "gc0.3", "gc0.5", "gc0.5-online", "gc0.5-ideal")
}
# --robustness: name -> (base method name, learning-rate factor, gc_model override)
# run only with --full: GC with the ideal generator on the digits-like mixture (its RK4 flow map
# takes the full-covariance velocity per row: about 5x a CT step; docs/convergence.md)
FULL_ONLY = {("digits_mixture", "gc0.5-ideal")}
ROBUSTNESS = {
    "ct@lr/2": ("ct", 0.5, None),
    "gc0.5@lr/2": ("gc0.5", 0.5, None),
    "ct@lr*2": ("ct", 2.0, None),
    "gc0.5@lr*2": ("gc0.5", 2.0, None),
    "gc0.5-constema": ("gc0.5", 1.0, "const_ema"),
}
#: the primary metrics (docs/convergence.md), exact sample metrics fair to every coupling, each
#: named before any GC row of its run was looked at, from CD and CT alone: the one-step mode-mass
#: TV (from a 3-seed pilot; one-step sliced W2 ranked CD below CT there), and the one-step
#: per-mode covariance error (added before the 2400-step run, on which the positive control
#: separated at 800 steps and in a 2400-step pilot of CD and CT, while the mode TV on random_64
#: did not)
PRIMARY = ("mode_tv_1step", "cov_err_1step")
#: metrics followed along training (evaluation EMA), and the figure's rows
CURVE_METRICS = ("cons_err", "sw2_1step", "mode_tv_1step", "cov_err_1step", "mean_err_1step")
N_CHECKPOINTS = 12
RECIPE = dict(
    hidden=128,
    depth=3,
    batch=256,
    steps=2400,
    lr=5e-4,
    lr_schedule="cosine",
    lr_warmup=0,
    s0=10,
    s1=1280,
    eval_ema=0.999,
    ideal_steps=12,
)
QUICK_RECIPE = dict(RECIPE, hidden=32, depth=2, batch=64, steps=48, s1=20, ideal_steps=4)
#: samples per seed: ``n_samples`` for the final metrics of the evaluation EMA (the mode TV of a
#: perfect sampler is then ~0.008 on random_64), ``n_curve`` for the curves and the online weights
EVAL = dict(n_flow=256, n_ref=4000, n_samples=20000, n_curve=4000)
QUICK_EVAL = dict(n_flow=32, n_ref=200, n_samples=200, n_curve=100)


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 60 s): tiny networks")
    p.add_argument("--full", action="store_true", help="adds the 256-D random mixture")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (10; quick 3)")
    p.add_argument("--steps", type=int, default=None, help=f"steps ({RECIPE['steps']})")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate ({RECIPE['lr']})")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None, help="(cosine)")
    p.add_argument("--s1", type=int, default=None, help=f"final grid intervals ({RECIPE['s1']})")
    p.add_argument("--hidden", type=int, default=None, help=f"width ({RECIPE['hidden']})")
    p.add_argument("--targets", nargs="+", default=None, help=f"subset of {TARGETS + FULL_TARGETS}")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {list(METHODS)}")
    p.add_argument("--robustness", action="store_true", help="adds the robustness runs")
    p.add_argument("--out", default="runs", help="parent folder of the run folder")
    p.add_argument("--workers", type=int, default=None, help="processes (min(2, cpus))")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    p.add_argument("--quiet", action="store_true", help="one log line per job, no progress bar")
    p.add_argument("--report", default=None, help="only (re)write tables.md of this run folder")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every argument before any work (one ``error:`` line and exit 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        p.error(str(err))
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.report is not None:
        if not (Path(args.report) / "results.json").is_file():
            fix = "name a run folder of this study (it holds results.json)"
            raise checks.bad("--report", args.report, fix)
        return
    if args.quick and args.full:
        raise ValueError("--quick and --full together are contradictory: pick one")
    if args.seeds is None:
        args.seeds = 3 if args.quick else 10
    checks.integer(args.seeds, "--seeds", lo=2, fix="use >= 2 (paired intervals need 2 seeds)")
    if args.steps is not None:
        checks.integer(
            args.steps, "--steps", lo=N_CHECKPOINTS, fix=f"use >= {N_CHECKPOINTS} (checkpoints)"
        )
    if args.lr is not None:
        checks.real(args.lr, "--lr", lo_open=0.0, fix="use a finite positive learning rate")
    if args.s1 is not None:
        checks.integer(args.s1, "--s1", lo=RECIPE["s0"], fix=f"use >= s0 = {RECIPE['s0']}")
    if args.hidden is not None:
        checks.integer(args.hidden, "--hidden", lo=1)
    checks.integer(args.threads, "--threads", lo=1)
    if args.workers is None:
        args.workers = max(1, min(2, os.cpu_count() or 1))
    checks.integer(args.workers, "--workers", lo=1)
    known = TARGETS + FULL_TARGETS
    for name in args.targets or []:
        checks.choice(name, "--targets", known)
    for name in args.methods or []:
        checks.choice(name, "--methods", list(METHODS))
    check_writable(args.out)
    for spec in specs_of(args, design(args)["recipe"], 1.0).values():
        spec.validate()


def design(args: argparse.Namespace) -> dict:
    """Targets, methods, recipe and evaluation sizes of this run (flags applied)."""
    recipe = dict(QUICK_RECIPE if args.quick else RECIPE)
    for key in ("steps", "lr", "s1", "hidden"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    if args.lr_schedule is not None:
        recipe["lr_schedule"] = args.lr_schedule
    targets = args.targets or (["random_64"] if args.quick else TARGETS)
    if args.full and not args.targets:
        targets = TARGETS + FULL_TARGETS
    return dict(
        targets=list(targets),
        runs=design_runs(args),
        recipe=recipe,
        eval=dict(QUICK_EVAL if args.quick else EVAL),
        checkpoints=checkpoints(recipe["steps"]),
        primary=PRIMARY,
    )


def checkpoints(steps: int) -> list[int]:
    """``N_CHECKPOINTS`` evenly spaced steps ending at ``steps`` (one at 3/4 when 4 divides it)."""
    return sorted({round(steps * q / N_CHECKPOINTS) for q in range(1, N_CHECKPOINTS + 1)})


def sigma_data(target: GaussianMixture) -> float:
    """The mixture's standard deviation per coordinate (the preconditioning's sigma_data)."""
    var = float(target.second_moment() - (target.mean() ** 2).sum()) / target.dim
    return math.sqrt(var)


def specs_of(args, recipe: dict, sd: float) -> dict[str, EnsembleSpec]:
    """One ``EnsembleSpec`` per run name."""
    out = {}
    for name, (base, lr_factor, gc_override) in design_runs(args).items():
        method, mu, gc_model = METHODS[base]
        out[name] = EnsembleSpec(
            method=method,
            mu=mu if method == "gc" else 0.5,
            gc_model=gc_override or gc_model,
            sigma_data=sd,
            **{**recipe, "lr": recipe["lr"] * lr_factor},
        )
    return out


def design_runs(args) -> dict:
    runs = {m: (m, 1.0, None) for m in (args.methods or METHODS)}
    if args.robustness:
        runs.update(ROBUSTNESS)
    return runs


# ------------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------------
def curve_point(target, ens, ev, n: int) -> dict[str, list[float]]:
    """The curve metrics of every seed's evaluation EMA at one checkpoint."""
    s = len(ens.seeds)

    def apply(x, t):
        return ens.apply(x, t, ens.eval_ema)

    out = {"cons_err": consistency_error(apply, s, ev).mean(1).double().tolist()}
    x = _samples(apply, s, target.dim, n, 1, torch.Generator().manual_seed(5))
    rows = [_sample_metrics(target, x[i], ev.ref) for i in range(s)]
    for m in CURVE_METRICS[1:]:
        out[m] = [r[m.removesuffix("_1step")] for r in rows]
    return out


def run_one(target, spec: EnsembleSpec, seeds: list[int], ev, cfg: dict) -> dict:
    """Train one method's seeds; its curves (evaluation EMA) and final metrics (EMA, online)."""
    curve: dict[str, list] = {m: [] for m in CURVE_METRICS}

    def callback(step, ens):
        for k, v in curve_point(target, ens, ev, cfg["eval"]["n_curve"]).items():
            curve[k].append(v)

    t0 = time.perf_counter()
    ens = train_ensemble(target, spec, seeds, callback=callback, callback_steps=cfg["checkpoints"])
    wall = time.perf_counter() - t0
    s, n = len(seeds), cfg["eval"]["n_samples"]
    final = evaluate(target, lambda x, t: ens.apply(x, t, ens.eval_ema), s, ev, n)
    online = evaluate(target, ens.apply, s, ev, cfg["eval"]["n_curve"])
    return dict(
        curves={k: np.asarray(v).T for k, v in curve.items()},  # (S, C)
        final=final,
        online=online,
        wall_s=wall,
        seed_steps_per_s=s * spec.steps / wall,
        pair_cost_per_d=(torch.stack(ens.pair_costs)[-spec.steps // 4 :].mean(0) / target.dim)
        .double()
        .numpy(),
    )


def analyse(res: dict[str, dict], steps: list[int], primary: Sequence[str]) -> dict:
    """Positive control, CT's plateau, paired differences and speed-ups of one target."""
    out: dict = {}
    ct = res["ct"]
    out["ct_last_quarter"] = {
        m: last_quarter_improvement(ct["curves"][m], steps).as_dict() for m in CURVE_METRICS
    }
    out["paired_vs_ct"] = {
        name: {m: paired_difference(r["final"][m], ct["final"][m]).as_dict() for m in METRICS}
        for name, r in res.items()
        if name != "ct"
    }
    out["paired_vs_ct_online"] = {
        name: {m: paired_difference(r["online"][m], ct["online"][m]).as_dict() for m in METRICS}
        for name, r in res.items()
        if name != "ct"
    }
    half = steps.index(min(steps, key=lambda k: abs(k - steps[-1] / 2)))
    out["speedup"] = {}  # metric -> run -> {"ct_final", "ct_half"}
    for m in primary:
        half_level = float(ct["curves"][m][:, half].mean())
        per = out["speedup"][m] = {}
        for name, r in res.items():
            if name == "ct":
                continue
            per[name] = {
                "ct_final": speedup(r["curves"][m], ct["curves"][m], steps).as_dict(),
                "ct_half": speedup(
                    r["curves"][m], ct["curves"][m], steps, level=half_level
                ).as_dict(),
            }
    # GC against CT at the same learning rate (robustness)
    for lr_tag in ("@lr/2", "@lr*2"):
        c, g = res.get(f"ct{lr_tag}"), res.get(f"gc0.5{lr_tag}")
        if c is not None and g is not None:
            out.setdefault("robustness", {})[f"gc0.5 - ct {lr_tag}"] = {
                m: paired_difference(g["final"][m], c["final"][m]).as_dict() for m in METRICS
            }
    # the authors' warm-up EMA against a constant 0.9999 EMA as the generator
    c, g = res.get("gc0.5"), res.get("gc0.5-constema")
    if c is not None and g is not None:
        out.setdefault("robustness", {})["gc0.5-constema - gc0.5"] = {
            m: paired_difference(g["final"][m], c["final"][m]).as_dict() for m in METRICS
        }
    return out


# ------------------------------------------------------------------------------------------------
# figure and tables
# ------------------------------------------------------------------------------------------------
def figure(run_dir: Path, all_res: dict, steps: list[int]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(all_res)
    fig, axes = plt.subplots(
        len(CURVE_METRICS),
        len(targets),
        figsize=(4.2 * len(targets), 2.6 * len(CURVE_METRICS)),
        squeeze=False,
    )
    # one colour per method in every panel (a panel may lack some methods)
    colours = {name: f"C{k}" for k, name in enumerate(METHODS)}
    handles = {}
    for j, tname in enumerate(targets):
        for name, r in all_res[tname].items():
            if name in ROBUSTNESS:
                continue
            for i, m in enumerate(CURVE_METRICS):
                mean, hw = band(r["curves"][m], steps)
                ax = axes[i][j]
                c = colours[name]
                (line,) = ax.plot(steps, mean, marker="o", ms=2.5, lw=1.2, color=c, label=name)
                ax.fill_between(steps, mean - hw, mean + hw, color=c, alpha=0.2)
                handles[name] = line
        for i, m in enumerate(CURVE_METRICS):
            axes[i][j].set_yscale("log")
            axes[i][j].set_ylabel(m + (" (primary)" if m in PRIMARY else ""), fontsize=8)
        axes[0][j].set_title(f"{tname} (evaluation EMA; mean, 95 % band)", fontsize=9)
        axes[-1][j].set_xlabel("training step")
    order = [n for n in METHODS if n in handles]
    axes[0][-1].legend([handles[n] for n in order], order, fontsize=7)
    fig.tight_layout()
    path = run_dir / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def markdown_tables(results: dict, rows: list[dict]) -> str:
    """The run's tables in Markdown (docs/convergence.md shows them): per target the positive
    control (CT and CD means, CD - CT, CT's last-quarter improvement), every run against CT, the
    speed-up factors per primary metric, the robustness comparisons; then the time per job.
    Built from ``results.json`` and the per-seed rows of ``results.csv`` alone."""
    primary = list(results["design"]["primary"])
    md: list[str] = []

    def mean(t: str, name: str, m: str) -> str:
        vals = [float(r[m]) for r in rows if r["target"] == t and r["method"] == name]
        return f"{np.mean(vals):.4g}"

    for t, a in results["analysis"].items():
        n = len([r for r in rows if r["target"] == t and r["method"] == "ct"])
        pc = a["paired_vs_ct"].get("cd")
        if pc is not None:
            md += [
                f"\n#### {t}: positive control (CD - CT, {n} seeds, paired; CT's last-quarter"
                " improvement)\n",
                "| metric | CT | CD | CD - CT (95 % CI) | CT last-quarter improvement |",
                "| --- | --- | --- | --- | --- |",
            ]
            for m in METRICS:
                lq = _fmt(a["ct_last_quarter"][m]) if m in a["ct_last_quarter"] else "-"
                label = f"**{m}** (primary)" if m in primary else m
                md.append(
                    f"| {label} | {mean(t, 'ct', m)} | {mean(t, 'cd', m)} | {_fmt(pc[m])} | {lq} |"
                )
        cols = [*primary, "sw2_1step", "mean_err_1step", "mode_tv_2step", "sw2_2step", "cons_err"]
        md += [
            f"\n#### {t}: every run against CT at the end (evaluation EMA; mean, and run - CT"
            f" with 95 % CI, {n} seeds)\n",
            "| run | " + " | ".join(cols) + " |",
            "| --- |" + " --- |" * len(cols),
            "| ct | " + " | ".join(mean(t, "ct", m) for m in cols) + " |",
        ]
        for name, per in a["paired_vs_ct"].items():
            cells = [f"{mean(t, name, m)}: {_fmt(per[m])}" for m in cols]
            md.append(f"| {name} | " + " | ".join(cells) + " |")
        for m, per in a["speedup"].items():
            md += [
                f"\n#### {t}: speed-up on {m} (steps to reach the level / CT's steps; bootstrap"
                " 95 % interval over seeds)\n",
                "| run | to CT's final quality | to CT's quality at half the budget |",
                "| --- | --- | --- |",
            ]
            md += [
                f"| {name} | {sp['ct_final']['describe']} | {sp['ct_half']['describe']} |"
                for name, sp in per.items()
            ]
        online = a.get("paired_vs_ct_online", {})
        if online:
            md.append(
                f"\nOnline weights instead of the evaluation EMA (run - CT; {', '.join(primary)}): "
                + "; ".join(
                    f"{k} " + ", ".join(_fmt(v[m]) for m in primary) for k, v in online.items()
                )
            )
        if "robustness" in a:
            md += [
                f"\n#### {t}: robustness (paired, 95 % CI)\n",
                "| comparison | " + " | ".join([*primary, "sw2_1step"]) + " |",
                "| --- |" + " --- |" * (len(primary) + 1),
            ]
            for name, per in a["robustness"].items():
                cells = [_fmt(per[m]) for m in (*primary, "sw2_1step")]
                md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += ["\n| job | wall s | seed-steps/s |", "| --- | --- | --- |"]
    md += [
        f"| {k} | {v['wall_s']} | {v['seed_steps_per_s']} |" for k, v in results["timing"].items()
    ]
    return "\n".join(md) + "\n"


def report(run_dir: str | Path) -> str:
    """(Re)write ``tables.md`` of a finished run folder from its results files; return it."""
    import csv
    import json

    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    if results.get("partial"):
        raise checks.bad("--report", str(run_dir), "name a finished run (its results are partial)")
    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # runs written before SpeedUp.first_step: the same rule (the JSON keeps no inf / nan, so
    # the stored description is kept otherwise)
    first = results["design"]["checkpoints"][0]
    for a in results["analysis"].values():
        for per in a["speedup"].values():
            for sp in per.values():
                for d in sp.values():
                    if d.get("base_steps") is not None and d["base_steps"] <= first:
                        d["describe"] = _describe({**d, "first_step": first, "ratio": 1.0})
    text = markdown_tables(results, rows)
    atomic_write_bytes(run_dir / "tables.md", text.encode())
    return text


def _fmt(iv: dict) -> str:
    return f"{iv['mean']:+.3g} [{iv['lo']:+.3g}, {iv['hi']:+.3g}]"


def summary(results: dict) -> None:
    primary = results["design"]["primary"]
    for tname, a in results["analysis"].items():
        pc = a["paired_vs_ct"].get("cd")
        if pc is not None:
            rows = [
                {
                    "metric": m,
                    "CD - CT (95 % CI)": _fmt(pc[m]),
                    "CT last-quarter improvement": _fmt(a["ct_last_quarter"][m])
                    if m in a["ct_last_quarter"]
                    else "",
                }
                for m in METRICS
            ]
            title = f"{tname}: positive control (primary {', '.join(primary)})"
            print_table(rows, title=title)
        rows = []
        for name, per in a["paired_vs_ct"].items():
            row = {"method": name}
            for m in (*primary, "sw2_1step", "sw2_2step", "cons_err"):
                row[m] = _fmt(per[m])
            rows.append(row)
        print_table(rows, title=f"{tname}: method - CT at the end (evaluation EMA)")
        if "robustness" in a:
            rows = [
                {"comparison": name, **{m: _fmt(per[m]) for m in (*primary, "sw2_1step")}}
                for name, per in a["robustness"].items()
            ]
            print_table(rows, title=f"{tname}: robustness (paired, 95 % CI)")
        for m, per in a["speedup"].items():
            rows = [
                {
                    "method": name,
                    "to CT final": sp["ct_final"]["describe"],
                    "to CT at half": sp["ct_half"]["describe"],
                }
                for name, sp in per.items()
            ]
            print_table(rows, title=f"{tname}: steps to reach CT's {m}, ratio to CT's")


# ------------------------------------------------------------------------------------------------
#: wall time of a job relative to CT's (the 2400-step run, docs/convergence.md): the costliest
#: jobs start first so that the two workers end together
COST = {"cd": 1.7, "ot": 1.2, "gc0.3": 1.1, "gc0.5": 0.9, "gc0.5-online": 0.9, "gc0.5-ideal": 2.1}


def run_job(job: dict) -> dict:
    """One (target, run) of the design, in a pool worker: train its seeds, evaluate them."""
    torch.set_num_threads(job["threads"])
    target = get_preset(job["target"])
    return run_one(target, job["spec"], job["seeds"], job["eval_set"], job)


def jobs_of(args: argparse.Namespace, cfg: dict, seeds: list[int]) -> list[dict]:
    """Every (target, run) job of the design, costliest first (``COST``). The target's
    evaluation draws (exact flow maps) are made here once and shared by its jobs."""
    out = []
    for tname in cfg["targets"]:
        target = get_preset(tname)
        ev = make_eval_set(target, cfg["eval"]["n_flow"], cfg["eval"]["n_ref"])
        for name, spec in specs_of(args, cfg["recipe"], sigma_data(target)).items():
            if (tname, name) in FULL_ONLY and not (args.full or args.methods):
                continue
            base = design_runs(args)[name][0]
            cost = COST.get(base, 1.0) * spec.steps * (1.0 if tname != "random_256" else 3.0)
            job = dict(target=tname, name=name, spec=spec, seeds=seeds, cost=cost, eval_set=ev)
            job.update(threads=args.threads, eval=cfg["eval"], checkpoints=cfg["checkpoints"])
            out.append(job)
    return sorted(out, key=lambda j: -j["cost"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report is not None:
        text = report(args.report)
        print(text)
        return {"report": text}
    cfg = design(args)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    run_dir = make_run_dir(args.out, "convergence_quick" if args.quick else "convergence")
    write_config(run_dir, args, seeds, settings=cfg)
    jobs = jobs_of(args, cfg, seeds)
    bar = Progress(len(jobs), "convergence_study", quiet=args.quiet)
    start, cpu0 = time.perf_counter(), time.process_time()
    done: dict = {}
    with signals_interrupt(), JobPool(run_job, min(args.workers, len(jobs)), bar) as pool:
        for job in jobs:
            pool.submit(job, f"{job['target']} {job['name']}")
        for label, r in pool.results():
            done[label] = r
            # what is done so far, in case the run is stopped (no analysis yet)
            all_res, rows = collect(cfg, jobs, done)
            write_results(run_dir, {"partial": True, "design": cfg, **_curves(all_res)}, rows)
    bar.close()
    all_res, rows = collect(cfg, jobs, done)
    analysis: dict = {}
    for tname, res in all_res.items():
        if "ct" in res:  # without the baseline (a --methods subset), curves and rows only
            analysis[tname] = analyse(res, cfg["checkpoints"], cfg["primary"])
            for per in analysis[tname]["speedup"].values():
                for sp in per.values():
                    for key, d in sp.items():
                        sp[key] = {**d, "describe": _describe(d)}
    results = dict(
        design=cfg,
        analysis=analysis,
        **_curves(all_res),
        figures=[figure(run_dir, all_res, cfg["checkpoints"])],
        wall_s=round(time.perf_counter() - start, 1),
        workers=min(args.workers, len(jobs)),
        # CPU time of this process; the workers' is the sum of the jobs' wall times (one thread)
        cpu_s=round(time.process_time() - cpu0, 1),
    )
    write_results(run_dir, results, rows)
    report(run_dir)
    summary(results)
    print(f"run folder: {run_dir}  wall {results['wall_s']} s  workers {results['workers']}")
    return results


def collect(cfg: dict, jobs: list[dict], done: dict) -> tuple[dict, list[dict]]:
    """``(target -> run -> result, rows)`` of the finished jobs, in the design's order (CT first
    within a target, then ``METHODS``, then the robustness runs), one row per seed."""
    all_res: dict = {}
    rows: list[dict] = []
    order = {name: i for i, name in enumerate(dict.fromkeys(["ct", *METHODS, *ROBUSTNESS]))}
    for tname in cfg["targets"]:
        finished = [j for j in jobs if j["target"] == tname and f"{tname} {j['name']}" in done]
        for job in sorted(finished, key=lambda j: order[j["name"]]):
            r = done[f"{tname} {job['name']}"]
            all_res.setdefault(tname, {})[job["name"]] = r
            for i, seed in enumerate(job["seeds"]):
                row = dict(target=tname, method=job["name"], seed=seed)
                row.update({m: float(r["final"][m][i]) for m in METRICS})
                row.update({f"online_{m}": float(r["online"][m][i]) for m in METRICS})
                row["pair_cost_per_d"] = float(r["pair_cost_per_d"][i])
                rows.append(row)
    return all_res, rows


def _curves(all_res: dict) -> dict:
    """``{"curves": target -> run -> metric -> (S, C) lists, "timing": ...}`` of finished runs."""
    return dict(
        curves={
            t: {n: {m: v.tolist() for m, v in r["curves"].items()} for n, r in res.items()}
            for t, res in all_res.items()
        },
        timing={
            f"{t}/{n}": dict(
                wall_s=round(r["wall_s"], 1), seed_steps_per_s=round(r["seed_steps_per_s"], 1)
            )
            for t, res in all_res.items()
            for n, r in res.items()
        },
    )


def _describe(d: dict) -> str:
    from gcflows.curves import SpeedUp

    return SpeedUp(**{k: d[k] for k in SpeedUp.__dataclass_fields__}).describe()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
