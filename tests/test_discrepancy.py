"""Tests of gcflows.discrepancy: Theorem 1 (docs/paper.md section 3) and the proxy R~_t (Eq. 17).

Oracles: a single Gaussian, whose flow map is linear with ``df/dx`` a multiple of the identity
and whose posterior covariance is constant, gives ``R(theta)`` in closed form; finite differences
check the Jacobian-vector products; the mixture's exact velocity checks the proxy. float64
throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.integrate import quad
from torch import nn

from gcflows import discrepancy as dsc
from gcflows.discrepancy import derivatives
from gcflows.discrepancy.derivatives import _jacobian_products
from gcflows.gmm import GaussianMixture, two_gaussians_1to2
from gcflows.processes import LinearProcess, VEProcess
from gcflows.stats import Interval
from gcflows.velocity import TrueVelocity

VE = VEProcess(t_min=1e-3, t_max=5.0)
LIN = LinearProcess(t_min=1e-3, t_max=0.999)


class TinyModel(nn.Module):
    """A smooth consistency-like function of ``(x, t)`` that keeps ``t`` differentiable."""

    def __init__(self, dim: int = 2, hidden: int = 16, seed: int = 0, t_min: float = 1e-3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(dim + 1, hidden, generator=g, dtype=torch.float64))
        self.b1 = nn.Parameter(0.1 * torch.randn(hidden, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=torch.float64) / 4)
        self.t_min = t_min

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([x / torch.sqrt(0.25 + t[:, None] ** 2), torch.log(t)[:, None] / 4], 1)
        c_skip = 0.25 / ((t - self.t_min) ** 2 + 0.25)
        c_out = 0.5 * (t - self.t_min) / torch.sqrt(0.25 + t**2)
        return c_skip[:, None] * x + c_out[:, None] * (
            torch.tanh(feats @ self.w1 + self.b1) @ self.w2
        )


class GaussianFlowMap(nn.Module):
    """Exact flow map to ``t_min`` of ``data ~ N(m, s^2 I)`` under an affine process.

    ``x_t ~ N(a(t) m, sigma(t)^2 I)`` with ``sigma(t)^2 = a^2 s^2 + b^2``; the PF-ODE maps
    standardised points to standardised points: ``f(x, t) = a0 m + (sigma0 / sigma(t)) (x - a m)``.
    """

    def __init__(self, mean: torch.Tensor, std: float, process):
        super().__init__()
        self.mean, self.std, self.process = mean, std, process

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.process.a(t) ** 2 * self.std**2 + self.process.b(t) ** 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t0 = torch.full_like(t, self.process.t_min)
        scale = (self.sigma(t0) / self.sigma(t))[:, None]
        a, a0 = self.process.a(t)[:, None], self.process.a(t0)[:, None]
        return a0 * self.mean + scale * (x - a * self.mean)


def _single_gaussian(std: float, mean=(0.3, -0.2)) -> tuple[GaussianMixture, torch.Tensor]:
    m = torch.tensor([mean], dtype=torch.float64)
    return GaussianMixture([1.0], m, stds=std), m[0]


def _r_closed_form(std: float, process, dim: int = 2) -> float:
    """``R = int d s^2 sigma0^2 / sigma(t)^4 dt`` (lambda = 1).

    ``J = (sigma0 / sigma) I`` and, for VE and linear,
    ``Cov[xdot | x_t] = (a' - b' a / b)^2 Cov[data | x_t] = (s^2 / sigma^2) I``.
    """

    def sig2(t: float) -> float:
        a = 1.0 if process.name == "ve" else 1.0 - t
        return a * a * std * std + t * t

    s0 = sig2(process.t_min)
    val, _ = quad(
        lambda t: dim * std**2 * s0 / sig2(t) ** 2,
        process.t_min,
        process.t_max,
        limit=400,
        epsabs=0,
        epsrel=1e-12,
        points=[std] if std < process.t_max else None,
    )
    return val


def _ve_antiderivative(std: float, t_min: float, t_max: float, dim: int = 2) -> float:
    """VE: ``int dt / (s^2 + t^2)^2 = t / (2 s^2 (s^2 + t^2)) + atan(t / s) / (2 s^3)``."""
    s = std

    def prim(t: float) -> float:
        return t / (2 * s**2 * (s**2 + t**2)) + math.atan(t / s) / (2 * s**3)

    return dim * s**2 * (s**2 + t_min**2) * (prim(t_max) - prim(t_min))


# ------------------------------------------------------------------------------------------------
# derivatives
# ------------------------------------------------------------------------------------------------
def test_directional_derivative_matches_central_differences():
    g = torch.Generator().manual_seed(3)
    model = TinyModel()
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = 0.01 + 4.0 * torch.rand(64, generator=g, dtype=torch.float64)
    w = torch.randn(64, 2, generator=g, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        fd = (model(x + eps * w, t + eps) - model(x - eps * w, t - eps)) / (2 * eps)
        by_jvp = dsc.directional_derivative(model, x, t, w, VE, time_derivative="jvp")
        by_fd = dsc.directional_derivative(model, x, t, w, VE, time_derivative="fd")
    # central differences in float64 with eps = 1e-5: truncation ~eps^2 |f'''| ~ 1e-10,
    # round-off ~1e-16 / eps ~ 1e-11
    torch.testing.assert_close(by_jvp, fd, rtol=1e-7, atol=1e-8)
    # the one-sided second-order time difference with step 1e-3 t: error ~(1e-3 t)^2 |f'''|
    torch.testing.assert_close(by_fd, by_jvp, rtol=1e-4, atol=1e-5)


def test_time_difference_at_the_domain_ends():
    """At t_min the difference goes forward, at t_max backward; both stay inside the domain."""
    model = TinyModel()
    x = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([VE.t_min, VE.t_max], dtype=torch.float64)
    w = torch.zeros_like(x)
    with torch.no_grad():
        by_jvp = dsc.directional_derivative(model, x, t, w, VE, time_derivative="jvp")
        by_fd = dsc.directional_derivative(model, x, t, w, VE, time_derivative="fd")
    torch.testing.assert_close(by_fd, by_jvp, rtol=1e-4, atol=1e-6)


def test_r_integrand_matches_brute_force_jacobian():
    """||J (xdot - v)||^2 by JVP = the same with the full Jacobian from central differences."""
    g = torch.Generator().manual_seed(5)
    model = TinyModel()
    gmm = two_gaussians_1to2(std=0.05)
    n = 32
    data = gmm.sample(n, g)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = 0.005 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    vel = TrueVelocity(gmm, VE)
    with torch.no_grad():
        got = dsc.r_integrand(model, data, noise, t, VE, vel, form="jacobian")
        x = VE.interpolate(data, noise, t)
        diff = VE.xdot(data, noise, t) - vel(x, t)
        eps = 1e-6
        cols = []
        for k in range(2):
            e = torch.zeros(1, 2, dtype=torch.float64)
            e[0, k] = eps
            cols.append((model(x + e, t) - model(x - e, t)) / (2 * eps))
        jac = torch.stack(cols, dim=2)  # (B, d_out, d_in)
        brute = ((jac @ diff[:, :, None])[:, :, 0] ** 2).sum(1)
        # alpha = 1, difference form against brute-force derivatives along (w, 1)
        got1 = dsc.r_integrand(model, data, noise, t, VE, vel, alpha=1.0, time_derivative="jvp")

        def along(w):
            return (model(x + eps * w, t + eps) - model(x - eps * w, t - eps)) / (2 * eps)

        xdot = VE.xdot(data, noise, t)
        brute1 = along(xdot).norm(dim=1) - along(vel(x, t)).norm(dim=1)
    torch.testing.assert_close(got, brute, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(got1, brute1, rtol=1e-6, atol=1e-8)


def test_posterior_form_is_the_posterior_average_of_eq11():
    """tr(J Cov[xdot | x] J^T) = E[||J (xdot - v)||^2 | x] over exact posterior draws."""
    g = torch.Generator().manual_seed(7)
    model = TinyModel()
    gmm = two_gaussians_1to2(std=0.05)
    x = torch.tensor([[0.02, 0.1], [0.3, -0.4]], dtype=torch.float64)
    t = torch.tensor([0.3, 0.05], dtype=torch.float64)
    vel = TrueVelocity(gmm, VE)
    n = 20_000
    with torch.no_grad():
        exact = dsc.posterior_jacobian_trace(model, x, t, VE, gmm)
        for j in range(2):
            xs, ts = x[j].expand(n, 2).contiguous(), t[j].expand(n).contiguous()
            data = gmm.sample_posterior(xs, ts, VE, generator=g)
            noise = (xs - data) / ts[:, None]  # the pair given x_t, exactly
            vals = dsc.r_integrand(model, data, noise, ts, VE, vel, form="jacobian")
            est = Interval.from_samples(vals)
            # k = 4 standard errors: a false alarm has probability ~6e-5 per point
            assert abs(est.mean - float(exact[j])) < 4 * est.se, (j, est, float(exact[j]))


# ------------------------------------------------------------------------------------------------
# R(theta) in closed form (single Gaussian, exact flow map)
# ------------------------------------------------------------------------------------------------
def test_ve_closed_form_agrees_with_quadrature():
    for std in (0.01, 0.5, 2.0):
        assert _ve_antiderivative(std, VE.t_min, VE.t_max) == pytest.approx(
            _r_closed_form(std, VE), rel=1e-8
        )


@pytest.mark.parametrize("process", [VE, LIN], ids=["ve", "linear"])
@pytest.mark.parametrize("std", [0.05, 0.5])
def test_r_theta_single_gaussian_closed_form(process, std):
    gmm, mean = _single_gaussian(std)
    model = GaussianFlowMap(mean, std, process)
    g = torch.Generator().manual_seed(11)
    truth = _r_closed_form(std, process)
    post = dsc.r_theta(model, gmm, process, n_samples=4000, generator=g)
    jac = dsc.r_theta(model, gmm, process, form="jacobian", n_samples=20_000, generator=g)
    diff = dsc.r_theta(
        model,
        gmm,
        process,
        form="difference",
        time_derivative="jvp",
        n_samples=20_000,
        generator=g,
    )
    for est in (post, jac, diff):
        # unbiased estimators: within 4 standard errors (false alarm ~6e-5 each); the posterior
        # form has no noise from the pair, so its interval is narrow and the check strict
        assert abs(est.mean - truth) < 4 * est.se + 1e-9 * truth, (est, truth)
    assert post.se < 0.2 * jac.se  # the posterior form removes the pair's noise


# ------------------------------------------------------------------------------------------------
# discrete losses
# ------------------------------------------------------------------------------------------------
def test_interval_probs_and_intervals():
    for n in (1, 7, 64):
        p = dsc.interval_probs(n, VE)
        assert p.shape == (n,) and bool((p > 0).all())
        torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    u = dsc.stratified_uniforms(1000, torch.Generator().manual_seed(0))
    t, q = dsc.sample_times(u, VE)
    torch.testing.assert_close(dsc.time_cdf(t, VE), u, rtol=0, atol=1e-12)
    idx, t_lo, t_hi = dsc.grid_interval(t, 10, VE)
    grid = torch.linspace(VE.t_min, VE.t_max, 11, dtype=torch.float64)
    assert bool(((grid[idx] <= t) & (t <= grid[idx + 1])).all())
    torch.testing.assert_close(t_lo, grid[idx], rtol=0, atol=1e-15)
    torch.testing.assert_close(t_hi, grid[idx + 1], rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", ["ct", "cd"])
def test_discrete_terms_match_the_training_objective(method):
    """The losses of Theorem 1 are the library's training losses on a uniform grid."""
    from gcflows.consistency import ConsistencyObjective
    from gcflows.processes import uniform_grid

    gmm = two_gaussians_1to2(std=0.05)
    model = TinyModel()
    g = torch.Generator().manual_seed(8)
    n, b = 16, 64
    data = gmm.sample(b, g)
    noise = torch.randn(b, 2, generator=g, dtype=torch.float64)
    objective = ConsistencyObjective(
        VE,
        method,
        distance="squared_l2",
        fixed_grid=uniform_grid(n, VE.t_min, VE.t_max),
        index_probs="uniform",
        velocity=TrueVelocity(gmm, VE) if method == "cd" else None,
    )
    out = objective(model, data, generator=torch.Generator().manual_seed(3), noise=noise)
    idx = out.diagnostics["index"]
    d_ct, d_cd = dsc.discrete_terms(model, data, noise, idx, n, VE, gmm)
    # same float64 arithmetic up to the order of operations
    torch.testing.assert_close(out.diagnostics["distance"], d_ct if method == "ct" else d_cd)
    weight = n / (VE.t_max - VE.t_min)  # lambda_i = 1 / (t_{i+1} - t_i)
    torch.testing.assert_close(out.loss, weight * out.diagnostics["distance"].mean())


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10])
def test_grid_interval_contains_t_and_has_width_t_over_n(n):
    """Each draw t lands in [t_min + i T / N, t_min + (i + 1) T / N] (not T / (N + 1))."""
    u = dsc.stratified_uniforms(400, torch.Generator().manual_seed(n))
    t, _ = dsc.sample_times(u, VE)
    t = torch.cat([t, torch.tensor([VE.t_min, VE.t_max], dtype=torch.float64)])
    idx, t_lo, t_hi = dsc.grid_interval(t, n, VE)
    span = VE.t_max - VE.t_min
    assert bool(((t_lo <= t) & (t <= t_hi)).all())
    torch.testing.assert_close(t_hi - t_lo, torch.full_like(t, span / n), rtol=0, atol=1e-12)
    expected = ((t - VE.t_min) * n / span).floor().long().clamp(0, n - 1)
    assert torch.equal(idx, expected)
    assert dsc.interval_probs(n, VE).shape == (n,)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_loss_gaps_at_small_n_equal_the_average_of_the_discrete_terms(n):
    """L(N) = (1/N) sum_i E D(f(x_teacher, t_i), f(x_{t_{i+1}}, t_{i+1})), computed here by hand
    on the grid t_i = t_min + i T / N with its own draws, against loss_gaps (importance-sampled
    interval index): agreement within 4.5 combined standard errors for CT, CD and the gap."""
    gmm = two_gaussians_1to2(std=0.2)
    process = VEProcess(t_min=0.01, t_max=2.0)
    model = TinyModel(t_min=0.01)
    vel = TrueVelocity(gmm, process)
    (res,) = dsc.loss_gaps(
        model, gmm, process, [n], ["squared_l2"], n_samples=8000,
        generator=torch.Generator().manual_seed(10 + n),
    )  # fmt: skip
    g = torch.Generator().manual_seed(20 + n)
    h = (process.t_max - process.t_min) / n
    per_interval = {"ct": [], "cd": []}
    m = 4000
    with torch.no_grad():
        for i in range(n):
            lo = torch.full((m,), process.t_min + i * h, dtype=torch.float64)
            hi = torch.full((m,), process.t_min + (i + 1) * h, dtype=torch.float64)
            data = gmm.sample(m, g)
            noise = torch.randn(m, 2, generator=g, dtype=torch.float64)
            y = process.interpolate(data, noise, hi)
            student = model(y, hi)
            teachers = {
                "ct": process.interpolate(data, noise, lo),
                "cd": y + (lo - hi)[:, None] * vel(y, hi),
            }
            for key, x_teacher in teachers.items():
                d = ((model(x_teacher, lo) - student) ** 2).sum(1)
                per_interval[key].append(d)
    ref = {
        k: Interval(
            float(torch.stack(v).mean()),
            math.sqrt(sum(float(x.var()) / m for x in v)) / n,
            n * m,
        )
        for k, v in per_interval.items()
    }
    diff = torch.stack(per_interval["ct"]) - torch.stack(per_interval["cd"])
    ref_gap = n**2 * float(diff.mean())
    ref_gap_se = n**2 * math.sqrt(sum(float(x.var()) / m for x in diff)) / n
    for got, want in ((res.loss_ct, ref["ct"]), (res.loss_cd, ref["cd"])):
        assert abs(got.mean - want.mean) < 4.5 * math.hypot(got.se, want.se), (n, got, want)
    gap = res.scaled_gap
    assert abs(gap.mean - ref_gap) < 4.5 * math.hypot(gap.se, ref_gap_se), (n, gap, ref_gap)


