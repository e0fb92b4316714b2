"""Learning curves over seeds: plateau, paired differences and speed-up factors.

A learning curve is ``values (S, C)``: a metric (lower is better) of ``S`` seeds at ``C``
checkpoints ``steps (C,)`` (increasing, training steps). Methods compared with one another are
paired by seed: row ``s`` of every method's curve comes from the same seed.

- :func:`steps_to_reach`: the first step at which the **mean** curve over seeds is ``<= level``,
  linearly interpolated between the checkpoint before (above the level) and the first one at or
  below it; ``inf`` when it never gets there ("never reached" is an answer, not an error). The
  first checkpoint at or below the level gives its own step when it is the first checkpoint.
- :func:`speedup`: the paper's "faster convergence" as a number. For a method ``m`` and the
  baseline ``b`` (CT) the factor is ``steps_to_reach(m, L) / steps_to_reach(b, L)`` (< 1: ``m``
  is faster), at ``L`` = the baseline's final quality (its mean at the last checkpoint;
  ``level=None``) or at a fixed level. Its interval is a percentile bootstrap over seeds: resample
  the seeds (the same rows for both methods: pairing kept), recompute ``L`` (when it is the
  baseline's final value), both step counts and the ratio; the 2.5 / 97.5 % order statistics.
  The ratio is ``inf`` where ``m`` never reaches ``L`` in a resample (``hi = inf`` then), and a
  bootstrap interval rather than ``gcflows.stats.Interval`` is used because the ratio's law is
  skewed and may be infinite, which a mean -/+ q se interval cannot express.
- :func:`last_quarter_improvement`: ``1 - mean(v_K) / mean(v_{3K/4})``, the relative improvement
  of the mean curve over the last quarter of training (the checkpoint nearest ``3K/4``), with a
  delta-method interval (``gcflows.stats.paired_ratio``): a run has "converged" when it is
  below a threshold (5 % in docs/convergence.md).
- :func:`paired_difference`: ``method - baseline`` per seed at one checkpoint, Student-t
  interval (``gcflows.stats.Interval``).
- :func:`band`: mean and 95 % Student-t half-width per checkpoint, for figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gcflows.checks import bad, is_int, is_real
from gcflows.stats import Interval, paired_ratio

__all__ = [
    "SpeedUp",
    "steps_to_reach",
    "speedup",
    "last_quarter_improvement",
    "paired_difference",
    "band",
]


def _curve(values, steps, name: str = "values") -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    if s.ndim != 1 or s.size < 1 or not np.all(np.diff(s) > 0) or not np.all(np.isfinite(s)):
        raise bad("steps", list(s), "use increasing finite checkpoint steps")
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != s.size:
        raise bad(name, tuple(v.shape), f"use shape (S, {s.size}): seeds x checkpoints")
    if np.isnan(v).any():
        raise bad(name, "nan", "use finite values (inf allowed: a diverged checkpoint)")
    return v, s


def _first_crossing(mean: np.ndarray, steps: np.ndarray, level: float) -> float:
    below = np.nonzero(mean <= level)[0]
    if below.size == 0:
        return math.inf
    j = int(below[0])
    if j == 0:
        return float(steps[0])
    v0, v1 = mean[j - 1], mean[j]
    if not np.isfinite(v0):
        return float(steps[j])
    frac = (v0 - level) / (v0 - v1)  # v0 > level >= v1
    return float(steps[j - 1] + frac * (steps[j] - steps[j - 1]))


def steps_to_reach(values, steps: Sequence[float], level: float) -> float:
    """First step at which the mean over seeds of ``values (S, C)`` (or one curve ``(C,)``) is
    ``<= level``, interpolated linearly between checkpoints; ``inf`` if never (module doc)."""
    v, s = _curve(values, steps)
    if not is_real(level) or math.isnan(float(level)):
        raise bad("level", level, "use a number")
    return _first_crossing(v.mean(0), s, float(level))


@dataclass(frozen=True)
class SpeedUp:
    """Steps a method needs to reach ``level`` as a ratio to the baseline's.

    ``ratio`` (point estimate on the seed means; ``inf``: the method never reaches the level,
    ``nan``: neither does the baseline), ``lo`` / ``hi`` the percentile bootstrap interval at
    ``confidence``, ``method_steps`` / ``base_steps`` the two step counts, ``level`` the level
    used, ``reached`` the share of bootstrap resamples in which the method reached it,
    ``first_step`` the first checkpoint: a baseline at the level there already (its curve does
    not improve on its first checkpoint, e.g. a metric that gets worse with training) leaves the
    factor undefined, whatever the ratio says (:meth:`describe`)."""

    ratio: float
    lo: float
    hi: float
    method_steps: float
    base_steps: float
    level: float
    reached: float
    n_boot: int
    confidence: float = 0.95
    first_step: float = math.nan

    def as_dict(self) -> dict:
        return dict(
            ratio=self.ratio,
            lo=self.lo,
            hi=self.hi,
            method_steps=self.method_steps,
            base_steps=self.base_steps,
            level=self.level,
            reached=self.reached,
            n_boot=self.n_boot,
            confidence=self.confidence,
            first_step=self.first_step,
        )

    def describe(self) -> str:
        """``"0.62 [0.41, 0.88]"``, ``"never reached"``, ``"1.3 [0.9, inf]"`` or, for a
        baseline at the level from its first checkpoint, ``"undefined: ..."``."""
        if self.base_steps <= self.first_step:
            return "undefined: CT is at this level from its first checkpoint (no improvement)"
        if math.isinf(self.ratio):
            return f"never reached (in {self.reached:.0%} of resamples it is)"
        if math.isnan(self.ratio):
            return "baseline never reaches the level"
        return f"{self.ratio:.3g} [{self.lo:.3g}, {self.hi:.3g}]"


def _ratio(m_steps: float, b_steps: float) -> float:
    if math.isinf(b_steps):
        return math.nan
    if math.isinf(m_steps):
        return math.inf
    return m_steps / b_steps


def speedup(
    method_values,
    base_values,
    steps: Sequence[float],
    level: float | None = None,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> SpeedUp:
    """Speed-up factor of a method against the baseline, paired by seed (module doc).

    ``method_values``, ``base_values``: ``(S, C)`` at the same ``steps``; ``level``: a fixed
    level, or None for the baseline's final mean (recomputed in every resample)."""
    m, s = _curve(method_values, steps, "method_values")
    b, _ = _curve(base_values, steps, "base_values")
    if m.shape != b.shape:
        raise bad("method_values", m.shape, f"use the baseline's shape {b.shape} (paired seeds)")
    if level is not None and (not is_real(level) or not math.isfinite(float(level))):
        raise bad("level", level, "use None (the baseline's final value) or a finite number")
    if not is_int(n_boot) or n_boot < 10:
        raise bad("n_boot", n_boot, "use an integer >= 10")
    if not is_real(confidence) or not 0 < float(confidence) < 1:
        raise bad("confidence", confidence, "use a float in (0, 1)")

    def one(rows: np.ndarray) -> tuple[float, float, float]:
        mm, bm = m[rows].mean(0), b[rows].mean(0)
        lev = float(bm[-1]) if level is None else float(level)
        ms, bs = _first_crossing(mm, s, lev), _first_crossing(bm, s, lev)
        return _ratio(ms, bs), ms, bs

    n = m.shape[0]
    ratio, ms, bs = one(np.arange(n))
    lev = float(b.mean(0)[-1]) if level is None else float(level)
    rng = np.random.default_rng(seed)
    boots = np.array([one(rng.integers(0, n, n))[0] for _ in range(n_boot)])
    reached = float(np.mean(np.isfinite(boots)))
    valid = np.sort(boots[~np.isnan(boots)])  # nan: the baseline missed in that resample
    if valid.size == 0:
        lo = hi = math.nan
    else:
        alpha = (1 - float(confidence)) / 2
        lo = float(valid[int(math.floor(alpha * (valid.size - 1)))])
        hi = float(valid[int(math.ceil((1 - alpha) * (valid.size - 1)))])
    return SpeedUp(ratio, lo, hi, ms, bs, lev, reached, int(n_boot), float(confidence), s[0])


