"""The paper's headline claims in high dimension, against exact Gaussian-mixture oracles.

    python experiments/highdim_study.py [--quick | --full] [--out runs] [--seeds 10] [--steps 160]

Three parts, one run folder (``config.json``, ``results.json``, ``results.csv``, figures):

1. **Proxy** ``R~_t`` per coupling and target (docs/paper.md Eq. 17, Fig. 2): IC exactly
   (posterior covariance trace) and by the learned regressor (``gcflows.regression``; the IC
   validation table: regressor vs exact at every d and t), batch-OT at batch 512 and 2048, GC
   with the ideal generator (exact flow map, RK4) at mu = 1 and 0.5, GC with trained generators
   (the warm-up EMA of a GC run at two points of training; needs the training part), on the
   random mixtures at d = 16, 64, 256, the digits-like mixture and the real digits (IC and
   batch-OT only; no exact reference there); ``--full`` adds d = 3072 (IC, batch-OT 512 and GC
   mu = 1 only, 2048 training pairs per time) and fits every target with more pairs (16384 per
   time, 4096 held out) and steps (cap 3000). Regressor: ``REGRESSOR`` (one network per time,
   each time from its own random stream, early stopping; the product of two half-fits'
   residuals), ``n_train`` training pairs per time, ``n_test`` held-out pairs per time; every
   point also estimated from half its pairs (the convergence margin; "not converged" beyond
   ``--conv-tol``). ``--pairs``, ``--test-pairs``, ``--reg-steps``, ``--regressor JSON``,
   ``--reg-seed`` and ``--couplings`` change them (``--couplings ic``: the IC validation alone).
   Validation against references: IC exact at every t; at times where the modes do not mix,
   GC with the ideal generator in closed form (isotropic components) and every coupling against
   per-component least squares (exact for IC and GC mu = 1, an upper bound for batch-OT).
   Ordering per t (called only where the intervals, sampling half-width plus convergence margin,
   separate) and a verdict on "GC < batch-OT < IC, the gap growing with t" per target.
   ``--workers``: the (target, coupling) jobs in that many processes.
2. **Training head to head** on the 64-D random mixture and the digits-like mixture (``--train``
   adds d = 256): CD (exact velocity), CT (IC), batch-OT, GC mu in {0.3, 0.5, 1.0} (warm-up EMA
   generator), GC with the ideal generator, ``--seeds`` seeds each through the vectorized
   ensemble (``gcflows.ensemble``), same network, optimizer, schedule and budget. Exact metrics:
   consistency error against the exact flow map over t, mode-mass total variation, per-mode mean
   and covariance error of one- and two-step samples, sliced W2 against fresh target samples;
   paired-by-seed differences against CT with 95 % t-intervals; metric-vs-step curves.
3. **EMA ablation** (the same training part): GC mu = 0.5 with the online network, the warm-up
   EMA (the authors') and a constant 0.9999 EMA as generator.

Metrics are per coordinate (divided by d) where marked ``/d``. A summary table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from gcflows import mixture_eval as me
from gcflows.ensemble import VARIANTS, EnsembleSpec, train_ensemble
from gcflows.gmm import GaussianMixture, get_preset
from gcflows.highdim_proxy import (
    BIG_D_TARGETS,
    estimate,
    make_sampler,
    ordering_verdicts,
    proxy_couplings,
    proxy_part,
    proxy_rows,
    target_verdict,
)
from gcflows.metrics import sliced_w2
from gcflows.progress import Progress
from gcflows.records import (
    check_writable,
    make_run_dir,
    print_table,
    write_config,
    write_results,
)
from gcflows.regression import RegressorConfig

# name -> (method, mu, gc_model): the library's named variants, in this study's order
METHODS = {
    name: VARIANTS[name]
    for name in (
        "cd",
        "ct",
        "ot",
        "gc0.3",
        "gc0.5",
        "gc1.0",
        "gc0.5-ideal",
        "gc0.5-online",
        "gc0.5-constema",
    )
}


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
PROXY_TIMES = [0.05, 0.2, 0.5, 1.0, 2.0, 10.0]
ALL_COUPLINGS = ["ic", "ot512", "ot2048", "gc1-ideal", "gc0.5-ideal"]
PROXY_TARGETS = ["random_16", "random_64", "random_256", "digits_mixture", "digits"]
# the regressor of the proxy (gcflows.regression.RegressorConfig); quick: a smoke-sized fit
# per-time fits: one network per time, each from its own stream (a time's estimate does not
# depend on the pairs of another time; gcflows.regression.estimate_proxy, Streams)
REGRESSOR = dict(per_time=True, hidden=128, depth=2, dropout=0.0, batch=512, max_steps=1500)
QUICK_REGRESSOR = dict(per_time=True, hidden=32, max_steps=60, eval_every=20, patience=3)
# a point is "converged" when its n/2-pairs estimate is within this share of its n-pairs one
CONV_TOL = 0.05


def settings(quick: bool, full: bool = False) -> dict:
    """The design. Default: the proxy on ``PROXY_TARGETS``; ``full`` adds ``random_3072``."""
    if quick:
        return dict(
            proxy_targets=["random_16", "digits_mixture"],
            proxy_times=[0.1, 1.0, 10.0],
            couplings=["ic", "ot512", "gc1-ideal"],
            n_train=512,
            n_test=512,
            regressor=dict(QUICK_REGRESSOR),
            big_d_pairs=512,
            train_targets=["random_16"],
            methods=["ct", "ot", "gc0.5", "gc0.5-online"],
            hidden=32,
            depth=2,
            batch=128,
            n_samples=256,
            n_eval=64,
            ideal_steps=8,
            trained_gc_proxy=True,
            estimator="product",
            conv_tol=CONV_TOL,
            ref_pairs=2048,
        )
    return dict(
        proxy_targets=PROXY_TARGETS + (BIG_D_TARGETS if full else []),
        proxy_times=list(PROXY_TIMES),
        # the claim's three (docs/paper.md Fig. 2); --full (or --couplings) adds batch-OT at 2048
        # and GC at mu = 0.5 (per-time fits with convergence cost about 4 fits per time)
        couplings=ALL_COUPLINGS if full else ["ic", "ot512", "gc1-ideal"],
        # training pairs per time (validation share included): more at the hard times 0.2-1;
        # --full: twice that, and most at t = 0.2 (the largest bias on random_16 / random_64)
        # per-time fits: 8192 at every time (GC at t = 0.05 needs them on random_64, GC at
        # t = 2, 10 too: docs/highdim.md); --full: twice that
        n_train=[16384] * 6 if full else [8192] * 6,
        n_test=4096 if full else 2048,
        regressor=dict(REGRESSOR, max_steps=3000) if full else dict(REGRESSOR),
        big_d_pairs=2048,  # 3072-D (--full): training pairs per time, IC / OT512 / GC mu = 1 only
        train_targets=["random_64", "digits_mixture"],
        methods=list(METHODS),
        hidden=64,
        depth=2,
        batch=256,
        n_samples=1000,
        n_eval=256,
        ideal_steps=12,
        trained_gc_proxy=True,
        # two fits on halves of the pairs, the held-out product of their residuals: the fits'
        # variance cancels (gcflows.regression.estimate_proxy, product=True; docs/highdim.md)
        estimator="product",
        conv_tol=CONV_TOL,
        # pairs of the per-component least-squares reference at non-mixing times (at least 16
        # per regression coefficient and component; see linear_reference)
        ref_pairs=16384,
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
    p.add_argument(
        "--full",
        action="store_true",
        help="the complete proxy design: adds the 3072-D mixture, more pairs and steps",
    )
    p.add_argument("--out", default="runs", help="parent folder of the run folder")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (10; quick 3)")
    p.add_argument("--steps", type=int, default=None, help="training steps (160; quick 40)")
    p.add_argument("--train-256", action="store_true", help="also train on the 256-D mixture")
    p.add_argument("--proxy-targets", nargs="+", default=None, help="subset of the proxy targets")
    p.add_argument(
        "--pairs",
        type=int,
        nargs="+",
        default=None,
        help="regressor training pairs per time: one number, or one per proxy time "
        "(default 8192 at t = 0.2-1, else 2048; --full 16384 at t = 0.2)",
    )
    p.add_argument(
        "--test-pairs", type=int, default=None, help="held-out pairs per time (2048; --full 4096)"
    )
    p.add_argument(
        "--reg-steps", type=int, default=None, help="regressor step cap per fit (1500; --full 3000)"
    )
    p.add_argument(
        "--regressor",
        type=json.loads,
        default=None,
        help="RegressorConfig fields as JSON, e.g. '{\"per_time\": true}' (gcflows.regression)",
    )
    p.add_argument("--reg-seed", type=int, default=1, help="seed of the regressor's pairs and fit")
    p.add_argument(
        "--estimator",
        choices=["product", "held-out"],
        default=None,
        help="proxy estimate: the product of two half-fits' residuals (default) or one fit's "
        "held-out residual",
    )
    p.add_argument(
        "--couplings", nargs="+", default=None, help="subset of the proxy couplings (e.g. ic)"
    )
    p.add_argument("--skip-proxy", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument(
        "--quiet", action="store_true", help="one log line per job on stderr, no progress bar"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: best when shared)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes for the proxy part's (target, coupling) jobs (1: in this process)",
    )
    p.add_argument(
        "--conv-tol",
        type=float,
        default=None,
        help=f"convergence tolerance: a proxy point whose n/2-pairs estimate differs from its "
        f"n-pairs one by more than this share is marked not converged ({CONV_TOL})",
    )
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the --quick defaults and validate everything before a run folder exists (exit 2)."""
    if args.seeds is None:
        args.seeds = 3 if args.quick else 10
    if args.steps is None:
        args.steps = 40 if args.quick else 160
    if args.seeds < 2:
        p.error(f"--seeds={args.seeds} is invalid: use >= 2 (paired intervals need 2 seeds)")
    if args.steps < 4:
        p.error(f"--steps={args.steps} is invalid: use >= 4 (curves at quarters of training)")
    if args.quick and args.full:
        p.error("--quick and --full together are contradictory: pick one")
    known = settings(False, full=True)["proxy_targets"]
    for name in args.proxy_targets or []:
        if name not in known:
            p.error(f"--proxy-targets: {name!r} is invalid: use names from {known}")
    n_times = len(settings(args.quick)["proxy_times"])
    if args.pairs is not None and len(args.pairs) not in (1, n_times):
        p.error(f"--pairs={args.pairs} is invalid: give one number or {n_times} (one per time)")
    for flag, v in (
        *(("--pairs", n) for n in args.pairs or []),
        ("--test-pairs", args.test_pairs),
        ("--reg-steps", args.reg_steps),
    ):
        if v is not None and v < 16:
            p.error(f"{flag}={v} is invalid: use >= 16")
    if args.regressor is not None:
        if not isinstance(args.regressor, dict):
            p.error(f"--regressor={args.regressor!r} is invalid: give a JSON object")
        try:
            RegressorConfig(**{**settings(args.quick, args.full)["regressor"], **args.regressor})
        except (TypeError, ValueError) as err:
            p.error(f"--regressor is invalid: {err}")
    known_c = ALL_COUPLINGS
    for name in args.couplings or []:
        if name not in known_c:
            p.error(f"--couplings: {name!r} is invalid: use names from {known_c}")
    if args.threads < 1:
        p.error(f"--threads={args.threads} is invalid: use >= 1")
    if args.workers < 1:
        p.error(f"--workers={args.workers} is invalid: use >= 1")
    if args.reg_seed < 0:
        p.error(f"--reg-seed={args.reg_seed} is invalid: use an integer >= 0")
    if args.conv_tol is not None and not (math.isfinite(args.conv_tol) and args.conv_tol > 0):
        p.error(f"--conv-tol={args.conv_tol} is invalid: use a finite number > 0")
    if args.skip_proxy and args.skip_train:
        p.error("--skip-proxy and --skip-train together leave nothing to run")
    if args.train_256 and args.skip_train:
        p.error("--train-256 and --skip-train together are contradictory: pick one")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out={args.out} is invalid: it is a file; give a folder")
    try:
        check_writable(out)
    except ValueError as err:
        p.error(f"--out={args.out} is invalid: {err}")


