"""Tests of gcflows.stats: the one interval type (quantiles, standard errors, methods)."""

from __future__ import annotations

import math

import pytest
import torch

from gcflows.stats import Interval, mean_interval, paired_ratio, stratified_se


def test_normal_and_student_t_intervals():
    v = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    se = float(v.std(unbiased=True)) / 2.0
    normal = Interval.from_samples(v)
    assert (normal.mean, normal.n, normal.method) == (3.5, 4, "normal")
    assert normal.se == pytest.approx(se)
    assert normal.hi - normal.mean == pytest.approx(1.959963985 * se, rel=1e-9)
    t90 = Interval.from_samples(v, "student-t", level=0.9)
    # Student t, 3 degrees of freedom, two-sided 90 %: 2.353363
    assert t90.half_width == pytest.approx(2.353363 * se, rel=1e-6)
    assert t90.lo == pytest.approx(3.5 - t90.half_width, rel=1e-12)
    assert t90.contains(3.5) and not t90.contains(3.5 + 1.01 * t90.half_width)


def test_one_unit_and_exact_values():
    one = Interval.from_samples([2.0], "student-t")
    assert math.isnan(one.se) and one.lo == -math.inf and one.hi == math.inf
    exact = Interval.exact(1.5)
    assert exact.lo == exact.hi == 1.5 and exact.as_dict()["method"] == "exact"


def test_stratified_standard_error_uses_within_stratum_differences():
    v = torch.tensor([1.0, 3.0, 10.0, 10.0], dtype=torch.float64)
    # strata (1, 3) and (10, 10): se^2 = (4 + 0) / (4 * 2^2) = 0.25
    assert stratified_se(v) == pytest.approx(0.5)
    est = Interval.from_samples(v, "stratified")
    assert est.se == pytest.approx(0.5) and est.mean == pytest.approx(6.0)
    with pytest.raises(ValueError, match="values"):
        stratified_se(torch.ones(3, dtype=torch.float64))


def test_paired_ratio_delta_method():
    g = torch.Generator().manual_seed(0)
    den = 1.0 + torch.rand(5000, generator=g, dtype=torch.float64)
    num = 2.0 * den + 0.01 * torch.randn(5000, generator=g, dtype=torch.float64)
    r = paired_ratio(num, den)
    assert r.method == "paired-ratio" and abs(r.mean - 2.0) < 4 * r.se
    # pairing: far tighter than the ratio of two independent means would be
    assert r.se < 0.1 * float(num.std()) / math.sqrt(5000) / float(den.mean())
    with pytest.raises(ValueError, match="den"):
        paired_ratio(num, torch.zeros_like(den))


def test_scaled_and_as_dict():
    e = Interval(2.0, 0.5, 10, "normal").scaled(-3.0)
    assert (e.mean, e.se) == (-6.0, 1.5)
    d = e.as_dict()
    assert set(d) == {"mean", "se", "lo", "hi", "n", "method", "level"}
    assert d["lo"] == pytest.approx(-6.0 - 1.959963985 * 1.5)


def test_mean_interval_over_seeds():
    assert mean_interval([None, None]) is None
    m = mean_interval([1.0, None, 3.0])
    assert m.n == 2 and m.mean == 2.0 and m.method == "student-t"


def test_bad_input():
    with pytest.raises(ValueError, match="Interval.method='bootstrap' is invalid"):
        Interval(1.0, 0.1, 3, "bootstrap")
    with pytest.raises(ValueError, match="level"):
        Interval(1.0, 0.1, 3, level=1.5)
    with pytest.raises(ValueError, match="NaN"):
        Interval.from_samples([1.0, float("nan")])
    with pytest.raises(ValueError, match="values"):
        Interval.from_samples([])