def test_scaled_gap_converges_to_r_theta():
    """N^alpha (L_CT - L_CD) / (C T^(alpha-1) R) -> 1 at rate O(1/N) (module docstring)."""
    gmm = two_gaussians_1to2(std=0.2)
    process = VEProcess(t_min=0.01, t_max=2.0)
    model = TinyModel(t_min=0.01)
    g = torch.Generator().manual_seed(2)
    res = dsc.loss_gaps(
        model,
        gmm,
        process,
        [8, 64, 512],
        ["squared_l2", "l2_norm"],
        n_samples=4000,
        generator=g,
        time_derivative="jvp",
    )
    ratio = {(r.distance, r.n_intervals): r.ratio for r in res}
    for name in ("squared_l2", "l2_norm"):
        far, near = ratio[(name, 8)], ratio[(name, 64)]
        fine = ratio[(name, 512)]
        # O(1/N): the error shrinks by about 8x per step; at N = 512 it is below 2 % here (the
        # integrand varies on the scale 0.2 = the data std, h = 0.004), plus 4 standard errors
        assert abs(fine.mean - 1) < 0.02 + 4 * fine.se, (name, fine)
        assert abs(fine.mean - 1) < abs(near.mean - 1) < abs(far.mean - 1), (name, far, near)
    # the limit on these draws matches the independent estimate of R (alpha = 2)
    r_ind = dsc.r_theta(model, gmm, process, n_samples=4000, generator=g)
    lim = next(r for r in res if r.distance == "squared_l2").limit
    assert abs(lim.mean - 1.99 * r_ind.mean) < 4 * math.hypot(lim.se, 1.99 * r_ind.se)