# ------------------------------------------------------------------------------------------------
# part 2: training
# ------------------------------------------------------------------------------------------------
def sigma_data(target: GaussianMixture) -> float:
    var = float(target.second_moment() - (target.mean() ** 2).sum()) / target.dim
    return math.sqrt(var)


# the script's names of gcflows.mixture_eval.sample_metrics' keys (results.csv columns)
METRIC_NAMES = {
    "mode_tv": "mode_tv",
    "mean_err": "mean_err_per_d",
    "cov_err": "cov_rel_err",
    "sw2": "sw2",
}


def sample_metrics(target: GaussianMixture, x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Exact-oracle metrics of one seed's samples ``x (n, d)`` (``gcflows.mixture_eval``)."""
    return {METRIC_NAMES[k]: v for k, v in me.sample_metrics(target, x, ref).items()}


def paired(values: dict[str, np.ndarray], base: str = "ct") -> dict[str, tuple]:
    """``method -> (mean diff, lo, hi)`` of per-seed ``method - base`` (95 % t-interval)."""
    out = {}
    for m, v in values.items():
        if m == base:
            continue
        diff = v - values[base]
        n = diff.size
        hw = stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n)
        out[m] = (float(diff.mean()), float(diff.mean() - hw), float(diff.mean() + hw))
    return out


