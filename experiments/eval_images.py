"""Evaluate an image consistency model from a checkpoint of ``experiments/train_images.py``.

    python experiments/eval_images.py runs/images/digits_gc_mix50_gc_s0/checkpoint.pt
    python experiments/eval_images.py CKPT --seeds 0 1 2 3 4 --n-samples 2000 --out runs/eval_gc
    python experiments/eval_images.py CKPT --data-root ~/data/cifar10 --n-samples 50000

Protocol (also written into ``results.json`` under ``"protocol"``):

- Samplers: **one-step** ``f(t_max z, t_max)`` (docs/paper.md section 5) and **two-step**
  (Song et al. 2023, Algorithm 1): ``x = f(80 z, 80)``, then ``x' = x + sqrt(s^2 - t_min^2)
  z'`` and ``f(x', s)`` at the intermediate time ``s = 0.821``, iCT's CIFAR-10 value, for every
  data set: on the digits it was also the best of s in {0.2, 0.5, 0.821, 1.5, 3} for a
  ``digits_base`` model (3000 steps, seed 0, 1000 samples: classifier FD 19.1, 13.0, 9.9, 11.5,
  15.4) and near-best for a ``digits_gc_mix50`` one (22.7, 16.0, 11.9, 11.3, 11.9).
  ``--two-step-sigma`` overrides it. The EMA weights are evaluated (``--weights model`` for the
  online network).
- Seeds: for each seed ``k`` in ``--seeds``, the noise ``z`` (and the two-step ``z'``) come from a
  CPU ``torch.Generator`` seeded by ``derive_seed(k, stream)``; the same seed gives the same noise
  for every checkpoint, so models are compared on identical noise. The reported value is the mean
  over seeds with a 95 % Student-t interval (``mean +- t_{0.975, n-1} std / sqrt(n)``).
- Samples are **clipped** to the data range [-1, 1] (never rescaled by a batch's own min / max);
  the fraction of pixels that needed clipping is reported.
- Reference set: the held-out **test** split (digits: 359 images, a fixed stratified split of
  scikit-learn's 1797; MNIST / CIFAR-10: their test sets) by default, ``--reference train`` for
  the training split (the usual CIFAR-10 FID convention, 50k training images).
- Metrics: ``sw2_pixels``: sliced W2 in pixel space (``gcflows.metrics.sliced_w2``, 256
  directions from a fixed seed, shared by all models); digits only: ``fd_classifier``: Frechet
  distance between the Gaussians fitted to the features of the cached digits classifier
  (``gcflows.classifier``; trained on the train split only) of the samples and of the reference
  set, and what the classifier says about the samples (``confident_fraction``: share classified
  with probability >= 0.9; per-class counts; classes covered; balance; classifier score);
  MNIST / CIFAR-10: Inception ``fid`` / ``kid`` through ``torchmetrics`` when it is installed and
  the Inception weights are on disk (in the torch hub cache, or ``--inception-weights``); nothing is
  downloaded or installed; otherwise the reason is written instead.
- Floor: the same metrics for ``--n-samples`` real training images (at most the training set),
  drawn without replacement with each seed, against the same reference: the value a perfect
  generator would get at this sample size (the Frechet distance is biased in the sample size,
  so compare numbers computed with the same ``--n-samples``).

Writes ``config.json`` (checkpoint, its training config, seeds, git SHA, versions, device),
``results.json`` / ``results.csv`` and ``samples_<sampler>.png`` to ``--out``; a table last.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcflows.classifier import classification_report, classifier_features, load_classifier
from gcflows.data import get_image_dataset
from gcflows.metrics import frechet_distance, sliced_w2
from gcflows.records import make_run_dir, print_table, write_config, write_results
from gcflows.sampling import multistep_sample
from gcflows.training import TrainConfig, derive_seed, load_checkpoint
from gcflows.training.images import model_from_checkpoint, save_image_grid

__all__ = [
    "TWO_STEP_SIGMA",
    "SW2_PROJECTIONS",
    "SW2_SEED",
    "CONFIDENCE",
    "two_step_sigma",
    "samplers",
    "generate",
    "ImageMetrics",
    "mean_interval",
    "inception_metrics",
    "evaluate_checkpoint",
    "main",
]

#: Intermediate time of the two-step sampler per data set (module docstring).
TWO_STEP_SIGMA = {"digits": 0.821, "mnist": 0.821, "cifar10": 0.821}
SW2_PROJECTIONS = 256
SW2_SEED = 20240610
CONFIDENCE = 0.9
_STREAM_NOISE, _STREAM_RENOISE, _STREAM_FLOOR = 101, 102, 103
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def two_step_sigma(data: str, override: float | None = None) -> float:
    """The documented intermediate time for ``data`` (or ``override``)."""
    return float(override) if override is not None else TWO_STEP_SIGMA[data]


def samplers(config: TrainConfig, data: str, mid: float | None = None) -> dict[str, list[float]]:
    """``{"one_step": [t_max], "two_step": [t_max, s]}`` for a training config."""
    s = two_step_sigma(data, mid)
    if not config.t_min < s < config.t_max:
        raise ValueError(f"two-step sigma must lie in ({config.t_min}, {config.t_max}), got {s}")
    return {"one_step": [config.t_max], "two_step": [config.t_max, s]}


@torch.no_grad()
def generate(
    model,
    n: int,
    shape: Sequence[int],
    sigmas: Sequence[float],
    seed: int,
    *,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``n`` samples ``(n, *shape)`` (on CPU, float32, not clipped) by multistep sampling along
    ``sigmas`` (one time = one step). Noise from CPU generators seeded by ``derive_seed(seed,
    stream)``, drawn in full before batching, so the samples do not depend on ``batch_size``."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    process = model.process
    z = torch.randn(
        (n, *shape), generator=torch.Generator().manual_seed(derive_seed(seed, _STREAM_NOISE))
    )
    g_re = torch.Generator().manual_seed(derive_seed(seed, _STREAM_RENOISE))
    renoise = torch.randn((len(sigmas) - 1, n, *shape), generator=g_re)
    model = model.to(device).eval()
    dtype = next(model.parameters()).dtype
    out = []
    for i in range(0, n, batch_size):
        zb = z[i : i + batch_size].to(device, dtype)
        if len(sigmas) == 1:
            x = multistep_sample(model, zb, sigmas, process)
        else:
            x = _multistep_fixed(model, zb, sigmas, process, renoise[:, i : i + batch_size])
        out.append(x.float().cpu())
    return torch.cat(out)


def _multistep_fixed(model, noise, sigmas, process, renoise):
    """``gcflows.sampling.multistep_sample`` with its re-noising draws given: ``renoise[k]`` is the
    ``z`` of step ``k + 1`` (``(K - 1, B, *dims)``), so that splitting the samples into batches does
    not change them. The recursion is the one documented there: ``x_s = (a(s) / a(t_min)) x +
    sqrt(b(s)^2 - (a(s) b(t_min) / a(t_min))^2) z``, then ``f(x_s, s)``; for one batch it equals
    ``multistep_sample(..., generator=g)`` with ``g`` seeded like ``renoise`` (tested)."""
    x = multistep_sample(model, noise, sigmas[:1], process)
    t0 = torch.tensor(process.t_min, dtype=torch.float64)
    a0, b0 = float(process.a(t0)), float(process.b(t0))
    for k, s in enumerate(sigmas[1:]):
        s64 = torch.tensor(s, dtype=torch.float64)
        scale = float(process.a(s64)) / a0
        std = math.sqrt(max(float(process.b(s64)) ** 2 - (scale * b0) ** 2, 0.0))
        z = renoise[k].to(noise.device, noise.dtype)
        t = torch.full((noise.shape[0],), float(s), dtype=noise.dtype, device=noise.device)
        x = model(scale * x + std * z, t)
    return x


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def mean_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample std and the Student-t interval ``mean +- t std / sqrt(n)`` over seeds."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "lo": None, "hi": None, "n": 0}
    mean = float(v.mean())
    if v.size == 1:
        return {"mean": mean, "std": None, "lo": None, "hi": None, "n": 1}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1)) * std / math.sqrt(v.size)
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": int(v.size)}


class ImageMetrics:
    """The metrics of the protocol against one reference set, with its features computed once.

    ``__call__(samples (n, C, H, W))`` clips to [-1, 1] and returns a flat dict of numbers
    (``sw2_pixels``, ``clipped_fraction``; for digits ``fd_classifier``, ``confident_fraction``,
    ``mean_confidence``, ``classes_covered``, ``balance_tv``, ``classifier_score``) and, with
    ``details=True``, the per-class report under ``"per_class"``.
    """

    def __init__(
        self,
        data: str,
        reference: torch.Tensor,
        *,
        classifier=None,
        label_distribution: torch.Tensor | None = None,
        n_projections: int = SW2_PROJECTIONS,
    ) -> None:
        self.data = data
        self.reference = reference.detach().float().cpu()
        d = int(np.prod(self.reference.shape[1:]))
        gen = torch.Generator().manual_seed(SW2_SEED)
        self.projections = torch.randn(d, n_projections, generator=gen, dtype=torch.float64)
        self.classifier = classifier
        self.label_distribution = label_distribution
        self.ref_features = None
        if classifier is not None:
            self.ref_features = classifier_features(classifier, self.reference)

    def __call__(self, samples: torch.Tensor, details: bool = False) -> dict[str, Any]:
        x = samples.detach().float().cpu()
        if tuple(x.shape[1:]) != tuple(self.reference.shape[1:]):
            raise ValueError(
                f"samples have shape {tuple(x.shape[1:])} per image, the reference "
                f"{tuple(self.reference.shape[1:])}"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError("samples contain NaN or inf: the model diverged")
        clipped = float(((x < -1.0) | (x > 1.0)).double().mean())
        x = x.clamp(-1.0, 1.0)
        out: dict[str, Any] = {
            "sw2_pixels": sliced_w2(x, self.reference, projections=self.projections),
            "clipped_fraction": clipped,
        }
        if self.classifier is not None:
            out["fd_classifier"] = frechet_distance(
                classifier_features(self.classifier, x), self.ref_features
            )
            rep = classification_report(
                self.classifier,
                x,
                confidence=CONFIDENCE,
                label_distribution=self.label_distribution,
            )
            for key in (
                "confident_fraction",
                "mean_confidence",
                "classes_covered",
                "balance_tv",
                "classifier_score",
            ):
                out[key] = rep[key]
            if details:
                out["per_class"] = rep["per_class"]
        return out


def _inception_weights(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit).expanduser()
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return hub if hub.is_file() else None


def inception_metrics(
    samples: torch.Tensor,
    reference: torch.Tensor,
    *,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 500,
) -> dict[str, Any]:
    """Inception FID and KID (torchmetrics) of ``samples`` against ``reference``, both ``(n, C, H,
    W)`` in [-1, 1] (clipped, then mapped to uint8 ``round((x + 1) 127.5)``; one channel is
    repeated to three). Returns ``{"fid", "kid_mean", "kid_std"}``, or ``{"skipped": reason}`` when
    torchmetrics / torch-fidelity is not installed or the Inception weights are not on disk
    (nothing is installed or downloaded)."""
    for module in ("torchmetrics", "torch_fidelity"):
        if importlib.util.find_spec(module) is None:
            return {
                "skipped": f"{module} is not installed; Inception FID / KID need "
                "`pip install torchmetrics[image]` and the Inception weights on disk"
            }
    path = _inception_weights(weights)
    if path is None or not path.is_file():
        where = path or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        return {
            "skipped": f"Inception weights not found at {where}; gcflows never downloads them. "
            "Fetch the torch-fidelity file weights-inception-2015-12-05-6726825d.pth on a machine "
            "with internet and put it there, or pass --inception-weights PATH"
        }
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    def _make(cls, **kw):
        if weights and "feature_extractor_weights_path" in inspect.signature(cls).parameters:
            kw["feature_extractor_weights_path"] = str(path)
        elif weights:
            raise ValueError(
                f"this torchmetrics' {cls.__name__} takes no feature_extractor_weights_path; put "
                f"the weights at {Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_FILE}"
            )
        return cls(**kw).to(device)

    n_min = min(samples.shape[0], reference.shape[0])
    fid = _make(FrechetInceptionDistance, feature=2048, normalize=False)
    kid = _make(
        KernelInceptionDistance, feature=2048, subset_size=min(1000, n_min), normalize=False
    )

    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x

    for real, images in ((True, reference), (False, samples)):
        for i in range(0, images.shape[0], batch_size):
            xb = to_uint8(images[i : i + batch_size]).to(device)
            fid.update(xb, real=real)
            kid.update(xb, real=real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


# ------------------------------------------------------------------------------------------------
# the evaluation
# ------------------------------------------------------------------------------------------------
def _data_of(config: TrainConfig) -> str:
    record = config.model or {}
    if "data" not in record:
        raise ValueError(
            "the checkpoint's config has no model['data']: it was not written by "
            "experiments/train_images.py"
        )
    return record["data"]


def _score_seeds(
    model,
    metrics: ImageMetrics,
    sampler_sigmas: dict[str, list[float]],
    ref_images: torch.Tensor,
    floor_images: torch.Tensor | None,
    *,
    seeds: Sequence[int],
    n_samples: int,
    batch_size: int,
    device: str,
    inception: str,
    inception_weights: str | None,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], dict[str, Any]]:
    """Per seed and sampler: samples, their metrics (Inception ones unless ``inception`` is
    ``"off"``) and the real-data floor; returns (rows, first seed's samples, per-class counts)."""
    rows: list[dict[str, Any]] = []
    first: dict[str, torch.Tensor] = {}
    per_class: dict[str, Any] = {}
    shape = tuple(ref_images.shape[1:])
    for seed in seeds:
        for name, sigmas in sampler_sigmas.items():
            x = generate(
                model, n_samples, shape, sigmas, seed, batch_size=batch_size, device=device
            )
            vals = metrics(x, details=seed == seeds[0])
            if "per_class" in vals:
                per_class[name] = vals.pop("per_class")
            if inception != "off":
                inc = inception_metrics(x, ref_images, weights=inception_weights, device=device)
                if "skipped" in inc:
                    if inception == "on":
                        raise RuntimeError(inc["skipped"])
                    vals["inception"] = inc["skipped"]
                else:
                    vals.update(inc)
            rows.append({"source": "model", "sampler": name, "seed": seed, **vals})
            if seed == seeds[0]:
                first[name] = x
        if floor_images is not None:
            g = torch.Generator().manual_seed(derive_seed(seed, _STREAM_FLOOR))
            m = min(n_samples, floor_images.shape[0])
            idx = torch.randperm(floor_images.shape[0], generator=g)[:m]
            vals = metrics(floor_images[idx])
            rows.append({"source": "train_data", "sampler": "data", "seed": seed, **vals})
    return rows, first, per_class


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95 % interval over seeds of every numeric metric, per source / sampler."""
    summary: dict[str, Any] = {}
    for source, sampler in sorted({(r["source"], r["sampler"]) for r in rows}):
        group = [r for r in rows if r["source"] == source and r["sampler"] == sampler]
        keys = [k for k, v in group[0].items() if isinstance(v, (int, float)) and k != "seed"]
        summary[f"{source}/{sampler}"] = {k: mean_interval([r[k] for r in group]) for k in keys}
    return summary


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    n_samples: int = 1000,
    reference: str = "test",
    data_root: str | None = None,
    mid_sigma: float | None = None,
    which: str = "ema",
    inception: str = "auto",
    inception_weights: str | None = None,
    device: str = "cpu",
    batch_size: int = 1000,
    classifier_cache: str | None = None,
    floor: bool = True,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` with the protocol of the module docstring; returns the results
    dict (``protocol``, ``per_seed`` rows, ``summary`` with mean / interval per sampler and
    metric, ``floor``) and, under ``"_samples"``, the first seed's samples per sampler."""
    if reference not in ("test", "train"):
        raise ValueError(f"reference must be 'test' or 'train', got {reference!r}")
    if inception not in ("auto", "on", "off"):
        raise ValueError(f"inception must be 'auto', 'on' or 'off', got {inception!r}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    ckpt = load_checkpoint(checkpoint)  # ValueError when missing / corrupt / not gcflows
    config = TrainConfig.from_dict(ckpt["config"])
    data = _data_of(config)
    sampler_sigmas = samplers(config, data, mid_sigma)
    if data != "digits" and data_root is None:
        raise ValueError(f"{data} checkpoints need --data-root (the reference images)")
    ref_images, ref_labels = get_image_dataset(data, root=data_root, split=reference)
    train_images, _ = get_image_dataset(data, root=data_root, split="train")
    model = model_from_checkpoint(ckpt, which=which)
    classifier, clf_info, label_dist = None, None, None
    if data == "digits":
        classifier, clf_info = load_classifier(cache_dir=classifier_cache, verbose=True)
        label_dist = torch.bincount(ref_labels, minlength=10).double()
    metrics = ImageMetrics(data, ref_images, classifier=classifier, label_distribution=label_dist)
    use_inception = inception == "on" or (inception == "auto" and data != "digits")

    rows, first, per_class = _score_seeds(
        model,
        metrics,
        sampler_sigmas,
        ref_images,
        train_images if floor else None,
        seeds=seeds,
        n_samples=n_samples,
        batch_size=batch_size,
        device=device,
        inception=inception if use_inception else "off",
        inception_weights=inception_weights,
    )
    summary = _summary(rows)
    protocol = {
        "checkpoint": str(checkpoint),
        "step": int(ckpt["step"]),
        "preset": config.preset,
        "data": data,
        "weights": which,
        "samplers": sampler_sigmas,
        "n_samples": n_samples,
        "seeds": list(seeds),
        "noise": "CPU torch.Generator seeded by derive_seed(seed, stream) per seed",
        "reference": f"{data} {reference} split, {ref_images.shape[0]} images",
        "post_processing": "clip to [-1, 1]; no rescaling",
        "sw2": f"{SW2_PROJECTIONS} directions, fixed seed {SW2_SEED}, pixel space",
        "classifier": clf_info and {k: clf_info[k] for k in ("hash", "test_accuracy", "path")},
        "confidence_threshold": CONFIDENCE if classifier is not None else None,
        "floor": "the same metrics for n_samples training images (without replacement)",
        "interval": "mean over seeds, 95 % Student-t interval",
        "inception": "torchmetrics FID / KID when installed with local weights"
        if use_inception
        else "not used (digits use the classifier features)",
    }
    return {
        "protocol": protocol,
        "per_seed": rows,
        "per_class_first_seed": per_class,
        "summary": summary,
        "_samples": first,
        "_config": config,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="checkpoint.pt written by train_images.py")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval_<time>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--reference", choices=["test", "train"], default="test")
    p.add_argument("--data-root", default=None, help="MNIST / CIFAR-10 folder (not digits)")
    p.add_argument("--two-step-sigma", type=float, default=None, help="intermediate time")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--inception", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--inception-weights", default=None, help="local Inception weights file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--classifier-cache", default=None, help="default ~/.cache/gcflows")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 for digits on CPU)"
    )
    return p


