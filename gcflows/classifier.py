"""A small digits classifier, trained and cached deterministically, for evaluating generated digits.

The scikit-learn digits (8x8, ``gcflows.data.load_digits``) have no Inception network; image
quality is measured in the feature space of this classifier instead:

- :class:`DigitsClassifier`: ``conv3(1 -> c1) ReLU conv3(c1 -> c2) ReLU maxpool2 -> linear ->
  ReLU`` gives the features ``(B, feature_dim)``; a linear head gives the 10 class logits.
- :func:`train_classifier`: trained on the **train** split only (the test split is the evaluation
  reference); every random draw (initial weights, minibatch order, one-pixel shifts used as
  augmentation) comes from one ``torch.Generator`` seeded by ``config["seed"]``: two trainings with
  the same config give identical weights (tested), and the global RNG is untouched.
- :func:`load_classifier`: the cached classifier, or train and cache it. The cache file is
  ``<cache_dir>/digits_classifier_<hash>.pt`` with ``hash`` = SHA-256 of the training config
  (:func:`config_hash`); ``cache_dir`` defaults to ``$GCFLOWS_CACHE`` or ``~/.cache/gcflows``.
- :func:`classifier_features`, :func:`classifier_frechet_distance` (the Frechet distance of
  ``gcflows.metrics`` on these features) and :func:`classification_report` (confidence of the
  classifier on the samples, per-class counts and coverage, balance against a label distribution,
  and the "classifier score" ``exp E_x KL(p(y | x) || p(y))``, the Inception-score formula).

Images are ``(N, 1, 8, 8)`` in ``[-1, 1]`` (the data's range). Generated samples should be clipped
to ``[-1, 1]`` by the caller (never rescaled per batch); :func:`check_digit_images` rejects other
shapes and non-finite values.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcflows import checks
from gcflows.atomic import atomic_torch_save
from gcflows.data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, load_digits
from gcflows.metrics import frechet_distance

__all__ = [
    "DEFAULT_CLASSIFIER_CONFIG",
    "CACHE_FORMAT",
    "DigitsClassifier",
    "check_digit_images",
    "config_hash",
    "default_cache_dir",
    "cache_path",
    "train_classifier",
    "load_classifier",
    "classifier_features",
    "classifier_frechet_distance",
    "classification_report",
]

N_CLASSES = 10
DIGIT_SHAPE = (1, 8, 8)
CACHE_FORMAT = "gcflows-digits-classifier"
CACHE_VERSION = 1

#: Training config of the default classifier (its hash names the cache file). ``data`` records the
#: split it is trained on, so a change of the digits split changes the hash too.
DEFAULT_CLASSIFIER_CONFIG: dict[str, Any] = {
    "version": CACHE_VERSION,
    "channels": [32, 64],
    "feature_dim": 64,
    "epochs": 40,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "max_shift": 1,
    "seed": 0,
    "data": {
        "name": "digits",
        "split": "train",
        "split_seed": DIGITS_SPLIT_SEED,
        "test_fraction": DIGITS_TEST_FRACTION,
    },
}


def _check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults for missing keys and validate; returns a JSON-normalised copy."""
    if not isinstance(config, dict):
        fix = "pass a dict of classifier settings"
        raise checks.bad("type(config)", type(config).__name__, fix)
    unknown = sorted(set(config) - set(DEFAULT_CLASSIFIER_CONFIG))
    if unknown:
        fix = f"drop the unknown keys; known: {sorted(DEFAULT_CLASSIFIER_CONFIG)}"
        raise checks.bad("config keys", unknown, fix)
    cfg = json.loads(json.dumps({**DEFAULT_CLASSIFIER_CONFIG, **config}, sort_keys=True))
    ch = cfg["channels"]
    if not (
        isinstance(ch, list) and len(ch) == 2 and all(isinstance(c, int) and c > 0 for c in ch)
    ):
        raise checks.bad("config['channels']", ch, "use two positive ints")
    for key in ("feature_dim", "epochs", "batch_size"):
        checks.integer(cfg[key], f"config[{key!r}]", lo=1)
    checks.real(cfg["lr"], "config['lr']", lo_open=0.0)
    checks.real(cfg["weight_decay"], "config['weight_decay']", lo=0.0)
    checks.integer(cfg["max_shift"], "config['max_shift']", lo=0, hi=3)
    checks.integer(cfg["seed"], "config['seed']", lo=0)
    expected = DEFAULT_CLASSIFIER_CONFIG["data"]
    if cfg["data"] != expected:
        fix = (
            f"use {expected} (the classifier is trained on this digits split; gcflows.data "
            "defines it)"
        )
        raise checks.bad("config['data']", cfg["data"], fix)
    return cfg


