"""Continuous-time consistency training with every coupling: gradient noise and training.

    python experiments/continuous_study.py            # default study (~10 min, quiet 2-core CPU)
    python experiments/continuous_study.py --quick    # smoke run (< 60 s)

Two parts, on the authors' 2D target (``two_gaussians_1to2``) and a 64-D mixture
(``gmm.random_mixture(64, 8)``), ``ve`` process on ``[1e-3, 5]``:

1. Gradient noise (``gcflows.continuous.gradient_noise``). A network is first trained by discrete
   CT for ``--noise-budget`` CPU seconds; at each time of a log-spaced grid and for each coupling
   - IC, batch-OT (exact, batches of 256), GC with the ideal flow map (``mu = 1``), GC with the
   trained network itself (``mu = 1``) - the per-sample continuous squared-L2 gradients
   ``gamma = 2 J_theta^T g`` give ``noise = E||gamma - gamma_CD||^2`` (the part CD does not pay),
   ``tr Cov[gamma]``, the bias ``||E gamma - E gamma_CD||^2`` relative to ``||E gamma_CD||^2``, and
   for IC the exact conditional term of Eq. (*) and ``r_t`` (R(theta)'s integrand). Verdict per
   time: GC noise below IC noise when the 2-SE intervals do not overlap.
2. Training at equal CPU time, through the library (``gcflows.training.train`` with a
   ``TrainConfig``, :func:`train_config`): discrete CT (iCT: pseudo-Huber, curriculum,
   lognormal indices), continuous CT and continuous GC (``mu = --mu``, the online network's
   current weights as ``gc_model``: an EMA of decay 0) with sCM's stabilizers (tangent
   normalization c = 0.1, tangent warm-up over the first 10 % of the steps), and continuous CT
   without them (``--methods`` adds ``gc_cont_nostab``, continuous GC without them). Each run
   gets the steps that fit ``--budget`` CPU seconds (``time.process_time``, one thread: equal
   compute even on a shared machine), measured once per method and target on
   ``CALIBRATION_STEPS`` steps, so every seed trains the same number of steps and a run is
   reproducible given its step count; ``--seeds`` seeds. Metrics: one-step samples
   ``f(t_max z, t_max)`` against target samples (exact W2 in 2D, sliced W2 in 64-D) and the
   consistency error ``E||f(x_t, t) - flow_map(x_t, t)||^2`` against the exact flow map, averaged
   over three times; runs whose loss becomes non-finite are counted as ``nan_runs``.

Run folder ``--out/continuous_study_<time>/`` with config.json, results.json, results.csv; the
summary table is printed last; progress (tqdm) goes to stderr. Every argument is checked before
any work or file (one ``error:`` line, exit status 2): sizes and budgets positive and finite, at
least one seed, ``--mu`` a probability and only with a GC method, ``--out`` writable;
``--quick`` sets only the sizes not given explicitly.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gcflows import checks
from gcflows import gmm as G
from gcflows.consistency import ConsistencyModel
from gcflows.continuous import gradient_noise
from gcflows.discrepancy import FlowMapGenerator, flow_map_error, flow_map_reference
from gcflows.metrics import exact_w2, sliced_w2
from gcflows.networks import ToyMLP
from gcflows.processes import VEProcess
from gcflows.records import (
    check_writable,
    make_run_dir,
    print_table,
    write_config,
    write_results,
)
from gcflows.training import NonFiniteLossError, TrainConfig
from gcflows.training import train as library_train

PROCESS = VEProcess(t_min=1e-3, t_max=5.0)
COUPLINGS = ("ic", "ot", "gc_ideal", "gc_trained")
METHODS = ("ct_discrete", "ct_cont", "gc_cont", "ct_cont_nostab", "gc_cont_nostab")
DEFAULT_METHODS = METHODS[:4]
CALIBRATION_STEPS = 8  # timed library steps that size a run to its CPU budget


def make_target(name: str) -> G.GaussianMixture:
    if name == "2d":
        return G.two_gaussians_1to2()
    return G.random_mixture(64, 8, 0)


def make_model(dim: int, hidden: int, seed: int, time_scale: float) -> ConsistencyModel:
    torch.manual_seed(seed)
    # time_scale 10 (default): an embedding smooth on the scale of t, so d_t f stays moderate;
    # ToyMLP's own default 1000 oscillates on the scale t / 250
    net = ToyMLP(dim, hidden, 3, time_scale=time_scale)
    return ConsistencyModel(net, PROCESS, check_inputs=False)


def train_config(method: str, args: argparse.Namespace, total_steps: int, seed: int = 0):
    """The library's ``TrainConfig`` of ``method``: iCT (pseudo-Huber, curriculum over
    ``total_steps``) for ``ct_discrete``; continuous CT / GC with squared L2 (``C = 1``, the form
    of the gradient-noise part) and, unless ``*_nostab``, sCM's tangent normalisation (0.1) and
    tangent warm-up over the first 10 % of the steps. ``ema_decay=0``: the GC generator (the EMA)
    is the online network's current weights. Adam, constant ``--lr``, no clipping."""
    continuous = method != "ct_discrete"
    stab = continuous and not method.endswith("nostab")
    return TrainConfig(
        method="gc" if method.startswith("gc") else "ct",
        mu=args.mu if method.startswith("gc") else 0.5,
        process=PROCESS.name,
        t_min=PROCESS.t_min,
        t_max=PROCESS.t_max,
        distance="squared_l2" if continuous else "pseudo_huber",
        continuous=continuous,
        tangent_norm=0.1 if stab else None,
        tangent_warmup=total_steps // 10 if stab else 0,
        batch_size=args.batch,
        total_steps=total_steps,
        lr=args.lr,
        ema_decay=0.0,
        seed=10_000 + seed,
        checkpoint_every=0,
        log_every=total_steps,
        progress=False,
    )


