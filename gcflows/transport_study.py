"""The transport-cost study's sections (docs/paper.md section 4) as library functions over
:mod:`gcflows.transport` with typed results; experiments/transport_cost.py runs them, draws the
figures and prints the tables.

- :class:`Profile` / :data:`PROFILES`: the work of the default and the ``--quick`` study.
- Costs per dataset (:func:`dataset_section`, :class:`DatasetResult`): IC, batch-OT per batch
  size, Sinkhorn, ``c(t)`` of the ideal flow map; :func:`summary_row`, the comparisons of
  intervals (:func:`compare`, :func:`compare_gain`, :func:`compare_zero`) and results.csv rows.
- Lemma 1 and its corollaries (:func:`lemma_section`, :class:`LemmaSection`): ``c'(t)`` by
  finite differences against the tangent ODE on full grids, Corollary 1 near ``t_min``,
  Corollary 2 (the scaling regime) near ``t_max``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from gcflows import gmm
from gcflows import transport as T
from gcflows.processes import get_process
from gcflows.stats import Interval

__all__ = [
    "PROCESSES",
    "Profile",
    "PROFILES",
    "compare",
    "compare_zero",
    "compare_gain",
    "crossing_time",
    "DatasetResult",
    "curve_rows",
    "dataset_section",
    "summary_row",
    "lemma_target",
    "lemma_times",
    "pooled_s0",
    "LemmaSection",
    "lemma_section",
]

PROCESSES = ("ve", "linear")
BATCH_SIZES = (16, 128, 512, 2048)
SWEEP_DIMS = (16, 64, 256, 3072)
GAUSSIAN_MEAN = (0.3, -0.2)
GAUSSIAN_STD = 0.5


@dataclass(frozen=True)
class Profile:
    """The work of a study (config.json records it): which datasets, pairs per estimate,
    batch sizes, grid sizes, training steps, Lemma 1 targets."""

    presets: tuple[str, ...]
    dims: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    ot_pairs: int
    ot_min_batches: int
    ot_pairs_by_dim: dict[int, int]
    sinkhorn_batch: int
    sinkhorn_batches: int
    gc_times_2d: int
    gc_times_sweep: int
    gc_n: dict[int, int]
    train_steps: int
    train_eval_n: int
    lemma_n: int
    lemma_processes: tuple[str, ...]
    lemma_targets: tuple[str, ...]
    cor1_targets: tuple[str, ...]
    digits: bool


# Work per profile. gc_n: pairs of the ideal-flow-map curve per dimension (the flow map in
# 3072-D costs ~0.05-0.1 s per velocity evaluation of 24 rows on this CPU); gc_times: grid points.
PROFILES: dict[str, Profile] = {
    "default": Profile(
        presets=("eight_gaussians", "two_gaussians_1to2"),
        dims=SWEEP_DIMS,
        batch_sizes=BATCH_SIZES,
        ot_pairs=4096,
        ot_min_batches=3,
        ot_pairs_by_dim={3072: 2048},
        sinkhorn_batch=512,
        sinkhorn_batches=3,
        gc_times_2d=10,
        gc_times_sweep=7,
        gc_n={2: 600, 16: 400, 64: 256, 256: 128, 3072: 24},
        train_steps=600,
        train_eval_n=1000,
        lemma_n=500,
        lemma_processes=("ve", "linear"),
        lemma_targets=("gaussian", "two_modes_std0.1"),
        cor1_targets=("two_gaussians_1to2", "two_diracs"),
        digits=True,
    ),
    "quick": Profile(
        presets=("two_gaussians_1to2",),
        dims=(16,),
        batch_sizes=(16, 128, 512),
        ot_pairs=512,
        ot_min_batches=2,
        ot_pairs_by_dim={},
        sinkhorn_batch=128,
        sinkhorn_batches=2,
        gc_times_2d=6,
        gc_times_sweep=5,
        gc_n={2: 300, 16: 100},
        train_steps=60,
        train_eval_n=300,
        lemma_n=200,
        lemma_processes=("ve",),
        lemma_targets=("gaussian",),
        cor1_targets=("two_gaussians_1to2",),
        digits=True,
    ),
}


# ------------------------------------------------------------------------------------------------
# comparisons and the costs per dataset
# ------------------------------------------------------------------------------------------------
def compare(a: Interval, b: Interval) -> str:
    """``<`` if a is below b with both intervals apart, ``>`` the reverse, ``~`` if they overlap."""
    if a.hi < b.lo:
        return "<"
    if a.lo > b.hi:
        return ">"
    return "~"


def compare_zero(e: Interval) -> str:
    """Sign of an interval: ``-`` (all below 0), ``+`` (all above), ``0?`` (contains 0)."""
    return "-" if e.hi < 0 else ("+" if e.lo > 0 else "0?")


def compare_gain(gain: Interval) -> str:
    """Coupled cost against IC on the same batches, from the paired gain ``IC - cost``."""
    return "<" if gain.lo > 0 else (">" if gain.hi < 0 else "~")


def crossing_time(curve: T.CostCurve, level_cost: Interval) -> float | None:
    """Smallest grid time from which ``c(t)`` stays below ``level_cost`` (intervals apart)."""
    below = [p.hi < level_cost.lo for p in curve.points]
    for i in range(len(below)):
        if all(below[i:]):
            return float(curve.times[i])
    return None


def _csv(name: str, dim: int, coupling: str, est: Interval, ic: float, **extra) -> dict:
    """One line of results.csv."""
    row = {
        "dataset": name,
        "dim": dim,
        "process": "-",
        "coupling": coupling,
        "batch_size": None,
        "t": None,
        "cost": est.mean,
        "lo": est.lo,
        "hi": est.hi,
        "ic": ic,
        "relative": est.mean / ic,
    }
    row.update(extra)
    return row


# ------------------------------------------------------------------------------------------------
# section 1-2: IC, batch-OT, Sinkhorn and the ideal GC cost per dataset
# ------------------------------------------------------------------------------------------------
@dataclass
class DatasetResult:
    """Costs of one dataset: IC, batch-OT per batch size, Sinkhorn, and ``c(t)`` of the ideal
    flow map per process (with the first grid time from which it stays below batch-OT)."""

    name: str
    dim: int
    kind: str
    ic: Interval
    batch_ot: list[T.BatchCost]
    sinkhorn: T.BatchCost
    gc_ideal: dict[str, T.CostCurve] = field(default_factory=dict)
    gc_below_batch_ot_from_t: dict[str, dict[str, float | None]] = field(default_factory=dict)
    gc_checkpoint: dict | None = None

    def csv_rows(self) -> list[dict]:
        rows = [
            _csv(self.name, self.dim, r.coupling, r.cost, r.ic.mean, batch_size=r.batch_size)
            for r in self.batch_ot + [self.sinkhorn]
        ]
        rows.append(_csv(self.name, self.dim, "ic", self.ic, self.ic.mean))
        for proc, curve in self.gc_ideal.items():
            rows.extend(curve_rows(self.name, self.dim, proc, "gc_ideal", curve))
        return rows


def curve_rows(name: str, dim: int, proc: str, coupling: str, curve: T.CostCurve) -> list[dict]:
    return [
        _csv(
            name,
            dim,
            coupling,
            p,
            curve.ic.mean,
            process=proc,
            t=t,
            gain_lo=gain.lo,
            gain_hi=gain.hi,
        )
        for t, p, gain in zip(curve.times.tolist(), curve.points, curve.gain, strict=True)
    ]


def dataset_section(
    ds: dict,
    profile: Profile,
    g: torch.Generator,
    level: float,
    sinkhorn_reg: float,
    digits_ideal: int,
) -> DatasetResult:
    """IC, batch-OT per batch size, Sinkhorn and (with a mixture) the ideal GC cost curve per
    process of one dataset of :func:`build_datasets`, all drawn from ``g`` in that order."""
    name, dim, source, mix = ds["name"], ds["dim"], ds["source"], ds["mixture"]
    n_pairs = profile.ot_pairs_by_dim.get(dim, profile.ot_pairs)
    ot = T.batch_ot_curve(
        source,
        None,
        profile.batch_sizes,
        n_pairs=n_pairs,
        generator=g,
        min_batches=profile.ot_min_batches,
        level=level,
    )
    sk = T.sinkhorn_cost(
        source,
        None,
        profile.sinkhorn_batch,
        profile.sinkhorn_batches,
        g,
        reg=sinkhorn_reg,
        level=level,
    )
    data = T.as_sampler(source)(8192, g)
    ic = T.ic_cost(data, torch.randn(data.shape, generator=g, dtype=data.dtype), level)
    res = DatasetResult(name, dim, ds["kind"], ic, ot, sk)
    n_gc = profile.gc_n.get(dim, 0) if mix is not None else 0
    if ds["kind"] == "digits":
        n_gc = digits_ideal
    if mix is None or n_gc == 0:
        return res
    n_times = profile.gc_times_2d if ds["kind"] == "2d" else profile.gc_times_sweep
    for proc in PROCESSES if ds["kind"] == "2d" else ("ve",):
        times = T.sigma_grid(proc, n_times)
        curve = T.gc_cost_curve(mix, mix, proc, times, n_gc, g, level=level, label="ideal")
        res.gc_ideal[proc] = curve
        res.gc_below_batch_ot_from_t[proc] = {
            str(r.batch_size): crossing_time(curve, r.cost) for r in ot
        }
    return res


def summary_row(res: DatasetResult) -> dict[str, Any]:
    """The dataset's line of the summary table (costs relative to IC; GC at t_max)."""
    row: dict[str, Any] = {"dataset": res.name, "d": res.dim, "IC": res.ic.mean}
    for r in res.batch_ot:
        row[f"OT{r.batch_size}/IC"] = r.cost.mean / res.ic.mean
    row[f"SK{res.sinkhorn.batch_size}/IC"] = res.sinkhorn.cost.mean / res.ic.mean
    top = {proc: c.points[-1] for proc, c in res.gc_ideal.items()}
    for proc in PROCESSES:
        row[f"GC({proc})/IC"] = top[proc].mean / res.ic.mean if proc in top else None
    row["GC source"] = "ideal flow map" if top else "-"
    row["OT vs IC"] = " ".join(compare_gain(r.gain) for r in res.batch_ot)
    gc_ref = top.get("ve")
    row["GC vs OT_B"] = (
        " ".join(compare(gc_ref, r.cost) for r in res.batch_ot) if gc_ref is not None else "-"
    )
    return row


