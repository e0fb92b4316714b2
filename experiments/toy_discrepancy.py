"""The CT / CD discrepancy measured exactly on 2D Gaussian mixtures (docs/paper.md section 3).

    python experiments/toy_discrepancy.py                 # default run (~190 s CPU, 2 workers)
    python experiments/toy_discrepancy.py --quick         # smoke run (under a minute)
    python experiments/toy_discrepancy.py --dataset eight_gaussians --process linear --seeds 0 1 2

Default setting: the authors' 2D notebook (docs/paper.md section 5): ``two_gaussians_1to2``
(modes at (0, -0.5) and (0, +0.5), std 0.01), VE process with sigma in [0.001, 5]
(``VEProcess(t_min=1e-3, t_max=5.0)``), ToyMLP with a positional time embedding, squared L2 as in
the notebook, curriculum s0 = 10, s1 = 100. Everything with the exact velocity of the mixture.

What it computes (the library does the work, this script wires it), one function per section:

1. Theorem 1 numerically (:func:`theorem1_job`: ``gcflows.discrepancy.loss_gaps`` /
   ``gradient_gaps`` / ``r_theta``) for a randomly initialised network and for the CT-trained
   network of the first seed: ``N^alpha (L_CT - L_CD)`` for N = 10 .. 1280 (and 10240, 81920 to
   show where pseudo-Huber reaches its alpha = 2 regime) against ``C T^(alpha-1) R(theta)``, for
   squared L2, pseudo-Huber and the Euclidean norm; the scaled gradient gaps.
2. The proxy ``R~_t`` per coupling (:func:`proxy_job`): IC (exact, posterior covariance), IC by
   k-NN (the estimator's validation), batch-OT (training batch size), GC with the ideal generator
   (exact flow map) and GC with the trained GC (mu = 0.5) model of the first seed, all by
   local-linear k-NN.
3. Training head to head (:func:`train_job`, ``gcflows.training.train``; same steps, batch,
   network, seeds): CD (exact velocity), CD (distilled denoiser), CT, batch-OT, GC mu in
   {0.3, 0.5, 1.0}, GC with the ideal generator (the flow map by the multistep solver of
   ``gcflows.discrepancy.FlowMapGenerator``, checked against the ODE in the tests); scored at fixed
   checkpoints by exact W2 of one-step samples, the consistency error against the exact flow map
   over t, mode balance, and R(theta).

Outputs in ``<out>/toy_discrepancy_<time>/``: config.json, results.json, results.csv, PNG figures;
the summary table is printed last. Jobs, the figures included, run in ``--workers`` processes
(default 2), the longest first (:func:`job_priority`); progress on stderr (a bar on a terminal,
one line per job with ``--quiet`` or in a log). Every argument is checked before the run folder
is created.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcflows import checks
from gcflows import discrepancy as dsc
from gcflows.consistency import ConsistencyModel, get_distance
from gcflows.gmm import PRESETS, get_preset
from gcflows.metrics import exact_w2, mode_coverage
from gcflows.networks import ToyMLP
from gcflows.processes import get_process
from gcflows.progress import Interrupted, JobFailed, JobPool, Progress, signals_interrupt
from gcflows.records import check_writable, make_run_dir, print_table, write_config, write_results
from gcflows.sampling import one_step_sample
from gcflows.stats import Interval, mean_interval
from gcflows.training import TrainConfig, train
from gcflows.velocity import DistilledVelocity, TrueVelocity, fit_denoiser

DATASETS = sorted(k for k in PRESETS if k != "random_mixture")
DISTANCES = ("squared_l2", "pseudo_huber", "l2_norm")
# (name, objective method, mu, teacher / generator)
METHODS = (
    ("cd_exact", "cd", 0.5, "exact"),
    ("cd_distilled", "cd", 0.5, "distilled"),
    ("ct", "ct", 0.5, None),
    ("ot", "ot", 0.5, None),
    ("gc_mu0.3", "gc", 0.3, None),
    ("gc_mu0.5", "gc", 0.5, None),
    ("gc_mu1.0", "gc", 1.0, None),
    ("gc_ideal", "gc", None, "ideal"),
)
THEORY_MODEL_FROM = "ct"  # the "briefly trained" network of Theorem 1's check
GC_GENERATOR_FROM = "gc_mu0.5"  # the trained GC generator of the proxy
TRAINING_ARGS = ("steps", "batch_size", "lr", "ema_decay", "hidden", "s1", "ideal_mu")
# defaults of the sizes (quick, default); an explicit value always wins over --quick
SIZES = {"steps": (24, 500), "n_eval": (200, 800)}
# TrainConfig fields set from a command-line option (for the error messages)
CONFIG_OPTIONS = {
    "total_steps": "--steps",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "ema_decay": "--ema-decay",
    "s1": "--s1",
    "distance": "--distance",
}


# ------------------------------------------------------------------------------------------------
# configuration: every argument is checked here, before any work
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="two_gaussians_1to2", choices=DATASETS)
    ap.add_argument("--process", default="ve", choices=["ve", "linear"])
    ap.add_argument("--t-min", type=float, default=None, help="default 1e-3 (both processes)")
    ap.add_argument("--t-max", type=float, default=None, help="default 5.0 (ve), 0.999 (linear)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0 1)")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, under a minute")
    ap.add_argument("--quiet", action="store_true", help="one log line per job, no progress bar")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 500)")
    ap.add_argument("--n-eval", type=int, default=None, help="samples per evaluation (800)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema-decay", type=float, default=0.99)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--distance", default="squared_l2", choices=list(DISTANCES))
    ap.add_argument("--s1", type=int, default=100, help="final curriculum N (notebook: 100)")
    ap.add_argument("--ideal-mu", type=float, default=0.5, help="mu of GC with the ideal generator")
    ap.add_argument("--sigma-data", type=float, default=None)
    ap.add_argument("--workers", type=int, default=None, help="processes (default min(2, cpus))")
    ap.add_argument(
        "--skip-training",
        action="store_true",
        help="items 1-2 only (Theorem 1 on the random network, the proxy without a trained GC)",
    )
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every argument (argparse's one-line error and exit 2 on a bad one)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        _check_args(args, argv)
    except ValueError as err:
        ap.error(str(err))
    return args


def _check_args(args: argparse.Namespace, argv) -> None:
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ValueError(f"--seeds={args.seeds} is invalid: use distinct integers >= 0")
    if args.workers is None:
        args.workers = max(1, min(2, os.cpu_count() or 1))
    checks.integer(args.workers, "--workers", lo=1)
    for name, (quick, default) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    checks.integer(args.steps, "--steps", lo=1)
    checks.integer(args.n_eval, "--n-eval", lo=2)
    checks.integer(args.hidden, "--hidden", lo=1)
    checks.probability(args.ideal_mu, "--ideal-mu", "of a GC row with the ideal generator")
    if args.sigma_data is not None:
        checks.real(args.sigma_data, "--sigma-data", lo_open=0.0)
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)}
    if args.skip_training:
        unused = [f"--{a.replace('_', '-')}" for a in TRAINING_ARGS]
        unused = [a for a in unused if a in given]
        if unused:
            print(f"warning: --skip-training ignores {' '.join(unused)}", file=sys.stderr)
    setup = build_setup(args)
    problem(setup)  # t_min / t_max against the process
    for name, *_ in METHODS:  # the workers' training configs, checked here
        try:
            train_config(setup, name, args.seeds[0])
        except ValueError as err:  # name the option, not the config field
            msg = str(err)
            for fld, option in CONFIG_OPTIONS.items():
                msg = msg.replace(f"TrainConfig.{fld}=", f"{option}=")
            raise ValueError(msg) from None
    check_writable(args.out)


def build_setup(args: argparse.Namespace) -> dict:
    """Every size of the run, in one picklable dict (recorded in config.json)."""
    t_min = 1e-3 if args.t_min is None else args.t_min
    t_max = (5.0 if args.process == "ve" else 0.999) if args.t_max is None else args.t_max
    target = get_preset(args.dataset)
    if args.sigma_data is not None:
        sigma_data = args.sigma_data
    elif args.dataset in ("two_gaussians_1to2", "two_diracs"):
        sigma_data = 0.5  # the paper's value
    else:
        sigma_data = float(torch.sqrt(target.second_moment() / target.dim))
    quick = args.quick
    return {
        "dataset": args.dataset,
        "process": args.process,
        "t_min": t_min,
        "t_max": t_max,
        "seeds": list(args.seeds),
        "hidden": args.hidden,
        "depth": 3,
        "time_embed_dim": 32,
        "time_scale": 16.0,  # c_noise spans a few units; a smooth embedding (module doc of dsc)
        "sigma_data": sigma_data,
        "distance": args.distance,
        "s0": 10,
        "s1": args.s1,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "ideal_mu": args.ideal_mu,
        # the ideal generator inside training: 32 multistep steps (mean squared error ~1e-7
        # against the exact ODE, tests/test_flowmap.py), a fixed cost per batch
        "ideal_steps": 32,
        "denoiser_steps": 150 if quick else 1500,
        "n_checkpoints": 2 if quick else 3,
        "n_eval": args.n_eval,
        "r_samples_ckpt": 400 if quick else 2000,
        # Theorem 1
        "gap_ns": [10, 40, 160, 1280] if quick else [10, 20, 40, 80, 160, 320, 640, 1280],
        "gap_ns_extended": [10240] if quick else [10240, 81920],
        "gap_samples": 2000 if quick else 20000,
        "r_samples": 2000 if quick else 20000,
        "grad_ns": [10, 1280] if quick else [10, 40, 160, 640, 1280, 10240],
        "grad_samples": 800 if quick else 7200,
        "grad_groups": 2 if quick else 6,
        # the proxy
        "proxy_times": 4 if quick else 10,
        "proxy_samples": 1500 if quick else 8000,
        "knn_k": 32,
        # the flow-map reference of the consistency error
        "ref_times": 4 if quick else 8,
        "ref_per_time": 40 if quick else 125,
        "n_traj": 12,
        "traj_times": 12,
    }


def problem(setup: dict):
    """The target mixture (float64) and the process."""
    target = get_preset(setup["dataset"])
    process = get_process(setup["process"], t_min=setup["t_min"], t_max=setup["t_max"])
    return target, process


def train_config(setup: dict, name: str, seed: int) -> TrainConfig:
    """The training configuration of method ``name`` (validated by ``TrainConfig``)."""
    _, method, mu, extra = {m[0]: m for m in METHODS}[name]
    return TrainConfig(
        method=method,
        mu=setup["ideal_mu"] if extra == "ideal" else mu,
        process=setup["process"],
        t_min=setup["t_min"],
        t_max=setup["t_max"],
        distance=setup["distance"],
        s0=setup["s0"],
        s1=setup["s1"],
        batch_size=setup["batch_size"],
        total_steps=setup["steps"],
        lr=setup["lr"],
        ema_decay=setup["ema_decay"],
        preset=setup["dataset"],
        seed=seed,
        out_dir=None,
        progress=False,
        log_every=max(1, setup["steps"] // 50),
    )


def build_model(setup: dict, seed: int) -> ConsistencyModel:
    """ConsistencyModel(ToyMLP) initialised from ``seed`` (float32)."""
    target, process = problem(setup)
    torch.manual_seed(seed)
    backbone = ToyMLP(
        target.dim,
        hidden=setup["hidden"],
        depth=setup["depth"],
        time_embed_dim=setup["time_embed_dim"],
        time_scale=setup["time_scale"],
    )
    return ConsistencyModel(backbone, process, sigma_data=setup["sigma_data"])


def float64_copy(model: torch.nn.Module, trainable: bool = False) -> torch.nn.Module:
    out = copy.deepcopy(model).double().eval()
    out.requires_grad_(trainable)
    return out


def log_times(process, n: int, lo_factor: float = 2.0) -> list[float]:
    """``n`` times log-spaced from ``lo_factor * t_min`` to ``t_max``."""
    lo, hi = math.log(process.t_min * lo_factor), math.log(process.t_max)
    return [math.exp(lo + (hi - lo) * k / (n - 1)) for k in range(n)]


def seeded(*words: int) -> torch.Generator:
    """A CPU generator seeded from integers (distinct streams per purpose)."""
    h = 0
    for w in words:
        h = (h * 1_000_003 + int(w) + 17) % (2**62)
    return torch.Generator().manual_seed(h)


# ------------------------------------------------------------------------------------------------
# the evaluation context (drawn once from the first seed, shared by every job)
# ------------------------------------------------------------------------------------------------
@dataclass
class EvalContext:
    """What every evaluation shares: the W2 target sample, a second target sample for the W2
    floor, the flow-map reference of the consistency error, the mode radius, exact PF-ODE
    trajectories; ``w2_floor`` (the exact W2 of the two target samples) is filled in by
    :func:`run_jobs` once the first jobs run."""

    w2_target: torch.Tensor
    floor_sample: torch.Tensor
    reference: dict
    mode_radius: float
    trajectory: dict
    w2_floor: float | None = None


def eval_context(setup: dict) -> EvalContext:
    target, process = problem(setup)
    base = setup["seeds"][0]
    g = seeded(base, 11)
    w2_target = target.sample(setup["n_eval"], g)
    floor_sample = target.sample(setup["n_eval"], g)
    # rtol 1e-4: squared errors ~1e-8, far below any consistency error measured here
    reference = dsc.flow_map_reference(
        target,
        process,
        log_times(process, setup["ref_times"]),
        setup["ref_per_time"],
        generator=seeded(base, 12),
        rtol=1e-4,
        atol=1e-6,
    )
    n_traj, n_tt = setup["n_traj"], setup["traj_times"]
    g = seeded(base, 13)
    x_top = process.interpolate(
        target.sample(n_traj, g),
        torch.randn(n_traj, 2, generator=g, dtype=torch.float64),
        process.t_max,
    )
    tt = torch.tensor(log_times(process, n_tt, lo_factor=1.0)[::-1], dtype=torch.float64)
    t_end = tt.repeat(n_traj)
    xs = x_top.repeat_interleave(n_tt, 0)
    path = target.flow_map(xs, process.t_max, process, t_end=t_end, rtol=1e-4, atol=1e-6)
    endpoints = target.flow_map(x_top, process.t_max, process, rtol=1e-4, atol=1e-6)
    stds = target.stds
    radius = max(0.05, 10.0 * float(stds.max())) if stds is not None else 0.5
    trajectory = {"x": path, "t": t_end, "shape": (n_traj, n_tt, 2), "endpoints": endpoints}
    return EvalContext(w2_target, floor_sample, reference, radius, trajectory)


# ------------------------------------------------------------------------------------------------
# jobs (run in worker processes; each returns a dict of numbers and gcflows result types)
# ------------------------------------------------------------------------------------------------
def evaluate(model, setup: dict, ctx: EvalContext, seed: int, step: int) -> dict:
    """Score a model: exact W2 of one-step samples, consistency error, mode balance, R(theta)."""
    target, process = problem(setup)
    with torch.no_grad():
        noise = torch.randn(setup["n_eval"], 2, generator=seeded(seed, 101))
        samples = one_step_sample(model, noise, process).double()
    cons = dsc.flow_map_error(model, ctx.reference)
    modes = mode_coverage(samples, target.means, target.weights, radius=ctx.mode_radius)
    r = dsc.r_theta(
        float64_copy(model),
        target,
        process,
        n_samples=setup["r_samples_ckpt"],
        generator=seeded(seed, step, 7),
    )
    return {
        "step": step,
        "w2": exact_w2(samples, ctx.w2_target),
        "consistency_error": float(np.mean(cons["mse"])),
        "consistency_by_t": cons,
        "mode_balance_tv": modes["balance_tv"],
        "outlier_fraction": modes["outlier_fraction"],
        "mode_fractions": modes["fractions"],
        "r_theta": r,
    }


def _teacher(extra, setup: dict, seed: int) -> tuple[Any, Any, float]:
    """``(velocity, gc_model, denoiser seconds)`` of a method: the exact or a distilled CD
    velocity, the ideal GC generator, or nothing."""
    target, process = problem(setup)
    if extra == "exact":
        return TrueVelocity(target, process), None, 0.0
    if extra == "distilled":
        t0 = time.perf_counter()
        samples = target.sample(20_000, seeded(seed, 31)).float()
        denoiser = fit_denoiser(
            samples,
            process,
            hidden=setup["hidden"],
            steps=setup["denoiser_steps"],
            generator=seeded(seed, 32),
        )
        return DistilledVelocity(denoiser, process), None, time.perf_counter() - t0
    if extra == "ideal":
        ideal = dsc.FlowMapGenerator(
            target, process, method="multistep", steps=setup["ideal_steps"]
        )
        return None, ideal, 0.0
    return None, None, 0.0


def train_job(job: dict) -> dict:
    """Train one (method, seed) and evaluate its EMA model at the checkpoints."""
    torch.set_num_threads(1)
    setup, ctx, name, seed = job["setup"], job["ctx"], job["name"], job["seed"]
    target, process = problem(setup)
    t_start = time.perf_counter()
    extra = {m[0]: m for m in METHODS}[name][3]
    velocity, gc_model, denoiser_s = _teacher(extra, setup, seed)
    config = train_config(setup, name, seed)
    model = build_model(setup, seed)
    k = setup["n_checkpoints"]
    checkpoints = sorted({max(1, round(setup["steps"] * (j + 1) / k)) for j in range(k)})
    evals: list[dict] = []

    def on_step(info) -> None:
        if info.step in checkpoints:
            evals.append(evaluate(info.ema_model, setup, ctx, seed, info.step))

    t0 = time.perf_counter()
    result = train(
        config,
        model,
        lambda n, g: target.sample(n, g),
        velocity=velocity,
        gc_model=gc_model,
        callbacks=[on_step],
    )
    out = {
        "name": name,
        "seed": seed,
        "mu": config.mu,
        "evals": evals,
        "train_s": time.perf_counter() - t0,
        "denoiser_s": denoiser_s,
        "job_s": time.perf_counter() - t_start,
    }
    if seed == setup["seeds"][0]:
        ema = result.ema_model
        with torch.no_grad():
            noise = torch.randn(setup["n_eval"], 2, generator=seeded(seed, 101))
            out["samples"] = one_step_sample(ema, noise, process).double().numpy()
            traj = ctx.trajectory
            pred = ema(traj["x"].float(), traj["t"].float()).double()
            out["trajectory"] = pred.reshape(traj["shape"]).numpy()
        out["ema_state"] = {k: v.detach().clone() for k, v in ema.state_dict().items()}
    return out


def theorem1_job(job: dict) -> dict:
    """Theorem 1 on one network: R(theta) (alpha 2 and 1), the scaled loss and gradient gaps."""
    torch.set_num_threads(job.get("threads", 1))
    setup, seed = job["setup"], job["seed"]
    target, process = problem(setup)
    t0 = time.perf_counter()
    model = build_model(setup, seed)
    if job.get("state") is not None:
        model.load_state_dict(job["state"])
    m64 = float64_copy(model)
    gen = seeded(seed, 500 + (1 if job.get("state") is not None else 0))
    r2 = dsc.r_theta(m64, target, process, n_samples=setup["r_samples"], generator=gen)
    r1 = dsc.r_theta(m64, target, process, alpha=1.0, n_samples=setup["r_samples"], generator=gen)
    ns = setup["gap_ns"] + setup["gap_ns_extended"]
    gaps = dsc.loss_gaps(
        m64, target, process, ns, DISTANCES, n_samples=setup["gap_samples"], generator=gen
    )
    m64.requires_grad_(True)
    grads = dsc.gradient_gaps(
        m64,
        target,
        process,
        setup["grad_ns"],
        DISTANCES,
        n_samples=setup["grad_samples"],
        n_groups=setup["grad_groups"],
        generator=gen,
    )
    limits = {}
    for name in DISTANCES:
        dist = get_distance(name, target.dim)
        limits[name] = (r2 if dist.alpha == 2.0 else r1).scaled(dsc.limit_constant(dist, process))
    return {
        "label": job["label"],
        "seed": seed,
        "r_theta_alpha2": r2,
        "r_theta_alpha1": r1,
        "limits": limits,
        "gaps": gaps,
        "grads": grads,
        "job_s": time.perf_counter() - t0,
    }


def _proxy_generators(job: dict, setup: dict) -> dict:
    target, process = problem(setup)
    out = {}
    if "gc_ideal" in job["kinds"]:
        out["gc_ideal"] = dsc.FlowMapGenerator(target, process, rtol=1e-5, atol=1e-7)
    if "gc_trained" in job["kinds"]:
        model = build_model(setup, job["seed"])
        model.load_state_dict(job["state"])
        out["gc_trained"] = float64_copy(model)
    return out


def proxy_job(job: dict) -> dict:
    """``R~_t`` per coupling at each time: the same data and noise for every coupling at a t."""
    torch.set_num_threads(1)
    setup, seed, kinds = job["setup"], job["seed"], job["kinds"]
    target, process = problem(setup)
    t0 = time.perf_counter()
    generators = _proxy_generators(job, setup)
    n, k = setup["proxy_samples"], setup["knn_k"]
    rows = []
    for j, t in enumerate(job["times"]):
        gen = seeded(seed, 900, j)
        data = target.sample(n, gen)
        noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        for kind in kinds:
            if kind == "ic_exact":
                # 4n points: the exact estimator is cheap and its only noise is the law of x_t
                est = dsc.ic_proxy(
                    target, process, t, n_samples=4 * n, generator=seeded(seed, 901, j)
                )
            else:
                coupling = {"ic_knn": "ic", "ot": "ot"}.get(kind, "gc")
                x_t, xdot = dsc.coupled_path(
                    coupling,
                    data,
                    noise,
                    t,
                    process,
                    gc_model=generators.get(kind),
                    mu=1.0,
                    ot_batch_size=setup["batch_size"],
                )
                est = dsc.knn_proxy(x_t, xdot, k=k)
            rows.append({"coupling": kind, "t": t, "estimate": est})
    return {"rows": rows, "job_s": time.perf_counter() - t0}


def figures_job(job: dict) -> dict:
    """Draw one group of figures (``job["part"]``) into ``job["run_dir"]``; returns their names.

    Run in a worker like the computations, so that figures drawn from finished sections overlap
    the jobs still running and the last ones are drawn by both workers at once."""
    t0 = time.perf_counter()
    run_dir, part, data = Path(job["run_dir"]), job["part"], job["data"]
    if part == "theorem1":
        paths = figure_theorem1(run_dir, theorem1_section(data))
    elif part == "proxy":
        _, process = problem(job["setup"])
        paths = [figure_proxy(run_dir, proxy_section(data, process))]
    elif part == "training":
        paths = figure_training(run_dir, data)
    else:
        paths = figure_samples(run_dir, data, job["ctx"])
    return {"part": part, "figures": [p.name for p in paths], "job_s": time.perf_counter() - t0}


def run_job(job: dict) -> dict:
    """Run one job; its result also holds ``cpu_s``, the CPU time of the job's process."""
    cpu0 = time.process_time()
    jobs = {"train": train_job, "theory": theorem1_job, "proxy": proxy_job, "figures": figures_job}
    res = jobs[job["kind"]](job)
    res["cpu_s"] = time.process_time() - cpu0
    return res


