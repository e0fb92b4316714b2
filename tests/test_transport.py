"""Tests of gcflows.transport: IC / batch-OT / Sinkhorn costs, the GC cost curve c(t), Lemma 1 and
its corollaries (docs/paper.md section 4). Mathematics in float64; statistical checks state n, the
interval level and the generator seed."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcflows import gmm
from gcflows import transport as T
from gcflows.processes import LinearProcess, VEProcess
from gcflows.stats import Interval

PROCESSES = [VEProcess(), LinearProcess()]


def _gaussian(dim: int = 2, mean=(0.3, -0.2), std: float = 0.5) -> gmm.GaussianMixture:
    m = torch.tensor([list(mean)[:dim]], dtype=torch.float64)
    return gmm.GaussianMixture([1.0], m, stds=std)


# --- intervals ------------------------------------------------------------------------------------
def test_estimate_matches_student_t_interval():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    e = T.estimate(values, level=0.9)
    se = float(values.std(unbiased=True)) / 2.0
    assert e.mean == pytest.approx(3.5)
    assert e.se == pytest.approx(se) and e.method == "student-t" and e.n == 4
    # Student t, 3 degrees of freedom, two-sided 90 %: 2.353363
    assert e.hi - e.mean == pytest.approx(2.353363 * se, rel=1e-6)
    one = T.estimate(torch.tensor([2.0]))
    assert one.half_width == math.inf and one.lo == -math.inf and one.hi == math.inf


# --- IC and batch-OT ------------------------------------------------------------------------------
def test_ic_cost_of_one_gaussian_matches_closed_form():
    # E||data - noise||^2 = |m|^2 + d s^2 + d; n = 20000 pairs, 99.9 % interval (seed 0)
    g = torch.Generator().manual_seed(0)
    mix = _gaussian()
    data = mix.sample(20000, generator=g)
    noise = torch.randn(data.shape, generator=g, dtype=torch.float64)
    e = T.ic_cost(data, noise, level=0.999)
    assert e.lo <= T.gaussian_ic_cost(mix.means[0], 0.5) <= e.hi


class _Recorder:
    """A sampler that remembers every batch it returned."""

    def __init__(self, dim: int, scale: float) -> None:
        self.dim, self.scale, self.batches = dim, scale, []

    def __call__(self, n: int, generator) -> torch.Tensor:
        x = self.scale * torch.rand(n, self.dim, generator=generator, dtype=torch.float64)
        self.batches.append(x)
        return x


@given(
    batch=st.integers(1, 48),
    dim=st.integers(1, 6),
    n_batches=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_batch_ot_cost_equals_ot_emd2_on_the_same_batches(batch, dim, n_batches, seed):
    data = _Recorder(dim, 3.0)
    noise = _Recorder(dim, 1.0)
    g = torch.Generator().manual_seed(seed)
    res = T.batch_ot_cost(data, noise, batch, n_batches, g)
    assert len(res.per_batch) == n_batches == len(data.batches) == len(noise.batches)
    for cost, x, z in zip(res.per_batch, data.batches, noise.batches, strict=True):
        a = np.full(batch, 1.0 / batch)
        m = ot.dist(x.numpy(), z.numpy(), metric="sqeuclidean")
        exact = ot.emd2(a, a, m, numItermax=10**7)
        # both are float64 sums of B squared distances of size <= 9 dim: 1e-9 relative is
        # ~1e6 ulps of slack, far below any suboptimal assignment's excess
        assert cost == pytest.approx(exact, rel=1e-9, abs=1e-12)
        assert cost <= float(((x - z) ** 2).sum(1).mean()) + 1e-12  # identity is a permutation


def test_batch_ot_cost_decreases_with_batch_size():
    # E[cost(B)] is non-increasing in B: an optimal plan on 2B points is no worse than two optimal
    # plans on B points each. eight_gaussians (IC cost ~6), seed 1.
    # (a) independent batches: B = 16 over 64 batches against B = 128 over 16 batches; means
    #     about 1.8 and 1.15, standard errors <= 0.06: at 99 %, hi(128) + 0.3 < lo(16).
    g = torch.Generator().manual_seed(1)
    mix = gmm.eight_gaussians()
    small = T.batch_ot_cost(mix, None, 16, 64, g, level=0.99)
    large = T.batch_ot_cost(mix, None, 128, 16, g, level=0.99)
    assert large.cost.hi + 0.3 < small.cost.lo, (small.cost, large.cost)
    assert small.cost.hi < small.ic.lo  # batch-OT is below IC already at B = 16
    # (b) nested batches, 128 -> 512: 6 batches of 512 pairs, each also solved as its 4 blocks of
    #     128. The mean of the blocks' costs is >= the whole batch's cost in every batch (the
    #     blocks' permutations together are one permutation of the batch); the paired gap, about
    #     0.09 (8 %), is above 0.03 at 99 %.
    big = _Recorder(2, 1.0)
    big_noise = _Recorder(2, 1.0)

    def draw_mix(rec):
        def sampler(n, generator):
            x = mix.sample(n, generator=generator)
            rec.batches.append(x)
            return x

        return sampler

    def draw_noise(rec):
        def sampler(n, generator):
            z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
            rec.batches.append(z)
            return z

        return sampler

    whole = T.batch_ot_cost(draw_mix(big), draw_noise(big_noise), 512, 6, g)
    blocks_d = iter([b for x in big.batches for b in x.split(128)])
    blocks_z = iter([b for z in big_noise.batches for b in z.split(128)])
    parts = T.batch_ot_cost(
        lambda n, gen: next(blocks_d), lambda n, gen: next(blocks_z), 128, 24, g
    )
    block_mean = torch.tensor(parts.per_batch).reshape(6, 4).mean(1)
    gaps = block_mean - torch.tensor(whole.per_batch)
    assert bool((gaps >= -1e-12).all())
    assert T.estimate(gaps, level=0.99).lo > 0.03


def test_batch_ot_curve_uses_enough_batches():
    g = torch.Generator().manual_seed(2)
    out = T.batch_ot_curve(gmm.two_diracs(), None, (4, 32), n_pairs=64, generator=g, min_batches=3)
    assert [c.batch_size for c in out] == [4, 32]
    assert [c.cost.n for c in out] == [16, 3]


def test_sinkhorn_cost_lies_between_exact_ot_and_ic():
    # The entropic plan is a feasible plan (marginals within tol = 1e-6), so <P, C> >= the exact
    # OT cost up to tol * max C; with reg = 0.05 x mean cost in 2D it stays below IC.
    mix = gmm.eight_gaussians()
    ot_res = T.batch_ot_cost(mix, None, 64, 3, torch.Generator().manual_seed(3))
    sk_res = T.sinkhorn_cost(mix, None, 64, 3, torch.Generator().manual_seed(3), reg=0.05)
    assert sk_res.reg == 0.05
    for exact, entropic in zip(ot_res.per_batch, sk_res.per_batch, strict=True):
        # marginal error <= 1e-6 of mass, costs <= ~60 in this batch: slack 1e-6 * 100
        assert entropic >= exact - 1e-6 * 100
    assert sk_res.cost.mean < sk_res.ic.mean
    assert sk_res.ic.mean == pytest.approx(ot_res.ic.mean, rel=1e-12)  # the same batches


# --- the GC cost curve c(t) -----------------------------------------------------------------------
def test_sigma_grid_is_log_uniform_in_b_over_a():
    for p in PROCESSES:
        t = T.sigma_grid(p, 7)
        assert float(t[0]) == p.t_min and float(t[-1]) == p.t_max
        sig = (p.b(t) / p.a(t)).log()
        steps = sig[1:] - sig[:-1]
        torch.testing.assert_close(steps, steps.mean().expand(6), rtol=1e-10, atol=0)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_gc_cost_at_t_min_equals_ic_cost(process):
    # fo(x, t_min) = x_{t_min} = a data + b noise. For linear, fo - noise = (1 - t_min)(data -
    # noise) exactly, so c(t_min) = (1 - t_min)^2 c_IC on the same pairs (float64 rounding only).
    # For ve, c(t_min) - c_IC = (t_min^2 - 2 t_min) d in expectation (d = 2): we assert it within
    # the 99.9 % paired interval (n = 4000, seed 4), and the relative gap to IC below 0.3 %.
    mix = gmm.eight_gaussians()
    g = torch.Generator().manual_seed(4)
    curve = T.gc_cost_curve(mix, mix, process, [process.t_min], 4000, g, level=0.999)
    c0, ic = curve.points[0].mean, curve.ic.mean
    if process.name == "linear":
        assert c0 == pytest.approx((1 - process.t_min) ** 2 * ic, rel=1e-12)
    else:
        tm = process.t_min
        expected_gain = (2 * tm - tm**2) * 2
        assert curve.gain[0].lo <= expected_gain <= curve.gain[0].hi
    assert abs(c0 - ic) / ic < 3e-3


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_gc_cost_curve_of_one_gaussian_matches_closed_form(process):
    # n = 3000 pairs shared by 4 times; 99.9 % intervals (seed 5)
    mix = _gaussian()
    times = T.sigma_grid(process, 4)
    curve = T.gc_cost_curve(mix, mix, process, times, 3000, torch.Generator().manual_seed(5))
    exact = T.gaussian_cost_curve(times, process, mix.means[0], 0.5)
    for point, c in zip(curve.points, exact.tolist(), strict=True):
        e = Interval(point.mean, point.se, point.n, "student-t", 0.999)
        assert e.lo <= c <= e.hi
    # GC lowers the cost: at t_max the decrease is ~2 (IC 2.63 -> ~0.63), far outside the interval
    assert curve.gain[-1].lo > 1.5


def test_gc_cost_curve_accepts_a_model_and_the_closed_form_flow_map():
    # A callable model is used as given: the closed-form Gaussian flow map must reproduce the
    # numerical one of the mixture (same pairs: same seed) to the ODE tolerance.
    mix = _gaussian()
    process = VEProcess()
    times = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)

    def closed(x, t):
        return T.gaussian_flow_map(x, t, process, mix.means[0], 0.5)

    a = T.gc_cost_curve(closed, mix, process, times, 500, torch.Generator().manual_seed(6))
    b = T.gc_cost_curve(mix, mix, process, times, 500, torch.Generator().manual_seed(6), rtol=1e-9)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-8)


def test_gc_cost_curve_casts_for_an_nn_module_and_restores_its_mode():
    class Half(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float32))

        def forward(self, x, t):
            assert x.dtype == torch.float32 and t.shape == x.shape[:1]
            return self.w * x

    model = Half().train()
    mix = _gaussian()
    curve = T.gc_cost_curve(model, mix, VEProcess(), [1.0], 200, torch.Generator().manual_seed(7))
    assert model.training
    assert math.isfinite(curve.points[0].mean)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_segmented_ideal_flow_map_matches_a_tight_single_solve(process):
    # ideal_flow_map at its default rtol 1e-5 against GaussianMixture.flow_map at rtol 1e-9 from
    # t_max, in 64-D (8 well-separated components, 16 points). The failure the segmentation
    # prevents (a loose solve stepping over the mode choice) is tens of percent; dopri5 at rtol
    # 1e-5 leaves pointwise errors of ~5e-4 here, so endpoints within 2e-3 of their norm, and the
    # transport cost (what the experiments report) within 1e-4 relative.
    mix = gmm.random_mixture(64, 8, 64)
    g = torch.Generator().manual_seed(13)
    data = mix.sample(16, generator=g)
    x = process.interpolate(data, torch.randn(16, 64, generator=g, dtype=torch.float64),
                            process.t_max)  # fmt: skip
    tight = mix.flow_map(x, process.t_max, process, rtol=1e-9, atol=1e-11)
    seg = T.ideal_flow_map(mix, x, process.t_max, process)
    err = (seg - tight).norm(dim=1) / tight.norm(dim=1)
    assert float(err.max()) < 2e-3
    noise = (x - process.a(torch.tensor(process.t_max)) * data) / process.t_max
    cost = lambda f: float(((f - noise) ** 2).sum(1).mean())  # noqa: E731
    assert cost(seg) == pytest.approx(cost(tight), rel=1e-4)


# --- Lemma 1 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
@given(
    mean=st.lists(st.floats(-2, 2), min_size=3, max_size=3),
    std=st.lists(st.floats(0.05, 2.0), min_size=3, max_size=3),
    u=st.floats(0.02, 0.98),
)
def test_closed_form_derivative_is_the_slope_of_the_closed_form_curve(process, mean, std, u):
    # pure mathematics: central difference of the exact c(t) (h = 1e-6 t, error O(h^2) ~ 1e-10
    # relative, rounding ~ 1e-16 / 1e-6) against Lemma 1's exact right side
    lo, hi = math.log(process.t_min), math.log(process.t_max)
    t = math.exp(lo + u * (hi - lo))
    h = 1e-6 * t
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    c = T.gaussian_cost_curve(torch.tensor([t - h, t + h], dtype=torch.float64), process, m, s)
    slope = (c[1] - c[0]) / (2 * h)
    exact = T.gaussian_cost_derivative(torch.tensor([t], dtype=torch.float64), process, m, s)[0]
    torch.testing.assert_close(slope, exact, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_flow_map_jvp_of_one_gaussian_is_the_scalar_k(process):
    # one Gaussian: J = k(t) I exactly, k = sqrt(V(t_min) / V(t)); the tangent ODE at rtol 1e-9
    # reproduces it to 1e-6 relative, the finite-difference variant too
    mix = _gaussian()
    g = torch.Generator().manual_seed(8)
    t = T.sigma_grid(process, 5)
    x = process.interpolate(
        mix.sample(5, g), torch.randn(5, 2, generator=g, dtype=torch.float64), t
    )
    u = torch.randn(5, 2, generator=g, dtype=torch.float64)
    tm = torch.tensor(process.t_min, dtype=torch.float64)
    v = lambda s: process.a(s) ** 2 * 0.25 + process.b(s) ** 2  # noqa: E731
    k = torch.sqrt(v(tm) / v(t))[:, None]
    for method in ("tangent", "fd"):
        f, jw = T.flow_map_jvp(mix, x, t, process, u, method=method)
        torch.testing.assert_close(jw, k * u, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(f, T.gaussian_flow_map(x, t, process, mix.means[0], 0.5))


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_lemma1_both_sides_agree_for_one_gaussian(process):
    # n = 1500 pairs (seed 9), three interior times; 99.9 % intervals. Each side contains the
    # closed form and their paired difference contains 0. Finite-difference bias at h_rel = 1e-2 is
    # ~1e-4 relative, far inside the intervals (which are a few % wide).
    mix = _gaussian()
    times = T.sigma_grid(process, 5)[1:4]
    res = T.lemma1_check(
        mix, process, times, 1500, torch.Generator().manual_seed(9), rtol=1e-8, level=0.999
    )
    assert res.exact is not None
    for fd, lemma, diff, exact in zip(res.fd, res.lemma, res.diff, res.exact.tolist(), strict=True):
        assert fd.lo <= exact <= fd.hi
        assert lemma.lo <= exact <= lemma.hi
        assert diff.lo <= 0.0 <= diff.hi
    assert bool(res.agree().all())
    # Corollary 2's scale: S0_eff -> sqrt(a(t_min)^2 s^2 + b(t_min)^2) = 0.5 as t grows, not t_min
    s0 = T.effective_s0(res)
    assert float(s0[-1]) == pytest.approx(T.gaussian_s0(process, 0.25), rel=0.05)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_corollary1_cost_decreases_near_t_min_for_two_modes(process):
    # two Gaussians at (0, -0.5), (0, 0.5), std 0.01 (the authors' 2D target). Near t_min,
    # J ~ I and c'(t) ~ -2 g E||w||^2 ~ -3.8 g. n = 800 pairs (seed 10): both the measured slope
    # and Lemma 1's side are negative at 99.9 %.
    mix = gmm.two_gaussians_1to2()
    times = torch.tensor([1.5, 3.0], dtype=torch.float64) * process.t_min
    res = T.lemma1_check(
        mix, process, times, 800, torch.Generator().manual_seed(10), rtol=1e-8, level=0.999
    )
    for fd, lemma in zip(res.fd, res.lemma, strict=True):
        assert fd.hi < 0.0 and lemma.hi < 0.0
    assert bool(res.agree().all())


def test_corollary1_is_vacuous_for_dirac_data():
    # with Dirac components the noise is identified from x_t at small t: w ~ 0, so c'(t_min) ~ 0
    res = T.lemma1_check(
        gmm.two_diracs(), VEProcess(), [0.002], 200, torch.Generator().manual_seed(11), rtol=1e-8
    )
    assert res.w2[0].mean < 1e-12
    assert abs(res.lemma[0].mean) < 1e-10


def test_corollary2_prediction_uses_w2_and_the_scale():
    mix = _gaussian()
    process = VEProcess()
    res = T.lemma1_check(mix, process, [40.0, 80.0], 400, torch.Generator().manual_seed(12))
    pred = T.corollary2_prediction(res, s0=0.5)
    for p, w2, t in zip(pred, res.w2, (40.0, 80.0), strict=True):
        assert p.mean == pytest.approx(-2 * 0.5 / t * w2.mean, rel=1e-12)
    # in the scaling regime (one Gaussian, t >> std) the prediction sits inside Lemma 1's interval
    # widened by the approximation error of J ~ S0 / t (relative (s / t)^2 < 1e-3)
    for p, lemma in zip(pred, res.lemma, strict=True):
        assert abs(p.mean - lemma.mean) <= 4 * lemma.se + 1e-3 * abs(lemma.mean)


# --- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors():
    mix = _gaussian()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="batch_size"):
        T.batch_ot_cost(mix, None, 0, 2, g)
    with pytest.raises(ValueError, match="n_batches"):
        T.batch_ot_cost(mix, None, 4, 0, g)
    with pytest.raises(ValueError, match="level"):
        T.batch_ot_cost(mix, None, 4, 2, g, level=1.5)
    with pytest.raises(ValueError, match="times"):
        T.gc_cost_curve(mix, mix, VEProcess(), [100.0], 10, g)
    with pytest.raises(ValueError, match=r"times.shape=\(0,\) is invalid: it is empty"):
        T.gc_cost_curve(mix, mix, VEProcess(), [], 10, g)
    with pytest.raises(ValueError, match="type\\(f\\)='int' is invalid: use a GaussianMixture"):
        T.gc_cost_curve(3, mix, VEProcess(), [1.0], 10, g)
    with pytest.raises(ValueError, match="type\\(sample_data\\)='str' is invalid"):
        T.gc_cost_curve(mix, "data", VEProcess(), [1.0], 10, g)
    with pytest.raises(ValueError, match="same shape"):
        T.ic_cost(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        T.ic_cost(torch.full((3, 2), math.nan), torch.zeros(3, 2))
    with pytest.raises(
        ValueError, match=r"direction.shape=\(3, 3\) is invalid: use the shape of x \(3, 2\)"
    ):
        T.flow_map_jvp(mix, torch.zeros(3, 2, dtype=torch.float64), 1.0, "ve", torch.zeros(3, 3))
    with pytest.raises(ValueError, match="method='adjoint' is invalid"):
        T.flow_map_jvp(mix, torch.zeros(2, 2, dtype=torch.float64), 1.0, "ve", torch.zeros(2, 2),
                       method="adjoint")  # fmt: skip
    with pytest.raises(ValueError, match="h_rel"):
        T.lemma1_check(mix, "ve", [1.0], 10, g, h_rel=0.7)
    with pytest.raises(
        ValueError, match="type\\(mixture\\)='function' is invalid: use a GaussianMixture"
    ):
        T.lemma1_check(lambda x, t: x, "ve", [1.0], 10, g)
