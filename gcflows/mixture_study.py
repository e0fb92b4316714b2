"""The exact-oracle sections of the mixture (toy) study of docs/paper.md section 3, as library
functions over :mod:`gcflows.discrepancy` returning typed results (experiments/toy_discrepancy.py
wires them into jobs, figures and tables).

- :class:`StudySizes`: every size of the study (recorded in config.json).
- :class:`EvalContext` / :func:`make_eval_context`: the draws every evaluation shares (the W2
  target sample, the flow-map reference of the consistency error, exact PF-ODE trajectories);
  :func:`score_model`: a trained model scored exactly (:class:`Scores`): exact W2 of one-step
  samples, the consistency error against the exact flow map
  (``gcflows.mixture_eval.consistency_error`` on the reference's draws, times ``d``), mode
  balance, ``R(theta)``.
- Section 1, Theorem 1 on one network: :func:`theorem1_on_network` (:class:`TheoryResult`),
  :func:`theorem_checks`.
- Section 2, the proxy ``R~_t`` per coupling: :func:`proxy_estimates`, :func:`proxy_section`
  (:class:`ProxySummary`).
- Section 3, training head to head: :func:`summarise_method` (:class:`MethodSummary`) over the
  per-seed :class:`Scores` at the checkpoints.
- results.csv rows (:func:`csv_rows`) and the printed tables (:func:`print_theorem1`,
  :func:`print_proxy`, :func:`print_training`).

Every random draw comes from :func:`seeded` (one stream per purpose and seed), so a section's
numbers do not depend on which process or in which order it runs.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gcflows import discrepancy as dsc
from gcflows.consistency import get_distance
from gcflows.gmm import GaussianMixture
from gcflows.metrics import exact_w2, mode_coverage
from gcflows.mixture_eval import consistency_error, eval_set_from_reference
from gcflows.records import print_table
from gcflows.sampling import one_step_sample
from gcflows.stats import Interval, mean_interval
from gcflows.training import TrainConfig, train
from gcflows.velocity import DistilledVelocity, TrueVelocity, fit_denoiser

__all__ = [
    "DISTANCES",
    "StudySizes",
    "seeded",
    "log_times",
    "float64_copy",
    "EvalContext",
    "make_eval_context",
    "Scores",
    "score_model",
    "TheoryResult",
    "theorem1_on_network",
    "theorem_checks",
    "proxy_estimates",
    "ProxySummary",
    "proxy_section",
    "Teacher",
    "teacher",
    "train_and_score",
    "MethodSummary",
    "summarise_method",
    "training_section",
    "first_seed_samples",
    "csv_rows",
    "print_theorem1",
    "print_proxy",
    "print_training",
    "print_summary",
]

DISTANCES = ("squared_l2", "pseudo_huber", "l2_norm")


@dataclass(frozen=True)
class StudySizes:
    """Every size of the study; :meth:`preset` gives the default or the ``--quick`` ones."""

    n_eval: int = 800  # samples per evaluation (W2, mode balance)
    ideal_steps: int = 32  # multistep steps of the ideal GC generator in training (MSE ~1e-7)
    denoiser_steps: int = 1500  # the distilled CD teacher
    n_checkpoints: int = 3
    r_samples_ckpt: int = 2000  # R(theta) at a checkpoint
    gap_ns: tuple[int, ...] = (10, 20, 40, 80, 160, 320, 640, 1280)  # Theorem 1
    gap_ns_extended: tuple[int, ...] = (10240, 81920)
    gap_samples: int = 20000
    r_samples: int = 20000
    grad_ns: tuple[int, ...] = (10, 40, 160, 640, 1280, 10240)
    grad_samples: int = 7200
    grad_groups: int = 6
    proxy_times: int = 10  # the proxy
    proxy_samples: int = 8000
    knn_k: int = 32
    ref_times: int = 8  # the flow-map reference of the consistency error
    ref_per_time: int = 125
    n_traj: int = 12
    traj_times: int = 12

    @classmethod
    def preset(cls, quick: bool, n_eval: int | None = None) -> StudySizes:
        if not quick:
            return cls(n_eval=800 if n_eval is None else n_eval)
        return cls(
            n_eval=200 if n_eval is None else n_eval,
            denoiser_steps=150,
            n_checkpoints=2,
            r_samples_ckpt=400,
            gap_ns=(10, 40, 160, 1280),
            gap_ns_extended=(10240,),
            gap_samples=2000,
            r_samples=2000,
            grad_ns=(10, 1280),
            grad_samples=800,
            grad_groups=2,
            proxy_times=4,
            proxy_samples=1500,
            ref_times=4,
            ref_per_time=40,
        )


def float64_copy(model: torch.nn.Module, trainable: bool = False) -> torch.nn.Module:
    """A float64 copy of ``model`` in eval mode (``requires_grad`` as ``trainable``)."""
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
# the evaluation of a trained model
# ------------------------------------------------------------------------------------------------
@dataclass
class EvalContext:
    """What every evaluation shares: the W2 target sample, a second target sample for the W2
    floor, the flow-map reference of the consistency error (``gcflows.discrepancy.
    flow_map_reference``), the mode radius, exact PF-ODE trajectories; ``w2_floor`` (the exact
    W2 of the two target samples) is filled in by the caller."""

    w2_target: torch.Tensor
    floor_sample: torch.Tensor
    reference: dict
    mode_radius: float
    trajectory: dict
    w2_floor: float | None = None


def make_eval_context(
    target: GaussianMixture, process, sizes: StudySizes, seed: int
) -> EvalContext:
    """The shared draws of a study, from the streams ``seeded(seed, 11 / 12 / 13)``."""
    g = seeded(seed, 11)
    w2_target = target.sample(sizes.n_eval, g)
    floor_sample = target.sample(sizes.n_eval, g)
    # rtol 1e-4: squared errors ~1e-8, far below any consistency error measured here
    reference = dsc.flow_map_reference(
        target,
        process,
        log_times(process, sizes.ref_times),
        sizes.ref_per_time,
        generator=seeded(seed, 12),
        rtol=1e-4,
        atol=1e-6,
    )
    n_traj, n_tt, d = sizes.n_traj, sizes.traj_times, target.dim
    g = seeded(seed, 13)
    x_top = process.interpolate(
        target.sample(n_traj, g),
        torch.randn(n_traj, d, generator=g, dtype=torch.float64),
        process.t_max,
    )
    tt = torch.tensor(log_times(process, n_tt, lo_factor=1.0)[::-1], dtype=torch.float64)
    t_end = tt.repeat(n_traj)
    xs = x_top.repeat_interleave(n_tt, 0)
    path = target.flow_map(xs, process.t_max, process, t_end=t_end, rtol=1e-4, atol=1e-6)
    endpoints = target.flow_map(x_top, process.t_max, process, rtol=1e-4, atol=1e-6)
    stds = target.stds
    radius = max(0.05, 10.0 * float(stds.max())) if stds is not None else 0.5
    trajectory = {"x": path, "t": t_end, "shape": (n_traj, n_tt, d), "endpoints": endpoints}
    return EvalContext(w2_target, floor_sample, reference, radius, trajectory)


@dataclass
class Scores:
    """A model scored at one training step (:func:`score_model`)."""

    step: int
    w2: float
    consistency_error: float
    consistency_by_t: dict[str, list[float]]
    mode_balance_tv: float
    outlier_fraction: float
    mode_fractions: list[float]
    r_theta: Interval

    def metric(self, name: str) -> float:
        """A metric's value (``r_theta``: its mean)."""
        value = getattr(self, name)
        return value.mean if isinstance(value, Interval) else value