# ------------------------------------------------------------------------------------------------
# running the jobs
# ------------------------------------------------------------------------------------------------
@dataclass
class JobResults:
    """Raw results of the jobs, by kind, and the time of each job."""

    train: list[dict] = field(default_factory=list)
    theory: list[dict] = field(default_factory=list)
    proxy_rows: list[dict] = field(default_factory=list)
    job_s: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    figures: dict[str, list[str]] = field(default_factory=dict)
    proxy_jobs: int = 0

    def train_summary(self) -> dict:
        return training_section(self.train)

    def figure_names(self) -> list[str]:
        """The figures' file names in the order of FIGURE_PARTS."""
        return [name for part in FIGURE_PARTS for name in self.figures.get(part, [])]


FIGURE_PARTS = ("theorem1", "proxy", "training", "samples")
# CPU seconds of each job at the default sizes (docs/experiments.md, toy section; measured under
# load, so only their order matters): the longest start first, so that the workers end together.
TRAIN_COST_S = {"ot": 8.0, "cd_distilled": 6.0, "gc_ideal": 5.5}
OTHER_TRAIN_COST_S = 4.0
FIGURE_COST_S = {"theorem1": 4.5, "proxy": 0.5, "training": 3.0, "samples": 2.0}


def job_cost(job: dict) -> float:
    """The expected CPU seconds of a job (its place in the queue)."""
    if job["kind"] == "train":
        return TRAIN_COST_S.get(job["name"], OTHER_TRAIN_COST_S)
    if job["kind"] == "theory":
        return 10.0
    if job["kind"] == "proxy":
        return 1.2 if job["kinds"] == ["gc_trained"] else 10.0
    return FIGURE_COST_S[job["part"]]