def _run(method: str, target, args, seed: int, steps: int, callbacks=()) -> dict[str, Any]:
    """``steps`` library steps of ``method`` (``gcflows.training.train``) on a fresh model."""
    model = make_model(target.dim, args.hidden, seed, args.time_scale)
    config = train_config(method, args, steps, seed)
    start, diverged = time.process_time(), False
    try:
        res = library_train(
            config, model, target.to(dtype=torch.float32).sample, callbacks=callbacks
        )
        done = res.step
    except NonFiniteLossError as err:  # the weights are those before the bad step
        diverged, done = True, err.step
    cpu = time.process_time() - start
    return {"model": model, "steps": done, "cpu_s": cpu, "diverged": diverged}


def steps_for_budget(method: str, target, args, budget: float) -> int:
    """Library steps of ``method`` that fit ``budget`` CPU seconds: ``CALIBRATION_STEPS`` steps
    are timed (``time.process_time`` between the first and the last step's callback, so the
    set-up is not counted) and the budget divided by the time per step (at least one step)."""
    stamps: list[float] = []
    _run(
        method,
        target,
        args,
        0,
        CALIBRATION_STEPS,
        [lambda info: stamps.append(time.process_time())],
    )
    per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return max(1, int(budget / max(per_step, 1e-9)))


def train(
    method: str, target, args, seed: int, budget: float | None = None, steps: int | None = None
) -> tuple[ConsistencyModel, dict[str, Any]]:
    """Train ``method`` through the library for the steps that fit ``budget`` CPU seconds
    (default ``args.budget``; ``steps`` when already measured); returns the model and stats."""
    if steps is None:
        steps = steps_for_budget(method, target, args, args.budget if budget is None else budget)
    out = _run(method, target, args, seed, steps)
    return out.pop("model"), out