# ------------------------------------------------------------------------------------------------
# Lemma 1, Corollaries 1 and 2
# ------------------------------------------------------------------------------------------------
def lemma_target(name: str) -> tuple[gmm.GaussianMixture, str]:
    """The distributions of the Lemma 1 checks."""
    if name == "gaussian":
        mean = torch.tensor([GAUSSIAN_MEAN], dtype=torch.float64)
        return gmm.GaussianMixture([1.0], mean, stds=GAUSSIAN_STD), "one Gaussian"
    if name == "two_modes_std0.1":
        return gmm.two_gaussians_1to2(std=0.1), "two modes, std 0.1"
    return gmm.get_preset(name), name


def lemma_times(process: str) -> torch.Tensor:
    """t_min, 1.5 t_min, four interior points of the sigma grid, t_max / 4, / 2, t_max."""
    p = get_process(process)
    grid = T.sigma_grid(p, 6)
    s_max = float(p.b(torch.tensor(p.t_max)) / p.a(torch.tensor(p.t_max)))
    top = [s_max / 4, s_max / 2]
    top_t = [s / (1 + s) if p.name == "linear" else s for s in top]
    pts = {p.t_min, 1.5 * p.t_min, *grid[1:-1].tolist(), *top_t, p.t_max}
    return torch.tensor(sorted(pts), dtype=torch.float64)