def job_priority(job: dict, setup: dict) -> tuple:
    """Sort key of the queue: first the jobs another job waits for (the first seed's CT and GC
    trainings, then their follow-ups, which complete the inputs of the Theorem 1 and proxy
    figures), then the figures whose data is complete (the training figures can only start
    after the last training: nothing else should be left then), then the longest first."""
    first = job.get("seed") == setup["seeds"][0]
    waited_for = (
        (job["kind"] == "train" and first and job["name"] in (THEORY_MODEL_FROM, GC_GENERATOR_FROM))
        or (job["kind"] == "theory" and job.get("state") is not None)
        or (job["kind"] == "proxy" and job["kinds"] == ["gc_trained"])
    )
    rank = 0 if waited_for else (1 if job["kind"] == "figures" else 2)
    return (rank, -job_cost(job))


def initial_jobs(setup: dict, ctx: EvalContext, skip_training: bool) -> list[dict]:
    """Every training, Theorem 1 on the random network and the proxy, in queue order
    (:func:`job_priority`)."""
    _, process = problem(setup)
    seeds, base = setup["seeds"], setup["seeds"][0]
    names = [] if skip_training else [m[0] for m in METHODS]
    train = [
        {"kind": "train", "setup": setup, "ctx": ctx, "name": n, "seed": s}
        for n in names
        for s in seeds
    ]
    theory = {"kind": "theory", "setup": setup, "seed": base, "label": "random init"}
    proxy = {
        "kind": "proxy",
        "setup": setup,
        "seed": base,
        "kinds": ["ic_exact", "ic_knn", "ot", "gc_ideal"],
        "times": log_times(process, setup["proxy_times"]),
    }
    return sorted(train + [theory, proxy], key=lambda job: job_priority(job, setup))