def train_part(cfg: dict, args, bar) -> tuple[list[dict], dict, dict]:
    rows, curves, paired_out = [], {}, {}
    seeds = list(range(args.seeds))
    checkpoints = [args.steps * q // 4 for q in (1, 2, 3, 4)]
    trained_gc = {}
    targets = list(cfg["train_targets"]) + (["random_256"] if args.train_256 else [])
    for tname in targets:
        target = get_preset(tname)
        # x_t at EVAL_TIMES and their exact flow maps (RK4, 48 steps); the sliced-W2 reference
        # from its own seed
        ev = me.make_eval_set(target, n_flow=cfg["n_eval"], n_ref=2)
        ref = target.sample(cfg["n_samples"], generator=torch.Generator().manual_seed(99)).float()
        per_metric: dict[str, dict[str, np.ndarray]] = {}
        curves[tname] = {}
        for mname in cfg["methods"]:
            method, mu, gc_model = METHODS[mname]
            spec = EnsembleSpec(
                method=method,
                mu=mu if method == "gc" else 0.5,
                gc_model=gc_model,
                steps=args.steps,
                batch=cfg["batch"],
                hidden=cfg["hidden"],
                depth=cfg["depth"],
                sigma_data=sigma_data(target),
                ideal_steps=cfg["ideal_steps"],
            )
            curve = []
            snaps = {}

            def callback(step, ens, curve=curve, snaps=snaps, mname=mname, ev=ev, ref=ref):
                s = len(ens.seeds)
                ce = me.consistency_error(ens.apply, s, ev).mean(1)
                g = torch.Generator().manual_seed(5)
                x1 = me.samples(ens.apply, s, ens.dim, cfg["n_samples"] // 4, 1, g)
                sw = [
                    sliced_w2(x1[i].double(), ref.double(), 64, torch.Generator().manual_seed(7))
                    for i in range(len(ens.seeds))
                ]
                curve.append(dict(step=step, cons_err=ce.tolist(), sw2_1step=sw))
                if mname == "gc0.5" and ens.ema is not None:
                    snaps[step] = {k: v[0].detach().clone() for k, v in ens.ema.items()}

            t0 = time.perf_counter()
            ens = train_ensemble(target, spec, seeds, callback=callback, callback_steps=checkpoints)
            wall = time.perf_counter() - t0
            curves[tname][mname] = curve
            if snaps:
                trained_gc[tname] = (ens, snaps)
            ce = me.consistency_error(ens.apply, len(seeds), ev)
            g = torch.Generator().manual_seed(11)
            # one-step then two-step samples, both from g
            one, two = [
                me.samples(ens.apply, len(seeds), ens.dim, cfg["n_samples"], k, g) for k in (1, 2)
            ]
            costs = torch.stack(ens.pair_costs)  # (steps, S)
            late = costs[-max(1, args.steps // 4) :].mean(0) / target.dim
            for i, seed in enumerate(seeds):
                m1 = sample_metrics(target, one[i], ref)
                m2 = sample_metrics(target, two[i], ref)
                row = dict(
                    part="train",
                    target=tname,
                    method=mname,
                    seed=seed,
                    cons_err=float(ce[i].mean()),
                    **{f"cons_err_t{t:g}": float(ce[i, j]) for j, t in enumerate(me.EVAL_TIMES)},
                    **{f"{k}_1step": v for k, v in m1.items()},
                    **{f"{k}_2step": v for k, v in m2.items()},
                    pair_cost_per_d=float(late[i]),
                    train_wall_s=round(wall, 1),
                )
                rows.append(row)
                for k, v in row.items():
                    if isinstance(v, float) and k != "train_wall_s":
                        per_metric.setdefault(k, {}).setdefault(mname, []).append(v)
            bar.done(f"train {tname} {mname} ({len(seeds)} seeds)", wall)
        paired_out[tname] = {
            k: paired({m: np.asarray(v) for m, v in per.items()})
            for k, per in per_metric.items()
            if "ct" in per
        }
        # curves: paired difference against CT at each checkpoint
        if "ct" in curves[tname]:
            for curve in curves[tname].values():
                for j, pt in enumerate(curve):
                    base = curves[tname]["ct"][j]
                    for key in ("cons_err", "sw2_1step"):
                        diff = np.asarray(pt[key]) - np.asarray(base[key])
                        n = diff.size
                        hw = stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n)
                        pt[f"{key}_minus_ct"] = [float(diff.mean()), float(hw)]
    return rows, curves, {"paired": paired_out, "trained_gc": trained_gc}


def trained_gc_proxy(cfg: dict, trained: dict, bar) -> tuple[list[dict], dict]:
    """Proxy of GC (mu = 1) with the warm-up EMA of the gc0.5 run (seed 0) at two checkpoints."""
    rows, curves = [], {}
    for tname, (ens, snaps) in trained.items():
        target = get_preset(tname)
        steps = sorted(snaps)
        for step in (steps[len(steps) // 2 - 1], steps[-1]):
            model = ens.seed_model(0)
            state = {k: v.clone() for k, v in snaps[step].items()}
            state.update({k: v[0].clone() for k, v in ens.buffers.items()})
            model.load_state_dict(state)

            def gc_model(x, t, model=model):
                with torch.no_grad():
                    return model(x.float(), t.float()).double()

            t0 = time.perf_counter()
            sampler = make_sampler("gc1", target, cfg["ideal_steps"], gc_model)
            est = estimate(cfg, sampler, cfg["n_train"], cfg["n_test"])
            name = f"gc1-trained@{step}"
            curves.setdefault(tname, {})[name] = est.as_dict()
            rows += proxy_rows(tname, target.dim, name, est, time.perf_counter() - t0)
            bar.done(f"proxy {tname} {name}", time.perf_counter() - t0)
    return rows, curves


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def figures(run_dir: Path, proxy_curves: dict, train_curves: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if proxy_curves:
        n = len(proxy_curves)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), squeeze=False)
        for ax, (tname, per) in zip(axes[0], proxy_curves.items(), strict=True):
            for cname, est in per.items():
                t = np.asarray(est["times"])
                v = np.asarray(est["value"]) / est["dim"]
                h = np.asarray(est["half_width"]) / est["dim"]
                ax.errorbar(t, v, yerr=h, marker="o", ms=3, capsize=2, label=cname)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(tname, fontsize=9)
            ax.set_xlabel("t")
        axes[0][0].set_ylabel("R~_t / d")
        # one legend for every coupling: the last panel (real digits) has no GC curves
        handles = {}
        for ax in axes[0]:
            handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
        axes[0][-1].legend(list(handles.values()), list(handles), fontsize=6)
        fig.tight_layout()
        path = run_dir / "proxy.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path.name)
    if train_curves:
        n = len(train_curves)
        fig, axes = plt.subplots(2, n, figsize=(4.0 * n, 6.0), squeeze=False)
        for j, (tname, per) in enumerate(train_curves.items()):
            for mname, curve in per.items():
                steps = [p["step"] for p in curve]
                for i, key in enumerate(("cons_err", "sw2_1step")):
                    vals = np.asarray([p[key] for p in curve])
                    mean = vals.mean(1)
                    hw = 1.96 * vals.std(1, ddof=1) / math.sqrt(vals.shape[1])
                    axes[i][j].errorbar(steps, mean, yerr=hw, marker="o", ms=3, label=mname)
            axes[0][j].set_title(tname, fontsize=9)
            axes[0][j].set_ylabel("consistency error / d")
            axes[1][j].set_ylabel("sliced W2 (one step)")
            axes[1][j].set_xlabel("training step")
            for i in range(2):
                axes[i][j].set_yscale("log")
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        path = run_dir / "training_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path.name)
    return made


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = settings(args.quick, args.full)
    if args.proxy_targets:
        cfg["proxy_targets"] = list(args.proxy_targets)
    if args.pairs:
        cfg["n_train"] = args.pairs[0] if len(args.pairs) == 1 else list(args.pairs)
        cfg["big_d_pairs"] = cfg["n_train"]
    if args.test_pairs:
        cfg["n_test"] = args.test_pairs
    if args.reg_steps:
        cfg["regressor"]["max_steps"] = args.reg_steps
    if args.regressor:
        cfg["regressor"].update(args.regressor)
    if args.couplings:
        cfg["couplings"] = list(args.couplings)
    cfg["reg_seed"] = args.reg_seed
    if args.estimator:
        cfg["estimator"] = args.estimator
    if args.conv_tol is not None:
        cfg["conv_tol"] = args.conv_tol
    torch.set_num_threads(args.threads)
    run_dir = make_run_dir(args.out, "highdim_quick" if args.quick else "highdim")
    write_config(run_dir, args, list(range(args.seeds)), settings=cfg)
    start, cpu_start = time.perf_counter(), time.process_time()
    n_proxy = 0
    if not args.skip_proxy:
        n_proxy = sum(len(proxy_couplings(cfg, t)) for t in cfg["proxy_targets"])
        if cfg["trained_gc_proxy"] and not args.skip_train:
            n_proxy += 2 * (len(cfg["train_targets"]) + args.train_256)
    n_train = 0 if args.skip_train else len(cfg["train_targets"]) * len(cfg["methods"])
    # a bar on a terminal, else (or with --quiet) one line per finished job (gcflows.progress)
    bar = Progress(n_proxy + n_train, "highdim_study", quiet=args.quiet)
    results: dict = {"settings": cfg}
    rows: list[dict] = []
    proxy_curves: dict = {}
    proxy_wall = 0.0
    if not args.skip_proxy:
        t0 = time.perf_counter()

        def partial(prow, validation, curves):  # a run stopped early keeps the finished jobs
            extra = {"ic_validation": validation, "proxy_curves": curves, "partial": True}
            write_results(run_dir, {**results, **extra}, prow)

        prow, validation, proxy_curves = proxy_part(
            cfg, bar, args.workers, args.threads, on_job=partial
        )
        proxy_wall += time.perf_counter() - t0
        rows += prow
        results["ic_validation"] = validation
        write_results(run_dir, {**results, "proxy_curves": proxy_curves, "partial": True}, rows)
    train_curves: dict = {}
    if not args.skip_train:
        trow, train_curves, extra = train_part(cfg, args, bar)
        rows += trow
        results["paired_vs_ct"] = extra["paired"]
        results["train_curves"] = train_curves
        if cfg["trained_gc_proxy"] and not args.skip_proxy and extra["trained_gc"]:
            t0 = time.perf_counter()
            grows, gcurves = trained_gc_proxy(cfg, extra["trained_gc"], bar)
            proxy_wall += time.perf_counter() - t0
            rows += grows
            for tname, per in gcurves.items():
                proxy_curves.setdefault(tname, {}).update(per)
    bar.close()
    if proxy_curves:
        results["proxy_curves"] = proxy_curves
        order = ordering_verdicts(proxy_curves, cfg["proxy_times"])
        results["ordering"] = order
        results["verdicts"] = target_verdict(order)
    results["figures"] = figures(run_dir, proxy_curves, train_curves)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    results["cpu_s"] = round(time.process_time() - cpu_start, 1)
    results["proxy_wall_s"] = round(proxy_wall, 1)
    write_results(run_dir, results, rows)
    _summary(results)
    print(
        f"run folder: {run_dir}  wall {results['wall_s']} s (proxy part "
        f"{results['proxy_wall_s']} s)  cpu {results['cpu_s']} s"
    )
    return results


def _summary(results: dict) -> None:
    if "ic_validation" in results:
        print_table(
            results["ic_validation"],
            [
                "target",
                "coupling",
                "t",
                "estimate_per_d",
                "reference_per_d",
                "reference",
                "rel_bias",
                "rel_margin",
                "converged",
            ],
            title="The learned proxy against its references (R~_t / d; rel_margin: n/2 vs n pairs)",
        )
    if "verdicts" in results:
        print_table(results["verdicts"], title="Fig. 2 claim: GC < batch-OT < IC (per target)")
    for tname, per in results.get("paired_vs_ct", {}).items():
        table = []
        for m in per.get("cons_err", {}):
            row = {"method": m}
            for k in ("cons_err", "mode_tv_1step", "sw2_1step", "sw2_2step", "pair_cost_per_d"):
                if k in per and m in per[k]:
                    mean, lo, hi = per[k][m]
                    row[k] = f"{mean:+.3g} [{lo:+.3g}, {hi:+.3g}]"
            table.append(row)
        print_table(table, title=f"{tname}: paired difference vs CT (95 % CI over seeds)")


if __name__ == "__main__":
    main()
