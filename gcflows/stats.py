"""One interval type for every Monte-Carlo or across-seed estimate in gcflows.

:class:`Interval` holds a mean, its standard error ``se`` over ``n`` units, the two-sided
``level`` (default 95 %) and the ``method`` that produced them, which also fixes the quantile
``q`` of the interval ``[lo, hi] = mean -/+ q se``:

==================  =====================================================  ====================
method              standard error                                         quantile ``q``
==================  =====================================================  ====================
``"normal"``        ``std / sqrt(n)`` of i.i.d. values                     normal
``"student-t"``     ``std / sqrt(n)`` of i.i.d. values (few units: seeds,  Student's t, ``n - 1``
                    batches)                                               degrees of freedom
``"stratified"``    within-stratum variance of paired stratified draws     normal
                    (:func:`stratified_se`)
``"paired-ratio"``  delta method for ``mean(num) / mean(den)``             normal
                    (:func:`paired_ratio`)
``"delta-t"``       delta method from per-unit influence values            Student's t, ``n - 1``
``"exact"``         none (a known value, ``se = 0``)                       -
==================  =====================================================  ====================

With ``n = 1`` a Student-t interval is unbounded (``lo = -inf``, ``hi = inf``; written as null in
JSON) and the standard error of one value is ``nan``. ``Interval.as_dict()`` is what every
``results.json`` holds: ``{"mean", "se", "lo", "hi", "n", "method", "level"}``.

This module imports only numpy, scipy, torch and the standard library (layer 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gcflows import checks

__all__ = ["METHODS", "Interval", "stratified_se", "paired_ratio", "mean_interval"]

#: interval methods and whether their quantile is Student's t (else the normal quantile)
METHODS = {
    "normal": False,
    "student-t": True,
    "stratified": False,
    "paired-ratio": False,
    "delta-t": True,
    "exact": False,
}


def _quantile(level: float, method: str, n: int) -> float:
    if method == "exact":
        return 0.0
    if METHODS[method]:
        if n < 2:
            return math.inf
        from scipy.stats import t as student_t

        return float(student_t.ppf(0.5 + level / 2.0, n - 1))
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2.0)


@dataclass(frozen=True)
class Interval:
    """``mean`` with standard error ``se`` over ``n`` units; ``[lo, hi] = mean -/+ q se``.

    ``q`` is the two-sided ``level`` quantile of the normal law or of Student's t with ``n - 1``
    degrees of freedom, by ``method`` (module docstring).
    """

    mean: float
    se: float
    n: int
    method: str = "normal"
    level: float = 0.95

    def __post_init__(self) -> None:
        checks.choice(self.method, "method", METHODS, where="Interval")
        checks.real(self.level, "level", lo_open=0.0, hi_open=1.0, where="Interval")
        checks.integer(self.n, "n", lo=1, where="Interval")

    @property
    def half_width(self) -> float:
        """``q se`` (``inf`` for a Student-t interval of one unit, ``0`` for ``"exact"``)."""
        q = _quantile(self.level, self.method, self.n)
        if q == 0.0 or math.isinf(q):
            return q
        return q * self.se

    @property
    def lo(self) -> float:
        return self.mean - self.half_width

    @property
    def hi(self) -> float:
        return self.mean + self.half_width

    def contains(self, value: float) -> bool:
        """``lo <= value <= hi``."""
        return self.lo <= value <= self.hi

    def scaled(self, factor: float) -> Interval:
        """The interval of ``factor * mean`` (``factor`` taken as exact)."""
        return Interval(factor * self.mean, abs(factor) * self.se, self.n, self.method, self.level)

    def as_dict(self) -> dict:
        """``{"mean", "se", "lo", "hi", "n", "method", "level"}`` (floats may be inf / nan)."""
        return {
            "mean": self.mean,
            "se": self.se,
            "lo": self.lo,
            "hi": self.hi,
            "n": self.n,
            "method": self.method,
            "level": self.level,
        }

    @classmethod
    def exact(cls, value: float) -> Interval:
        """A known value: ``se = 0``, ``lo = hi = value``."""
        return cls(float(value), 0.0, 1, "exact")

    @classmethod
    def from_samples(
        cls, values: Tensor | np.ndarray | Iterable[float], method: str = "normal", level=0.95
    ) -> Interval:
        """Mean and standard error of per-unit values ``(n,)``.

        ``"normal"`` / ``"student-t"``: ``se = std / sqrt(n)`` (unbiased std; ``nan`` for one
        value). ``"stratified"``: rows ``2j, 2j + 1`` are the two draws of stratum ``j``
        (:func:`stratified_se`). NaN / inf values raise ``ValueError``.
        """
        checks.choice(method, "method", ("normal", "student-t", "stratified"))
        v = _as_float64(values, "values")
        n = v.numel()
        if n == 0:
            raise checks.bad("values", "[]", "pass at least one value")
        if method == "stratified":
            se = stratified_se(v)
        elif n > 1:
            se = float(v.std(unbiased=True)) / math.sqrt(n)
        else:
            se = math.nan
        return cls(float(v.mean()), se, n, method, level)


def _as_float64(values, name: str) -> Tensor:
    if torch.is_tensor(values):
        v = values.detach().cpu()
    else:
        v = torch.as_tensor(np.asarray(list(values) if not hasattr(values, "shape") else values))
    v = v.reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or inf; clean the input before calling")
    return v


def stratified_se(v: Tensor) -> float:
    """Standard error of the mean of stratified draws ``(n,)``, ``n`` even: rows ``2j, 2j + 1``
    are the two draws of stratum ``j`` of ``S = n / 2`` equal strata, and
    ``se^2 = sum_j (v_2j - v_2j+1)^2 / (4 S^2)`` (the within-stratum variance only)."""
    n = v.numel()
    if n < 2 or n % 2:
        raise checks.bad("values", f"<{n} values>", "stratified values come in pairs (even n >= 2)")
    d = v[0::2] - v[1::2]
    return math.sqrt(float((d * d).sum()) / 4.0) / (n // 2)


def paired_ratio(num: Tensor, den: Tensor, stratified: bool = False, level=0.95) -> Interval:
    """``mean(num) / mean(den)`` of paired values ``(n,)``, standard error by the delta method.

    ``Var(r) ~ Var(mean(num - r den)) / mean(den)^2``: pairing (common random numbers) makes it
    small when ``num`` and ``den`` move together; ``stratified`` as in
    :meth:`Interval.from_samples`.
    """
    num, den = _as_float64(num, "num"), _as_float64(den, "den")
    if num.shape != den.shape:
        raise ValueError(
            f"num and den must be paired values of one length, got {num.numel()} and {den.numel()}"
        )
    if num.numel() < 2:
        raise checks.bad("len(num)", num.numel(), "use at least 2 paired values")
    mden = float(den.mean())
    if mden == 0.0:
        fix = "the ratio is undefined; pass a denominator with a non-zero mean"
        raise checks.bad("den.mean()", mden, fix)
    r = float(num.mean()) / mden
    resid = num - r * den
    if stratified:
        se = stratified_se(resid)
    else:
        se = float(resid.std(unbiased=True)) / math.sqrt(resid.numel())
    return Interval(r, se / abs(mden), num.numel(), "paired-ratio", level)


def mean_interval(values: Iterable[float | None], level: float = 0.95) -> Interval | None:
    """Student-t interval over independent units (e.g. one metric over seeds); ``None`` values
    are dropped, and ``None`` is returned when nothing is left."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None
    return Interval.from_samples(v, "student-t", level)