def follow_up_jobs(res: dict, setup: dict) -> list[dict]:
    """Jobs that need a trained network of the first seed: Theorem 1 on the CT model, the proxy
    with the trained GC generator."""
    if res["seed"] != setup["seeds"][0]:
        return []
    _, process = problem(setup)
    if res["name"] == THEORY_MODEL_FROM:
        label = f"trained ({THEORY_MODEL_FROM}, seed {res['seed']})"
        return [
            {
                "kind": "theory",
                "setup": setup,
                "seed": res["seed"],
                "label": label,
                "state": res["ema_state"],
            }
        ]
    if res["name"] == GC_GENERATOR_FROM:
        return [
            {
                "kind": "proxy",
                "setup": setup,
                "seed": res["seed"],
                "kinds": ["gc_trained"],
                "state": res["ema_state"],
                "times": log_times(process, setup["proxy_times"]),
            }
        ]
    return []


def job_label(job: dict) -> str:
    if job["kind"] == "train":
        return f"train {job['name']} seed {job['seed']}"
    if job["kind"] == "theory":
        return f"theorem 1, {job['label']}"
    if job["kind"] == "figures":
        return f"figures: {job['part']}"
    return f"proxy {'/'.join(job['kinds'])}"


def figure_jobs(out: JobResults, done: set[str], setup: dict, ctx: EvalContext, args, run_dir):
    """The figure jobs whose data is now complete (each once; ``done`` holds the parts queued)."""
    per_section = 1 if args.skip_training else 2  # the random network only / and a trained one
    trained = not args.skip_training and len(out.train) == len(METHODS) * len(args.seeds)
    ready = {
        "theorem1": len(out.theory) == per_section,
        "proxy": out.proxy_jobs == per_section,
        "training": trained,
        "samples": trained,
    }
    jobs = []
    for part in FIGURE_PARTS:
        if ready[part] and part not in done:
            done.add(part)
            if part == "theorem1":
                data = out.theory
            elif part == "proxy":
                data = out.proxy_rows
            elif part == "training":
                data = out.train_summary()
            else:
                data = first_seed_samples(out.train)
            jobs.append(
                {
                    "kind": "figures",
                    "part": part,
                    "run_dir": str(run_dir),
                    "data": data,
                    "setup": setup,
                    "ctx": ctx if part == "samples" else None,
                }
            )
    return jobs


