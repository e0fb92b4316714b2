"""Image-shaped target with an exact oracle: the digits-like mixture as 8x8 images, 4 methods.

    python experiments/image_target_study.py [--quick] [--seeds 8] [--steps N] [--out runs]
        [--methods cd ct ot gc0.5] [--classifier-cache DIR] [--quiet]

Design (docs/image_target.md): the target is ``gcflows.gmm.digits_mixture`` (one Gaussian per
digit class fitted to scikit-learn's 8x8 digits in [-1, 1], row-major: an exact density, velocity
and flow map), each 64-D draw read as a one-channel 8x8 image by the digits presets' U-Net
(``EnsembleSpec(backbone="unet")``; ``gcflows.presets`` ``digits_base``). Every method (CD with
the exact velocity, the positive control; CT; batch-OT at the training batch; GC with mu = 0.5
and the warm-up EMA generator) is trained for ``--seeds`` seeds through the seed ensemble
(``gcflows.ensemble``; paired by seed: the same initial weights and draws where the methods draw
alike) with the digits presets' recipe as far as the ensemble expresses it (``RECIPE``: Adam,
lr 1e-3, batch 64, curriculum s0 = 10 -> s1 = 160 over the run, EMA decay 0.995, sigma_data 0.5;
fewer steps than the presets' 3000, see ``RECIPE``). Every model is read through its evaluation
EMA (``EnsembleSpec.eval_ema``).

Reported at the end (``results.json`` / ``results.csv``, tables on stdout, ``curves.png``):

- the exact sample metrics of ``gcflows.mixture_eval`` (mode-mass TV, per-mode mean and
  covariance errors, sliced W2; one and two steps) and the consistency error (secondary: it
  measures the PF-ODE flow, which batch-OT and GC do not learn);
- the classifier Frechet distance (``gcflows.evaluation.ImageMetrics``: features of the library's
  digits classifier, samples clipped to [-1, 1], against the real test digits) of the **same**
  one- and two-step samples, with two floors: exact draws of the mixture and real train digits;
- method - CT per metric, paired by seed (95 % Student-t interval, ``gcflows.curves``);
- whether the classifier FD ranks the methods as the exact metrics do: Kendall's tau between the
  methods' seed-mean ranks under the FD and under each exact metric, and CD - CT on both.

The primary metric is ``PRIMARY`` (one-step mode-mass TV, as in docs/convergence.md). Curves of
one-step TV, sliced W2 and FD at ``N_CHECKPOINTS`` checkpoints go into the figure.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gcflows import checks
from gcflows.classifier import load_classifier
from gcflows.curves import band, paired_difference
from gcflows.data import load_digits
from gcflows.ensemble import DIGITS_UNET, VARIANTS, EnsembleSpec, train_ensemble
from gcflows.evaluation import ImageMetrics
from gcflows.gmm import digits_mixture
from gcflows.mixture_eval import METRICS, SAMPLE_METRICS, consistency_error, make_eval_set
from gcflows.mixture_eval import sample_metrics as _sample_metrics
from gcflows.mixture_eval import samples as _samples
from gcflows.progress import Progress
from gcflows.records import check_writable, make_run_dir, print_table, write_config, write_results

# name -> (method, mu, gc_model): the library's named variants, in this study's order
# (GC before batch-OT: a run stopped early keeps the positive control, the baseline and GC)
METHODS = {name: VARIANTS[name] for name in ("cd", "ct", "gc0.5", "ot")}
PRIMARY = "mode_tv_1step"
#: classifier metrics kept per sample set (``ImageMetrics`` keys)
FD_KEYS = ("fd_classifier", "confident_fraction", "classes_covered")
#: exact metrics compared with the FD's ranking (one-step samples, the FD's samples)
RANKED = tuple(f"{m}_1step" for m in SAMPLE_METRICS)
CURVE_METRICS = ("mode_tv_1step", "sw2_1step", "fd_1step")
N_CHECKPOINTS = 6
# the digits presets' recipe (gcflows.presets: _DIGITS_TRAIN, _DIGITS_NET) as far as the ensemble
# expresses it. Its 3000 steps do not fit this study's budget on one shared core (about 14
# seed-steps per second for CT, 11 for GC: 4 methods x 8 seeds x 720 steps with the evaluations
# take about 32 minutes; docs/image_target.md); the curriculum is compressed with the run
# (N doubles from 10 to 160 over ``steps``). The GC generator is the authors' warm-up EMA with the
# presets' decay 0.995, updated every step (every 5 steps would average over ~1000 steps, longer
# than the run); the evaluation EMA has the same decay.
RECIPE = dict(
    backbone="unet",
    batch=64,
    steps=720,
    lr=1e-3,
    s0=10,
    s1=160,
    sigma_data=0.5,
    ema_beta=0.995,
    ema_every=1,
    eval_ema=0.995,
)
QUICK_UNET = {**DIGITS_UNET, "base_channels": 8, "num_groups": 4}  # the presets' digits_tiny
QUICK_RECIPE = dict(RECIPE, batch=16, steps=24, s1=20, ema_beta=0.9, eval_ema=0.9)
EVAL = dict(n_flow=256, n_ref=2000, n_samples=1000, n_curve=500)
QUICK_EVAL = dict(n_flow=16, n_ref=200, n_samples=200, n_curve=100)
SAMPLE_SEED = 11  # mixture_eval.evaluate's default: the same one- and two-step draws


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 60 s): a tiny U-Net")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (8; quick 2)")
    p.add_argument("--steps", type=int, default=None, help=f"steps ({RECIPE['steps']})")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate ({RECIPE['lr']})")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {list(METHODS)}")
    p.add_argument("--out", default="runs", help="parent folder of the run folder")
    p.add_argument(
        "--classifier-cache", default=None, help="folder of the cached digits classifier"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: best when shared)")
    p.add_argument("--quiet", action="store_true", help="one log line per method, no bar")
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
    if args.seeds is None:
        args.seeds = 2 if args.quick else 8
    checks.integer(args.seeds, "--seeds", lo=2, fix="use >= 2 (paired intervals need 2 seeds)")
    if args.steps is not None:
        checks.integer(
            args.steps, "--steps", lo=N_CHECKPOINTS, fix=f"use >= {N_CHECKPOINTS} (checkpoints)"
        )
    if args.lr is not None:
        checks.real(args.lr, "--lr", lo_open=0.0, fix="use a finite positive learning rate")
    checks.integer(args.threads, "--threads", lo=1)
    methods = args.methods or list(METHODS)
    for name in methods:
        checks.choice(name, "--methods", list(METHODS))
    if "ct" not in methods or len(set(methods)) != len(methods):
        raise checks.bad("--methods", methods, "include ct (the baseline), each name once")
    check_writable(args.out)
    if args.classifier_cache is not None:
        check_writable(args.classifier_cache)
    for spec in specs_of(args, design(args)["recipe"]).values():
        spec.validate(64)


def design(args: argparse.Namespace) -> dict:
    """Methods, recipe and evaluation sizes of this run (flags applied)."""
    recipe = dict(QUICK_RECIPE if args.quick else RECIPE)
    recipe["unet"] = dict(QUICK_UNET if args.quick else DIGITS_UNET)
    for key in ("steps", "lr"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    return dict(
        methods=list(args.methods or METHODS),
        recipe=recipe,
        eval=dict(QUICK_EVAL if args.quick else EVAL),
        checkpoints=checkpoints(recipe["steps"]),
        primary=PRIMARY,
        fd_reference="digits test split",
    )


def checkpoints(steps: int) -> list[int]:
    """``N_CHECKPOINTS`` evenly spaced steps ending at ``steps``."""
    return sorted({round(steps * q / N_CHECKPOINTS) for q in range(1, N_CHECKPOINTS + 1)})


def specs_of(args, recipe: dict) -> dict[str, EnsembleSpec]:
    """One ``EnsembleSpec`` per method."""
    out = {}
    for name in args.methods or METHODS:
        method, mu, gc_model = METHODS[name]
        out[name] = EnsembleSpec(
            method=method, mu=mu if method == "gc" else 0.5, gc_model=gc_model, **recipe
        )
    return out


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def as_images(x: torch.Tensor) -> torch.Tensor:
    """Rows ``(n, 64)`` (row-major 8x8) -> images ``(n, 1, 8, 8)``."""
    return x.reshape(x.shape[0], 1, 8, 8)


def classifier_metrics(metrics: ImageMetrics, x: torch.Tensor) -> dict[str, float]:
    """FD and two classifier diagnostics of rows ``x (n, 64)``; non-finite samples give inf."""
    if not bool(torch.isfinite(x).all()):
        return {k: float("inf") for k in FD_KEYS}
    vals = metrics(as_images(x))
    return {k: float(vals[k]) for k in FD_KEYS}


def final_metrics(target, apply, s: int, ev, metrics: ImageMetrics, n: int) -> dict:
    """Per seed ``(S,)``: the metrics of ``mixture_eval.evaluate`` (the same draws: generator
    ``SAMPLE_SEED``, one step then two steps) and the classifier metrics of those samples."""
    out = {"cons_err": consistency_error(apply, s, ev).mean(1).double().numpy()}
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    for k in (1, 2):
        x = _samples(apply, s, target.dim, n, k, g)
        rows = [_sample_metrics(target, x[i], ev.ref) for i in range(s)]
        fds = [classifier_metrics(metrics, x[i]) for i in range(s)]
        for m in SAMPLE_METRICS:
            out[f"{m}_{k}step"] = np.asarray([r[m] for r in rows])
        out[f"fd_{k}step"] = np.asarray([r["fd_classifier"] for r in fds])
        for key in ("confident_fraction", "classes_covered"):
            out[f"{key}_{k}step"] = np.asarray([r[key] for r in fds])
    return out


def curve_point(target, ens, ev, metrics: ImageMetrics, n: int) -> dict[str, list[float]]:
    """One-step TV, sliced W2 and FD of every seed's evaluation EMA at one checkpoint."""
    s = len(ens.seeds)
    x = _samples(
        lambda a, b: ens.apply(a, b, ens.eval_ema), s, 64, n, 1, torch.Generator().manual_seed(5)
    )
    rows = [_sample_metrics(target, x[i], ev.ref) for i in range(s)]
    return {
        "mode_tv_1step": [r["mode_tv"] for r in rows],
        "sw2_1step": [r["sw2"] for r in rows],
        "fd_1step": [classifier_metrics(metrics, x[i])["fd_classifier"] for i in range(s)],
    }