def config_hash(config: dict[str, Any] | None = None) -> str:
    """SHA-256 (hex) of the normalised training config: the key of the cache file."""
    cfg = _check_config(config or {})
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$GCFLOWS_CACHE`` if set, else ``~/.cache/gcflows``."""
    env = os.environ.get("GCFLOWS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gcflows"


def cache_path(config: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None):
    """``<cache_dir>/digits_classifier_<first 16 hex digits of the config hash>.pt``."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"digits_classifier_{config_hash(config)[:16]}.pt"


def check_digit_images(images: Tensor, name: str = "images") -> Tensor:
    """Validate ``(N, 1, 8, 8)`` finite floating images; returns them as float32 on CPU."""
    if not torch.is_tensor(images):
        raise checks.bad_tensor(images, name, "pass a floating-point tensor (N, 1, 8, 8)")
    if not images.is_floating_point():
        raise checks.bad(f"{name}.dtype", images.dtype, "use a floating-point tensor (N, 1, 8, 8)")
    if images.dim() != 4 or tuple(images.shape[1:]) != DIGIT_SHAPE or images.shape[0] < 1:
        fix = (
            "use shape (N, 1, 8, 8) with N >= 1 (8x8 digits in [-1, 1]); the digits classifier "
            "applies to the digits presets only"
        )
        raise checks.bad_tensor(images, name, fix)
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} contains NaN or inf; drop or fix those samples first")
    return images.detach().to("cpu", torch.float32)


# ------------------------------------------------------------------------------------------------
# the network
# ------------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """CNN for ``(B, 1, 8, 8)`` digits: ``features (B, feature_dim)`` and ``logits (B, 10)``.

    ``conv3x3(1 -> c1) ReLU conv3x3(c1 -> c2) ReLU maxpool2 (-> c2 x 4 x 4) flatten
    linear(16 c2 -> feature_dim) ReLU`` = features; ``linear(feature_dim -> 10)`` = logits.
    No dropout or batch statistics: the network is a deterministic function of its input.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 64) -> None:
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(16 * c2, int(feature_dim))
        self.head = nn.Linear(int(feature_dim), N_CLASSES)
        self.feature_dim = int(feature_dim)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """He-uniform weights ``U(-sqrt(6 / fan_in), +)``, zero biases, drawn from ``generator``."""
        with torch.no_grad():
            for module in (self.conv1, self.conv2, self.fc, self.head):
                w = module.weight
                fan_in = w[0].numel()
                bound = math.sqrt(6.0 / fan_in)
                w.copy_(torch.rand(w.shape, generator=generator, dtype=w.dtype) * 2 * bound - bound)
                module.bias.zero_()

    def features(self, x: Tensor) -> Tensor:
        """``(B, 1, 8, 8) -> (B, feature_dim)`` (post-ReLU penultimate layer)."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 1, 8, 8) -> logits (B, 10)``."""
        return self.head(self.features(x))


def _build(cfg: dict[str, Any]) -> DigitsClassifier:
    # torch's layer constructors draw default weights from the global RNG; fork it so that the
    # caller's stream is untouched (the weights are then redrawn by reset_parameters)
    with torch.random.fork_rng(devices=[]):
        return DigitsClassifier(tuple(cfg["channels"]), cfg["feature_dim"])