def job_count(args: argparse.Namespace) -> int:
    """Jobs of the run: trainings, Theorem 1 and the proxy (twice each with training: on the
    random and on a trained network), figure groups."""
    if args.skip_training:
        return 2 + 2
    return len(METHODS) * len(args.seeds) + 4 + len(FIGURE_PARTS)


def run_jobs(
    setup: dict, args: argparse.Namespace, run_dir: Path
) -> tuple[JobResults, EvalContext, float]:
    """Every job, the figures included, in ``args.workers`` processes with progress on stderr;
    SIGINT / SIGTERM stop the workers (:class:`gcflows.progress.Interrupted`). Returns the raw
    results, the evaluation context and the ``perf_counter`` time at which it was ready.

    The workers are started first: they import while the parent prepares the evaluation context.
    Scheduling: a job starts only when a worker is free, taken from a queue kept in
    :func:`job_priority` order, into which the follow-up and figure jobs are inserted as their
    inputs complete; so the jobs others wait for run first and the longest ones next."""
    out, figures_queued = JobResults(), set()
    with (
        Progress(job_count(args), "toy_discrepancy", quiet=args.quiet) as progress,
        JobPool(run_job, args.workers, progress) as pool,
    ):
        ctx = eval_context(setup)
        ctx_ready = time.perf_counter()
        queue = initial_jobs(setup, ctx, args.skip_training)
        kinds = {}

        def start_free_workers() -> None:
            while queue and pool.pending < args.workers:
                job = queue.pop(0)
                kinds[job_label(job)] = job["kind"]
                pool.submit(job, job_label(job))

        start_free_workers()
        # now, while the first jobs run: exact_w2 imports POT (~1.5 s), off the path to them
        ctx.w2_floor = exact_w2(ctx.w2_target, ctx.floor_sample)
        for label, res in pool.results():
            out.job_s[label] = res["job_s"]
            out.cpu_s[label] = res["cpu_s"]
            kind = kinds[label]
            new = []
            if kind == "train":
                out.train.append(res)
                new += follow_up_jobs(res, setup)
            elif kind == "theory":
                out.theory.append(res)
            elif kind == "proxy":
                out.proxy_rows.extend(res["rows"])
                out.proxy_jobs += 1
            else:
                out.figures[res["part"]] = res["figures"]
            new += figure_jobs(out, figures_queued, setup, ctx, args, run_dir)
            queue.extend(new)
            queue.sort(key=lambda job: job_priority(job, setup))
            start_free_workers()
    return out, ctx, ctx_ready


# ------------------------------------------------------------------------------------------------
# section 1: Theorem 1
# ------------------------------------------------------------------------------------------------
@dataclass
class TheoryResult:
    """Theorem 1 on one network (:func:`theorem1_job`)."""

    label: str
    seed: int
    r_theta_alpha2: Interval
    r_theta_alpha1: Interval
    limits: dict[str, Interval]
    gaps: list[dsc.GapResult]
    grads: list[dsc.GradientGapResult]
    job_s: float
    cpu_s: float = 0.0

    def gap(self, distance: str, n: int) -> dsc.GapResult:
        return next(g for g in self.gaps if g.distance == distance and g.n_intervals == n)

    def grad(self, distance: str, n: int) -> dsc.GradientGapResult:
        return next(g for g in self.grads if g.distance == distance and g.n_intervals == n)


def theorem1_section(raw: list[dict]) -> dict[str, TheoryResult]:
    """The networks' results, the random initialisation first."""
    results = [TheoryResult(**r) for r in raw]
    results.sort(key=lambda r: r.label != "random init")
    return {r.label: r for r in results}


def _independent_ratio(gap: Interval, lim: Interval) -> Interval:
    """scaled gap / limit from independent draws: relative standard errors added in quadrature."""
    ratio = gap.mean / lim.mean
    rel = math.hypot(gap.se / gap.mean, lim.se / lim.mean)
    return Interval(ratio, abs(ratio) * rel, min(gap.n, lim.n))