@torch.no_grad()
def evaluate(model, target, reference, args, seed: int) -> dict[str, float]:
    model = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(20_000 + seed)
    n = args.n_eval
    z = torch.randn(n, target.dim, generator=gen, dtype=torch.float64)
    t = torch.full((n,), PROCESS.t_max, dtype=torch.float64)
    samples = model(PROCESS.t_max * z, t)
    ref = target.sample(n, gen)
    if not torch.isfinite(samples).all():
        return {"w2": math.nan, "consistency_error": math.nan}
    if target.dim == 2:
        w2 = exact_w2(samples, ref)
    else:
        w2 = sliced_w2(samples, ref, generator=torch.Generator().manual_seed(seed))
    ce = flow_map_error(model, reference)
    return {"w2": float(w2), "consistency_error": float(sum(ce["mse"]) / len(ce["mse"]))}


def noise_curves(name: str, target, args, bar) -> list[dict[str, Any]]:
    """Part 1: gradient noise per time and coupling at a CT-trained network (none if
    ``--n-times 0``)."""
    if args.n_times == 0:
        return []
    trained, _ = train("ct_discrete", target, args, 0, budget=args.noise_budget)
    model = copy.deepcopy(trained).double().eval()
    ideal = FlowMapGenerator(target, PROCESS)
    times = torch.logspace(math.log10(0.01), math.log10(3.0), args.n_times).tolist()
    rows = []
    for t in times:
        for coupling in COUPLINGS:
            kind = "gc" if coupling.startswith("gc") else coupling
            gc_model = (
                ideal if coupling == "gc_ideal" else model if coupling == "gc_trained" else None
            )
            res = gradient_noise(
                model,
                target,
                PROCESS,
                t,
                coupling=kind,
                n=args.n_noise,
                gc_model=gc_model,
                mu=1.0,
                generator=torch.Generator().manual_seed(int(1e6 * t) % 2**31),
            )
            row = {"target": name, "t": t, **res.as_dict(), "coupling": coupling}
            row["rel_bias"] = res.bias / res.grad_norm2
            row["bias/null"] = res.bias / res.bias_null
            rows.append(row)
            bar.update(1)
    return rows


def noise_verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by = {(r["target"], r["t"], r["coupling"]): r for r in rows}
    for (name, t, coupling), ic in by.items():
        if coupling != "ic":
            continue
        entry = {"target": name, "t": t, "ic_noise": ic["noise"], "ic_exact": ic["exact_noise"]}
        for c in COUPLINGS[1:]:
            r = by[(name, t, c)]
            ratio = r["noise"] / ic["noise"]
            gap = 2 * math.hypot(r["noise_se"], ic["noise_se"])
            verdict = (
                "<"
                if r["noise"] + gap < ic["noise"]
                else ">"
                if r["noise"] - gap > ic["noise"]
                else "~"
            )
            entry[f"{c}/ic"] = ratio
            entry[f"{c}_vs_ic"] = verdict
            entry[f"{c}_rel_bias"] = r["rel_bias"]
        out.append(entry)
    return out


def summarize(train_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["target"] for r in train_rows):
        for method in dict.fromkeys(r["method"] for r in train_rows):
            rs = [r for r in train_rows if r["target"] == name and r["method"] == method]
            ok = [r for r in rs if math.isfinite(r["w2"]) and not r["diverged"]]
            row = {
                "target": name,
                "method": method,
                "seeds": len(rs),
                "nan_runs": len(rs) - len(ok),
            }
            for key in ("w2", "consistency_error", "steps"):
                vals = torch.tensor([float(r[key]) for r in ok], dtype=torch.float64)
                row[key] = float(vals.mean()) if len(ok) else math.nan
                row[f"{key}_se"] = (
                    float(vals.std() / math.sqrt(len(ok))) if len(ok) > 1 else math.nan
                )
            out.append(row)
    return out


COUPLING_LABELS = {"ic": "IC", "ot": "batch-OT", "gc_ideal": "GC ideal", "gc_trained": "GC trained"}