def floors(target, metrics: ImageMetrics, n: int, s: int) -> dict[str, dict[str, list[float]]]:
    """What a perfect model scores, ``s`` draws of ``n``: exact mixture draws (every metric; the
    FD floor of this target) and real train digits (FD only: what the mixture itself misses)."""
    real = load_digits("train")[0].reshape(-1, 64)
    out: dict[str, dict[str, list[float]]] = {"mixture": {}, "real_train_digits": {}}
    ref = None
    for i in range(s):
        g = torch.Generator().manual_seed(1000 + i)
        x = target.sample(n, generator=g).float()
        if ref is None:
            ref = target.sample(2000, generator=torch.Generator().manual_seed(999))
        row = _sample_metrics(target, x, ref)
        row["fd"] = classifier_metrics(metrics, x)["fd_classifier"]
        for k, v in row.items():
            out["mixture"].setdefault(k, []).append(float(v))
        idx = torch.randperm(real.shape[0], generator=g)[: min(n, real.shape[0])]
        fd = classifier_metrics(metrics, real[idx])["fd_classifier"]
        out["real_train_digits"].setdefault("fd", []).append(fd)
    return out


def kendall_tau(a, b) -> float:
    """Kendall's tau-a of two score lists (pairs tied in either count 0)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    if not pairs:
        return float("nan")
    s = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs)
    return float(s) / len(pairs)


def analyse(res: dict[str, dict]) -> dict:
    """Method - CT per metric (paired), the methods' seed-mean ranks and their agreement."""
    ct = res["ct"]["final"]
    keys = list(ct)
    paired = {
        name: {m: paired_difference(r["final"][m], ct[m]).as_dict() for m in keys}
        for name, r in res.items()
        if name != "ct"
    }
    names = list(res)
    means = {m: [float(np.mean(res[n]["final"][m])) for n in names] for m in keys}
    ranks = {m: [int(r) for r in np.argsort(np.argsort(means[m])) + 1] for m in keys}
    agreement = {
        f"fd_{k}step vs {m}": kendall_tau(means[f"fd_{k}step"], means[m])
        for k in (1, 2)
        for m in (r.replace("1step", f"{k}step") for r in RANKED)
    }
    return dict(
        paired_vs_ct=paired,
        seed_means={m: dict(zip(names, v, strict=True)) for m, v in means.items()},
        ranks={m: dict(zip(names, v, strict=True)) for m, v in ranks.items()},
        rank_agreement=agreement,
    )


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def run_one(target, spec: EnsembleSpec, seeds, ev, metrics, cfg) -> dict:
    curve: dict[str, list] = {m: [] for m in CURVE_METRICS}

    def callback(step, ens):
        for k, v in curve_point(target, ens, ev, metrics, cfg["eval"]["n_curve"]).items():
            curve[k].append(v)

    t0 = time.perf_counter()
    ens = train_ensemble(target, spec, seeds, callback=callback, callback_steps=cfg["checkpoints"])
    wall = time.perf_counter() - t0
    s, n = len(seeds), cfg["eval"]["n_samples"]
    final = final_metrics(target, lambda x, t: ens.apply(x, t, ens.eval_ema), s, ev, metrics, n)
    return dict(
        curves={k: np.asarray(v).T for k, v in curve.items()},  # (S, C)
        final=final,
        wall_s=wall,
        seed_steps_per_s=s * spec.steps / wall,
    )


