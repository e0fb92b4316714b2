"""Evaluation of image consistency models (the protocol of ``experiments/eval_images.py``, also
used along training by ``experiments/digits_comparison.py``): seeded one- and two-step samplers
(docs/paper.md section 5), the metrics against a reference set (:class:`ImageMetrics`: sliced W2
in pixel space; for the digits the Frechet distance in the features of the cached digits
classifier and what the classifier says about the samples; Inception FID / KID through
torchmetrics when installed with local weights), the mean and Student-t interval over seeds
(:func:`seed_interval`) and the whole evaluation of a checkpoint (:func:`evaluate_checkpoint`).

The samplers: one-step ``f(t_max z, t_max)`` and two-step (Song et al. 2023, Algorithm 1) at the
intermediate time ``TWO_STEP_SIGMA[data]``. The noise of seed ``k`` comes from CPU generators
seeded by ``derive_seed(k, stream)``, so every model is scored on the same noise. Samples are
clipped to the data range [-1, 1], never rescaled.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcflows.checks import bad, choice
from gcflows.classifier import classification_report, classifier_features, load_classifier
from gcflows.data import get_image_dataset
from gcflows.metrics import frechet_distance, sliced_w2
from gcflows.sampling import multistep_sample
from gcflows.stats import mean_interval
from gcflows.training import TrainConfig, derive_seed, load_checkpoint
from gcflows.training.images import model_from_checkpoint

__all__ = [
    "TWO_STEP_SIGMA",
    "SW2_PROJECTIONS",
    "SW2_SEED",
    "CONFIDENCE",
    "INCEPTION_FILE",
    "two_step_sigma",
    "samplers",
    "generate",
    "ImageMetrics",
    "seed_interval",
    "inception_metrics",
    "evaluate_checkpoint",
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
        fix = f"the two-step sigma must lie in ({config.t_min}, {config.t_max}) (the run's times)"
        raise bad("two_step_sigma", s, fix)
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
        raise bad("n", n, "use a positive int")
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
def seed_interval(values: Sequence[float | None], level: float = 0.95) -> dict[str, Any]:
    """The record ``{"mean", "std", "lo", "hi", "n"}`` of one metric over seeds, as written to the
    results files: the Student-t interval ``mean +- t_{(1 + level) / 2, n - 1} std / sqrt(n)`` of
    :func:`gcflows.stats.mean_interval` with the sample standard deviation ``std``. ``None``
    values are dropped; one value gives ``std = lo = hi = None``, none gives ``n = 0`` and all
    ``None``."""
    interval = mean_interval(values, level)
    if interval is None:
        return {"mean": None, "std": None, "lo": None, "hi": None, "n": 0}
    if interval.n == 1:
        return {"mean": interval.mean, "std": None, "lo": None, "hi": None, "n": 1}
    std = float(np.std([float(x) for x in values if x is not None], ddof=1))
    return {
        "mean": interval.mean,
        "std": std,
        "lo": interval.lo,
        "hi": interval.hi,
        "n": interval.n,
    }


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
            fix = f"use the reference's shape per image {tuple(self.reference.shape[1:])}"
            raise bad("samples.shape[1:]", tuple(x.shape[1:]), fix)
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
        summary[f"{source}/{sampler}"] = {k: seed_interval([r[k] for r in group]) for k in keys}
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
    choice(reference, "reference", ("test", "train"))
    choice(inception, "inception", ("auto", "on", "off"))
    if not seeds:
        raise bad("seeds", seeds, "pass at least one seed")
    ckpt = load_checkpoint(checkpoint)  # ValueError when missing / corrupt / not gcflows
    config = TrainConfig.from_dict(ckpt["config"])
    data = _data_of(config)
    sampler_sigmas = samplers(config, data, mid_sigma)
    if data != "digits" and data_root is None:
        raise bad(
            "data_root", data_root, f"{data} checkpoints need --data-root (the reference images)"
        )
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
