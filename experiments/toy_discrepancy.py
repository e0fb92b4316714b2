"""The CT / CD discrepancy measured exactly on 2D Gaussian mixtures (docs/paper.md section 3).

    python experiments/toy_discrepancy.py                 # default run (~190 s CPU, 2 workers)
    python experiments/toy_discrepancy.py --quick         # smoke run (under a minute)
    python experiments/toy_discrepancy.py --dataset eight_gaussians --process linear --seeds 0 1 2

Default setting: the authors' 2D notebook (docs/paper.md section 5): ``two_gaussians_1to2``
(modes at (0, +-0.5), std 0.01), VE process with sigma in [0.001, 5], ToyMLP with a positional
time embedding, squared L2, curriculum s0 = 10, s1 = 100; the exact velocity of the mixture.

``gcflows.mixture_study`` computes the sections (typed results); this script declares the jobs
(:func:`study_jobs`) and draws the figures.

1. Theorem 1 numerically (:class:`TheoryJob`, ``mixture_study.theorem1_on_network``) for a
   randomly initialised network and for the CT-trained network of the first seed:
   ``N^alpha (L_CT - L_CD)`` for N = 10 .. 1280 (and 10240, 81920 to show where pseudo-Huber
   reaches its alpha = 2 regime) against ``C T^(alpha-1) R(theta)``, for squared L2,
   pseudo-Huber and the Euclidean norm; the scaled gradient gaps.
2. The proxy ``R~_t`` per coupling (:class:`ProxyJob`, ``mixture_study.proxy_estimates``): IC
   (exact, posterior covariance), IC by k-NN (the estimator's validation), batch-OT (training
   batch size), GC with the ideal generator (exact flow map) and GC with the trained GC
   (mu = 0.5) model of the first seed, all by local-linear k-NN.
3. Training head to head (:class:`TrainJob`, ``gcflows.training.train``; same steps, batch,
   network, seeds): CD (exact velocity), CD (distilled denoiser), CT, batch-OT, GC mu in
   {0.3, 0.5, 1.0}, GC with the ideal generator (the flow map by the multistep solver of
   ``gcflows.discrepancy.FlowMapGenerator``, checked against the ODE in the tests); scored at fixed
   checkpoints by ``mixture_study.score_model``: exact W2 of one-step samples, the consistency
   error against the exact flow map over t, mode balance, and R(theta).

Outputs in ``<out>/toy_discrepancy_<time>/``: config.json, results.json, results.csv, PNG figures;
the summary table is printed last. Jobs, the figures included, run in ``--workers`` processes
(default 2) under ``gcflows.progress.Scheduler``: each after the jobs whose results it needs, the
one with the longest expected path to the end first (:data:`JOB_COST_S`); progress on stderr (a
bar on a terminal, one line per job with ``--quiet`` or in a log). Every argument is checked
before the run folder is created.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gcflows import checks
from gcflows import discrepancy as dsc
from gcflows import mixture_study as ms
from gcflows import progress as pg
from gcflows.consistency import ConsistencyModel
from gcflows.gmm import PRESETS, get_preset
from gcflows.metrics import exact_w2
from gcflows.mixture_study import DISTANCES, EvalContext, StudySizes, seeded
from gcflows.networks import ToyMLP
from gcflows.processes import get_process
from gcflows.records import check_writable, make_run_dir, write_config, write_results
from gcflows.training import TrainConfig

DATASETS = sorted(k for k in PRESETS if k != "random_mixture")
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
    setup.problem()  # t_min / t_max against the process
    for name, *_ in METHODS:  # the workers' training configs, checked here
        try:
            train_config(setup, name, args.seeds[0])
        except ValueError as err:  # name the option, not the config field
            msg = str(err)
            for fld, option in CONFIG_OPTIONS.items():
                msg = msg.replace(f"TrainConfig.{fld}=", f"{option}=")
            raise ValueError(msg) from None
    check_writable(args.out)


@dataclass(frozen=True)
class Setup:
    """Every setting of the run (picklable; config.json records :meth:`record`)."""

    dataset: str
    process: str
    t_min: float
    t_max: float
    seeds: tuple[int, ...]
    hidden: int
    sigma_data: float
    distance: str
    s1: int
    batch_size: int
    steps: int
    lr: float
    ema_decay: float
    ideal_mu: float
    sizes: StudySizes
    depth: int = 3
    time_embed_dim: int = 32
    time_scale: float = 16.0  # c_noise spans a few units; a smooth embedding (module doc of dsc)
    s0: int = 10

    def record(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "sizes"}
        return out | dataclasses.asdict(self.sizes)

    def problem(self):
        """The target mixture (float64) and the process."""
        target = get_preset(self.dataset)
        return target, get_process(self.process, t_min=self.t_min, t_max=self.t_max)


def build_setup(args: argparse.Namespace) -> Setup:
    target = get_preset(args.dataset)
    if args.sigma_data is not None:
        sigma_data = args.sigma_data
    elif args.dataset in ("two_gaussians_1to2", "two_diracs"):
        sigma_data = 0.5  # the paper's value
    else:
        sigma_data = float(torch.sqrt(target.second_moment() / target.dim))
    return Setup(
        dataset=args.dataset,
        process=args.process,
        t_min=1e-3 if args.t_min is None else args.t_min,
        t_max=(5.0 if args.process == "ve" else 0.999) if args.t_max is None else args.t_max,
        seeds=tuple(args.seeds),
        hidden=args.hidden,
        sigma_data=sigma_data,
        distance=args.distance,
        s1=args.s1,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        ema_decay=args.ema_decay,
        ideal_mu=args.ideal_mu,
        sizes=StudySizes.preset(args.quick, args.n_eval),
    )


def train_config(setup: Setup, name: str, seed: int) -> TrainConfig:
    """The training configuration of method ``name`` (validated by ``TrainConfig``)."""
    _, method, mu, extra = {m[0]: m for m in METHODS}[name]
    return TrainConfig(
        method=method,
        mu=setup.ideal_mu if extra == "ideal" else mu,
        process=setup.process,
        t_min=setup.t_min,
        t_max=setup.t_max,
        distance=setup.distance,
        s0=setup.s0,
        s1=setup.s1,
        batch_size=setup.batch_size,
        total_steps=setup.steps,
        lr=setup.lr,
        ema_decay=setup.ema_decay,
        preset=setup.dataset,
        seed=seed,
        out_dir=None,
        progress=False,
        log_every=max(1, setup.steps // 50),
    )


def build_model(setup: Setup, seed: int, state: dict | None = None) -> ConsistencyModel:
    """ConsistencyModel(ToyMLP) initialised from ``seed`` (float32), or loaded from ``state``."""
    target, process = setup.problem()
    torch.manual_seed(seed)
    backbone = ToyMLP(
        target.dim,
        hidden=setup.hidden,
        depth=setup.depth,
        time_embed_dim=setup.time_embed_dim,
        time_scale=setup.time_scale,
    )
    model = ConsistencyModel(backbone, process, sigma_data=setup.sigma_data)
    if state is not None:
        model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------------------------------
# the jobs: typed specs, run in worker processes by run_job
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainJob:
    """Train one (method, seed) and score its EMA model at the checkpoints."""

    setup: Setup
    ctx: EvalContext
    name: str
    seed: int

    def run(self) -> dict:
        s, (target, process) = self.setup, self.setup.problem()
        extra = {m[0]: m for m in METHODS}[self.name][3]
        teacher = ms.teacher(extra, target, process, s.hidden, s.sizes, self.seed)
        model = build_model(s, self.seed)
        config = train_config(s, self.name, self.seed)
        keep = self.seed == s.seeds[0]  # samples, trajectories and the model of the first seed
        run = ms.train_and_score(config, model, target, process, teacher, self.ctx, s.sizes, keep)
        return {"name": self.name, **run}


@dataclass
class TheoryJob:
    """Theorem 1 on the random network of ``seed`` or on a trained one (``state``)."""

    setup: Setup
    seed: int
    label: str
    state: dict | None = None

    def run(self) -> ms.TheoryResult:
        target, process = self.setup.problem()
        model = build_model(self.setup, self.seed, self.state)
        gen = seeded(self.seed, 500 + (1 if self.state is not None else 0))
        sizes = self.setup.sizes
        return ms.theorem1_on_network(model, target, process, sizes, gen, self.label, self.seed)


@dataclass
class ProxyJob:
    """``R~_t`` of the couplings ``kinds`` (the trained GC generator from ``state``)."""

    setup: Setup
    seed: int
    kinds: tuple[str, ...]
    state: dict | None = None

    def run(self) -> list[dict]:
        target, process = self.setup.problem()
        generators = {}
        if "gc_ideal" in self.kinds:
            generators["gc_ideal"] = dsc.FlowMapGenerator(target, process, rtol=1e-5, atol=1e-7)
        if "gc_trained" in self.kinds:
            model = build_model(self.setup, self.seed, self.state)
            generators["gc_trained"] = ms.float64_copy(model)
        times = ms.log_times(process, self.setup.sizes.proxy_times)
        s = self.setup
        return ms.proxy_estimates(
            target, process, times, list(self.kinds), generators, s.sizes, s.batch_size, self.seed
        )


@dataclass
class FiguresJob:
    """Draw one group of figures into ``run_dir``; returns their file names. Run in a worker
    like the computations, so that figures of finished sections overlap the jobs still running."""

    setup: Setup
    part: str
    run_dir: str
    data: Any
    ctx: EvalContext | None = None

    def run(self) -> list[str]:
        run_dir, data = Path(self.run_dir), self.data
        if self.part == "theorem1":
            paths = figure_theorem1(run_dir, ms.theorem1_section(data))
        elif self.part == "proxy":
            paths = [figure_proxy(run_dir, ms.proxy_section(data, self.setup.problem()[1]))]
        elif self.part == "training":
            paths = figure_training(run_dir, data)
        else:
            paths = figure_samples(run_dir, data, self.ctx)
        return [p.name for p in paths]


@dataclass
class Done:
    """A job's value, its wall and CPU seconds (in its worker)."""

    value: Any
    job_s: float
    cpu_s: float