def score_model(
    model,
    target: GaussianMixture,
    process,
    ctx: EvalContext,
    sizes: StudySizes,
    seed: int,
    step: int,
) -> Scores:
    """Exact W2 of ``sizes.n_eval`` one-step samples against ``ctx.w2_target``, the consistency
    error ``E||f(x_t, t) - flow map(x_t, t)||^2`` per reference time and its mean over them, mode
    balance and outliers (``gcflows.metrics.mode_coverage``), ``R(theta)`` (alpha 2)."""
    with torch.no_grad():
        noise = torch.randn(sizes.n_eval, target.dim, generator=seeded(seed, 101))
        samples = one_step_sample(model, noise, process).double()
    ev = eval_set_from_reference(ctx.reference)

    def apply(x, t):  # (1, B, d), (1, B) -> (1, B, d)
        return model(x.reshape(-1, x.shape[-1]), t.reshape(-1)).reshape(x.shape)

    per_t = (consistency_error(apply, 1, ev)[0] * target.dim).double()
    modes = mode_coverage(samples, target.means, target.weights, radius=ctx.mode_radius)
    r = dsc.r_theta(
        float64_copy(model),
        target,
        process,
        n_samples=sizes.r_samples_ckpt,
        generator=seeded(seed, step, 7),
    )
    return Scores(
        step=step,
        w2=exact_w2(samples, ctx.w2_target),
        consistency_error=float(per_t.mean()),
        consistency_by_t={"times": list(ev.times), "mse": per_t.tolist()},
        mode_balance_tv=modes["balance_tv"],
        outlier_fraction=modes["outlier_fraction"],
        mode_fractions=modes["fractions"],
        r_theta=r,
    )


