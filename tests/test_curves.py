"""Learning-curve statistics on synthetic curves with a known answer."""

import math

import numpy as np
import pytest

from gcflows.curves import (
    band,
    last_quarter_improvement,
    paired_difference,
    speedup,
    steps_to_reach,
)

STEPS = np.arange(1, 13) * 100.0  # 12 checkpoints, 100 ... 1200


def _exp_curves(rate, floor=1.0, scale=9.0, n_seeds=10, noise=0.0, seed=0):
    """v_s(k) = floor + scale exp(-rate k) (+ per-seed multiplicative noise)."""
    rng = np.random.default_rng(seed)
    base = floor + scale * np.exp(-rate * STEPS)
    return base[None] * (1 + noise * rng.standard_normal((n_seeds, STEPS.size)))


def test_steps_to_reach_interpolates_between_checkpoints():
    v = np.array([[10.0, 6.0, 2.0, 1.0], [10.0, 6.0, 2.0, 1.0]])
    steps = [0, 10, 20, 30]
    assert steps_to_reach(v, steps, 6.0) == 10.0
    assert steps_to_reach(v, steps, 4.0) == pytest.approx(15.0)  # halfway from 6 to 2
    assert steps_to_reach(v, steps, 10.0) == 0.0  # reached at the first checkpoint
    assert steps_to_reach(v, steps, 0.5) == math.inf  # never reached
    # the mean over seeds is used, not any one seed
    two = np.array([[10.0, 4.0, 1.0], [10.0, 8.0, 1.0]])  # mean 10, 6, 1
    assert steps_to_reach(two, [0, 10, 20], 6.0) == 10.0


def test_speedup_of_a_curve_twice_as_fast_is_one_half():
    """The method's curve is the baseline's at twice the rate: v_m(k) = v_b(2k), so every level
    is reached in half the steps; with interpolation between checkpoints the factor is 0.5 up to
    the interpolation error of an exponential over one checkpoint gap (a few %)."""
    base = _exp_curves(0.002)
    fast = _exp_curves(0.004)
    fixed = 1.0 + 9.0 * math.exp(-0.002 * 800)  # the baseline reaches it at step 800
    s = speedup(fast, base, STEPS, level=fixed, n_boot=200)
    assert s.base_steps == pytest.approx(800.0)
    assert s.ratio == pytest.approx(0.5, rel=0.04)
    assert s.method_steps == pytest.approx(400.0, rel=0.04)
    # no seed noise: every resample gives the same answer
    assert s.lo == pytest.approx(s.ratio) and s.hi == pytest.approx(s.ratio)
    assert s.reached == 1.0
    # and the slower one is the inverse
    slow = speedup(base, fast, STEPS, level=fixed, n_boot=200)
    assert slow.ratio == pytest.approx(2.0, rel=0.04)


def test_speedup_at_the_baselines_final_quality():
    """Default level: the baseline's final mean (reached by it at its last step, 1200)."""
    base = _exp_curves(0.002)
    fast = _exp_curves(0.004)
    s = speedup(fast, base, STEPS, n_boot=100)
    assert s.level == pytest.approx(base.mean(0)[-1])
    assert s.base_steps == 1200.0
    assert s.ratio == pytest.approx(0.5, rel=0.04)


def test_never_reached_is_an_answer():
    base = _exp_curves(0.004)
    plateau = _exp_curves(0.004, floor=2.0)  # never gets below 2, the baseline ends near 1.07
    s = speedup(plateau, base, STEPS, n_boot=100)
    assert s.ratio == math.inf and s.method_steps == math.inf
    assert s.reached == 0.0 and s.hi == math.inf
    assert "never reached" in s.describe()
    # the baseline never reaching a fixed level: nan
    s2 = speedup(base, plateau, STEPS, level=1.5, n_boot=100)
    assert math.isnan(s2.ratio)


def test_a_baseline_that_gets_worse_leaves_the_factor_undefined():
    """A baseline whose final value is no better than its first checkpoint (a metric that
    worsens with training) is at its 'final quality' from the start: every method 'reaches' it
    there and the ratio 1 says nothing; describe() says so. A baseline that first reaches the
    level at its second checkpoint is an ordinary factor."""
    rising = _exp_curves(0.004)[:, ::-1].copy()  # worse at every checkpoint
    s = speedup(_exp_curves(0.004), rising, STEPS, n_boot=50)
    assert s.ratio == 1.0 and s.base_steps == STEPS[0] == s.first_step
    assert s.describe().startswith("undefined")
    ok = speedup(_exp_curves(0.004), _exp_curves(0.002), STEPS, level=None, n_boot=50)
    assert ok.base_steps > STEPS[0] and not ok.describe().startswith("undefined")


def test_bootstrap_interval_covers_the_truth_and_pairs_the_seeds():
    """Noisy seeds (5 % multiplicative, 10 seeds): over 8 replicates the 95 % interval covers
    the noiseless answer (exactly 0.5: the crossings fall on checkpoints) at least 6 times (a
    percentile bootstrap over 10 seeds under-covers a little; a broken pairing or a wrong
    quantile covers far less or is far wider), and is never degenerate."""
    fixed = 1.0 + 9.0 * math.exp(-0.002 * 800)
    truth = speedup(_exp_curves(0.004), _exp_curves(0.002), STEPS, level=fixed, n_boot=10).ratio
    assert truth == pytest.approx(0.5)
    covered = 0
    for r in range(8):
        base = _exp_curves(0.002, noise=0.05, seed=2 * r + 1)
        fast = _exp_curves(0.004, noise=0.05, seed=2 * r + 2)
        s = speedup(fast, base, STEPS, level=fixed, n_boot=300, seed=r)
        assert s.lo < s.ratio < s.hi
        assert 0.4 < s.lo and s.hi < 0.6
        covered += s.lo <= truth <= s.hi
    assert covered >= 6


def test_last_quarter_improvement_closed_form():
    """Checkpoint nearest 3/4 of 1200 is 900: 1 - v(1200) / v(900)."""
    v = _exp_curves(0.002)
    iq = last_quarter_improvement(v, STEPS)
    want = 1 - (1 + 9 * math.exp(-2.4)) / (1 + 9 * math.exp(-1.8))
    assert iq.mean == pytest.approx(want, rel=1e-12)
    assert iq.se == pytest.approx(0.0, abs=1e-12)
    # a flat curve: 0; a curve that gets worse: negative
    assert last_quarter_improvement(np.ones((3, 12)), STEPS).mean == 0.0
    assert last_quarter_improvement(v[:, ::-1], STEPS).mean < 0


def test_paired_difference_and_band():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([0.5, 1.5, 2.5, 3.7])
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(0.45)
    assert d.method == "student-t" and d.n == 4
    assert d.lo > 0  # the pairing removes the seed-to-seed spread
    mean, hw = band(np.stack([a, b], 1), [1, 2])
    np.testing.assert_allclose(mean, [2.5, 2.05])
    assert hw[0] > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps="):
        steps_to_reach(np.ones((2, 3)), [0, 2, 1], 1.0)
    with pytest.raises(ValueError, match="values="):
        steps_to_reach(np.ones((2, 4)), [0, 1, 2], 1.0)
    with pytest.raises(ValueError, match="method_values="):
        speedup(np.ones((2, 3)), np.ones((3, 3)), [0, 1, 2])
    with pytest.raises(ValueError, match="level="):
        speedup(np.ones((2, 3)), np.ones((2, 3)), [0, 1, 2], level=math.inf)
    with pytest.raises(ValueError, match="values="):
        steps_to_reach(np.full((2, 3), np.nan), [0, 1, 2], 1.0)