def _shift(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Shift each image by integer ``(dy, dx)`` pixels, filling with the background value -1."""
    out = torch.full_like(x, -1.0)
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        sy, sx = int(dy[i]), int(dx[i])
        ys, yd = (slice(0, h - sy), slice(sy, h)) if sy >= 0 else (slice(-sy, h), slice(0, h + sy))
        xs, xd = (slice(0, w - sx), slice(sx, w)) if sx >= 0 else (slice(-sx, w), slice(0, w + sx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


@torch.no_grad()
def _accuracy(model: DigitsClassifier, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).double().mean())


def train_classifier(config: dict[str, Any] | None = None) -> tuple[DigitsClassifier, dict]:
    """Train the digits classifier of ``config`` (defaults: :data:`DEFAULT_CLASSIFIER_CONFIG`).

    Adam (``lr``, ``weight_decay``) on the cross-entropy, ``epochs`` passes over the train split in
    minibatches of ``batch_size`` (order from the generator; the last partial batch is used), each
    image shifted by a random integer offset in ``[-max_shift, max_shift]^2``. One CPU
    ``torch.Generator(seed)`` supplies every draw, in float32, on CPU, with one torch thread
    (set for the call and restored after it): the summation order of the convolutions then does
    not depend on the number of cores, and for 8x8 images extra threads only add synchronisation.
    Deterministic for a given torch build. Returns ``(model in eval mode, info)`` with ``info``
    holding the config, its hash, train and test accuracy.
    """
    cfg = _check_config(config or {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored below; see the docstring
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: dict[str, Any]) -> tuple[DigitsClassifier, dict]:
    gen = torch.Generator().manual_seed(cfg["seed"])
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    model = _build(cfg)
    model.reset_parameters(gen)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    n, bs, s = x_train.shape[0], cfg["batch_size"], cfg["max_shift"]
    model.train()
    for _ in range(cfg["epochs"]):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            xb = x_train[idx]
            if s > 0:
                d = torch.randint(-s, s + 1, (2, idx.numel()), generator=gen)
                xb = _shift(xb, d[0], d[1])
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    info = {
        "config": cfg,
        "hash": config_hash(cfg),
        "train_accuracy": _accuracy(model, x_train, y_train),
        "test_accuracy": _accuracy(model, x_test, y_test),
        "torch": str(torch.__version__),
    }
    return model, info


def load_classifier(
    config: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    retrain: bool = False,
    verbose: bool = False,
) -> tuple[DigitsClassifier, dict]:
    """The classifier of ``config`` from the cache, trained and cached first when absent.

    Returns ``(model in eval mode on CPU, info)`` (``info`` as in :func:`train_classifier`, plus
    ``"path"`` and ``"cached"``: whether it was read from the cache). A cache file that is
    unreadable or holds another config raises ``ValueError`` naming it (delete it, or pass
    ``retrain=True`` to overwrite it). The file is written atomically (temporary file, fsync,
    ``os.replace``), so concurrent callers at worst train twice and never read a partial file.
    """
    cfg = _check_config(config or {})
    path = cache_path(cfg, cache_dir)
    h = config_hash(cfg)
    if path.exists() and not retrain:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated file, garbage bytes, unpickling errors
            raise ValueError(
                f"classifier cache {str(path)!r} is unreadable ({type(err).__name__}: {err}); "
                "delete it or pass retrain=True (--retrain-classifier)"
            ) from None
        if (
            not isinstance(blob, dict)
            or blob.get("format") != CACHE_FORMAT
            or blob.get("hash") != h
        ):
            raise ValueError(
                f"classifier cache {str(path)!r} does not hold the classifier of this config "
                f"(hash {h[:16]}); delete it or pass retrain=True (--retrain-classifier)"
            )
        model = _build(cfg)
        try:
            model.load_state_dict(blob["state_dict"])
        except (RuntimeError, KeyError) as err:
            raise ValueError(
                f"classifier cache {str(path)!r} does not fit the network ({err}); delete it"
            ) from None
        model.eval().requires_grad_(False)
        info = {k: blob[k] for k in ("config", "hash", "train_accuracy", "test_accuracy", "torch")}
        return model, {**info, "path": str(path), "cached": True}
    if verbose:
        print(f"training the digits classifier (cached at {path}) ...", flush=True)
    model, info = train_classifier(cfg)
    payload = {"format": CACHE_FORMAT, "state_dict": model.state_dict(), **info}
    atomic_torch_save(path, payload)
    return model, {**info, "path": str(path), "cached": False}


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _batched(fn, images: Tensor, batch_size: int) -> Tensor:
    return torch.cat(
        [fn(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    )


def classifier_features(model: DigitsClassifier, images: Tensor, batch_size: int = 1024) -> Tensor:
    """Features ``(N, feature_dim)`` float64 of ``images (N, 1, 8, 8)`` (CPU, eval mode)."""
    x = check_digit_images(images)
    model = model.to("cpu").eval()
    return _batched(model.features, x, batch_size).double()


def classifier_frechet_distance(
    model: DigitsClassifier, images: Tensor, reference: Tensor
) -> float:
    """Frechet distance between the classifier features of ``images`` and of ``reference``.

    ``||m_x - m_y||^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))`` of the Gaussians fitted to both
    feature sets (:func:`gcflows.metrics.frechet_distance`); biased in the sample sizes: compare
    values computed with the same sizes.
    """
    return frechet_distance(
        classifier_features(model, images, 1024), classifier_features(model, reference, 1024)
    )


@torch.no_grad()
def classification_report(
    model: DigitsClassifier,
    images: Tensor,
    *,
    confidence: float = 0.9,
    label_distribution: Tensor | None = None,
    min_fraction: float = 0.02,
) -> dict[str, Any]:
    """How the classifier sees ``images (N, 1, 8, 8)``: confidence, per-class coverage, balance.

    With ``p(y | x)`` the softmax of the logits and ``c(x) = argmax_y p(y | x)``:

    - ``mean_confidence`` = mean of ``max_y p(y | x)``; ``confident_fraction`` = fraction with
      ``max_y p(y | x) >= confidence`` (on real test digits both are close to the test accuracy;
      a sample the classifier cannot place confidently is rarely a recognisable digit);
    - ``per_class``: for each class, ``count`` and ``fraction`` of samples with ``c(x) = y``, and
      the ``mean_confidence`` of those samples (0 for an empty class);
    - ``classes_covered`` = classes holding at least ``min_fraction`` of the samples;
    - ``balance_tv`` = ``1/2 sum_y |fraction_y - q_y|`` with ``q`` = ``label_distribution``
      (uniform when ``None``);
    - ``classifier_score`` = ``exp(mean_x KL(p(y | x) || p_hat(y)))``, ``p_hat`` the mean of
      ``p(y | x)`` over the samples (the Inception-score formula; at most 10).
    """
    if not 0.0 < float(confidence) <= 1.0:
        raise checks.bad("confidence", confidence, "use a number in (0, 1]")
    if not 0.0 <= float(min_fraction) < 1.0:
        raise checks.bad("min_fraction", min_fraction, "use a number in [0, 1)")
    x = check_digit_images(images)
    model = model.to("cpu").eval()
    probs = torch.softmax(_batched(model, x, 1024).double(), dim=1)
    conf, pred = probs.max(1)
    n = x.shape[0]
    counts = torch.bincount(pred, minlength=N_CLASSES)
    fractions = counts.double() / n
    if label_distribution is None:
        q = torch.full((N_CLASSES,), 1.0 / N_CLASSES, dtype=torch.float64)
    else:
        q = torch.as_tensor(label_distribution, dtype=torch.float64).reshape(-1)
        if q.shape != (N_CLASSES,) or bool((q < 0).any()) or float(q.sum()) <= 0:
            fix = f"use {N_CLASSES} non-negative weights, not all zero"
            raise checks.bad("label_distribution", label_distribution, fix)
        q = q / q.sum()
    marginal = probs.mean(0)
    kl = (probs * (probs.clamp_min(1e-300).log() - marginal.clamp_min(1e-300).log())).sum(1)
    per_class = []
    for c in range(N_CLASSES):
        mask = pred == c
        per_class.append(
            {
                "class": c,
                "count": int(counts[c]),
                "fraction": float(fractions[c]),
                "mean_confidence": float(conf[mask].mean()) if bool(mask.any()) else 0.0,
            }
        )
    return {
        "n_samples": n,
        "confidence_threshold": float(confidence),
        "mean_confidence": float(conf.mean()),
        "confident_fraction": float((conf >= confidence).double().mean()),
        "per_class": per_class,
        "classes_covered": int((fractions >= min_fraction).sum()),
        "min_fraction": float(min_fraction),
        "balance_tv": 0.5 * float((fractions - q).abs().sum()),
        "classifier_score": float(np.exp(float(kl.mean()))),
    }
