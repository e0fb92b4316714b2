"""Noise-to-data transport cost of IC, batch-OT, Sinkhorn and GC, in 2D and high dimension, and
Lemma 1 checked numerically (docs/paper.md section 4).

    python experiments/transport_cost.py                # default study (a few minutes on 2 CPUs)
    python experiments/transport_cost.py --quick        # smoke run (< 60 s)
    python experiments/transport_cost.py --checkpoint runs/images/<run>/checkpoint.pt
                                                        # + GC cost of a trained digits model

What it measures (gcflows.transport does the computing):

1. Costs per dataset. IC ``E||data - noise||^2``; batch-OT after the exact assignment for batch
   sizes 16, 128, 512, 2048 (intervals over independent batches); Sinkhorn at batch 512 with
   entropic weight ``--sinkhorn-reg`` x the batch's mean squared distance (the plan's expected cost
   ``<P, C>``); GC ``c(t) = E_IC ||f(x_t, t) - noise||^2`` on a grid of ``t`` (log-uniform in
   ``sigma = b / a``) with (a) the ideal flow map of the mixture (exact PF-ODE, torchdiffeq) and
   (b) consistency models trained through ``gcflows.training`` with IC (``ct``) and GC (``gc``,
   ``mu = --mu``) on the authors' 2D target, for the ``ve`` and the ``linear`` process.
2. Dimension. 2D presets (eight_gaussians, two_gaussians_1to2) for ``ve`` and ``linear``; random
   well-separated mixtures (``gmm.random_mixture``, 8 components, separation 10 std) in
   d = 16, 64, 256, 3072 for ``ve`` (fewer pairs as d grows: the flow map in 3072-D is the
   costliest step); scikit-learn digits (64-D, train split) for IC / batch-OT / Sinkhorn, and with
   ``--checkpoint`` the GC cost of the image model trained by ``experiments/train_images.py``.
3. Lemma 1: ``c'(t)`` by central differences of the measured curve (common random numbers)
   against ``-2 g(t) E<J w, w>`` by the tangent (variational) ODE of the ideal flow map, for one
   Gaussian (closed form as well) and the two-mode target, ``ve`` and ``linear``; Corollary 1
   (slope < 0 near ``t_min``) and Corollary 2 (the scaling regime near ``t_max``: the effective
   ``S0 = b(t) E<J w, w> / E||w||^2`` against the paper's literal ``s_0 = t_min``).
4. A run folder ``--out/transport_cost_<time>/`` with config.json, results.json / results.csv,
   figures (cost_vs_t_ve.png, cost_vs_t_linear.png, ot_vs_batch.png, lemma1.png), and the summary
   table printed last. Comparisons "GC below batch-OT below IC" are made with the intervals:
   ``<`` when the upper end of the left is below the lower end of the right, ``>`` the reverse,
   ``~`` when they overlap.

Threads: ``--threads 1`` by default (the tensors are small and a shared 2-core machine loses more
to intra-op thread contention than it gains).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gcflows import checks, gmm
from gcflows import transport as T
from gcflows.metrics import exact_w2
from gcflows.processes import get_process
from gcflows.progress import Progress
from gcflows.records import check_writable, make_run_dir, print_table, write_config, write_results
from gcflows.transport_study import (
    BATCH_SIZES,
    PROCESSES,
    PROFILES,
    DatasetResult,
    LemmaSection,
    Profile,
    compare,
    curve_rows,
    dataset_section,
    lemma_section,
    summary_row,
)


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
def build_datasets(profile: Profile, seed: int, digits_ideal: bool) -> list[dict[str, Any]]:
    """Each dataset: name, dim, sampler source (mixture or tensor), the mixture (oracle) or None."""
    out = []
    for name in profile.presets:
        mix = gmm.get_preset(name)
        out.append({"name": name, "dim": mix.dim, "source": mix, "mixture": mix, "kind": "2d"})
    for d in profile.dims:
        mix = gmm.random_mixture(d, 8, seed + d)
        out.append(
            {"name": f"mixture-{d}d", "dim": d, "source": mix, "mixture": mix, "kind": "sweep"}
        )
    if profile.digits:
        from gcflows.data import load_digits

        images, _ = load_digits("train", dtype=torch.float64)
        flat = images.reshape(images.shape[0], -1)
        empirical = None
        if digits_ideal:
            # the empirical distribution of the training images as a mixture of Diracs: its
            # flow map is the ideal generator of exactly the data batch-OT draws from
            k = flat.shape[0]
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
            empirical = gmm.GaussianMixture(weights, flat, stds=0.0)
        out.append(
            {"name": "digits", "dim": 64, "source": flat, "mixture": empirical, "kind": "digits"}
        )
    return out


# ------------------------------------------------------------------------------------------------
# trained consistency models (2D)
# ------------------------------------------------------------------------------------------------
def train_models(mix: gmm.GaussianMixture, process: str, steps: int, mu: float, seed: int):
    """Consistency models trained with IC (``ct``) and GC (``gc``, probability ``mu``) on ``mix``.

    Small budget on purpose: ToyMLP(width 128, depth 2), batch 256, Adam 1e-3, squared L2 (the
    authors' 2D notebook), curriculum s0 = 10 -> s1 = 160, EMA 0.99 (the GC generator), float32.
    Returns ``{method: (ema model, final logged metrics)}``.
    """
    from gcflows.consistency import ConsistencyModel
    from gcflows.networks import ToyMLP
    from gcflows.training import TrainConfig, train

    out = {}
    for method in ("ct", "gc"):
        torch.manual_seed(seed)
        model = ConsistencyModel(ToyMLP(mix.dim, hidden=128, depth=2), process).float()
        config = TrainConfig(
            method=method,
            mu=mu,
            process=process,
            batch_size=256,
            total_steps=steps,
            lr=1e-3,
            s0=10,
            s1=160,
            distance="squared_l2",
            ema_decay=0.99,
            seed=seed,
            log_every=max(1, steps // 4),
            progress=False,
            preset="two_gaussians_1to2",
            model={"backbone": "ToyMLP", "hidden": 128, "depth": 2},
        )
        result = train(config, model, lambda n, g: mix.sample(n, generator=g).float())
        out[method] = (result.ema_model.eval(), result.history[-1] if result.history else {})
    return out


# ------------------------------------------------------------------------------------------------
# the digits checkpoint
# ------------------------------------------------------------------------------------------------
def load_digits_model(path: str):
    """The EMA model of a ``train_images.py`` digits checkpoint, and its process.

    The checkpoint is read and checked first (missing, corrupt, not a digits model: ValueError);
    the network is then rebuilt by ``gcflows.training.images.model_from_checkpoint``.
    """
    from gcflows.training import TrainConfig, load_checkpoint
    from gcflows.training.images import model_from_checkpoint

    ckpt = load_checkpoint(path)  # ValueError when missing / corrupt / not gcflows
    config = TrainConfig.from_dict(ckpt["config"])
    data = (config.model or {}).get("data")
    if data != "digits":
        raise ValueError(
            f"--checkpoint must be a digits model of experiments/train_images.py (model['data'] "
            f"== 'digits'), got {data!r}: the transport study evaluates the 8x8 digits only"
        )
    model = model_from_checkpoint(ckpt, which="ema")
    process = get_process(config.process, t_min=config.t_min, t_max=config.t_max)
    return model, process, config


# ------------------------------------------------------------------------------------------------
# section 1b: trained consistency models on the authors' 2D target
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainedResult:
    """``c(t)`` of the ideal flow map and of the CT- and GC-trained models on the same pairs,
    with the exact W2 of one-step samples (and of the ideal flow map's, the floor)."""

    process: str
    steps: int
    ideal: T.CostCurve
    curves: dict[str, T.CostCurve]
    final_metrics: dict[str, dict]
    w2_samples: dict[str, float]
    w2_ideal_samples: float
    mu: float

    def table_rows(self) -> list[dict[str, Any]]:
        ideal = self.ideal
        return [
            {
                "process": self.process,
                "trained with": "GC" if method == "gc" else "IC (CT)",
                "steps": self.steps,
                "c(t_max)/IC": curve.points[-1].mean / curve.ic.mean,
                "ideal c(t_max)/IC": ideal.points[-1].mean / ideal.ic.mean,
                "mean |c - c_ideal|/IC": float(
                    ((curve.mean - ideal.mean).abs() / ideal.ic.mean).mean()
                ),
                "train pair cost": self.final_metrics[method].get("pair_cost"),
                "W2(samples, data)": self.w2_samples[method],
                "W2 ideal (floor)": self.w2_ideal_samples,
            }
            for method, curve in self.curves.items()
        ]


def trained_section(proc: str, profile: Profile, args) -> TrainedResult:
    target = gmm.two_gaussians_1to2()
    models = train_models(target, proc, args.train_steps, args.mu, args.seed)
    times = T.sigma_grid(proc, profile.gc_times_2d)
    n = profile.train_eval_n

    def curve_of(f, label: str) -> T.CostCurve:  # the same pairs for every f (same seed)
        g = torch.Generator().manual_seed(args.seed + 7)
        return T.gc_cost_curve(f, target, proc, times, n, g, level=args.level, label=label)

    # one-step samples f(x_T, T) against fresh data, exact W2 on n points: a transport cost
    # below the ideal one is only meaningful if the samples are the data's
    w2_gen = torch.Generator().manual_seed(args.seed + 11)
    p = get_process(proc)
    start = target.sample(n, generator=w2_gen)
    noise = torch.randn(start.shape, generator=w2_gen, dtype=start.dtype)
    x_top = p.interpolate(start, noise, p.t_max)
    reference = target.sample(n, generator=w2_gen)
    w2 = {}
    for method, (model, _) in models.items():
        with torch.no_grad():
            t_top = torch.full((n,), p.t_max, dtype=torch.float64)
            w2[method] = exact_w2(model(x_top.float(), t_top).double(), reference)
    return TrainedResult(
        process=proc,
        steps=args.train_steps,
        ideal=curve_of(target, "ideal"),
        curves={method: curve_of(model, method) for method, (model, _) in models.items()},
        final_metrics={method: metrics for method, (_, metrics) in models.items()},
        w2_samples=w2,
        w2_ideal_samples=exact_w2(
            target.flow_map(x_top, p.t_max, p, method="segmented"), reference
        ),
        mu=args.mu,
    )


def checkpoint_section(args, profile: Profile, g: torch.Generator) -> dict[str, Any]:
    """``c(t)`` of a trained digits model (``--checkpoint``)."""
    from gcflows.data import load_digits

    model, proc_obj, cfg = load_digits_model(args.checkpoint)
    images, _ = load_digits("train", dtype=torch.float32)
    times = T.sigma_grid(proc_obj, profile.gc_times_sweep)
    curve = T.gc_cost_curve(
        model, images, proc_obj, times, args.checkpoint_n, g, level=args.level, label="checkpoint"
    )
    return {
        "checkpoint": args.checkpoint,
        "method": cfg.method,
        "mu": cfg.mu,
        "process": proc_obj.name,
        "curve": curve,
    }


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def _sigma(process: str, t: torch.Tensor) -> torch.Tensor:
    p = get_process(process)
    return p.b(t) / p.a(t)


def _cost_panel(ax, panel: dict, process: str, colors) -> None:
    """One dataset: IC, batch-OT and Sinkhorn levels, and each ``c(t)`` curve, relative to IC."""
    ic = panel["ic"].mean
    ax.axhline(1.0, color="k", lw=1.2, label="IC")
    for c, res in zip(colors, panel["ot"], strict=False):
        ax.axhline(res.cost.mean / ic, color=c, lw=1, ls="--", label=f"batch-OT {res.batch_size}")
    sk = panel["sinkhorn"]
    ax.axhline(
        sk.cost.mean / ic, color="tab:orange", lw=1, ls=":", label=f"Sinkhorn {sk.batch_size}"
    )
    for label, curve, style in panel["curves"]:
        # each curve relative to the IC cost of its own pairs (common random numbers)
        x = _sigma(process, curve.times).numpy()
        own = curve.ic.mean
        ax.plot(x, (curve.mean / own).numpy(), style, label=label, lw=1.5, ms=3)
        ax.fill_between(x, (curve.lo / own).numpy(), (curve.hi / own).numpy(), alpha=0.2)
    ax.set_xscale("log")
    p = get_process(process)
    ends = _sigma(process, torch.tensor([p.t_min, p.t_max]))
    ax.set_xlim(float(ends[0]) / 1.5, float(ends[1]) * 1.5)
    if len(panel["curves"]) > 1:
        lines = ax.get_lines()[-len(panel["curves"]) :]
        ax.legend(lines, [c[0] for c in panel["curves"]], fontsize=6, loc="upper right")
    ax.set_title(f"{panel['name']} (d={panel['dim']})", fontsize=9)
    ax.set_xlabel("sigma = b(t)/a(t)")
    ax.set_ylabel("cost / IC cost")


def figure_cost_vs_t(path: Path, process: str, panels: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    from gcflows.plotting import finish_grid, panel_grid

    fig, axes = panel_grid(len(panels), 4, (4.2, 3.4))
    colors = plt.cm.viridis(torch.linspace(0.0, 0.85, len(BATCH_SIZES)).tolist())
    for ax, panel in zip(axes.flat, panels, strict=False):
        _cost_panel(ax, panel, process, colors)
    title = f"Transport cost against t ({process}): GC c(t) vs IC, batch-OT, Sinkhorn"
    return finish_grid(fig, axes, len(panels), title, path, legend_below=True)


def figure_ot_vs_batch(path: Path, results: list[DatasetResult]) -> Path:
    import matplotlib.pyplot as plt

    from gcflows.plotting import save

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, res in enumerate(results):
        color = plt.cm.tab10(i % 10)
        ic = res.ic.mean
        bs = [r.batch_size for r in res.batch_ot]
        mean = [r.cost.mean / ic for r in res.batch_ot]
        err = [r.cost.half_width / ic for r in res.batch_ot]
        ax.errorbar(bs, mean, yerr=err, color=color, marker="o", ms=3, label=res.name)
        if "ve" in res.gc_ideal:
            ax.axhline(res.gc_ideal["ve"].points[-1].mean / ic, color=color, ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("batch-OT cost / IC cost")
    ax.set_title("batch-OT cost vs batch size (dotted: GC, ideal flow map, t_max)", fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, path)


def figure_lemma1(path: Path, checks: list[T.Lemma1Result]) -> Path:
    """Top: -c'(t) by finite differences and by Lemma 1 (log scale; intervals clipped at the
    axis). Bottom: the paired difference in standard errors, with the +-1.96 band."""
    from gcflows.plotting import finish_grid, panel_grid

    k = len(checks)
    fig, axes = panel_grid(2 * k, k, (4.3, 3.0), sharex="col")
    for j, res in enumerate(checks):
        top, bottom = axes[0, j], axes[1, j]
        x = _sigma(res.process, res.times).numpy()
        for est, fmt, shift, label in (
            (res.fd, "o", 1.0, "-c'(t), finite differences"),
            (res.lemma, "s", 1.1, "2 g E<J w, w> (Lemma 1)"),
        ):
            mean = torch.tensor([-e.mean for e in est])
            half = torch.tensor([e.half_width for e in est])
            keep = (mean > 0).numpy()
            lower = torch.minimum(half, 0.999 * mean.clamp_min(0))
            top.errorbar(
                (x * shift)[keep],
                mean[keep].numpy(),
                yerr=[lower[keep].numpy(), half[keep].numpy()],
                fmt=fmt,
                ms=4,
                capsize=2,
                label=label,
            )
        if res.exact is not None:
            top.plot(x, (-res.exact).numpy(), "k-", lw=1, label="closed form")
        top.set_xscale("log")
        top.set_yscale("log")
        top.set_title(f"{res.label} ({res.process})", fontsize=9)
        bottom.axhspan(-1.96, 1.96, color="0.85")
        bottom.plot(x, [d.mean / d.se if d.se > 0 else 0.0 for d in res.diff], "o-", ms=4)
        bottom.set_xscale("log")
        bottom.set_xlabel("sigma = b(t)/a(t)")
    axes[0, 0].set_ylabel("-c'(t)")
    axes[1, 0].set_ylabel("(FD - Lemma) / se")
    axes[0, 0].legend(fontsize=7)
    title = "Lemma 1: slope of the measured c(t) against -2 g E<J w, w> (95 % intervals)"
    return finish_grid(fig, axes, 2 * k, title, path)


def n_sections(profile: Profile, args) -> int:
    n = len(profile.presets) + len(profile.dims) + int(profile.digits)
    n += len(PROCESSES) if args.train_steps > 0 else 0
    n += 1 if args.checkpoint else 0
    lemma = len(profile.lemma_targets) + len(profile.cor1_targets)
    return n + lemma * len(profile.lemma_processes)


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------
@dataclass
class Study:
    """Every section's typed results (written to results.json by gcflows.records)."""

    datasets: dict[str, DatasetResult] = field(default_factory=dict)
    trained: dict[str, TrainedResult] = field(default_factory=dict)
    lemma: LemmaSection = field(default_factory=LemmaSection)
    timing_s: dict[str, float] = field(default_factory=dict)


def run_sections(args, profile: Profile, progress) -> Study:
    g = torch.Generator().manual_seed(args.seed)
    study = Study()
    for ds in build_datasets(profile, args.seed, args.digits_ideal > 0):
        t0 = time.perf_counter()
        res = dataset_section(ds, profile, g, args.level, args.sinkhorn_reg, args.digits_ideal)
        study.datasets[res.name] = res
        study.timing_s[res.name] = time.perf_counter() - t0
        progress.done(f"{res.name} (d={res.dim}): IC {res.ic.mean:.4g}", study.timing_s[res.name])
    if args.train_steps > 0:
        for proc in PROCESSES:
            t0 = time.perf_counter()
            study.trained[proc] = trained_section(proc, profile, args)
            label = f"trained CT / GC models ({proc}, {args.train_steps} steps)"
            progress.done(label, time.perf_counter() - t0)
    if args.checkpoint:
        t0 = time.perf_counter()
        study.datasets["digits"].gc_checkpoint = checkpoint_section(args, profile, g)
        progress.done("digits checkpoint", time.perf_counter() - t0)
    study.lemma = lemma_section(profile, g, args.level, progress)
    return study


def cost_panels(study: Study, proc: str) -> list[dict]:
    """The panels of cost_vs_t_<proc>.png: every dataset with a curve for ``proc`` or in 2D."""
    panels = []
    for res in study.datasets.values():
        if proc != "ve" and res.kind != "2d":
            continue
        curves = [("GC ideal flow map", res.gc_ideal[proc], "o-")] if proc in res.gc_ideal else []
        if res.name == "two_gaussians_1to2" and proc in study.trained:
            for method, curve in study.trained[proc].curves.items():
                label = "GC-trained model" if method == "gc" else "IC(CT)-trained model"
                curves.append((label, curve, "s--" if method == "gc" else "^--"))
        ck = res.gc_checkpoint
        if ck is not None and ck["process"] == proc:
            curves.append((f"{ck['method']} checkpoint", ck["curve"], "s--"))
        panels.append(
            {
                "name": res.name,
                "dim": res.dim,
                "ic": res.ic,
                "ot": res.batch_ot,
                "sinkhorn": res.sinkhorn,
                "curves": curves,
            }
        )
    return panels


def make_figures(run_dir: Path, study: Study) -> list[Path]:
    figs = [
        figure_cost_vs_t(run_dir / f"cost_vs_t_{proc}.png", proc, cost_panels(study, proc))
        for proc in PROCESSES
    ]
    figs.append(figure_ot_vs_batch(run_dir / "ot_vs_batch.png", list(study.datasets.values())))
    if study.lemma.checks:
        figs.append(figure_lemma1(run_dir / "lemma1.png", study.lemma.checks))
    return figs


def summary_table(study: Study) -> list[dict[str, Any]]:
    table = [summary_row(res) for res in study.datasets.values()]
    digits = study.datasets.get("digits")
    if digits is not None and digits.gc_checkpoint is not None:
        ck = digits.gc_checkpoint
        row = next(r for r in table if r["dataset"] == "digits")
        curve = ck["curve"]
        row[f"GC({ck['process']})/IC"] = curve.points[-1].mean / curve.ic.mean
        row["GC source"] = f"checkpoint ({ck['method']})"
        row["GC vs OT_B"] = " ".join(compare(curve.points[-1], r.cost) for r in digits.batch_ot)
    return table


def csv_rows(study: Study) -> list[dict[str, Any]]:
    rows = [row for res in study.datasets.values() for row in res.csv_rows()]
    for proc, tr in study.trained.items():
        for method, curve in tr.curves.items():
            rows.extend(curve_rows("two_gaussians_1to2", 2, proc, f"gc_model_{method}", curve))
    digits = study.datasets.get("digits")
    if digits is not None and digits.gc_checkpoint is not None:
        ck = digits.gc_checkpoint
        rows.extend(curve_rows("digits", 64, ck["process"], "gc_checkpoint", ck["curve"]))
    return rows


def print_tables(study: Study, table: list[dict], profile: Profile, wall: float) -> None:
    lem = study.lemma
    if lem.lemma_rows:
        print_table(lem.lemma_rows, title="\nLemma 1 (95 % intervals; c' by central differences)")
    if lem.corollary1:
        print_table(lem.corollary1, title="\nCorollary 1: c decreases near t_min (95 % intervals)")
    if lem.corollary2:
        print_table(
            lem.corollary2,
            title="\nCorollary 2 near t_max: effective S0 (J ~ S0 / b(t)) vs the paper's s0",
        )
    trained_rows = [row for tr in study.trained.values() for row in tr.table_rows()]
    if trained_rows:
        print_table(trained_rows, title="\nGC cost of trained consistency models (2D target)")
    print_table(
        table,
        title=(
            "\nTransport cost relative to IC (GC = c(t_max); '<' '>' '~': intervals apart / "
            f"overlapping; batch sizes {list(profile.batch_sizes)}; wall time {wall:.0f}s)"
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
    p.add_argument("--quiet", action="store_true", help="one log line per section, no progress bar")
    p.add_argument("--out", default="runs", help="parent folder of the run folder (default runs/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument(
        "--sinkhorn-reg",
        type=float,
        default=T.DEFAULT_SINKHORN_REG,
        help="Sinkhorn entropic weight relative to the batch's mean squared distance (0.05)",
    )
    p.add_argument("--mu", type=float, default=None, help="GC probability of the GC-trained model")
    p.add_argument(
        "--train-steps", type=int, default=None, help="steps per trained model (0: skip training)"
    )
    p.add_argument(
        "--checkpoint", default=None, help="digits checkpoint.pt written by train_images.py"
    )
    p.add_argument(
        "--checkpoint-n", type=int, default=None, help="pairs for the checkpoint curve (1000)"
    )
    p.add_argument(
        "--digits-ideal",
        type=int,
        default=0,
        metavar="N",
        help="also the GC cost of the ideal flow map of the empirical digits distribution (a\n"
        "mixture of 1438 Diracs) on N pairs (slow: ~80 s for N = 32 on 2 CPUs; 0 = skip)",
    )
    return p


def check_args(args) -> None:
    """Every argument, before any work (ValueError naming the argument and the fix)."""
    profile = PROFILES["quick" if args.quick else "default"]
    checks.integer(args.threads, "--threads", lo=1)
    checks.integer(args.seed, "--seed", lo=0)
    checks.real(args.level, "--level", lo_open=0.0, hi_open=1.0, fix="use a value in (0, 1)")
    checks.real(args.sinkhorn_reg, "--sinkhorn-reg", lo_open=0.0)
    checks.integer(args.digits_ideal, "--digits-ideal", lo=0)
    if args.train_steps is None:
        args.train_steps = profile.train_steps
    checks.integer(args.train_steps, "--train-steps", lo=0, fix="use an integer >= 0 (0: skip)")
    if args.mu is not None and args.train_steps == 0:
        print("warning: --mu is not used when --train-steps is 0", file=sys.stderr)
    args.mu = 0.5 if args.mu is None else args.mu
    checks.probability(args.mu, "--mu", "of a GC row in the GC-trained model")
    if args.checkpoint_n is not None and not args.checkpoint:
        print("warning: --checkpoint-n is not used without --checkpoint", file=sys.stderr)
    args.checkpoint_n = 1000 if args.checkpoint_n is None else args.checkpoint_n
    checks.integer(args.checkpoint_n, "--checkpoint-n", lo=1)
    if args.checkpoint:
        try:
            load_digits_model(args.checkpoint)
        except ValueError as err:
            raise ValueError(f"--checkpoint: {err}") from None
    check_writable(args.out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    t_start = time.perf_counter()
    profile = PROFILES["quick" if args.quick else "default"]
    torch.set_num_threads(args.threads)
    run_dir = make_run_dir(args.out, "transport_cost")
    write_config(run_dir, args, seed=args.seed, profile=dataclasses.asdict(profile))
    with Progress(n_sections(profile, args), "transport_cost", quiet=args.quiet) as progress:
        study = run_sections(args, profile, progress)
    figures = make_figures(run_dir, study)
    table = summary_table(study)
    wall = time.perf_counter() - t_start
    results = {
        "datasets": study.datasets,
        "trained": study.trained,
        "lemma1": study.lemma.all_checks,
        "corollary1": study.lemma.corollary1,
        "corollary2": study.lemma.corollary2,
        "summary": table,
        "trained_summary": [row for tr in study.trained.values() for row in tr.table_rows()],
        "figures": [f.name for f in figures],
        "timing_s": study.timing_s,
        "wall_time_s": wall,
    }
    write_results(run_dir, results, csv_rows(study))
    print(f"run folder: {run_dir}", flush=True)
    print_tables(study, table, profile, wall)
    return {"run_dir": str(run_dir), **results}


if __name__ == "__main__":
    main()