def run_job(job) -> Done:
    torch.set_num_threads(1)
    cpu0, t0 = time.process_time(), time.perf_counter()
    value = job.run()
    return Done(value, time.perf_counter() - t0, time.process_time() - cpu0)


# ------------------------------------------------------------------------------------------------
# the schedule
# ------------------------------------------------------------------------------------------------
FIGURE_PARTS = ("theorem1", "proxy", "training", "samples")
# CPU seconds of the jobs at the default sizes (docs/experiments.md, toy section; measured under
# load, so only their order matters): with the jobs that wait for each, they decide which ready
# job starts first (gcflows.progress.Scheduler), so that the workers end together
JOB_COST_S = {"train ot": 8.0, "train cd_distilled": 6.0, "train gc_ideal": 5.5, "train": 4.0}
JOB_COST_S |= {"theorem 1": 10.0, "proxy": 10.0, "proxy gc_trained": 1.2}
JOB_COST_S |= {f"figures: {k}": v for k, v in zip(FIGURE_PARTS, (4.5, 0.5, 3.0, 2.0), strict=True)}


def _job(label: str, payload=None, after=(), make=None) -> pg.Job:
    """A job spec, its cost from :data:`JOB_COST_S` (the longest key its label starts with)."""
    cost = JOB_COST_S[max((k for k in JOB_COST_S if label.startswith(k)), key=len)]
    return pg.Job(label, payload, tuple(after), cost, make)