# ------------------------------------------------------------------------------------------------
# figure and tables
# ------------------------------------------------------------------------------------------------
def figure(run_dir: Path, res: dict, steps: list[int], floor: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4.2 * len(CURVE_METRICS), 3.2))
    floor_of = {
        "mode_tv_1step": floor["mixture"]["mode_tv"],
        "sw2_1step": floor["mixture"]["sw2"],
        "fd_1step": floor["mixture"]["fd"],
    }
    for ax, m in zip(axes, CURVE_METRICS, strict=True):
        for k, (name, r) in enumerate(res.items()):
            mean, hw = band(r["curves"][m], steps)
            ax.plot(steps, mean, marker="o", ms=2.5, lw=1.2, color=f"C{k}", label=name)
            ax.fill_between(steps, mean - hw, mean + hw, color=f"C{k}", alpha=0.2)
        ax.axhline(float(np.mean(floor_of[m])), color="k", ls=":", lw=1, label="mixture draws")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        kind = "exact" if m != "fd_1step" else "classifier"
        ax.set_title(f"{m} ({kind}{', primary' if m == PRIMARY else ''})", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("digits-like mixture as 8x8 images, U-Net: evaluation EMA, mean and 95 % band")
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _fmt(iv: dict) -> str:
    return f"{iv['mean']:+.3g} [{iv['lo']:+.3g}, {iv['hi']:+.3g}]"


def summary(results: dict) -> None:
    a = results["analysis"]
    shown = [*METRICS, "fd_1step", "fd_2step"]
    rows = []
    for m in shown:
        row = {"metric": m}
        for name, v in a["seed_means"][m].items():
            row[name] = f"{v:.4g}"
        key = "fd" if m.startswith("fd_") else m.rsplit("_", 1)[0]
        if key in results["floors"]["mixture"]:
            row["mixture draws"] = f"{np.mean(results['floors']['mixture'][key]):.4g}"
        if m.startswith("fd_"):
            row["real digits"] = f"{np.mean(results['floors']['real_train_digits']['fd']):.4g}"
        rows.append(row)
    print_table(rows, title="seed means at the end (evaluation EMA)")
    rows = []
    for name, per in a["paired_vs_ct"].items():
        rows.append({"method": name, **{m: _fmt(per[m]) for m in shown}})
    cols = ["method", "mode_tv_1step", "sw2_1step", "mean_err_1step", "cov_err_1step", "fd_1step"]
    print_table(rows, cols, title="method - CT, one step (paired by seed, 95 % CI)")
    cols = ["method", "mode_tv_2step", "sw2_2step", "mean_err_2step", "cov_err_2step", "fd_2step"]
    print_table(rows, cols, title="method - CT, two steps (paired by seed, 95 % CI)")
    rows = [{"comparison": k, "kendall tau": f"{v:+.2f}"} for k, v in a["rank_agreement"].items()]
    print_table(rows, title="rank agreement of the methods' seed means: FD vs exact metrics")


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = design(args)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    run_dir = make_run_dir(args.out, "image_target_quick" if args.quick else "image_target")
    write_config(run_dir, args, seeds, settings=cfg)
    start, cpu0 = time.perf_counter(), time.process_time()
    classifier, clf_info = load_classifier(cache_dir=args.classifier_cache, verbose=True)
    metrics = ImageMetrics(
        "digits", load_digits("test")[0], classifier=classifier, n_projections=64
    )
    target = digits_mixture()
    ev = make_eval_set(target, cfg["eval"]["n_flow"], cfg["eval"]["n_ref"])
    floor = floors(target, metrics, cfg["eval"]["n_samples"], args.seeds)
    specs = specs_of(args, cfg["recipe"])
    bar = Progress(len(specs), "image_target_study", quiet=args.quiet)
    res: dict = {}
    rows: list[dict] = []
    for name, spec in specs.items():
        r = run_one(target, spec, seeds, ev, metrics, cfg)
        res[name] = r
        for i, seed in enumerate(seeds):
            row = dict(method=name, seed=seed)
            row.update({m: float(v[i]) for m, v in r["final"].items()})
            rows.append(row)
        bar.done(f"{name} ({len(seeds)} seeds)", r["wall_s"])
        write_results(run_dir, {"partial": True, "design": cfg, **_curves(res)}, rows)
    bar.close()
    results = dict(
        design=cfg,
        classifier={k: clf_info[k] for k in ("hash", "test_accuracy")},
        floors=floor,
        analysis=analyse(res),
        **_curves(res),
        figures=[figure(run_dir, res, cfg["checkpoints"], floor)],
        wall_s=round(time.perf_counter() - start, 1),
        cpu_s=round(time.process_time() - cpu0, 1),
    )
    write_results(run_dir, results, rows)
    summary(results)
    print(f"run folder: {run_dir}  wall {results['wall_s']} s  cpu {results['cpu_s']} s")
    return results


def _curves(res: dict) -> dict:
    return dict(
        curves={n: {m: v.tolist() for m, v in r["curves"].items()} for n, r in res.items()},
        timing={
            n: dict(wall_s=round(r["wall_s"], 1), seed_steps_per_s=round(r["seed_steps_per_s"], 1))
            for n, r in res.items()
        },
    )


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