# ------------------------------------------------------------------------------------------------
# section 1: Theorem 1
# ------------------------------------------------------------------------------------------------
@dataclass
class TheoryResult:
    """Theorem 1 on one network (:func:`theorem1_on_network`)."""

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


def theorem1_on_network(
    model: torch.nn.Module,
    target: GaussianMixture,
    process,
    sizes: StudySizes,
    generator: torch.Generator,
    label: str,
    seed: int,
) -> TheoryResult:
    """Theorem 1 on one network: ``R(theta)`` (alpha 2 and 1), the scaled loss gaps at
    ``sizes.gap_ns + gap_ns_extended`` and the gradient gaps at ``sizes.grad_ns`` for each of
    :data:`DISTANCES`, and each distance's limit ``C T^(alpha-1) R``; all in float64 from
    ``generator``, in that order."""
    m64 = float64_copy(model)
    r2 = dsc.r_theta(m64, target, process, n_samples=sizes.r_samples, generator=generator)
    r1 = dsc.r_theta(
        m64, target, process, alpha=1.0, n_samples=sizes.r_samples, generator=generator
    )
    ns = list(sizes.gap_ns) + list(sizes.gap_ns_extended)
    gaps = dsc.loss_gaps(
        m64, target, process, ns, DISTANCES, n_samples=sizes.gap_samples, generator=generator
    )
    m64.requires_grad_(True)
    grads = dsc.gradient_gaps(
        m64,
        target,
        process,
        list(sizes.grad_ns),
        DISTANCES,
        n_samples=sizes.grad_samples,
        n_groups=sizes.grad_groups,
        generator=generator,
    )
    limits = {}
    for name in DISTANCES:
        dist = get_distance(name, target.dim)
        limits[name] = (r2 if dist.alpha == 2.0 else r1).scaled(dsc.limit_constant(dist, process))
    return TheoryResult(label, seed, r2, r1, limits, gaps, grads, job_s=0.0)


def theorem1_section(results: list[TheoryResult]) -> dict[str, TheoryResult]:
    """The networks' results by label, the random initialisation first."""
    results = sorted(results, key=lambda r: r.label != "random init")
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
def proxy_estimates(
    target: GaussianMixture,
    process,
    times: list[float],
    kinds: list[str],
    generators: dict,
    sizes: StudySizes,
    batch_size: int,
    seed: int,
) -> list[dict]:
    """``R~_t`` per coupling (``kinds``: ``ic_exact`` by the posterior covariance, ``ic_knn`` /
    ``ot`` / a GC kind by local-linear k-NN, the GC generator ``generators[kind]``, ``mu = 1``;
    batch-OT at ``batch_size``) at each time: the same data and noise for every coupling at a t.
    Rows ``{"coupling", "t", "estimate"}``."""
    n, k = sizes.proxy_samples, sizes.knn_k
    rows = []
    for j, t in enumerate(times):
        gen = seeded(seed, 900, j)
        data = target.sample(n, gen)
        noise = torch.randn(n, target.dim, generator=gen, dtype=torch.float64)
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
                    ot_batch_size=batch_size,
                )
                est = dsc.knn_proxy(x_t, xdot, k=k)
            rows.append({"coupling": kind, "t": t, "estimate": est})
    return rows


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
class Teacher:
    """What a method trains with besides data: a CD velocity, a GC generator (or neither), and
    the seconds spent fitting a distilled denoiser."""

    velocity: Any = None
    gc_model: Any = None
    denoiser_s: float = 0.0


def teacher(
    kind: str | None, target: GaussianMixture, process, hidden: int, sizes: StudySizes, seed: int
) -> Teacher:
    """``"exact"``: the exact velocity; ``"distilled"``: a denoiser (``hidden`` units,
    ``sizes.denoiser_steps``) fitted on 20,000 target samples; ``"ideal"``: the ideal GC generator
    (multistep flow map, ``sizes.ideal_steps``); ``None``: nothing."""
    if kind == "exact":
        return Teacher(velocity=TrueVelocity(target, process))
    if kind == "distilled":
        t0 = time.perf_counter()
        samples = target.sample(20_000, seeded(seed, 31)).float()
        denoiser = fit_denoiser(
            samples, process, hidden=hidden, steps=sizes.denoiser_steps, generator=seeded(seed, 32)
        )
        return Teacher(DistilledVelocity(denoiser, process), None, time.perf_counter() - t0)
    if kind == "ideal":
        gen = dsc.FlowMapGenerator(target, process, method="multistep", steps=sizes.ideal_steps)
        return Teacher(gc_model=gen)
    return Teacher()