def pooled_s0(estimates: list[Interval]) -> float:
    """Inverse-variance weighted mean (plain mean when a standard error is 0: exact values)."""
    if any(e.se <= 0 for e in estimates):
        return sum(e.mean for e in estimates) / len(estimates)
    w = [1.0 / e.se**2 for e in estimates]
    return sum(wi * e.mean for wi, e in zip(w, estimates, strict=True)) / sum(w)


def corollary1_row(res: T.Lemma1Result, label: str) -> dict[str, Any]:
    """Corollary 1 at the first two times of ``res`` (t_min and 1.5 t_min): both slopes < 0?"""
    return {
        "target": label,
        "process": res.process,
        "c'(t_min) finite diff.": f"{res.fd[0].mean:.4g} +- {res.fd[0].half_width:.2g}",
        "-2 g E<Jw,w> (t_min)": f"{res.lemma[0].mean:.4g} +- {res.lemma[0].half_width:.2g}",
        "-2 g E|w|^2 (t_min)": -2 * float(res.g[0]) * res.w2[0].mean,
        "c' < 0 at t_min, 1.5 t_min": " ".join(
            "yes" if res.fd[i].hi < 0 and res.lemma[i].hi < 0 else "NO" for i in (0, 1)
        ),
    }


@dataclass
class LemmaSection:
    """Lemma 1 on full time grids, Corollary 1 near ``t_min``, Corollary 2 near ``t_max``."""

    checks: list[T.Lemma1Result] = field(default_factory=list)  # the full-grid checks (figure)
    all_checks: list[T.Lemma1Result] = field(default_factory=list)
    lemma_rows: list[dict] = field(default_factory=list)
    corollary1: list[dict] = field(default_factory=list)
    corollary2: list[dict] = field(default_factory=list)