def test_gradient_gap_vanishes_for_alpha_2_not_for_alpha_1():
    gmm = two_gaussians_1to2(std=0.2)
    process = VEProcess(t_min=0.01, t_max=2.0)
    model = TinyModel(t_min=0.01)
    g = torch.Generator().manual_seed(4)
    res = dsc.gradient_gaps(
        model,
        gmm,
        process,
        [16, 256],
        ["squared_l2", "l2_norm"],
        n_samples=2000,
        n_groups=4,
        generator=g,
    )
    by = {(r.distance, r.n_intervals): r for r in res}
    l2_coarse, l2_fine = by[("squared_l2", 16)], by[("squared_l2", 256)]
    # alpha = 2: with the zero-mean control variate the relative gap is O(1/N): 16x finer -> at
    # least 5x smaller (allowing for the noise floor reported alongside)
    assert l2_fine.relative_cv < l2_coarse.relative_cv / 5 + 3 * l2_fine.noise_cv
    # alpha = 1: the gap stays, far above its Monte-Carlo noise floor
    n1 = by[("l2_norm", 256)]
    assert n1.relative_debiased > 0.02 and n1.relative > 4 * n1.noise, n1


@pytest.mark.parametrize("process", [VE, LIN], ids=["ve", "linear"])
def test_ic_proxy_of_one_gaussian_is_the_closed_form(process):
    """One Gaussian ``N(m, diag(lam))``: ``Cov[data | x_t]`` does not depend on ``x_t``, so the
    proxy is exactly ``(a' - b' a / b)^2 sum_i lam_i b^2 / (a^2 lam_i + b^2)`` with no sampling
    spread (1e-10 relative; standard error below 1e-8). The one Interval type is returned."""
    lam = torch.tensor([0.04, 1.0, 0.25], dtype=torch.float64)
    gmm = GaussianMixture([1.0], [[0.3, -0.2, 0.1]], stds=lam.sqrt()[None])
    for t in (0.2 * process.t_max, 0.9 * process.t_max):
        got = dsc.ic_proxy(gmm, process, t, n_samples=256, generator=torch.Generator())
        tt = torch.tensor(t, dtype=torch.float64)
        a, b, da, db = process.a(tt), process.b(tt), process.da(tt), process.db(tt)
        want = float((da - db * a / b) ** 2 * (lam * b * b / (a * a * lam + b * b)).sum())
        assert isinstance(got, Interval)
        assert got.mean == pytest.approx(want, rel=1e-10)
        assert got.se < 1e-8