def theorem_checks(theory: dict[str, TheoryResult]) -> dict[str, dict]:
    """What Theorem 1 predicts, from the numbers computed, per network."""
    checks_out = {}
    for label, res in theory.items():
        n_top = max(g.n_intervals for g in res.gaps)
        l2 = res.gap("squared_l2", 1280)
        g_ns = sorted({g.n_intervals for g in res.grads})
        n_grad = 1280 if 1280 in g_ns else g_ns[-1]
        a1, a2 = res.grad("l2_norm", n_grad), res.grad("squared_l2", n_grad)
        a2_first = res.grad("squared_l2", g_ns[0])
        checks_out[label] = {
            "alpha2_ratio_at_1280_same_draws": l2.ratio,
            "alpha2_within_5pct_at_1280": bool(
                abs(l2.ratio.lo - 1) < 0.05 and abs(l2.ratio.hi - 1) < 0.05
            ),
            "alpha2_ratio_at_1280_independent": _independent_ratio(
                l2.scaled_gap, res.limits["squared_l2"]
            ),
            "alpha1_ratio_at_1280": res.gap("l2_norm", 1280).ratio,
            "pseudo_huber_ratio_at_1280": res.gap("pseudo_huber", 1280).ratio,
            f"pseudo_huber_ratio_at_{n_top}": res.gap("pseudo_huber", n_top).ratio,
            "grad_N": n_grad,
            "grad_alpha1_relative": a1.relative_debiased,
            "grad_alpha1_noise": a1.noise,
            "grad_alpha2_relative_cv_first": a2_first.relative_cv,
            "grad_alpha2_relative_cv_at_N": a2.relative_cv,
            "grad_alpha2_relative_plain_at_N": a2.relative,
            "grad_alpha2_noise_plain_at_N": a2.noise,
            "grad_alpha1_bounded_away": bool(a1.relative > 3 * a1.noise),
            "grad_alpha2_shrinks": bool(a2.relative_cv < 0.1 * a2_first.relative_cv),
        }
    return checks_out


# ------------------------------------------------------------------------------------------------
# section 2: the proxy R~_t
# ------------------------------------------------------------------------------------------------
@dataclass
class ProxySummary:
    """``R~_t`` per coupling and time, the k-NN estimator against the exact IC value, and the
    ordering of the couplings."""

    times: list[float]
    by_coupling: dict[str, list[Interval]]
    knn_relative_error_on_ic: list[float]
    knn_z_score_on_ic: list[float]
    knn_max_abs_relative_error: float
    knn_max_abs_z: float
    large_t_ordering: dict[str, dict]
    ordering_by_t: list[str]


def _ordering(values: dict) -> str:
    """Couplings sorted by increasing R~_t, e.g. ``"ot < gc_ideal < ic"``."""
    return " < ".join(k for k, _ in sorted(values.items(), key=lambda kv: kv[1]))


def proxy_section(rows: list[dict], process) -> ProxySummary:
    by: dict[str, dict[float, Interval]] = {}
    for r in rows:
        by.setdefault(r["coupling"], {})[r["t"]] = r["estimate"]
    times = sorted(by["ic_exact"])
    ex, kn = [by["ic_exact"][t] for t in times], [by["ic_knn"][t] for t in times]
    rel = [k.mean / e.mean - 1.0 for e, k in zip(ex, kn, strict=True)]
    z = [(k.mean - e.mean) / math.hypot(k.se, e.se) for e, k in zip(ex, kn, strict=True)]
    large = [t for t in times if t >= 0.2 * process.t_max]
    order = {}
    for gc in ("gc_ideal", "gc_trained"):
        if gc in by:
            holds = [by[gc][t].mean < by["ot"][t].mean < by["ic_exact"][t].mean for t in large]
            order[gc] = {
                "times": large,
                "holds": holds,
                "all_hold": bool(all(holds)),
                "at_t_max": {c: by[c][times[-1]] for c in ("ic_exact", "ot", gc)},
            }
    names = [c for c in ("ic_exact", "ot", "gc_ideal", "gc_trained") if c in by]
    return ProxySummary(
        times=times,
        by_coupling={c: [by[c][t] for t in times] for c in by},
        knn_relative_error_on_ic=rel,
        knn_z_score_on_ic=z,
        knn_max_abs_relative_error=float(np.max(np.abs(rel))),
        knn_max_abs_z=float(np.max(np.abs(z))),
        large_t_ordering=order,
        ordering_by_t=[_ordering({c: by[c][t].mean for c in names}) for t in times],
    )


# ------------------------------------------------------------------------------------------------
# section 3: training head to head
# ------------------------------------------------------------------------------------------------
CURVE_METRICS = ("w2", "consistency_error", "mode_balance_tv", "outlier_fraction", "r_theta")


@dataclass
class MethodSummary:
    """One method over seeds: metric curves and final values (Student-t intervals over seeds)."""

    mu: float
    steps: list[int]
    curves: dict[str, list[Interval | None]]
    final: dict[str, Interval | None]
    per_seed_final: dict[str, list]
    consistency_by_t: dict[str, list]
    train_s: list[float]
    denoiser_s: list[float]


def _metric(ev: dict, metric: str) -> float:
    return ev[metric].mean if metric == "r_theta" else ev[metric]


def summarise_method(runs: list[dict]) -> MethodSummary:
    runs = sorted(runs, key=lambda r: r["seed"])
    steps = [e["step"] for e in runs[0]["evals"]]
    curves = {
        m: [mean_interval([_metric(r["evals"][i], m) for r in runs]) for i in range(len(steps))]
        for m in CURVE_METRICS
    }
    per_t = np.asarray([r["evals"][-1]["consistency_by_t"]["mse"] for r in runs])
    by_t = [mean_interval(per_t[:, j].tolist()) for j in range(per_t.shape[1])]
    last = [r["evals"][-1] for r in runs]
    return MethodSummary(
        mu=runs[0]["mu"],
        steps=steps,
        curves=curves,
        final={m: c[-1] for m, c in curves.items()},
        per_seed_final={
            "seeds": [r["seed"] for r in runs],
            **{m: [_metric(e, m) for e in last] for m in CURVE_METRICS if m != "outlier_fraction"},
        },
        consistency_by_t={
            "times": last[0]["consistency_by_t"]["times"],
            "mean": [b.mean for b in by_t],
            "se": [b.se for b in by_t],
        },
        train_s=[r["train_s"] for r in runs],
        denoiser_s=[r["denoiser_s"] for r in runs],
    )


