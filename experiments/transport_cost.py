"""Noise-to-data transport cost of IC, batch-OT, Sinkhorn and GC, in 2D and high dimension, and
Lemma 1 checked numerically (PAPER.md section 4; issue 6).

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
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gcflows import gmm
from gcflows import transport as T
from gcflows.metrics import exact_w2
from gcflows.processes import get_process

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gcflows.records import make_run_dir, print_table, write_config, write_results

BATCH_SIZES = (16, 128, 512, 2048)
SWEEP_DIMS = (16, 64, 256, 3072)
GAUSSIAN_MEAN = (0.3, -0.2)
GAUSSIAN_STD = 0.5

# Work per profile. gc_n: pairs of the ideal-flow-map curve per dimension (the flow map in
# 3072-D costs ~0.05-0.1 s per velocity evaluation of 24 rows on this CPU); gc_times: grid points.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "presets": ("eight_gaussians", "two_gaussians_1to2"),
        "dims": SWEEP_DIMS,
        "batch_sizes": BATCH_SIZES,
        "ot_pairs": 4096,
        "ot_min_batches": 3,
        "ot_pairs_by_dim": {3072: 2048},
        "sinkhorn_batch": 512,
        "sinkhorn_batches": 3,
        "gc_times_2d": 10,
        "gc_times_sweep": 7,
        "gc_n": {2: 600, 16: 400, 64: 256, 256: 128, 3072: 24},
        "train_steps": 600,
        "train_eval_n": 1000,
        "lemma_n": 500,
        "lemma_processes": ("ve", "linear"),
        "lemma_targets": ("gaussian", "two_modes_std0.1"),
        "cor1_targets": ("two_gaussians_1to2", "two_diracs"),
        "digits": True,
    },
    "quick": {
        "presets": ("two_gaussians_1to2",),
        "dims": (16,),
        "batch_sizes": (16, 128, 512),
        "ot_pairs": 512,
        "ot_min_batches": 2,
        "ot_pairs_by_dim": {},
        "sinkhorn_batch": 128,
        "sinkhorn_batches": 2,
        "gc_times_2d": 6,
        "gc_times_sweep": 5,
        "gc_n": {2: 300, 16: 100},
        "train_steps": 60,
        "train_eval_n": 300,
        "lemma_n": 200,
        "lemma_processes": ("ve",),
        "lemma_targets": ("gaussian",),
        "cor1_targets": ("two_gaussians_1to2",),
        "digits": True,
    },
}


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
def build_datasets(profile: dict, seed: int, digits_ideal: bool) -> list[dict[str, Any]]:
    """Each dataset: name, dim, sampler source (mixture or tensor), the mixture (oracle) or None."""
    out = []
    for name in profile["presets"]:
        mix = gmm.get_preset(name)
        out.append({"name": name, "dim": mix.dim, "source": mix, "mixture": mix, "kind": "2d"})
    for d in profile["dims"]:
        mix = gmm.random_mixture(d, 8, seed + d)
        out.append(
            {"name": f"mixture-{d}d", "dim": d, "source": mix, "mixture": mix, "kind": "sweep"}
        )
    if profile["digits"]:
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
    """The EMA model of a ``train_images.py`` digits checkpoint, and its process."""
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
# comparisons
# ------------------------------------------------------------------------------------------------
def compare(a: T.CostEstimate, b: T.CostEstimate) -> str:
    """``<`` if a is below b with both intervals apart, ``>`` the reverse, ``~`` if they overlap."""
    if a.hi < b.lo:
        return "<"
    if a.lo > b.hi:
        return ">"
    return "~"


def crossing_time(curve: T.CostCurve, level_cost: T.CostEstimate) -> float | None:
    """Smallest grid time from which ``c(t)`` stays below ``level_cost`` (intervals apart)."""
    below = [p.hi < level_cost.lo for p in curve.points]
    for i in range(len(below)):
        if all(below[i:]):
            return float(curve.times[i])
    return None


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def _sigma(process: str, t: torch.Tensor) -> torch.Tensor:
    p = get_process(process)
    return p.b(t) / p.a(t)


def figure_cost_vs_t(path: Path, process: str, panels: list[dict]) -> None:
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.cm.viridis(torch.linspace(0.0, 0.85, len(BATCH_SIZES)).tolist())
    for ax, panel in zip(axes.flat, panels, strict=False):
        ic = panel["ic"].mean
        ax.axhline(1.0, color="k", lw=1.2, label="IC")
        for c, res in zip(colors, panel["ot"], strict=False):
            ax.axhline(
                res.cost.mean / ic, color=c, lw=1, ls="--", label=f"batch-OT {res.batch_size}"
            )
        if panel.get("sinkhorn") is not None:
            sk = panel["sinkhorn"]
            ax.axhline(
                sk.cost.mean / ic,
                color="tab:orange",
                lw=1,
                ls=":",
                label=f"Sinkhorn {sk.batch_size}",
            )
        for label, curve, style in panel["curves"]:
            # each curve relative to the IC cost of its own pairs (common random numbers)
            x = _sigma(process, curve.times).numpy()
            own = curve.ic.mean
            ax.plot(x, (curve.mean / own).numpy(), style, label=label, lw=1.5, ms=3)
            ax.fill_between(x, (curve.lo / own).numpy(), (curve.hi / own).numpy(), alpha=0.2)
        ax.set_xscale("log")
        ends = _sigma(
            process, torch.tensor([get_process(process).t_min, get_process(process).t_max])
        )
        ax.set_xlim(float(ends[0]) / 1.5, float(ends[1]) * 1.5)
        if len(panel["curves"]) > 1:
            ax.legend(ax.get_lines()[-len(panel["curves"]) :], [c[0] for c in panel["curves"]],
                      fontsize=6, loc="upper right")  # fmt: skip
        ax.set_title(f"{panel['name']} (d={panel['dim']})", fontsize=9)
        ax.set_xlabel("sigma = b(t)/a(t)")
        ax.set_ylabel("cost / IC cost")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(labels))
    fig.suptitle(f"Transport cost against t ({process}): GC c(t) vs IC, batch-OT, Sinkhorn")
    fig.tight_layout(rect=(0, 0.06 / rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_ot_vs_batch(path: Path, rows: list[dict]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, row in enumerate(rows):
        color = plt.cm.tab10(i % 10)
        ic = row["ic"].mean
        bs = [r.batch_size for r in row["ot"]]
        mean = [r.cost.mean / ic for r in row["ot"]]
        err = [r.cost.halfwidth / ic for r in row["ot"]]
        ax.errorbar(bs, mean, yerr=err, color=color, marker="o", ms=3, label=f"{row['name']}")
        if row.get("gc_tmax") is not None:
            ax.axhline(row["gc_tmax"].mean / ic, color=color, ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("batch-OT cost / IC cost")
    ax.set_title("batch-OT cost vs batch size (dotted: GC, ideal flow map, t_max)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_lemma1(path: Path, checks: list[T.Lemma1Result]) -> None:
    """Top: -c'(t) by finite differences and by Lemma 1 (log scale; intervals clipped at the
    axis). Bottom: the paired difference in standard errors, with the +-1.96 band."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(checks), figsize=(4.3 * len(checks), 6.0), squeeze=False, sharex="col"
    )
    for k, res in enumerate(checks):
        top, bottom = axes[0, k], axes[1, k]
        x = _sigma(res.process, res.times).numpy()
        for est, fmt, shift, label in (
            (res.fd, "o", 1.0, "-c'(t), finite differences"),
            (res.lemma, "s", 1.1, "2 g E<J w, w> (Lemma 1)"),
        ):
            mean = torch.tensor([-e.mean for e in est])
            half = torch.tensor([e.halfwidth for e in est])
            keep = mean > 0
            lower = torch.minimum(half, 0.999 * mean.clamp_min(0))
            top.errorbar(
                (x * shift)[keep.numpy()],
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
        z = [d.mean / d.stderr if d.stderr > 0 else 0.0 for d in res.diff]
        bottom.axhspan(-1.96, 1.96, color="0.85")
        bottom.plot(x, z, "o-", ms=4)
        bottom.set_xscale("log")
        bottom.set_xlabel("sigma = b(t)/a(t)")
    axes[0, 0].set_ylabel("-c'(t)")
    axes[1, 0].set_ylabel("(FD - Lemma) / stderr")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Lemma 1: slope of the measured c(t) against -2 g E<J w, w> (95 % intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    profile = dict(PROFILES["quick" if args.quick else "default"])
    torch.set_num_threads(args.threads)
    run_dir = make_run_dir(args.out, "transport_cost")
    write_config(run_dir, args, seed=args.seed, profile=profile)
    g = torch.Generator().manual_seed(args.seed)
    level = args.level
    datasets = build_datasets(profile, args.seed, args.digits_ideal > 0)
    processes = ("ve", "linear")
    results: dict[str, Any] = {"datasets": {}, "trained": {}, "lemma1": [], "timing": {}}
    csv_rows: list[dict[str, Any]] = []
    panels: dict[str, list[dict]] = {p: [] for p in processes}
    table: list[dict[str, Any]] = []
    ot_by_name: dict[str, list[T.BatchCost]] = {}

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    # ---- 1-2: IC, batch-OT, Sinkhorn, GC ideal per dataset ------------------------------------
    for ds in datasets:
        name, dim, source, mix = ds["name"], ds["dim"], ds["source"], ds["mixture"]
        t0 = time.time()
        n_pairs = profile["ot_pairs_by_dim"].get(dim, profile["ot_pairs"])
        ot = T.batch_ot_curve(
            source,
            None,
            profile["batch_sizes"],
            n_pairs=n_pairs,
            generator=g,
            min_batches=profile["ot_min_batches"],
            level=level,
        )
        sk = T.sinkhorn_cost(
            source,
            None,
            profile["sinkhorn_batch"],
            profile["sinkhorn_batches"],
            g,
            reg=args.sinkhorn_reg,
            level=level,
        )
        data = T.as_sampler(source)(8192, g)
        ic = T.ic_cost(data, torch.randn(data.shape, generator=g, dtype=data.dtype), level)
        entry: dict[str, Any] = {
            "dim": dim,
            "ic": ic.to_dict(),
            "batch_ot": [r.to_dict() for r in ot],
            "sinkhorn": sk.to_dict(),
            "gc_ideal": {},
        }
        for r in ot + [sk]:
            csv_rows.append(
                {
                    "dataset": name,
                    "dim": dim,
                    "process": "-",
                    "coupling": r.coupling,
                    "batch_size": r.batch_size,
                    "t": None,
                    "cost": r.cost.mean,
                    "lo": r.cost.lo,
                    "hi": r.cost.hi,
                    "ic": r.ic.mean,
                    "relative": r.cost.mean / r.ic.mean,
                }
            )
        csv_rows.append(
            {"dataset": name, "dim": dim, "process": "-", "coupling": "ic", "batch_size": None,
             "t": None, "cost": ic.mean, "lo": ic.lo, "hi": ic.hi, "ic": ic.mean, "relative": 1.0}
        )  # fmt: skip
        gc_tmax: dict[str, T.CostEstimate] = {}
        curves: dict[str, T.CostCurve] = {}
        procs = processes if ds["kind"] == "2d" else ("ve",)
        n_gc = profile["gc_n"].get(dim, 0) if mix is not None else 0
        if ds["kind"] == "digits":
            n_gc = args.digits_ideal
        if mix is not None and n_gc > 0:
            n_times = profile["gc_times_2d"] if ds["kind"] == "2d" else profile["gc_times_sweep"]
            for proc in procs:
                times = T.sigma_grid(proc, n_times)
                curve = T.gc_cost_curve(mix, mix, proc, times, n_gc, g, level=level, label="ideal")
                curves[proc] = curve
                gc_tmax[proc] = curve.points[-1]
                entry["gc_ideal"][proc] = curve.to_dict()
                for t, p, gain in zip(curve.times.tolist(), curve.points, curve.gain, strict=True):
                    csv_rows.append(
                        {"dataset": name, "dim": dim, "process": proc, "coupling": "gc_ideal",
                         "batch_size": None, "t": t, "cost": p.mean, "lo": p.lo, "hi": p.hi,
                         "ic": curve.ic.mean, "relative": p.mean / curve.ic.mean,
                         "gain_lo": gain.lo, "gain_hi": gain.hi}
                    )  # fmt: skip
                # where does c(t) fall below batch-OT at each batch size?
                entry["gc_ideal"][proc]["below_batch_ot_from_t"] = {
                    str(r.batch_size): crossing_time(curve, r.cost) for r in ot
                }
        for proc in procs:
            panels[proc].append(
                {
                    "name": name,
                    "dim": dim,
                    "ic": ic,
                    "ot": ot,
                    "sinkhorn": sk,
                    "curves": [("GC ideal flow map", curves[proc], "o-")] if proc in curves else [],
                    "gc_tmax": gc_tmax.get(proc),
                }
            )
        results["datasets"][name] = entry
        ot_by_name[name] = ot
        row: dict[str, Any] = {"dataset": name, "d": dim, "IC": ic.mean}
        for r in ot:
            row[f"OT{r.batch_size}/IC"] = r.cost.mean / ic.mean
        row[f"SK{sk.batch_size}/IC"] = sk.cost.mean / ic.mean
        for proc in processes:
            row[f"GC({proc})/IC"] = gc_tmax[proc].mean / ic.mean if proc in gc_tmax else None
        row["GC source"] = "ideal flow map" if gc_tmax else "-"
        gc_ref = gc_tmax.get("ve")
        row["OT vs IC"] = " ".join(compare_gain(r.gain) for r in ot)
        row["GC vs OT_B"] = (
            " ".join(compare(gc_ref, r.cost) for r in ot) if gc_ref is not None else "-"
        )
        table.append(row)
        results["timing"][name] = time.time() - t0
        log(f"{name} (d={dim}): IC {ic.mean:.4g}; {time.time() - t0:.1f}s")

    # ---- 1b: trained consistency models on the authors' 2D target -----------------------------
    target = gmm.two_gaussians_1to2()
    trained_rows = []
    if args.train_steps is None:
        args.train_steps = profile["train_steps"]
    if args.train_steps > 0:
        panel_of = {p: next((x for x in panels[p] if x["name"] == "two_gaussians_1to2"), None)
                    for p in processes}  # fmt: skip
        for proc in processes:
            t0 = time.time()
            models = train_models(target, proc, args.train_steps, args.mu, args.seed)
            times = T.sigma_grid(proc, profile["gc_times_2d"])
            ideal = T.gc_cost_curve(
                target, target, proc, times, profile["train_eval_n"],
                torch.Generator().manual_seed(args.seed + 7), level=level, label="ideal",
            )  # fmt: skip
            results["trained"][proc] = {"ideal": ideal.to_dict()}
            # one-step samples f(x_T, T) against fresh data, exact W2 on n points: a transport
            # cost below the ideal one is only meaningful if the samples are the data's
            w2_gen = torch.Generator().manual_seed(args.seed + 11)
            n_w2 = profile["train_eval_n"]
            p_obj = get_process(proc)
            start = target.sample(n_w2, generator=w2_gen)
            x_top = p_obj.interpolate(
                start, torch.randn(start.shape, generator=w2_gen, dtype=start.dtype), p_obj.t_max
            )
            reference = target.sample(n_w2, generator=w2_gen)
            w2_ideal = exact_w2(T.ideal_flow_map(target, x_top, p_obj.t_max, p_obj), reference)
            for method, (model, metrics) in models.items():
                # the same pairs as the ideal curve (same seed): paired comparisons
                curve = T.gc_cost_curve(
                    model, target, proc, times, profile["train_eval_n"],
                    torch.Generator().manual_seed(args.seed + 7), level=level, label=method,
                )  # fmt: skip
                results["trained"][proc][method] = {
                    "curve": curve.to_dict(),
                    "final_metrics": metrics,
                    "steps": args.train_steps,
                    "mu": args.mu if method == "gc" else 0.0,
                }
                with torch.no_grad():
                    t_top = torch.full((n_w2,), p_obj.t_max, dtype=torch.float64)
                    samples = model(x_top.float(), t_top).double()
                w2_model = exact_w2(samples, reference)
                results["trained"][proc][method]["w2_samples"] = w2_model
                results["trained"][proc]["w2_ideal_samples"] = w2_ideal
                label = "GC-trained model" if method == "gc" else "IC(CT)-trained model"
                if panel_of[proc] is not None:
                    panel_of[proc]["curves"].append(
                        (label, curve, "s--" if method == "gc" else "^--")
                    )
                for t, p in zip(curve.times.tolist(), curve.points, strict=True):
                    csv_rows.append(
                        {"dataset": "two_gaussians_1to2", "dim": 2, "process": proc,
                         "coupling": f"gc_model_{method}", "batch_size": None, "t": t,
                         "cost": p.mean, "lo": p.lo, "hi": p.hi, "ic": curve.ic.mean,
                         "relative": p.mean / curve.ic.mean}
                    )  # fmt: skip
                trained_rows.append(
                    {
                        "process": proc,
                        "trained with": "GC" if method == "gc" else "IC (CT)",
                        "steps": args.train_steps,
                        "c(t_max)/IC": curve.points[-1].mean / curve.ic.mean,
                        "ideal c(t_max)/IC": ideal.points[-1].mean / ideal.ic.mean,
                        "mean |c - c_ideal|/IC": float(
                            ((curve.mean - ideal.mean).abs() / ideal.ic.mean).mean()
                        ),
                        "train pair cost": metrics.get("pair_cost"),
                        "W2(samples, data)": w2_model,
                        "W2 ideal (floor)": w2_ideal,
                    }
                )
            log(
                f"trained CT / GC models ({proc}, {args.train_steps} steps): "
                f"{time.time() - t0:.1f}s"
            )

    # ---- digits checkpoint -------------------------------------------------------------------
    if args.checkpoint:
        from gcflows.data import load_digits

        model, proc_obj, cfg = load_digits_model(args.checkpoint)
        images, _ = load_digits("train", dtype=torch.float32)
        times = T.sigma_grid(proc_obj, profile["gc_times_sweep"])
        curve = T.gc_cost_curve(
            model, images, proc_obj, times, args.checkpoint_n, g, level=level, label="checkpoint"
        )
        results["datasets"]["digits"]["gc_checkpoint"] = {
            "checkpoint": args.checkpoint,
            "method": cfg.method,
            "mu": cfg.mu,
            "process": proc_obj.name,
            "curve": curve.to_dict(),
        }
        for panel in panels.get(proc_obj.name, []):
            if panel["name"] == "digits":
                panel["curves"].append((f"{cfg.method} checkpoint", curve, "s--"))
        for row in table:
            if row["dataset"] == "digits":
                row[f"GC({proc_obj.name})/IC"] = curve.points[-1].mean / curve.ic.mean
                row["GC source"] = f"checkpoint ({cfg.method})"
                ot_rows = ot_by_name["digits"]
                row["GC vs OT_B"] = " ".join(compare(curve.points[-1], r.cost) for r in ot_rows)
        log(
            f"digits checkpoint ({cfg.method}, {proc_obj.name}): "
            f"c(t_max) {curve.points[-1].mean:.4g}"
        )

    # ---- 3: Lemma 1 and the corollaries ------------------------------------------------------
    lemma_rows, cor1_rows, cor2_rows, checks = lemma_section(profile, g, level, results, log)

    # ---- 4: figures, files, tables -----------------------------------------------------------
    for proc in processes:
        if panels[proc]:
            figure_cost_vs_t(run_dir / f"cost_vs_t_{proc}.png", proc, panels[proc])
    figure_ot_vs_batch(run_dir / "ot_vs_batch.png", panels["ve"])
    if checks:
        figure_lemma1(run_dir / "lemma1.png", checks)
    results["summary"] = table
    results["trained_summary"] = trained_rows
    results["corollary1"] = cor1_rows
    results["corollary2"] = cor2_rows
    results["wall_time_s"] = time.time() - t_start
    write_results(run_dir, results, csv_rows)
    log(f"run folder: {run_dir}")
    if lemma_rows:
        print_table(lemma_rows, title="\nLemma 1 (95 % intervals; c' by central differences)")
    if cor1_rows:
        print_table(cor1_rows, title="\nCorollary 1: c decreases near t_min (95 % intervals)")
    if cor2_rows:
        print_table(
            cor2_rows,
            title="\nCorollary 2 near t_max: effective S0 (J ~ S0 / b(t)) vs the paper's s0",
        )
    if trained_rows:
        print_table(trained_rows, title="\nGC cost of trained consistency models (2D target)")
    print_table(
        table,
        title=(
            f"\nTransport cost relative to IC (GC = c(t_max); "
            "'<' '>' '~': intervals apart / overlapping; batch sizes "
            f"{list(profile['batch_sizes'])}"
            f"; wall time {time.time() - t_start:.0f}s)"
        ),
    )
    return {"run_dir": str(run_dir), **results}


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


def pooled_s0(estimates: list[T.CostEstimate]) -> float:
    """Inverse-variance weighted mean (plain mean when a standard error is 0: exact values)."""
    if any(e.stderr <= 0 for e in estimates):
        return sum(e.mean for e in estimates) / len(estimates)
    w = [1.0 / e.stderr**2 for e in estimates]
    return sum(wi * e.mean for wi, e in zip(w, estimates, strict=True)) / sum(w)


def corollary1_row(res: T.Lemma1Result, label: str) -> dict[str, Any]:
    """Corollary 1 at the first two times of ``res`` (t_min and 1.5 t_min): both slopes < 0?"""
    return {
        "target": label,
        "process": res.process,
        "c'(t_min) finite diff.": f"{res.fd[0].mean:.4g} +- {res.fd[0].halfwidth:.2g}",
        "-2 g E<Jw,w> (t_min)": f"{res.lemma[0].mean:.4g} +- {res.lemma[0].halfwidth:.2g}",
        "-2 g E|w|^2 (t_min)": -2 * float(res.g[0]) * res.w2[0].mean,
        "c' < 0 at t_min, 1.5 t_min": " ".join(
            "yes" if res.fd[i].hi < 0 and res.lemma[i].hi < 0 else "NO" for i in (0, 1)
        ),
    }


def lemma_section(profile: dict, g: torch.Generator, level: float, results: dict, log):
    """Lemma 1 on the full time grid, Corollary 1 near t_min, Corollary 2 near t_max."""
    lemma_rows, cor1_rows, cor2_rows, checks = [], [], [], []
    for target_name in profile["lemma_targets"]:
        mixture, label = lemma_target(target_name)
        for proc in profile["lemma_processes"]:
            t0 = time.time()
            p = get_process(proc)
            times = lemma_times(proc)
            res = T.lemma1_check(
                mixture, p, times, profile["lemma_n"], g, rtol=1e-8, atol=1e-10, level=level,
                label=label,
            )  # fmt: skip
            checks.append(res)
            d = res.to_dict()
            results["lemma1"].append(d)
            agree = res.agree()
            for i, t in enumerate(times.tolist()):
                lemma_rows.append(
                    {
                        "target": label,
                        "process": proc,
                        "t": t,
                        "c' (finite diff.)": res.fd[i].mean,
                        "+-": res.fd[i].halfwidth,
                        "-2 g E<Jw,w>": res.lemma[i].mean,
                        "+- ": res.lemma[i].halfwidth,
                        "closed form": float(res.exact[i]) if res.exact is not None else None,
                        "agree": "yes" if bool(agree[i]) else "NO",
                    }
                )
            # Corollary 2: S0_eff at the three top times (constant in the scaling regime); one S0
            # pooled over them (inverse-variance weights) predicts the slope at each
            top = (-3, -2, -1)
            s0_top = pooled_s0([res.s0[i] for i in top])
            pred = T.corollary2_prediction(res, s0_top)
            pred_lit = T.corollary2_prediction(res, float(p.b(torch.tensor(p.t_min))))
            var = float(mixture.second_moment() - (mixture.mean() ** 2).sum()) / mixture.dim
            cor1_rows.append(corollary1_row(res, label))
            row = {
                "target": label,
                "process": proc,
                "S0_eff at t_max/4, /2, 1": " ".join(
                    f"{res.s0[i].mean:.3g}+-{res.s0[i].halfwidth:.2g}" for i in top
                ),
                "pooled S0": s0_top,
                "S0 Gaussian approx.": T.gaussian_s0(p, var),
                "literal s0": float(p.b(torch.tensor(p.t_min))),
                "pred(pooled S0)/lemma": " ".join(
                    f"{pred[i].mean / res.lemma[i].mean:.2f}" for i in top
                ),
                "pred(s0=t_min)/lemma": f"{pred_lit[-1].mean / res.lemma[-1].mean:.1e}",
                "slope sign at top (FD)": " ".join(compare_zero(res.fd[i]) for i in top),
            }
            cor2_rows.append(row)
            d["corollary2"] = row
            log(
                f"Lemma 1 {label} ({proc}): {int(agree.sum())}/{len(times)} agree; "
                f"{time.time() - t0:.1f}s"
            )
    # Corollary 1 on the authors' target (std 0.01) and on Dirac data, near t_min only
    for target_name in profile["cor1_targets"]:
        mixture, label = lemma_target(target_name)
        for proc in profile["lemma_processes"]:
            p = get_process(proc)
            times = torch.tensor([1.0, 1.5, 3.0], dtype=torch.float64) * p.t_min
            res = T.lemma1_check(
                mixture, p, times, profile["lemma_n"], g, rtol=1e-8, atol=1e-10, level=level,
                label=label,
            )  # fmt: skip
            results["lemma1"].append(res.to_dict())
            cor1_rows.append(corollary1_row(res, label))
    return lemma_rows, cor1_rows, cor2_rows, checks


def compare_zero(e: T.CostEstimate) -> str:
    """Sign of an interval: ``-`` (all below 0), ``+`` (all above), ``0?`` (contains 0)."""
    return "-" if e.hi < 0 else ("+" if e.lo > 0 else "0?")


def compare_gain(gain: T.CostEstimate) -> str:
    """Coupled cost against IC on the same batches, from the paired gain ``IC - cost``."""
    return "<" if gain.lo > 0 else (">" if gain.hi < 0 else "~")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
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
    p.add_argument("--mu", type=float, default=0.5, help="GC probability of the GC-trained model")
    p.add_argument(
        "--train-steps", type=int, default=None, help="steps per trained model (0: skip training)"
    )
    p.add_argument(
        "--checkpoint", default=None, help="digits checkpoint.pt written by train_images.py"
    )
    p.add_argument("--checkpoint-n", type=int, default=1000, help="pairs for the checkpoint curve")
    p.add_argument(
        "--digits-ideal",
        type=int,
        default=0,
        metavar="N",
        help="also the GC cost of the ideal flow map of the empirical digits distribution (a\n"
        "mixture of 1438 Diracs) on N pairs (slow: ~80 s for N = 32 on 2 CPUs; 0 = skip)",
    )
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if not 0.0 < args.level < 1.0:
        parser.error("--level must be in (0, 1), e.g. 0.95")
    if not 0.0 <= args.mu <= 1.0:
        parser.error("--mu is a probability: use a value in [0, 1]")
    for name in ("checkpoint_n", "digits_ideal"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.train_steps is not None and args.train_steps < 0:
        parser.error("--train-steps must be >= 0 (0 skips training)")
    if args.checkpoint:
        # fail before any work when the checkpoint is unusable
        try:
            load_digits_model(args.checkpoint)
        except ValueError as err:
            parser.error(f"--checkpoint: {err}")
    return run(args)


if __name__ == "__main__":
    main()