# ------------------------------------------------------------------------------------------------
# the proxy R~_t
# ------------------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**16), log_t=st.floats(math.log(2e-3), math.log(5.0)))
def test_ic_proxy_equals_monte_carlo(seed, log_t):
    t = math.exp(log_t)
    gmm = two_gaussians_1to2(std=0.05)
    g = torch.Generator().manual_seed(seed)
    exact = dsc.ic_proxy(gmm, VE, t, n_samples=2000, generator=g)
    data = gmm.sample(4000, g)
    noise = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    x = VE.interpolate(data, noise, t)
    mc = dsc.mc_proxy(VE.xdot(data, noise, t), gmm.velocity(x, t, VE))
    # two independent unbiased estimates: |difference| < 5 combined standard errors
    assert abs(exact.mean - mc.mean) < 5 * math.hypot(exact.se, mc.se), (t, exact, mc)


@pytest.mark.parametrize("process", [VE, LIN], ids=["ve", "linear"])
def test_knn_proxy_recovers_ic(process):
    gmm = two_gaussians_1to2(std=0.05)
    g = torch.Generator().manual_seed(9)
    times = (0.01, 0.3, 0.9) if process is LIN else (0.01, 0.3, 3.0)
    for t in times:
        exact = dsc.ic_proxy(gmm, process, t, n_samples=4000, generator=g)
        data = gmm.sample(6000, g)
        noise = torch.randn(6000, 2, generator=g, dtype=torch.float64)
        x_t, xdot = dsc.coupled_path("ic", data, noise, t, process)
        est = dsc.knn_proxy(x_t, xdot, k=32)
        # local-linear k-NN keeps a second-order smoothing bias (measured within 4 % at 6000
        # points in 2D over t in [0.002, 5]); 8 % relative plus 4 standard errors
        assert abs(est.mean - exact.mean) < 0.08 * exact.mean + 4 * est.se, (t, est, exact)