def training_section(train_results: list[dict]) -> dict[str, MethodSummary]:
    if not train_results:
        return {}
    return {
        name: summarise_method([r for r in train_results if r["name"] == name])
        for name, *_ in METHODS
    }


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def figure_theorem1(run_dir: Path, theory: dict[str, TheoryResult]) -> list[Path]:
    """scaled_gap.png (per network and distance), gap_ratio.png, gradient_gap.png."""
    from gcflows import plotting as pl

    panels, hlines, logy, ratios, grads = {}, {}, {}, {}, {}
    for label, res in theory.items():
        ratios[label], grads[label] = [], []
        for k, name in enumerate(DISTANCES):
            rows = [g for g in res.gaps if g.distance == name]
            ns = [g.n_intervals for g in rows]
            key = f"{label}: {name}"
            gaps = [g.scaled_gap for g in rows]
            panels[key] = [pl.Curve.from_intervals(ns, gaps, "N^a (L_CT - L_CD)")]
            lim = res.limits[name]
            hlines[key] = [{"y": lim.mean, "lo": lim.lo, "hi": lim.hi, "label": "C T^(a-1) R"}]
            logy[key] = name == "pseudo_huber"
            ratios[label].append(pl.Curve.from_intervals(ns, [g.ratio for g in rows], name))
            grads[label].extend(_gradient_curves(pl, res, name, f"C{k}"))
    figs = [
        pl.plot_panels(
            panels,
            run_dir / "scaled_gap.png",
            xlabel="N (intervals)",
            ylabel="scaled gap",
            logx=True,
            logy=logy,
            hlines=hlines,
            ncols=3,
            suptitle="Theorem 1: scaled loss gap against N (95% intervals)",
        ),
        pl.plot_panels(
            ratios,
            run_dir / "gap_ratio.png",
            xlabel="N (intervals)",
            ylabel="N^a (L_CT - L_CD) / (C T^(a-1) R)",
            logx=True,
            ncols=2,
            hlines={k: [{"y": 1.0, "lo": 0.95, "hi": 1.05, "label": "1 +- 5%"}] for k in ratios},
        ),
        pl.plot_panels(
            grads,
            run_dir / "gradient_gap.png",
            xlabel="N (intervals)",
            ylabel="||grad L_CT - grad L_CD|| / ||grad L_CD||",
            logx=True,
            logy=True,
            ncols=2,
        ),
    ]
    return figs


def _gradient_curves(pl, res: TheoryResult, name: str, color: str) -> list:
    rows = [g for g in res.grads if g.distance == name]
    ns = [g.n_intervals for g in rows]
    curves = [
        pl.Curve(ns, [g.relative for g in rows], label=name, style={"color": color}),
        pl.Curve(
            ns,
            [g.noise for g in rows],
            label=f"{name}: MC noise floor",
            style={"linestyle": ":", "marker": None, "color": color},
        ),
    ]
    if rows and rows[0].relative_cv is not None:
        curves.append(
            pl.Curve(
                ns,
                [g.relative_cv for g in rows],
                label=f"{name}: zero-mean control variate removed",
                style={"linestyle": "--", "marker": "s", "color": color},
            )
        )
    return curves


def figure_proxy(run_dir: Path, proxy: ProxySummary) -> Path:
    from gcflows import plotting as pl

    curves = [pl.Curve.from_intervals(proxy.times, v, c) for c, v in proxy.by_coupling.items()]
    return pl.plot_curves(
        curves,
        run_dir / "proxy_rtilde.png",
        xlabel="t",
        ylabel="R~_t = E||xdot - v_t||^2",
        logx=True,
        logy=True,
        title="Proxy R~_t per coupling (95% intervals)",
    )


TRAINING_PANELS = {
    "w2": "exact W2 (one-step)",
    "consistency_error": "consistency error",
    "mode_balance_tv": "mode balance (TV)",
    "r_theta": "R(theta), alpha 2",
}


def figure_training(run_dir: Path, training: dict[str, MethodSummary]) -> list[Path]:
    """training_curves.png, consistency_vs_t.png."""
    from gcflows import plotting as pl

    panels = {
        title: [
            pl.Curve.from_intervals(res.steps, res.curves[metric], method, band="se")
            for method, res in training.items()
        ]
        for metric, title in TRAINING_PANELS.items()
    }
    logy = {TRAINING_PANELS[m]: True for m in ("w2", "consistency_error", "r_theta")}
    by_t = [
        pl.Curve(res.consistency_by_t["times"], res.consistency_by_t["mean"], label=method)
        for method, res in training.items()
    ]
    return [
        pl.plot_panels(
            panels,
            run_dir / "training_curves.png",
            xlabel="step",
            logy=logy,
            ncols=2,
            suptitle="Training head to head (mean +- se over seeds)",
        ),
        pl.plot_curves(
            by_t,
            run_dir / "consistency_vs_t.png",
            xlabel="t",
            ylabel="E||f(x_t, t) - flow map(x_t, t)||^2",
            logx=True,
            logy=True,
            title="Consistency error at the end of training",
        ),
    ]


def figure_samples(run_dir: Path, samples: dict, ctx: EvalContext) -> list[Path]:
    """samples.png, trajectories.png (the first seed's EMA models)."""
    from gcflows import plotting as pl

    reference = ctx.w2_target.numpy()
    return [
        pl.plot_scatter_grid(
            samples["samples"],
            run_dir / "samples.png",
            reference=reference,
            suptitle="One-step samples (first seed)",
        ),
        pl.plot_trajectories(
            samples["trajectory"],
            run_dir / "trajectories.png",
            endpoints=ctx.trajectory["endpoints"].numpy(),
            reference=reference,
            suptitle="f(x_t, t) along exact PF-ODE paths (t_max -> t_min); stars: exact endpoints",
        ),
    ]


# ------------------------------------------------------------------------------------------------
# files and tables
# ------------------------------------------------------------------------------------------------
def _row(section: str, subject: str, quantity: str, value, x=None, distance=None, **extra) -> dict:
    """One line of results.csv; an Interval fills value, se, ci_lo, ci_hi."""
    row = {
        "section": section,
        "subject": subject,
        "distance": distance,
        "x": x,
        "quantity": quantity,
    }
    if isinstance(value, Interval):
        row.update(value=value.mean, se=value.se, ci_lo=value.lo, ci_hi=value.hi)
    else:
        row["value"] = value
    row.update(extra)
    return row


def csv_rows(
    theory: dict[str, TheoryResult], proxy: ProxySummary, training: dict[str, MethodSummary]
) -> list[dict]:
    rows = []
    for label, res in theory.items():
        for g in res.gaps:
            for q in ("scaled_gap", "ratio"):
                value = getattr(g, q)
                rows.append(_row("theorem1_gap", label, q, value, g.n_intervals, g.distance))
        for g in res.grads:
            for q in ("relative", "relative_debiased", "relative_cv"):
                se = g.noise if q == "relative" else None
                rows.append(
                    _row("theorem1_grad", label, q, getattr(g, q), g.n_intervals, g.distance, se=se)
                )
        for name, lim in res.limits.items():
            rows.append(_row("theorem1_limit", label, "C T^(a-1) R", lim, distance=name))
    for coupling, estimates in proxy.by_coupling.items():
        for t, est in zip(proxy.times, estimates, strict=True):
            rows.append(_row("proxy", coupling, "R~_t", est, t))
    for method, res in training.items():
        for metric, curve in res.curves.items():
            for step, c in zip(res.steps, curve, strict=True):
                rows.append(_row("training", method, metric, c, step))
    return rows


def _fmt(est: Interval, digits: int = 4) -> str:
    return f"{est.mean:.{digits}g} [{est.lo:.{digits}g}, {est.hi:.{digits}g}]"


