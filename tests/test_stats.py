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
    with pytest.raises(ValueError, match=r"den.mean\(\)=0.0 is invalid: the ratio is undefined"):
        paired_ratio(num, torch.zeros_like(den))
    with pytest.raises(ValueError, match=r"len\(num\)=1 is invalid: use at least 2 paired"):
        paired_ratio(num[:1], den[:1])
    with pytest.raises(ValueError, match="num and den must be paired values of one length"):
        paired_ratio(num[:3], den[:4])


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


@pytest.mark.parametrize("method", ["student-t", "delta-t"])
@pytest.mark.parametrize("level", [0.95, 0.8])
def test_t_intervals_use_student_quantiles_at_small_n(method, level):
    """Both Student-t methods take the t quantile with n - 1 degrees of freedom (scipy.stats.t as
    the reference; at n = 5 and 95 %: 2.776, against the normal 1.960)."""
    from scipy.stats import norm
    from scipy.stats import t as student_t

    n, se = 5, 0.3
    q = float(student_t.ppf(0.5 + level / 2, n - 1))
    est = Interval(1.0, se, n, method, level)
    assert est.half_width == pytest.approx(q * se, rel=1e-12)
    assert (est.lo, est.hi) == pytest.approx((1.0 - q * se, 1.0 + q * se), rel=1e-12)
    assert q > 1.15 * float(norm.ppf(0.5 + level / 2))  # the slip it guards against is visible
    if level == 0.95:
        assert q == pytest.approx(2.776445, rel=1e-6)  # the table value, independent of scipy
    if method == "student-t":
        v = torch.tensor([0.2, 1.1, -0.4, 2.0, 0.9], dtype=torch.float64)
        est = Interval.from_samples(v, method, level)
        assert est.half_width == pytest.approx(q * float(v.std()) / math.sqrt(n), rel=1e-12)
    # the normal-quantile methods keep the normal quantile at the same n
    assert Interval(1.0, se, n, "paired-ratio", level).half_width == pytest.approx(
        float(norm.ppf(0.5 + level / 2)) * se, rel=1e-12
    )


def test_paired_ratio_standard_error_is_the_written_out_delta_method():
    """se = std(num - r den) / sqrt(n) / |mean(den)| by hand, with mean(den) far from 1 (8.0) so
    that a missing division is a factor 8; stratified: the within-stratum form, divided alike."""
    num = torch.tensor([3.0, 5.5, 2.0, 7.0, 4.5, 6.0], dtype=torch.float64)
    den = torch.tensor([6.0, 9.0, 5.0, 11.0, 8.0, 9.0], dtype=torch.float64)
    r = float(num.sum() / den.sum())
    resid = [a - r * b for a, b in zip(num.tolist(), den.tolist(), strict=True)]
    mean_res = sum(resid) / 6
    sd = math.sqrt(sum((x - mean_res) ** 2 for x in resid) / 5)
    est = paired_ratio(num, den)
    assert est.mean == pytest.approx(28.0 / 48.0, rel=1e-12)
    assert est.se == pytest.approx(sd / math.sqrt(6) / 8.0, rel=1e-12)
    assert est.n == 6 and est.method == "paired-ratio"
    strat = paired_ratio(num, den, stratified=True)
    d = [resid[0] - resid[1], resid[2] - resid[3], resid[4] - resid[5]]
    assert strat.se == pytest.approx(math.sqrt(sum(x * x for x in d) / 4) / 3 / 8.0, rel=1e-12)
    # a negative mean(den) divides by its absolute value: se stays positive
    neg = paired_ratio(num, -den)
    assert neg.mean == pytest.approx(-r, rel=1e-12) and neg.se == pytest.approx(est.se, rel=1e-12)