def test_coupled_path_kinds():
    gmm = two_gaussians_1to2()
    g = torch.Generator().manual_seed(0)
    data = gmm.sample(64, g)
    noise = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x_ic, xd_ic = dsc.coupled_path("ic", data, noise, 0.5, VE)
    torch.testing.assert_close(x_ic, data + 0.5 * noise)
    torch.testing.assert_close(xd_ic, noise)
    x_ot, xd_ot = dsc.coupled_path("ot", data, noise, 0.5, VE, ot_batch_size=32)
    # VE: xdot = the noise, re-paired within each batch of 32 (a permutation, cheaper pairs)
    for s in (0, 32):
        assert sorted(xd_ot[s : s + 32, 0].tolist()) == sorted(noise[s : s + 32, 0].tolist())
    assert ((x_ot - xd_ot * 0.5 - data) ** 2).sum() < 1e-20
    assert ((data - xd_ot) ** 2).sum() <= ((data - noise) ** 2).sum()
    ideal = dsc.FlowMapGenerator(gmm, VE)
    x_gc, xd_gc = dsc.coupled_path("gc", data, noise, 0.5, VE, gc_model=ideal)
    xhat = gmm.flow_map(data + 0.5 * noise, 0.5, VE)
    torch.testing.assert_close(x_gc, xhat + 0.5 * noise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xd_gc, noise)