def make_figure(noise_rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Gradient noise ``E||gamma - gamma_CD||^2`` against t, one panel per target, one curve per
    coupling with +-2 SE bands (the lower edge clipped at y / 20 on the log axis), and IC's exact
    value (docs/theory.md section 6)."""
    if not noise_rows:
        return None
    from gcflows.plotting import Curve, plot_panels  # matplotlib only when a figure is drawn

    panels: dict[str, list] = {}
    for target in dict.fromkeys(r["target"] for r in noise_rows):
        curves = []
        for coupling in dict.fromkeys(r["coupling"] for r in noise_rows):
            rows = [r for r in noise_rows if r["target"] == target and r["coupling"] == coupling]
            if not rows:
                continue
            t = [r["t"] for r in rows]
            y = [r["noise"] for r in rows]
            lo = [max(r["noise"] - 2 * r["noise_se"], r["noise"] / 20) for r in rows]  # log axis
            hi = [r["noise"] + 2 * r["noise_se"] for r in rows]
            curves.append(Curve(t, y, lo, hi, label=COUPLING_LABELS.get(coupling, coupling)))
        exact = [r for r in noise_rows if r["target"] == target and r["exact_noise"] is not None]
        if exact:
            ex_t, ex_y = [r["t"] for r in exact], [r["exact_noise"] for r in exact]
            curves.append(Curve(ex_t, ex_y, label="IC exact", style={"ls": "--", "color": "k"}))
        panels[f"{target} target"] = curves
    return plot_panels(
        panels,
        path,
        xlabel="t",
        ylabel="gradient noise E||gamma - gamma_CD||^2",
        logx=True,
        logy=True,
        ncols=2,
        suptitle="Continuous CT gradient noise per coupling",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    run_dir = make_run_dir(args.out, "continuous_study")
    write_config(run_dir, args, seed=list(range(args.seeds)))
    t0_wall, t0_cpu = time.perf_counter(), time.process_time()
    targets = {name: make_target(name) for name in args.targets}
    total = len(targets) * (args.n_times * len(COUPLINGS) + args.seeds * len(args.methods))
    noise_rows, train_rows = [], []
    with tqdm(total=total, file=sys.stderr, desc="continuous study") as bar:
        for name, target in targets.items():
            noise_rows += noise_curves(name, target, args, bar)
            reference = flow_map_reference(
                target,
                PROCESS,
                (0.05, 0.5, 2.0),
                args.n_ref,
                generator=torch.Generator().manual_seed(1),
            )
            # one step count per method and target, timed once: every seed trains the same steps
            steps = {m: steps_for_budget(m, target, args, args.budget) for m in args.methods}
            for seed in range(args.seeds):
                for method in args.methods:
                    model, stats = train(method, target, args, seed, steps=steps[method])
                    metrics = evaluate(model, target, reference, args, seed)
                    train_rows.append(
                        {"target": name, "method": method, "seed": seed, **stats, **metrics}
                    )
                    bar.update(1)
    verdicts = noise_verdicts(noise_rows)
    summary = summarize(train_rows)
    timing = {"wall_s": time.perf_counter() - t0_wall, "cpu_s": time.process_time() - t0_cpu}
    results = {
        "noise": noise_rows,
        "verdicts": verdicts,
        "training": train_rows,
        "summary": summary,
        "timing": timing,
    }
    write_results(run_dir, results, summary)
    make_figure(noise_rows, run_dir / "continuous_gradient_noise.png")
    print_table(
        [
            {
                k: r[k]
                for k in (
                    "target",
                    "t",
                    "coupling",
                    "noise",
                    "noise_se",
                    "exact_noise",
                    "trace_ct",
                    "trace_cd",
                    "rel_bias",
                    "bias/null",
                    "proxy",
                )
            }
            for r in noise_rows
        ],
        title="Gradient noise per time and coupling (noise = E||gamma - gamma_CD||^2)",
    )
    print_table(
        verdicts,
        title="\nDoes GC lower CT's gradient noise? (< lower, > higher, ~ overlap at 2 SE)",
    )
    print(f"\nrun folder: {run_dir}; wall {timing['wall_s']:.1f} s, CPU {timing['cpu_s']:.1f} s")
    print_table(summary, title=f"\nTraining at equal CPU time ({args.budget} s per run)")
    return results


# sizes (quick, default): an explicit value always wins over --quick
SIZES = {
    "seeds": (2, 5),
    "budget": (0.3, 6.0),
    "noise_budget": (0.5, 10.0),
    "n_times": (2, 5),
    "n_noise": (24, 128),
    "n_eval": (200, 1000),
    "n_ref": (20, 200),
    "hidden": (32, 64),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke run (< 60 s): small sizes unless given"
    )
    p.add_argument("--out", default="runs", help="parent folder of the run folder")
    p.add_argument("--targets", nargs="+", default=["2d", "64d"], choices=["2d", "64d"])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (5; quick 2)")
    p.add_argument("--budget", type=float, default=None, help="CPU s per training run (6; 0.3)")
    p.add_argument(
        "--noise-budget", type=float, default=None, help="CPU s of the noise network (10; 0.5)"
    )
    p.add_argument("--n-times", type=int, default=None, help="noise times (5; quick 2; 0: none)")
    p.add_argument("--n-noise", type=int, default=None, help="pairs per time, coupling (128; 24)")
    p.add_argument("--n-eval", type=int, default=None, help="evaluation samples (1000; 200)")
    p.add_argument("--n-ref", type=int, default=None, help="flow-map points per time (200; 20)")
    p.add_argument("--hidden", type=int, default=None, help="MLP width (64; quick 32)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mu", type=float, default=None, help="GC fraction of gc_cont* (0.5)")
    p.add_argument("--time-scale", type=float, default=10.0, help="ToyMLP time_scale")
    p.add_argument("--threads", type=int, default=1)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Fill the sizes (``--quick`` or default, an explicit value wins) and check every argument
    before any work or any file; ``ValueError`` naming the flag otherwise."""
    for name, (quick, default) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    checks.integer(args.seeds, "--seeds", lo=1, fix="use at least one seed")
    checks.real(args.budget, "--budget", lo_open=0.0, fix="use a positive, finite CPU time (s)")
    checks.real(args.noise_budget, "--noise-budget", lo_open=0.0, fix="use a positive CPU time")
    checks.integer(args.n_times, "--n-times", lo=0, fix="use an integer >= 0 (0: no noise part)")
    checks.integer(args.n_noise, "--n-noise", lo=2, fix="use >= 2 pairs (a standard error)")
    checks.integer(args.n_eval, "--n-eval", lo=2)
    checks.integer(args.n_ref, "--n-ref", lo=1)
    checks.integer(args.hidden, "--hidden", lo=1)
    checks.integer(args.batch, "--batch", lo=2)
    checks.integer(args.threads, "--threads", lo=1)
    checks.real(args.lr, "--lr", lo_open=0.0, fix="use a positive, finite learning rate")
    checks.real(args.time_scale, "--time-scale", lo_open=0.0, fix="use a positive time scale")
    for flag in ("targets", "methods"):
        values = getattr(args, flag)
        if len(set(values)) != len(values):
            raise checks.bad(f"--{flag}", values, "name each one once")
    gc = [m for m in args.methods if m.startswith("gc")]
    if args.mu is not None and not gc:
        raise checks.bad(
            "--mu", args.mu, f"it applies to gc_cont / gc_cont_nostab only, not {args.methods}"
        )
    args.mu = 0.5 if args.mu is None else args.mu
    checks.probability(args.mu, "--mu", "of a generator-induced pair in GC")
    for method in args.methods:
        train_config(method, args, 10)  # TrainConfig's own checks, here rather than mid-run
    check_writable(args.out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    return run(args)


if __name__ == "__main__":
    main()