def lemma_rows(res: T.Lemma1Result) -> list[dict[str, Any]]:
    agree = res.agree()
    return [
        {
            "target": res.label,
            "process": res.process,
            "t": t,
            "c' (finite diff.)": res.fd[i].mean,
            "+-": res.fd[i].half_width,
            "-2 g E<Jw,w>": res.lemma[i].mean,
            "+- ": res.lemma[i].half_width,
            "closed form": float(res.exact[i]) if res.exact is not None else None,
            "agree": "yes" if bool(agree[i]) else "NO",
        }
        for i, t in enumerate(res.times.tolist())
    ]


def corollary2_row(res: T.Lemma1Result, mixture: gmm.GaussianMixture) -> dict[str, Any]:
    """S0_eff at the three top times (constant in the scaling regime); one S0 pooled over them
    (inverse-variance weights) predicts the slope at each."""
    p = get_process(res.process)
    top = (-3, -2, -1)
    s0_top = pooled_s0([res.s0[i] for i in top])
    pred = T.corollary2_prediction(res, s0_top)
    literal = float(p.b(torch.tensor(p.t_min)))
    pred_lit = T.corollary2_prediction(res, literal)
    var = float(mixture.second_moment() - (mixture.mean() ** 2).sum()) / mixture.dim
    return {
        "target": res.label,
        "process": res.process,
        "S0_eff at t_max/4, /2, 1": " ".join(
            f"{res.s0[i].mean:.3g}+-{res.s0[i].half_width:.2g}" for i in top
        ),
        "pooled S0": s0_top,
        "S0 Gaussian approx.": T.gaussian_s0(p, var),
        "literal s0": literal,
        "pred(pooled S0)/lemma": " ".join(f"{pred[i].mean / res.lemma[i].mean:.2f}" for i in top),
        "pred(s0=t_min)/lemma": f"{pred_lit[-1].mean / res.lemma[-1].mean:.1e}",
        "slope sign at top (FD)": " ".join(compare_zero(res.fd[i]) for i in top),
    }


def lemma_section(profile: Profile, g: torch.Generator, level: float, progress) -> LemmaSection:
    out = LemmaSection()

    def check(name: str, proc: str, times: torch.Tensor) -> T.Lemma1Result:
        t0 = time.perf_counter()
        mixture, label = lemma_target(name)
        res = T.lemma1_check(
            mixture,
            get_process(proc),
            times,
            profile.lemma_n,
            g,
            rtol=1e-8,
            atol=1e-10,
            level=level,
            label=label,
        )
        out.all_checks.append(res)
        out.corollary1.append(corollary1_row(res, label))
        agree = f"{int(res.agree().sum())}/{len(times)} agree"
        progress.done(f"Lemma 1 {label} ({proc}): {agree}", time.perf_counter() - t0)
        return res

    for name in profile.lemma_targets:
        for proc in profile.lemma_processes:
            res = check(name, proc, lemma_times(proc))
            out.checks.append(res)
            out.lemma_rows.extend(lemma_rows(res))
            out.corollary2.append(corollary2_row(res, lemma_target(name)[0]))
    # Corollary 1 on the authors' target (std 0.01) and on Dirac data, near t_min only
    for name in profile.cor1_targets:
        for proc in profile.lemma_processes:
            p = get_process(proc)
            check(name, proc, torch.tensor([1.0, 1.5, 3.0], dtype=torch.float64) * p.t_min)
    return out