def _writable(folder: Path) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"the output folder {str(folder)!r} cannot be written; choose another --out"
        )


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Check every argument before any work (the checkpoint is read and its digest verified);
    returns the checkpoint's training config record. Raises ``ValueError`` with one message."""
    for flag in ("n_samples", "batch_size", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if any(seed < 0 for seed in args.seeds):
        raise ValueError(f"--seeds must be non-negative integers, got {args.seeds}")
    config = load_checkpoint(args.checkpoint)["config"]
    data = (config.get("model") or {}).get("data")
    if data == "digits" and args.data_root is not None:
        print("warning: --data-root is ignored: the digits are bundled", file=sys.stderr)
    if data not in (None, "digits") and args.data_root is None:
        raise ValueError(f"{data} checkpoints need --data-root (the reference images)")
    _writable(Path(args.out) if args.out else Path(args.checkpoint).parent)
    return config


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command line ``argv``; a bad argument exits with status 2 and one message before
    any sample is drawn or any file written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = check_args(args)
    except ValueError as err:
        parser.error(str(err))
    threads = args.threads
    if (
        threads is None
        and args.device == "cpu"
        and (config.get("model") or {}).get("data") == "digits"
    ):
        threads = 1  # 8x8 images: extra threads only add synchronisation
    if threads is not None:
        torch.set_num_threads(threads)
    res = evaluate_checkpoint(
        args.checkpoint,
        seeds=args.seeds,
        n_samples=args.n_samples,
        reference=args.reference,
        data_root=args.data_root,
        mid_sigma=args.two_step_sigma,
        which=args.weights,
        inception=args.inception,
        inception_weights=args.inception_weights,
        device=args.device,
        batch_size=args.batch_size,
        classifier_cache=args.classifier_cache,
    )
    samples, config = res.pop("_samples"), res.pop("_config")
    out = Path(args.out) if args.out else make_run_dir(Path(args.checkpoint).parent, "eval")
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, args, seed=args.seeds, train_config=config.to_dict())
    for name, x in samples.items():
        save_image_grid(x[:100], out / f"samples_{name}.png")
    write_results(out, res, res["per_seed"])
    table = []
    for key, stats in res["summary"].items():
        row: dict[str, Any] = {"source/sampler": key}
        for metric in (
            "fd_classifier",
            "confident_fraction",
            "classes_covered",
            "sw2_pixels",
            "fid",
        ):
            if metric in stats and stats[metric]["mean"] is not None:
                s = stats[metric]
                row[metric] = (
                    f"{s['mean']:.4g}"
                    if s["lo"] is None
                    else f"{s['mean']:.4g} [{s['lo']:.4g}, {s['hi']:.4g}]"
                )
        table.append(row)
    skipped = {r["inception"] for r in res["per_seed"] if isinstance(r.get("inception"), str)}
    for reason in sorted(skipped):
        print(f"note: Inception FID / KID skipped: {reason}")
    print(f"results in {out}")
    print_table(
        table,
        title=f"eval_images: {res['protocol']['preset']} step {res['protocol']['step']} "
        f"({len(args.seeds)} seeds x {args.n_samples} samples, mean [95% interval])",
    )
    return res


if __name__ == "__main__":
    main()