# ------------------------------------------------------------------------------------------------
# the exact flow map
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", [VE, LIN], ids=["ve", "linear"])
def test_flow_map_reference_single_gaussian(process):
    gmm, mean = _single_gaussian(0.3)
    g = torch.Generator().manual_seed(1)
    ref = dsc.flow_map_reference(gmm, process, [process.t_min * 2, 0.5], 50, generator=g)
    closed = GaussianFlowMap(mean, 0.3, process)
    err = dsc.flow_map_error(closed, ref)
    assert err["times"] == pytest.approx([process.t_min * 2, 0.5])
    # ODE tolerance rtol 1e-8 -> squared errors far below 1e-12
    assert max(err["mse"]) < 1e-12
    ideal = dsc.FlowMapGenerator(gmm, process, rtol=1e-8, atol=1e-10)
    assert max(dsc.flow_map_error(ideal, ref)["mse"]) < 1e-12


def test_jacobian_products_equal_jvps():
    """With at least d directions the products come from the reverse-mode Jacobian (d passes);
    they equal one JVP per direction up to float64 rounding."""
    model = TinyModel()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(50, 2, generator=g, dtype=torch.float64)
    t = 0.01 + 4 * torch.rand(50, generator=g, dtype=torch.float64)
    ws = [torch.randn(50, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():  # as inside r_theta / loss_gaps
        for k in (1, 2, 3):  # k = 1 < d: the JVP path; k >= d: the Jacobian
            got = _jacobian_products(model, x, t, ws[:k])
            for g_k, w in zip(got, ws[:k], strict=True):
                want = dsc.jacobian_vector_product(model, x, t, w)
                torch.testing.assert_close(g_k, want, rtol=1e-12, atol=1e-14)


def test_row_chunks_give_the_same_values(monkeypatch):
    """Large batches are evaluated EVAL_ROWS rows at a time: the same values as one call (the
    model is row-wise), for the JVP, both time derivatives and the loss gaps built on them."""
    model, gmm = TinyModel(), two_gaussians_1to2()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(101, 2, generator=g, dtype=torch.float64)
    t = 0.01 + 4 * torch.rand(101, generator=g, dtype=torch.float64)
    w = torch.randn(101, 2, generator=g, dtype=torch.float64)

    def values():
        return [
            dsc.jacobian_vector_product(model, x, t, w),
            dsc.directional_derivative(model, x, t, w, VE),
            dsc.directional_derivative(model, x, t, w, VE, time_derivative="jvp"),
            *[
                torch.tensor([r.scaled_gap.mean, r.ratio.mean, r.loss_ct.mean])
                for r in dsc.loss_gaps(
                    model,
                    gmm,
                    VE,
                    [10, 1000],
                    n_samples=200,
                    generator=torch.Generator().manual_seed(5),
                )
            ],
        ]

    whole = values()
    monkeypatch.setattr(derivatives, "EVAL_ROWS", 16)  # 101 rows: six full chunks and a partial one
    for a, b in zip(values(), whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input_raises():
    gmm = two_gaussians_1to2()
    model = TinyModel()
    with pytest.raises(ValueError, match="alpha"):
        dsc.r_theta(model, gmm, VE, alpha=0.5, n_samples=10)
    with pytest.raises(ValueError, match="n_samples"):
        dsc.r_theta(model, gmm, VE, n_samples=11)
    with pytest.raises(ValueError, match="alpha = 2"):
        dsc.r_theta(model, gmm, VE, alpha=1.0, form="jacobian", n_samples=10)
    with pytest.raises(ValueError, match="distance='pseudo_huber_elementwise' is invalid: .*phi"):
        dsc.loss_gaps(model, gmm, VE, [4], ["pseudo_huber_elementwise"], n_samples=10)
    with pytest.raises(ValueError, match="n_intervals"):
        dsc.loss_gaps(model, gmm, VE, [0], n_samples=10)
    with pytest.raises(ValueError, match=r"len\(x_t\)=5 is invalid: use more than k \+ 1 = 11"):
        dsc.knn_proxy(torch.zeros(5, 2), torch.zeros(5, 2), k=10)
    with pytest.raises(ValueError, match=r"k=3 is invalid: use k >= d \+ 2 = 5"):
        dsc.knn_proxy(torch.zeros(20, 3), torch.zeros(20, 3), k=3, method="local_linear")
    with pytest.raises(ValueError, match="kind"):
        dsc.coupled_path("sinkhorn", torch.zeros(4, 2), torch.zeros(4, 2), 0.5, VE)
    with pytest.raises(ValueError, match="t must lie"):
        dsc.ic_proxy(gmm, VE, 10.0)
    with pytest.raises(ValueError, match="time_derivative='x' is invalid: use 'fd' or 'jvp'"):
        dsc.directional_derivative(
            model, torch.zeros(2, 2), torch.ones(2), torch.zeros(2, 2), VE, time_derivative="x"
        )