def train_and_score(
    config: TrainConfig,
    model,
    target: GaussianMixture,
    process,
    teach: Teacher,
    ctx: EvalContext,
    sizes: StudySizes,
    keep: bool,
) -> dict:
    """Train ``model`` (``gcflows.training.train``) and score its EMA model (:func:`score_model`)
    at ``sizes.n_checkpoints`` evenly spaced steps. Returns ``{"seed", "mu", "evals", "train_s",
    "denoiser_s"}``; with ``keep`` also the EMA model's one-step ``samples``, its predictions
    along ``ctx.trajectory`` and its ``ema_state``."""
    seed, k = config.seed, sizes.n_checkpoints
    checkpoints = sorted({max(1, round(config.total_steps * (j + 1) / k)) for j in range(k)})
    evals: list[Scores] = []

    def on_step(info) -> None:
        if info.step in checkpoints:
            evals.append(score_model(info.ema_model, target, process, ctx, sizes, seed, info.step))

    t0 = time.perf_counter()
    result = train(
        config,
        model,
        lambda n, g: target.sample(n, g),
        velocity=teach.velocity,
        gc_model=teach.gc_model,
        callbacks=[on_step],
    )
    out = {
        "seed": seed,
        "mu": config.mu,
        "evals": evals,
        "train_s": time.perf_counter() - t0,
        "denoiser_s": teach.denoiser_s,
    }
    if keep:
        ema = result.ema_model
        with torch.no_grad():
            noise = torch.randn(sizes.n_eval, target.dim, generator=seeded(seed, 101))
            out["samples"] = one_step_sample(ema, noise, process).double().numpy()
            traj = ctx.trajectory
            pred = ema(traj["x"].float(), traj["t"].float()).double()
            out["trajectory"] = pred.reshape(traj["shape"]).numpy()
        out["ema_state"] = {k: v.detach().clone() for k, v in ema.state_dict().items()}
    return out


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


def summarise_method(runs: list[dict]) -> MethodSummary:
    """One method's runs (``{"seed", "mu", "evals": [Scores ...], "train_s", "denoiser_s"}``)
    summarised over seeds."""
    runs = sorted(runs, key=lambda r: r["seed"])
    steps = [e.step for e in runs[0]["evals"]]
    curves = {
        m: [mean_interval([r["evals"][i].metric(m) for r in runs]) for i in range(len(steps))]
        for m in CURVE_METRICS
    }
    per_t = np.asarray([r["evals"][-1].consistency_by_t["mse"] for r in runs])
    by_t = [mean_interval(per_t[:, j].tolist()) for j in range(per_t.shape[1])]
    last = [r["evals"][-1] for r in runs]
    return MethodSummary(
        mu=runs[0]["mu"],
        steps=steps,
        curves=curves,
        final={m: c[-1] for m, c in curves.items()},
        per_seed_final={
            "seeds": [r["seed"] for r in runs],
            **{m: [e.metric(m) for e in last] for m in CURVE_METRICS if m != "outlier_fraction"},
        },
        consistency_by_t={
            "times": last[0].consistency_by_t["times"],
            "mean": [b.mean for b in by_t],
            "se": [b.se for b in by_t],
        },
        train_s=[r["train_s"] for r in runs],
        denoiser_s=[r["denoiser_s"] for r in runs],
    )


def training_section(runs: list[dict], methods: list[str]) -> dict[str, MethodSummary]:
    """The runs (each with its method's ``"name"``) summarised per method, in ``methods`` order."""
    if not runs:
        return {}
    return {m: summarise_method([r for r in runs if r["name"] == m]) for m in methods}


def first_seed_samples(runs: list[dict], methods: list[str]) -> dict:
    """One-step samples and trajectories of the runs that kept them, in ``methods`` order."""
    have = sorted((r for r in runs if "samples" in r), key=lambda r: methods.index(r["name"]))
    return {
        "samples": {r["name"]: r["samples"] for r in have},
        "trajectory": {r["name"]: r["trajectory"] for r in have},
    }


# ------------------------------------------------------------------------------------------------
# results.csv and the printed tables
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


def print_summary(
    run_dir, dataset: str, seeds, w2_floor: float, checks_by_label, proxy, training, total_s: float
) -> None:
    """The summary printed last: the run folder, the setting, the three sections' tables."""
    print(f"\nRun folder: {run_dir}")
    print(f"Setting: {dataset}, seeds {seeds}; W2 floor (two target samples) {w2_floor:.4g}")
    print_theorem1(checks_by_label)
    print_proxy(proxy)
    if not training:
        print(f"\n(training skipped); total wall time {total_s:.1f} s")
        return
    print_training(training, len(seeds), total_s)
