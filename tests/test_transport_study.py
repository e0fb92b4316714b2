"""gcflows.transport_study: the comparisons of intervals, the pooled S0, the Lemma 1 time grid and
the profiles (the pieces the transport script's tables are built from)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gcflows import transport_study as ts
from gcflows.processes import get_process
from gcflows.stats import Interval


def _iv(mean: float, half: float) -> Interval:
    """An Interval with ``lo, hi = mean -+ half`` (se chosen so that 1.96 se = half)."""
    return Interval(mean, half / 1.959963984540054, 100)


def test_compare_needs_the_intervals_apart():
    a, b = _iv(1.0, 0.1), _iv(1.5, 0.1)
    assert ts.compare(a, b) == "<" and ts.compare(b, a) == ">"
    assert ts.compare(a, _iv(1.15, 0.1)) == "~"  # overlapping: no order claimed
    assert ts.compare_zero(_iv(-0.3, 0.1)) == "-" and ts.compare_zero(_iv(0.05, 0.1)) == "0?"
    # the gain is IC - cost: a positive gain means the coupled cost is below IC
    assert ts.compare_gain(_iv(0.3, 0.1)) == "<" and ts.compare_gain(_iv(-0.3, 0.1)) == ">"


def test_pooled_s0_weights_by_inverse_variance():
    est = [Interval(1.0, 0.1, 10), Interval(4.0, 0.2, 10)]
    # weights 100 and 25: (100 * 1 + 25 * 4) / 125 = 1.6 (a plain mean would be 2.5)
    assert ts.pooled_s0(est) == pytest.approx(1.6)
    assert ts.pooled_s0([Interval(1.0, 0.0, 1), Interval(4.0, 0.2, 10)]) == pytest.approx(2.5)


@pytest.mark.parametrize("name", ["ve", "linear"])
def test_lemma_times_span_the_process_and_are_sorted(name):
    p = get_process(name)
    t = ts.lemma_times(name)
    assert t[0] == pytest.approx(p.t_min) and t[1] == pytest.approx(1.5 * p.t_min)
    assert t[-1] == pytest.approx(p.t_max) and bool((t[1:] > t[:-1]).all())
    # t_max / 4 and / 2 in sigma: sigma(t) of the two points before t_max
    s = p.b(t[-3:-1]) / p.a(t[-3:-1])
    s_max = float(p.b(torch.tensor(p.t_max)) / p.a(torch.tensor(p.t_max)))
    assert s.tolist() == pytest.approx([s_max / 4, s_max / 2], rel=1e-9)


def test_profiles_are_typed_and_quick_is_smaller():
    quick, default = ts.PROFILES["quick"], ts.PROFILES["default"]
    assert set(dataclasses.asdict(quick)) == {f.name for f in dataclasses.fields(ts.Profile)}
    assert quick.ot_pairs < default.ot_pairs and quick.lemma_n < default.lemma_n
    assert set(quick.batch_sizes) <= set(ts.BATCH_SIZES) and default.dims == ts.SWEEP_DIMS
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.ot_pairs = 1