def study_jobs(setup: Setup, ctx: EvalContext, skip_training: bool, run_dir: Path) -> list[pg.Job]:
    """Every job of the run with its dependencies: the trainings, Theorem 1 and the proxy on the
    random network, on the first seed's CT model and with its GC (mu 0.5) generator, the figures
    once their data is complete (built in the parent from the results they wait for)."""
    base = setup.seeds[0]
    names = [] if skip_training else [m[0] for m in METHODS]
    jobs = [
        _job(f"train {n} seed {s}", TrainJob(setup, ctx, n, s)) for n in names for s in setup.seeds
    ]
    train = [j.label for j in jobs]
    kinds = ("ic_exact", "ic_knn", "ot", "gc_ideal")
    theory, proxy = ["theorem 1, random init"], [f"proxy {'/'.join(kinds)}"]
    jobs += [
        _job(theory[0], TheoryJob(setup, base, "random init")),
        _job(proxy[0], ProxyJob(setup, base, kinds)),
    ]
    if not skip_training:
        ct, gc = f"train {THEORY_MODEL_FROM} seed {base}", f"train {GC_GENERATOR_FROM} seed {base}"
        label = f"trained ({THEORY_MODEL_FROM}, seed {base})"
        theory.append(f"theorem 1, {label}")
        proxy.append("proxy gc_trained")
        state = lambda r, k: r[k].value["ema_state"]  # noqa: E731
        jobs += [
            _job(theory[1], None, [ct], lambda r: TheoryJob(setup, base, label, state(r, ct))),
            _job(
                proxy[1], None, [gc], lambda r: ProxyJob(setup, base, ("gc_trained",), state(r, gc))
            ),
        ]
    values = lambda r, labels: [r[k].value for k in labels]  # noqa: E731
    data = {
        "theorem1": (theory, lambda r: values(r, theory)),
        "proxy": (proxy, lambda r: [row for rows in values(r, proxy) for row in rows]),
        "training": (train, lambda r: ms.training_section(values(r, train), names)),
        "samples": (train, lambda r: ms.first_seed_samples(values(r, train), names)),
    }
    for part in FIGURE_PARTS[: 2 if skip_training else 4]:
        after, make = data[part]
        ctx_part = ctx if part == "samples" else None

        def build(r, part=part, make=make, ctx_part=ctx_part) -> FiguresJob:
            return FiguresJob(setup, part, str(run_dir), make(r), ctx_part)

        jobs.append(_job(f"figures: {part}", None, after, build))
    return jobs