def _nearest(steps: np.ndarray, step: float) -> int:
    return int(np.argmin(np.abs(steps - step)))


def last_quarter_improvement(values, steps: Sequence[float], level: float = 0.95) -> Interval:
    """``1 - mean(v[:, -1]) / mean(v[:, q])`` with ``q`` the checkpoint nearest to 3/4 of the
    last step; delta-method interval over seeds (``paired_ratio``). Positive: still improving."""
    v, s = _curve(values, steps)
    if v.shape[0] < 2:
        raise bad("values", tuple(v.shape), "use at least 2 seeds for an interval")
    q = _nearest(s, 0.75 * s[-1])
    if q == s.size - 1:
        raise bad("steps", list(s), "use checkpoints that include one near 3/4 of the last")
    r = paired_ratio(torch.as_tensor(v[:, -1]), torch.as_tensor(v[:, q]), level=level)
    return Interval(1.0 - r.mean, r.se, r.n, r.method, r.level)


def paired_difference(method_values, base_values, level: float = 0.95) -> Interval:
    """``method - base`` per seed ``(S,)`` -> Student-t interval of the mean difference."""
    m = np.asarray(method_values, dtype=np.float64).reshape(-1)
    b = np.asarray(base_values, dtype=np.float64).reshape(-1)
    if m.shape != b.shape or m.size < 2:
        raise bad("method_values", m.shape, f"use {b.shape} paired values (>= 2 seeds)")
    return Interval.from_samples(m - b, "student-t", level)


def band(values, steps: Sequence[float], level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(C,)`` and Student-t half-width ``(C,)`` over seeds at every checkpoint."""
    v, _ = _curve(values, steps)
    mean = v.mean(0)
    hw = np.array([Interval.from_samples(col, "student-t", level).half_width for col in v.T])
    return mean, hw