def _pm(est: Interval | None, digits: int = 4) -> str:
    if est is None:
        return "-"
    se = "-" if not math.isfinite(est.se) else f"{est.se:.2g}"
    return f"{est.mean:.{digits}g} +- {se}"


def print_theorem1(checks_by_label: dict[str, dict]) -> None:
    rows = []
    for label, c in checks_by_label.items():
        n_top = next(k for k in c if k.startswith("pseudo_huber_ratio_at_") and "1280" not in k)
        rows.append(
            {
                "network": label,
                "a=2 ratio@1280 (95% CI)": _fmt(c["alpha2_ratio_at_1280_same_draws"]),
                "within 5%": c["alpha2_within_5pct_at_1280"],
                "a=1 ratio@1280": _fmt(c["alpha1_ratio_at_1280"]),
                "pH ratio@1280": f"{c['pseudo_huber_ratio_at_1280'].mean:.3g}",
                f"pH ratio@{n_top.split('_')[-1]}": f"{c[n_top].mean:.3g}",
                f"grad a=1 rel@{c['grad_N']}": f"{c['grad_alpha1_relative']:.3g}"
                f" (noise {c['grad_alpha1_noise']:.2g})",
                f"grad a=2 rel (CV) N=10 -> {c['grad_N']}": (
                    f"{c['grad_alpha2_relative_cv_first']:.3g}"
                    f" -> {c['grad_alpha2_relative_cv_at_N']:.3g}"
                ),
            }
        )
    print_table(rows, title="\nTheorem 1 (ratio = N^a (L_CT - L_CD) / (C T^(a-1) R(theta)))")


def print_proxy(p: ProxySummary) -> None:
    rows = []
    for j, t in enumerate(p.times):
        row = {"t": f"{t:.3g}"}
        for c in ("ic_exact", "ic_knn", "ot", "gc_ideal", "gc_trained"):
            if c in p.by_coupling:
                est = p.by_coupling[c][j]
                row[c] = f"{est.mean:.3g} +- {est.se:.1g}"
        row["order (increasing)"] = p.ordering_by_t[j]
        rows.append(row)
    holds = ", ".join(
        f"{gc}: {sum(o['holds'])}/{len(o['holds'])}" for gc, o in p.large_t_ordering.items()
    )
    print_table(
        rows,
        title=(
            f"\nProxy R~_t = E||xdot - v_t||^2 (k-NN on IC: max |rel. error| "
            f"{p.knn_max_abs_relative_error:.3g}, max |z| {p.knn_max_abs_z:.2g}); "
            f"GC < OT < IC at t >= 0.2 t_max: {holds}"
        ),
    )


def print_training(training: dict[str, MethodSummary], n_seeds: int, total_s: float) -> None:
    rows = []
    for method, r in training.items():
        f = r.final
        rows.append(
            {
                "method": method,
                "W2": _pm(f["w2"]),
                "consistency err": _pm(f["consistency_error"], 3),
                "mode TV": _pm(f["mode_balance_tv"], 3),
                "outliers": f"{f['outlier_fraction'].mean:.3g}",
                "R(theta)": f"{f['r_theta'].mean:.3g}",
                "train s": f"{np.mean(r.train_s):.1f}",
            }
        )
    print_table(
        rows,
        title=f"\nTraining head to head (final step, mean +- se over {n_seeds} seeds); "
        f"total wall time {total_s:.1f} s",
    )


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    wall0 = time.perf_counter()
    args = parse_args(argv)
    setup = build_setup(args)
    run_dir = make_run_dir(args.out, "toy_discrepancy")
    write_config(run_dir, args, seed=args.seeds, setup=setup, methods=[m[0] for m in METHODS])
    _, process = problem(setup)
    # the parent only prepares the evaluation context (small tensors, where a second thread
    # only adds synchronisation; under load it made this step 20x slower) and collects results
    torch.set_num_threads(1)
    print(
        f"[toy_discrepancy] {args.dataset}, {process.name} on [{process.t_min}, {process.t_max}], "
        f"seeds {args.seeds}, {setup['steps']} steps, {args.workers} workers -> {run_dir}",
        flush=True,
    )
    try:
        with signals_interrupt():
            raw, ctx, t_jobs = run_jobs(setup, args, run_dir)
    except Interrupted as err:
        print(
            f"[toy_discrepancy] {err}: workers stopped, nothing written to {run_dir} "
            "but config.json",
            file=sys.stderr,
        )
        raise SystemExit(128 + err.signum) from None
    except JobFailed as err:  # a job's error, or its worker killed (the out-of-memory killer)
        print(f"toy_discrepancy.py: error: {err}; run folder {run_dir}", file=sys.stderr)
        raise SystemExit(1) from None
    jobs_s = time.perf_counter() - t_jobs
    prep_s = t_jobs - wall0
    theory = theorem1_section(raw.theory)
    checks_by_label = theorem_checks(theory)
    proxy = proxy_section(raw.proxy_rows, process)
    training = training_section(raw.train)
    results = {
        "setting": {
            "dataset": args.dataset,
            "process": process.name,
            "t_min": process.t_min,
            "t_max": process.t_max,
            "seeds": args.seeds,
            "w2_floor": ctx.w2_floor,
            "mode_radius": ctx.mode_radius,
        },
        "theorem1": {"by_model": theory, "checks": checks_by_label},
        "proxy": {"summary": proxy, "rows": raw.proxy_rows},
        "training": training,
        "figures": raw.figure_names(),
        "timing_s": {
            "total": time.perf_counter() - wall0,
            "preparation": prep_s,
            "jobs": jobs_s,
            "per_job": raw.job_s,
            "per_job_cpu": raw.cpu_s,
        },
    }
    write_results(run_dir, results, csv_rows(theory, proxy, training))
    print_summary(run_dir, ctx, args, checks_by_label, proxy, training, time.perf_counter() - wall0)
    return results


def first_seed_samples(train_results: list[dict]) -> dict:
    """One-step samples and trajectories of the first seed, in the order of METHODS."""
    order = [m[0] for m in METHODS]
    have = [r for r in train_results if "samples" in r]
    have.sort(key=lambda r: order.index(r["name"]))
    return {
        "samples": {r["name"]: r["samples"] for r in have},
        "trajectory": {r["name"]: r["trajectory"] for r in have},
    }


def print_summary(run_dir, ctx, args, checks_by_label, proxy, training, total_s: float) -> None:
    print(f"\nRun folder: {run_dir}")
    print(
        f"Setting: {args.dataset}, seeds {args.seeds}; W2 floor (two target samples) "
        f"{ctx.w2_floor:.4g}"
    )
    print_theorem1(checks_by_label)
    print_proxy(proxy)
    if not training:
        print(f"\n(training skipped); total wall time {total_s:.1f} s")
        return
    print_training(training, len(args.seeds), total_s)


if __name__ == "__main__":
    main()