def run_jobs(setup: Setup, args: argparse.Namespace, run_dir: Path):
    """Every job, the figures included, in ``args.workers`` processes with progress on stderr;
    SIGINT / SIGTERM stop the workers (:class:`gcflows.progress.Interrupted`). Returns the
    schedule's result, the evaluation context and the ``perf_counter`` time at which it was
    ready. The workers are started first: they import while the parent prepares the context."""
    n_jobs = 4 if args.skip_training else len(METHODS) * len(setup.seeds) + 4 + len(FIGURE_PARTS)
    with (
        pg.Progress(n_jobs, "toy_discrepancy", quiet=args.quiet) as progress,
        pg.JobPool(run_job, args.workers, progress) as pool,
    ):
        target, process = setup.problem()
        ctx = ms.make_eval_context(target, process, setup.sizes, setup.seeds[0])
        ctx_ready = time.perf_counter()
        scheduler = pg.Scheduler(pool, study_jobs(setup, ctx, args.skip_training, run_dir))
        scheduler.fill()
        # now, while the first jobs run: exact_w2 imports POT (~1.5 s), off the path to them
        ctx.w2_floor = exact_w2(ctx.w2_target, ctx.floor_sample)
        done = scheduler.run()
    return done, ctx, ctx_ready


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def figure_theorem1(run_dir: Path, theory: dict[str, ms.TheoryResult]) -> list[Path]:
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


def _gradient_curves(pl, res: ms.TheoryResult, name: str, color: str) -> list:
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


def figure_proxy(run_dir: Path, proxy: ms.ProxySummary) -> Path:
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


def figure_training(run_dir: Path, training: dict[str, ms.MethodSummary]) -> list[Path]:
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
# main
# ------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    wall0 = time.perf_counter()
    args = parse_args(argv)
    setup = build_setup(args)
    run_dir = make_run_dir(args.out, "toy_discrepancy")
    methods = [m[0] for m in METHODS]
    write_config(run_dir, args, seed=args.seeds, setup=setup.record(), methods=methods)
    _, process = setup.problem()
    # the parent only prepares the evaluation context (small tensors, where a second thread
    # only adds synchronisation; under load it made this step 20x slower) and collects results
    torch.set_num_threads(1)
    print(
        f"[toy_discrepancy] {args.dataset}, {process.name} on [{process.t_min}, {process.t_max}], "
        f"seeds {args.seeds}, {setup.steps} steps, {args.workers} workers -> {run_dir}",
        flush=True,
    )
    try:
        with pg.signals_interrupt():
            done, ctx, t_jobs = run_jobs(setup, args, run_dir)
    except pg.Interrupted as err:
        print(
            f"[toy_discrepancy] {err}: workers stopped, nothing written to {run_dir} "
            "but config.json",
            file=sys.stderr,
        )
        raise SystemExit(128 + err.signum) from None
    except pg.JobFailed as err:  # a job's error, or its worker killed (the out-of-memory killer)
        print(f"toy_discrepancy.py: error: {err}; run folder {run_dir}", file=sys.stderr)
        raise SystemExit(1) from None
    jobs_s = time.perf_counter() - t_jobs
    res = done.results
    labels = lambda prefix: [k for k in res if k.startswith(prefix)]  # noqa: E731
    timed = lambda d: dataclasses.replace(d.value, job_s=d.job_s, cpu_s=d.cpu_s)  # noqa: E731
    theory = ms.theorem1_section([timed(res[k]) for k in labels("theorem 1")])
    checks_by_label = ms.theorem_checks(theory)
    proxy_labels = sorted(labels("proxy "), key=lambda k: k.endswith("gc_trained"))
    proxy_rows = [row for k in proxy_labels for row in res[k].value]
    proxy = ms.proxy_section(proxy_rows, process)
    training = ms.training_section([res[k].value for k in labels("train ")], methods)
    figures = [n for p in FIGURE_PARTS for n in getattr(res.get(f"figures: {p}"), "value", [])]
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
        "proxy": {"summary": proxy, "rows": proxy_rows},
        "training": training,
        "figures": figures,
        "timing_s": {
            "total": time.perf_counter() - wall0,
            "preparation": t_jobs - wall0,
            "jobs": jobs_s,
            "per_job": {k: d.job_s for k, d in res.items()},
            "per_job_cpu": {k: d.cpu_s for k, d in res.items()},
            # (start, end) of each job in seconds since the schedule began, in order of start
            "schedule": {k: list(done.times[k]) for k in done.started},
        },
    }
    write_results(run_dir, results, ms.csv_rows(theory, proxy, training))
    total_s, setting = time.perf_counter() - wall0, (args.dataset, args.seeds, ctx.w2_floor)
    ms.print_summary(run_dir, *setting, checks_by_label, proxy, training, total_s)
    return results


if __name__ == "__main__":
    main()
