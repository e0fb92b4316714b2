"""The Gaussian-mixture oracle (gcflows.gmm) checked against independent mathematics, in float64.

Independent references: torch.distributions (log-densities), autograd of log_prob (score, and
through Tweedie's formulas the denoiser and the posterior covariance), numerical quadrature
(normalisation), the orthogonality principle of conditional expectations under joint sampling,
Monte Carlo over exact posterior draws, and the closed-form linear flow map of one Gaussian.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

import gcflows.gmm as gmm_module
from gcflows.gmm import (
    PRESETS,
    GaussianMixture,
    eight_gaussians,
    get_preset,
    random_mixture,
    two_diracs,
    two_gaussians_1to2,
)
from gcflows.processes import LinearProcess, VEProcess, get_process

F64 = torch.float64
KINDS = ["iso", "diag", "full", "dirac"]


def make_mixture(seed: int, dim: int, k: int, kind: str) -> GaussianMixture:
    """A random mixture: random weights, means of scale 1, components of the given kind.

    ``full`` covariances are ``A A^T`` with ``A`` of shape ``(d, r)``, ``r`` random in [1, d], so
    singular (rank-deficient) components occur; ``dirac`` mixes std-0 and isotropic components.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=g, dtype=F64) + 0.1
    w = w / w.sum()
    means = torch.randn(k, dim, generator=g, dtype=F64)
    if kind == "iso":
        return GaussianMixture(w, means, stds=0.05 + 0.5 * torch.rand(k, generator=g, dtype=F64))
    if kind == "diag":
        return GaussianMixture(w, means, stds=0.3 * torch.rand(k, dim, generator=g, dtype=F64))
    if kind == "dirac":
        stds = 0.2 * torch.rand(k, generator=g, dtype=F64)
        stds[0] = 0.0
        return GaussianMixture(w, means, stds=stds)
    rank = int(torch.randint(1, dim + 1, (1,), generator=g))
    a = 0.4 * torch.randn(k, dim, rank, generator=g, dtype=F64)
    return GaussianMixture(w, means, covs=a @ a.transpose(1, 2))


def time_from_unit(process, u: float) -> float:
    """Log-uniform time in the process domain; ``u = 0`` gives t_min, ``u = 1`` gives t_max."""
    return math.exp((1 - u) * math.log(process.t_min) + u * math.log(process.t_max))


def noised_points(gm, process, t, n, g, far: bool = True) -> torch.Tensor:
    """``n`` draws of the noised marginal at ``t``, plus (``far``) two points at distance 1e3."""
    data = gm.sample(n, generator=g)
    x = process.interpolate(data, torch.randn(data.shape, generator=g, dtype=F64), t)
    if far:
        far_pts = 1e3 * torch.nn.functional.normalize(torch.randn(2, gm.dim, generator=g), dim=1)
        x = torch.cat([x, far_pts.to(F64)])
    return x


def component_gaussians(gm, process, t):
    """torch.distributions reference of the noised marginal at the scalar time ``t``."""
    tt = torch.tensor(t, dtype=F64)
    a, b = process.a(tt), process.b(tt)
    cov = a**2 * gm.covariances + b**2 * torch.eye(gm.dim, dtype=F64)
    return MixtureSameFamily(Categorical(probs=gm.weights), MultivariateNormal(a * gm.means, cov))


processes = st.sampled_from(["ve", "linear"])
units = st.floats(0.0, 1.0)
kinds = st.sampled_from(KINDS)
seeds = st.integers(0, 2**31 - 1)


# --- the noised marginal -----------------------------------------------------------------------
@given(pname=processes, u=units, kind=kinds, seed=seeds, dim=st.integers(1, 4), k=st.integers(1, 4))
@example(pname="ve", u=0.0, kind="dirac", seed=0, dim=2, k=3)
@example(pname="linear", u=1.0, kind="full", seed=1, dim=3, k=2)
@example(pname="linear", u=0.0, kind="full", seed=2, dim=4, k=4)
def test_log_prob_and_responsibilities_match_torch_distributions(pname, u, kind, seed, dim, k):
    process = get_process(pname)
    t = time_from_unit(process, u)
    gm = make_mixture(seed, dim, k, kind)
    g = torch.Generator().manual_seed(seed + 1)
    x = noised_points(gm, process, t, 7, g)
    ref = component_gaussians(gm, process, t)
    lp = gm.log_prob(x, t, process)
    # Both sides are float64 closed forms (eigen- vs Cholesky factorisation); log-densities reach
    # 1e12 in size for the far points at t_min, so the tolerance is relative (1e-10).
    torch.testing.assert_close(lp, ref.log_prob(x), rtol=1e-10, atol=1e-9)
    comp = ref.component_distribution.log_prob(x[:, None, :]) + gm.weights.log()
    r_ref = torch.softmax(comp, dim=-1)
    r = gm.responsibilities(x, t, process)
    # Probabilities in [0, 1]: differences come only from rounding of the exponents.
    torch.testing.assert_close(r, r_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(r.sum(-1), torch.ones(len(x), dtype=F64), rtol=0, atol=1e-12)
    assert bool((r >= 0).all())


@pytest.mark.parametrize("pname", ["ve", "linear"])
@pytest.mark.parametrize("t", [0.002, 0.05, 0.9])
def test_log_prob_integrates_to_one_in_1d(pname, t):
    """Trapezoid quadrature of exp(log_prob) over a grid with >= 20 points per component width."""
    process = get_process(pname, t_min=1e-3)
    gm = GaussianMixture([0.2, 0.5, 0.3], [[-1.0], [0.3], [2.0]], stds=[0.0, 0.1, 0.4])
    tt = torch.tensor(t, dtype=F64)
    a, b = float(process.a(tt)), float(process.b(tt))
    width_min, width_max = b, math.sqrt(a * a * 0.16 + b * b)
    lo, hi = -a - 12 * width_max, 2 * a + 12 * width_max
    n = int((hi - lo) / (width_min / 20)) + 1
    grid = torch.linspace(lo, hi, n, dtype=F64)[:, None]
    mass = torch.trapezoid(gm.log_prob(grid, t, process).exp(), grid[:, 0])
    # Trapezoid on a Gaussian sampled at >= 20 points per std is exact to ~1e-12; tails beyond
    # 12 widths hold < 1e-30: the mass is 1 up to rounding over ~1e5 terms.
    assert abs(float(mass) - 1.0) < 1e-9


# --- score, denoiser, posterior covariance through autograd and Tweedie -------------------------
@given(pname=processes, u=units, kind=kinds, seed=seeds, dim=st.integers(1, 4), k=st.integers(1, 3))
@example(pname="ve", u=0.0, kind="dirac", seed=3, dim=2, k=2)
@example(pname="ve", u=1.0, kind="iso", seed=4, dim=1, k=3)
@example(pname="linear", u=0.0, kind="full", seed=5, dim=3, k=3)
@example(pname="linear", u=1.0, kind="diag", seed=6, dim=2, k=1)
def test_score_is_autograd_of_log_prob_and_tweedie_gives_the_denoiser(pname, u, kind, seed, dim, k):
    process = get_process(pname)
    t = time_from_unit(process, u)
    gm = make_mixture(seed, dim, k, kind)
    g = torch.Generator().manual_seed(seed + 2)
    x = noised_points(gm, process, t, 6, g).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x, t, process).sum(), x)
    x = x.detach()
    score = gm.score(x, t, process)
    # Same float64 quantities summed in a different order; the score is up to |x| / b^2 ~ 1e9
    # for the far points at t_min, so the tolerance is relative to the row's scale.
    scale = 1 + score.abs().amax(dim=1, keepdim=True)
    assert bool(((score - grad).abs() <= 1e-9 * scale).all())
    tt = torch.tensor(t, dtype=F64)
    a, b = process.a(tt), process.b(tt)
    # Tweedie: D = (x + b^2 grad log p) / a, E[noise | x] = -b grad log p. Checked on the points
    # drawn from the marginal (the far ones are covered by the stability tests): the cancellation
    # in x + b^2 grad is then at most 1e-16 |x| / a relative to D's scale 1.
    xm, gm_grad = x[:-2], grad[:-2]
    torch.testing.assert_close(
        gm.denoiser(xm, t, process), (xm + b**2 * gm_grad) / a, rtol=1e-8, atol=1e-8 / float(a)
    )
    torch.testing.assert_close(
        gm.expected_noise(xm, t, process), -b * gm_grad, rtol=1e-8, atol=1e-8
    )


@given(pname=processes, u=units, kind=kinds, seed=seeds, dim=st.integers(1, 3))
@example(pname="ve", u=0.0, kind="dirac", seed=7, dim=2)
@example(pname="linear", u=1.0, kind="full", seed=8, dim=3)
def test_posterior_cov_is_second_order_tweedie(pname, u, kind, seed, dim):
    """Cov[data | x] = (b^2 / a^2) (I + b^2 Hessian log p_t(x)), the Hessian by double autograd."""
    process = get_process(pname)
    t = time_from_unit(process, u)
    gm = make_mixture(seed, dim, 3, kind)
    g = torch.Generator().manual_seed(seed + 3)
    x = noised_points(gm, process, t, 4, g, far=False)
    hess = torch.autograd.functional.hessian(lambda z: gm.log_prob(z, t, process).sum(), x)
    hess = torch.stack([hess[i, :, i, :] for i in range(len(x))])
    tt = torch.tensor(t, dtype=F64)
    a, b = float(process.a(tt)), float(process.b(tt))
    eye = torch.eye(dim, dtype=F64)
    ref = (b * b / (a * a)) * (eye + b * b * hess)
    cov = gm.posterior_cov(x, t, process)
    # I + b^2 H cancels down to a^2 Cov / b^2; with |b^2 H| <= 1 the rounding is ~1e-15 of
    # b^2 / a^2 (up to 1e5 here), hence the absolute tolerance in those units.
    torch.testing.assert_close(cov, ref, rtol=1e-7, atol=1e-9 * b * b / (a * a))
    torch.testing.assert_close(cov, cov.transpose(1, 2), rtol=0, atol=1e-12)
    assert bool((torch.linalg.eigvalsh(cov) >= -1e-10).all())
    trace = gm.posterior_cov_trace(x, t, process)
    torch.testing.assert_close(trace, cov.diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-10, atol=1e-14)


# --- Monte Carlo: posterior draws and the joint law ---------------------------------------------
def fourth_moments(gm, x, t, process):
    """E[z_i^4 | x] for z = data - D(x), from the per-component posteriors N(m_k, C_k), each
    obtained as the one-component mixture's denoiser / posterior_cov (a Gaussian's fourth
    central moment plus its shift: delta^4 + 6 delta^2 c + 3 c^2)."""
    r = gm.responsibilities(x, t, process)
    denoised = gm.denoiser(x, t, process)
    covs = gm.covariances
    total = torch.zeros_like(x)
    for k in range(gm.n_components):
        one = GaussianMixture([1.0], gm.means[k : k + 1], covs=covs[k : k + 1])
        delta = one.denoiser(x, t, process) - denoised
        c = one.posterior_cov(x, t, process).diagonal(dim1=1, dim2=2)
        total += r[:, k : k + 1] * (delta**4 + 6 * delta**2 * c + 3 * c**2)
    return total


@given(pname=processes, u=units, kind=kinds, seed=seeds, dim=st.integers(1, 3))
@example(pname="ve", u=0.0, kind="dirac", seed=9, dim=2)
@example(pname="linear", u=1.0, kind="full", seed=10, dim=3)
def test_denoiser_and_posterior_cov_match_posterior_draws(pname, u, kind, seed, dim):
    """n = 4000 exact posterior draws per point, generator seeded from the drawn seed; k = 5.

    Mean: |mean - D_i| <= k sqrt(C_ii / n) (the exact posterior variance).
    Covariance: |emp_ij - C_ij| <= k sqrt(E[z_i^2 z_j^2] / n) with the exact
    E[z_i^2 z_j^2] <= sqrt(E z_i^4 E z_j^4) (Cauchy-Schwarz). Exact moments keep the bound valid
    when a far component has a small responsibility r and no draw lands in it: the shortfall
    r delta^2 exceeds the bound only if r > k^2 / n, where a miss has probability < exp(-25).
    """
    process = get_process(pname)
    t = time_from_unit(process, u)
    gm = make_mixture(seed, dim, 3, kind)
    g = torch.Generator().manual_seed(seed + 4)
    x = noised_points(gm, process, t, 3, g)
    n, k = 4000, 5.0
    denoised = gm.denoiser(x, t, process)
    cov = gm.posterior_cov(x, t, process)
    draws = gm.sample_posterior(x.repeat_interleave(n, 0), t, process, generator=g)
    draws = draws.reshape(len(x), n, dim)
    var = cov.diagonal(dim1=1, dim2=2)
    assert bool(((draws.mean(1) - denoised).abs() <= k * (var / n).sqrt() + 1e-12).all())
    centred = draws - denoised[:, None, :]
    emp = centred.transpose(1, 2) @ centred / n
    m4 = fourth_moments(gm, x, t, process).sqrt()
    bound = k * (m4[:, :, None] * m4[:, None, :] / n).sqrt() + 1e-12
    assert bool(((emp - cov).abs() <= bound).all())


@pytest.mark.parametrize("pname", ["ve", "linear"])
@pytest.mark.parametrize("t", [0.05, 0.5])
def test_orthogonality_principle_under_joint_sampling(pname, t):
    """For the conditional expectation D: E[(data - D(x_t)) h(x_t)] = 0 for every h; tested with
    h = 1 and h = x_t coordinates, on n = 20000 joint draws (generator seed 11), k = 5 standard
    errors (empirical). The same for E[noise | x_t]. Posterior draws at x_t ~ p_t reproduce the
    data law: their first two moments match fresh data within 5 standard errors."""
    process = get_process(pname)
    gm = make_mixture(11, 2, 3, "full")
    g = torch.Generator().manual_seed(11)
    n, k = 20000, 5.0
    data = gm.sample(n, generator=g)
    noise = torch.randn(data.shape, generator=g, dtype=F64)
    x = process.interpolate(data, noise, t)
    feats = torch.cat([torch.ones(n, 1, dtype=F64), x], dim=1)
    for target, pred in (
        (data, gm.denoiser(x, t, process)),
        (noise, gm.expected_noise(x, t, process)),
    ):
        prod = ((target - pred)[:, :, None] * feats[:, None, :]).reshape(n, -1)
        assert bool((prod.mean(0).abs() <= k * prod.std(0) / math.sqrt(n)).all())
    draws = gm.sample_posterior(x, t, process, generator=g)
    fresh = gm.sample(n, generator=g)
    for f in (lambda z: z, lambda z: z**2, lambda z: z[:, :1] * z[:, 1:]):
        a, b = f(draws), f(fresh)
        se = (a.var(0) / n + b.var(0) / n).sqrt()
        assert bool(((a.mean(0) - b.mean(0)).abs() <= k * se).all())


def test_sample_moments_and_components():
    """n = 40000 draws (generator seed 12): component frequencies within 5 binomial SE, per
    component mean / covariance within 5 SE, E||x||^2 (second_moment) and mean() within 5 SE."""
    gm = make_mixture(12, 3, 3, "full")
    g = torch.Generator().manual_seed(12)
    n, k = 40000, 5.0
    x, comp = gm.sample(n, generator=g, return_components=True)
    assert x.shape == (n, 3) and comp.dtype == torch.long and x.dtype == F64
    w = gm.weights
    freq = torch.bincount(comp, minlength=3).to(F64) / n
    assert bool(((freq - w).abs() <= k * (w * (1 - w) / n).sqrt()).all())
    covs = gm.covariances
    for j in range(3):
        xj = x[comp == j]
        nj = len(xj)
        se = (covs[j].diagonal() / nj).sqrt()
        assert bool(((xj.mean(0) - gm.means[j]).abs() <= k * se + 1e-12).all())
        c = xj - gm.means[j]
        prods = c[:, :, None] * c[:, None, :]
        assert bool(((prods.mean(0) - covs[j]).abs() <= k * prods.std(0) / math.sqrt(nj)).all())
    sq = (x**2).sum(1)
    assert abs(float(sq.mean() - gm.second_moment())) <= k * float(sq.std()) / math.sqrt(n)
    assert bool(((x.mean(0) - gm.mean()).abs() <= k * x.std(0) / math.sqrt(n)).all())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(gm.sample(10, generator=g1), gm.sample(10, generator=g2))


def test_covariances_round_trip_the_eigendecomposition():
    g = torch.Generator().manual_seed(13)
    a = torch.randn(2, 3, 3, generator=g, dtype=F64)
    covs = a @ a.transpose(1, 2)
    gm = GaussianMixture([0.5, 0.5], torch.zeros(2, 3, dtype=F64), covs=covs)
    # eigh then U diag(lam) U^T: float64 rounding of a 3x3 product, entries of size ~10.
    torch.testing.assert_close(gm.covariances, covs, rtol=1e-12, atol=1e-12)
    iso = GaussianMixture([1.0], [[1.0, 2.0]], stds=0.3)
    torch.testing.assert_close(iso.covariances[0], 0.09 * torch.eye(2, dtype=F64))
    # the public eigen-decomposition is the one covariances are built from, and a copy
    lam, rot = gm.eigen
    torch.testing.assert_close((rot * lam[:, None, :]) @ rot.transpose(1, 2), gm.covariances)
    lam.zero_()
    assert bool((gm.eigen[0] > 0).all())
    lam_iso, rot_iso = iso.eigen
    assert rot_iso is None and torch.equal(lam_iso, torch.full((1, 2), 0.09, dtype=F64))


# --- one Gaussian: closed forms -----------------------------------------------------------------
def single_gaussian(seed: int, dim: int, full: bool):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, generator=g, dtype=F64)
    if full:
        a = 0.5 * torch.randn(dim, dim, generator=g, dtype=F64)
        cov = a @ a.T + 0.01 * torch.eye(dim, dtype=F64)
    else:
        cov = (0.1 + float(torch.rand(1, generator=g))) ** 2 * torch.eye(dim, dtype=F64)
    return m, cov, GaussianMixture([1.0], m[None], covs=cov[None])


def closed_form_flow(m, cov, process, x, t, t_end):
    """One Gaussian N(m, Sigma) = U diag(lam) U^T: x_{t'} = a' m + U diag(s_i(t') / s_i(t)) U^T
    (x_t - a m), s_i(t)^2 = a(t)^2 lam_i + b(t)^2 (the PF-ODE is linear; each eigen-coordinate of
    x - a m scales with its marginal std). VE: m + sqrt((s^2 + t'^2) / (s^2 + t^2)) (x - m)."""
    lam, u = torch.linalg.eigh(cov)
    a0, b0 = process.a(t)[:, None], process.b(t)[:, None]
    a1, b1 = process.a(t_end)[:, None], process.b(t_end)[:, None]
    ratio = torch.sqrt((a1**2 * lam + b1**2) / (a0**2 * lam + b0**2))
    y = (x - a0 * m) @ u
    return a1 * m + (ratio * y) @ u.T


@given(pname=processes, seed=seeds, dim=st.integers(1, 4), full=st.booleans(), u=units)
@example(pname="ve", seed=0, dim=2, full=False, u=0.0)
@example(pname="linear", seed=1, dim=3, full=True, u=1.0)
def test_single_gaussian_denoiser_and_velocity_closed_forms(pname, seed, dim, full, u):
    process = get_process(pname)
    t = time_from_unit(process, u)
    m, cov, gm = single_gaussian(seed, dim, full)
    g = torch.Generator().manual_seed(seed)
    x = noised_points(gm, process, t, 5, g)
    tt = torch.full((len(x),), t, dtype=F64)
    a, b = process.a(tt)[:, None], process.b(tt)[:, None]
    da, db = process.da(tt)[:, None], process.db(tt)[:, None]
    s = (a[:, :, None] ** 2) * cov + (b[:, :, None] ** 2) * torch.eye(dim, dtype=F64)
    sol = torch.linalg.solve(s, (x - a * m)[:, :, None])[:, :, 0]
    denoised = m + a * (sol @ cov)
    # m + a Sigma S^{-1}(x - a m) by an LU solve against the eigenbasis formula: relative 1e-9
    # covers the condition number of S (<= 1e5 here) times float64 rounding; the far points make
    # |x - a m| ~ 1e3, so the absolute part is scaled by it.
    torch.testing.assert_close(gm.denoiser(x, t, process), denoised, rtol=1e-9, atol=1e-9)
    # Velocity as the time derivative of the closed-form flow map: v = a' m + U diag(s_i'/s_i)
    # U^T (x - a m), s_i' = (a a' lam_i + b b') / s_i.
    lam, rot = torch.linalg.eigh(cov)
    var = a**2 * lam + b**2
    y = (x - a * m) @ rot
    v_ref = da * m + ((a * da * lam + b * db) / var * y) @ rot.T
    torch.testing.assert_close(gm.velocity(x, t, process), v_ref, rtol=1e-9, atol=1e-9)


@given(
    pname=processes,
    seed=seeds,
    dim=st.integers(1, 3),
    full=st.booleans(),
    u0=st.lists(units, min_size=3, max_size=3),
    u1=units,
)
@example(pname="ve", seed=0, dim=2, full=False, u0=[1.0, 0.5, 0.0], u1=0.0)
@example(pname="linear", seed=1, dim=2, full=True, u0=[1.0, 0.3, 0.0], u1=0.0)
@example(pname="ve", seed=2, dim=1, full=True, u0=[0.0, 0.2, 0.9], u1=1.0)
def test_flow_map_matches_the_closed_form_for_one_gaussian(pname, seed, dim, full, u0, u1):
    """Per-sample start times in one batched solve, both directions; |error| < 1e-5 (the issue's
    requirement; rtol 1e-9 / atol 1e-11 usually give ~1e-8)."""
    process = get_process(pname)
    m, cov, gm = single_gaussian(seed, dim, full)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([time_from_unit(process, v) for v in u0], dtype=F64).repeat(2)
    t_end = time_from_unit(process, u1)
    data = gm.sample(len(t), generator=g)
    x = process.interpolate(data, torch.randn(data.shape, generator=g, dtype=F64), t)
    out = gm.flow_map(x, t, process, t_end=t_end)
    ref = closed_form_flow(m, cov, process, x, t, torch.full_like(t, t_end))
    assert float((out - ref).abs().max()) < 1e-5
    default = gm.flow_map(x[:2], t[:2], process)  # t_end defaults to t_min
    ref_min = closed_form_flow(m, cov, process, x[:2], t[:2], torch.full((2,), process.t_min))
    assert float((default - ref_min).abs().max()) < 1e-5


def test_flow_map_of_two_diracs_under_ve_is_exactly_linear():
    """A single Dirac at m under ve: x_{t'} = m + (t'/t)(x - m). With two far-apart Diracs a point
    near one of them follows that line to rounding (responsibility 1 - 1e-100)."""
    gm = two_diracs()
    process = VEProcess()
    m = gm.means[1]
    x = m + torch.tensor([[0.01, 0.02], [-0.03, 0.01]], dtype=F64)
    t = torch.tensor([0.05, 0.1], dtype=F64)
    out = gm.flow_map(x, t, process)
    ref = m + (process.t_min / t)[:, None] * (x - m)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


@given(seed=seeds, dim=st.integers(1, 4), pname=processes)
@example(seed=0, dim=2, pname="ve")
def test_flow_map_round_trip_on_random_mixtures(seed, dim, pname):
    """The PF-ODE flow is invertible: t -> t_end -> t returns x. Times in [0.05, 0.5] (ratio <= 10
    bounds the error amplification); bound 1e-6 = 1e3 x the solver tolerance for |x| <= 10."""
    process = get_process(pname)
    gm = random_mixture(dim, 4, seed, separation=6.0)
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.45 * torch.rand(6, generator=g, dtype=F64)
    t_end = 0.05 + 0.45 * torch.rand(6, generator=g, dtype=F64)
    x = noised_points(gm, process, t, 6, g, far=False)
    there = gm.flow_map(x, t, process, t_end=t_end)
    back = gm.flow_map(there, t_end, process, t_end=t)
    assert float((back - x).abs().max()) < 1e-6
    same = gm.flow_map(x, t, process, t_end=t)
    torch.testing.assert_close(same, x, rtol=0, atol=1e-14)


def test_flow_map_carries_the_marginal_at_t_max_to_the_data():
    """n = 600 draws of p_{t_max} (seed 14) flowed to t_min land in the two modes of
    two_gaussians_1to2 (nearest-mode distance < 6 stds of p_{t_min}) in balanced proportions
    (within 5 binomial SE)."""
    gm = two_gaussians_1to2()
    process = VEProcess()
    g = torch.Generator().manual_seed(14)
    n = 600
    x = noised_points(gm, process, process.t_max, n, g, far=False)
    out = gm.flow_map(x, process.t_max, process)
    d = torch.cdist(out, gm.means).min(1).values
    assert float(d.max()) < 6 * math.hypot(0.01, process.t_min)
    frac = float((out[:, 1] > 0).to(F64).mean())
    assert abs(frac - 0.5) <= 5 * math.sqrt(0.25 / n)


# --- stability ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "process",
    [VEProcess(), VEProcess(t_min=1e-3), LinearProcess()],
    ids=["ve-0.002", "ve-0.001", "linear-0.001"],
)
@pytest.mark.parametrize("preset", [two_diracs, two_gaussians_1to2])
def test_stable_at_t_min_and_far_from_the_modes(process, preset):
    gm = preset()
    t = process.t_min
    x = torch.tensor(
        [
            [0.0, 0.5],  # on a mode
            [0.0, 0.0],  # exactly between the modes
            [1e-3, -0.5 + 2e-3],  # near a mode
            [0.0, 1e3],  # far, above
            [1e3, -1.0],  # far, nearer the lower mode
            [-7e2, 7e2],  # far, diagonal
        ],
        dtype=F64,
    )
    r = gm.responsibilities(x, t, process)
    outs = [
        gm.log_prob(x, t, process),
        r,
        gm.denoiser(x, t, process),
        gm.expected_noise(x, t, process),
        gm.score(x, t, process),
        gm.velocity(x, t, process),
        gm.posterior_cov(x, t, process),
        gm.posterior_cov_trace(x, t, process),
        gm.sample_posterior(x, t, process, generator=torch.Generator().manual_seed(0)),
    ]
    for out in outs:
        assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(r.sum(-1), torch.ones(len(x), dtype=F64), rtol=0, atol=1e-12)
    # The midpoint is equidistant: responsibilities exactly 1/2 by symmetry.
    torch.testing.assert_close(r[1], torch.full((2,), 0.5, dtype=F64), rtol=0, atol=1e-12)
    # Far points: the nearer mode takes all the mass (log-odds ~ 1e9), so D is that mode's
    # posterior mean, and v = (x - D) / t holds for both processes.
    nearest = torch.cdist(x, process.a(torch.tensor(t, dtype=F64)) * gm.means).argmin(1)
    for i in (0, 2, 3, 4):
        assert float(r[i, nearest[i]]) == pytest.approx(1.0, abs=1e-12)
    d = gm.denoiser(x, t, process)
    torch.testing.assert_close(gm.velocity(x, t, process), (x - d) / t, rtol=1e-9, atol=1e-6)
    if preset is two_diracs:
        torch.testing.assert_close(d[[0, 3, 4]], gm.means[nearest[[0, 3, 4]]], rtol=0, atol=1e-12)
    cov = gm.posterior_cov(x, t, process)
    assert bool((torch.linalg.eigvalsh(cov) >= -1e-12).all())


def test_stable_for_singular_full_covariance_at_t_min():
    """A rank-1 covariance and a Dirac at t = 1e-3: everything finite, posteriors PSD."""
    cov = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=F64) * 0.1
    gm = GaussianMixture([0.5, 0.5], [[0.0, 0.0], [3.0, 0.0]], covs=cov)
    process = LinearProcess()
    x = torch.tensor([[0.3, -0.3], [1e3, 1e3], [3.0, 1e-4], [1.5, 0.0]], dtype=F64)
    for f in (gm.log_prob, gm.denoiser, gm.velocity, gm.score, gm.posterior_cov):
        assert bool(torch.isfinite(f(x, 1e-3, process)).all())
    assert bool((torch.linalg.eigvalsh(gm.posterior_cov(x, 1e-3, process)) >= -1e-12).all())


def test_chunked_evaluation_equals_one_pass(monkeypatch):
    gm = make_mixture(15, 3, 4, "full")
    process = VEProcess()
    g = torch.Generator().manual_seed(15)
    x = noised_points(gm, process, 0.3, 37, g)
    methods = ("log_prob", "responsibilities", "denoiser", "velocity", "posterior_cov")
    whole = [getattr(gm, name)(x, 0.3, process) for name in methods]
    monkeypatch.setattr(gmm_module, "_CHUNK_ELEMENTS", 50)  # chunks of 1 to 4 rows
    for name, ref in zip(methods, whole, strict=True):
        torch.testing.assert_close(getattr(gm, name)(x, 0.3, process), ref, rtol=1e-13, atol=0)


def test_float32_points_give_float32_results_close_to_float64():
    gm = two_gaussians_1to2()
    process = VEProcess()
    x = noised_points(gm, process, 0.5, 10, torch.Generator().manual_seed(16), far=False)
    v32 = gm.velocity(x.float(), 0.5, process)
    assert v32.dtype == torch.float32
    # float32 rounding of inputs (~1e-7 relative) propagated through a smooth field of scale 1.
    torch.testing.assert_close(v32.double(), gm.velocity(x, 0.5, process), rtol=1e-4, atol=1e-5)
    g32 = gm.to(dtype=torch.float32)
    assert g32.dtype == torch.float32 and gm.dtype == F64
    torch.testing.assert_close(g32.means.double(), gm.means)


# --- presets ------------------------------------------------------------------------------------
def test_presets():
    gm = two_gaussians_1to2()
    assert gm.dtype == F64 and gm.n_components == 2 and gm.dim == 2
    torch.testing.assert_close(gm.means, torch.tensor([[0.0, -0.5], [0.0, 0.5]], dtype=F64))
    torch.testing.assert_close(gm.stds, torch.full((2,), 0.01, dtype=F64))
    torch.testing.assert_close(gm.weights, torch.full((2,), 0.5, dtype=F64))
    torch.testing.assert_close(two_diracs().stds, torch.zeros(2, dtype=F64))
    eight = eight_gaussians()
    torch.testing.assert_close(eight.means.norm(dim=1), torch.full((8,), 2.0, dtype=F64))
    dist = torch.cdist(eight.means, eight.means) + 1e9 * torch.eye(8, dtype=F64)
    assert float(dist.min()) / float(eight.stds.max()) > 30
    two_d = {"two_gaussians_1to2", "two_diracs", "eight_gaussians", "random_mixture"}
    high_d = {"random_16", "random_64", "random_256", "random_3072", "digits_mixture"}
    assert set(PRESETS) == two_d | high_d
    assert get_preset("eight_gaussians", radius=3.0).means.norm(dim=1).max() == pytest.approx(3.0)


@given(dim=st.integers(1, 64), k=st.integers(1, 12), seed=seeds, sep=st.floats(2.0, 50.0))
@example(dim=1, k=12, seed=0, sep=50.0)
@example(dim=3072, k=2, seed=1, sep=10.0)
def test_random_mixture_is_separated_and_reproducible(dim, k, seed, sep):
    gm = random_mixture(dim, k, seed, separation=sep, random_weights=True)
    assert (gm.dim, gm.n_components) == (dim, k)
    if k > 1:
        dist = torch.cdist(gm.means, gm.means).fill_diagonal_(math.inf)
        assert float(dist.min()) >= sep * float(gm.stds.max()) * (1 - 1e-12)
    w = gm.weights
    assert float(w.min()) >= 1 / (2 * k) - 1e-12 and float(w.max()) <= 2 / k + 1e-12
    same_seed = torch.Generator().manual_seed(seed)
    again = random_mixture(dim, k, same_seed, separation=sep, random_weights=True)
    assert torch.equal(gm.means, again.means) and torch.equal(gm.weights, again.weights)


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"weights": [], "means": torch.zeros(0, 2), "stds": 0.1},
            r"weights.shape=\(0,\) is invalid",
        ),
        (
            {"weights": [0.5, 0.6], "means": torch.zeros(2, 2), "stds": 0.1},
            r"weights.sum\(\)=1.1[0-9]* is invalid: .*sum to 1",
        ),
        (
            {"weights": [1.5, -0.5], "means": torch.zeros(2, 2), "stds": 0.1},
            r"weights.min\(\)=-0.5 is invalid: .*non-negative",
        ),
        (
            {"weights": [0.5, 0.5], "means": torch.zeros(3, 2), "stds": 0.1},
            r"means.shape=\(3, 2\) is invalid",
        ),
        (
            {"weights": [0.5, 0.5], "means": torch.zeros(2, 0), "stds": 0.1},
            r"means.shape=\(2, 0\) is invalid",
        ),
        ({"weights": [1.0], "means": [[math.nan, 0.0]], "stds": 0.1}, "means"),
        ({"weights": [1.0], "means": [[0.0, 0.0]], "stds": math.inf}, "stds"),
        (
            {"weights": [1.0], "means": [[0.0, 0.0]], "stds": -0.1},
            r"stds.min\(\)=-0.1 is invalid: .*non-negative",
        ),
        (
            {"weights": [1.0], "means": [[0.0, 0.0]], "stds": [0.1, 0.2, 0.3]},
            r"stds.shape=\(3,\) is invalid",
        ),
        ({"weights": [1.0], "means": [[0.0, 0.0]]}, r"\(stds, covs\)='neither' is invalid"),
        (
            {"weights": [1.0], "means": [[0.0, 0.0]], "stds": 0.1, "covs": torch.eye(2)[None]},
            r"\(stds, covs\)='both' is invalid",
        ),
        (
            {"weights": [1.0], "means": [[0.0, 0.0]], "covs": torch.eye(3)[None]},
            r"covs.shape=\(1, 3, 3\) is invalid",
        ),
        (
            {"weights": [1.0], "means": [[0.0, 0.0]], "covs": [[[1.0, 0.5], [0.0, 1.0]]]},
            r"max \|covs - covs.transpose\(1, 2\)\|=0.5 is invalid: use symmetric",
        ),
        (
            {"weights": [1.0], "means": [[0.0, 0.0]], "covs": [[[1.0, 2.0], [2.0, 1.0]]]},
            r"min eigenvalue of covs=-1.0 is invalid: use positive semi-definite",
        ),
    ],
)
def test_bad_constructor_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_bad_call_input_raises():
    gm = two_gaussians_1to2()
    ve = VEProcess()
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(
        ValueError, match=r"x.shape=\(3, 3\) is invalid: use shape \(B, d\) = \(B, 2\)"
    ):
        gm.denoiser(torch.zeros(3, 3, dtype=F64), 0.5, ve)
    with pytest.raises(ValueError, match=r"x.shape=\(0, 2\) is invalid: it is an empty batch"):
        gm.velocity(torch.zeros(0, 2, dtype=F64), 0.5, ve)
    with pytest.raises(ValueError, match="x contains NaN"):
        gm.log_prob(torch.tensor([[math.nan, 0.0]], dtype=F64), 0.5, ve)
    with pytest.raises(ValueError, match="t must lie in"):
        gm.score(x, 100.0, ve)
    with pytest.raises(ValueError, match="t must lie in"):
        gm.velocity(x, 0.0, LinearProcess())
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        gm.denoiser(x, torch.ones(2, dtype=F64), ve)
    with pytest.raises(ValueError, match="t_end must lie in"):
        gm.flow_map(x, 1.0, ve, t_end=1e-4)
    with pytest.raises(ValueError, match="x.dtype=torch.int64 is invalid: use a floating point"):
        gm.velocity(torch.zeros(3, 2, dtype=torch.long), 0.5, ve)
    with pytest.raises(ValueError, match="n=0 is invalid: use a positive integer"):
        gm.sample(0)
    with pytest.raises(ValueError, match="process must be one of"):
        gm.velocity(x, 0.5, "vp")
    with pytest.raises(ValueError, match="name must be one of"):
        get_preset("nine_gaussians")
    with pytest.raises(ValueError, match="separation"):
        random_mixture(2, 3, 0, separation=0.0)
    with pytest.raises(ValueError, match="dim"):
        random_mixture(0, 3, 0)


@pytest.mark.parametrize("preset", [two_gaussians_1to2, two_diracs])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_points_are_computed_in_float32(preset, dtype):
    # At t_min the component variances b^2 = 4e-6 overflow half-precision log-densities (NaN rows
    # before the fix: 24 / 1000 for two_gaussians_1to2 and 1000 / 1000 for two_diracs).
    gm, process = preset(), VEProcess()
    g = torch.Generator().manual_seed(21)
    data = gm.sample(1000, generator=g)
    x = (data + process.t_min * torch.randn(data.shape, generator=g, dtype=F64)).to(dtype)
    for mixture in (gm, gm.to(dtype=dtype)):
        v = mixture.velocity(x, process.t_min, process)
        assert v.dtype == dtype and bool(torch.isfinite(v).all())
    # Against float64 on the same (rounded) points: the float32 arithmetic error in x - D is
    # ~ 6e-8 |x| / t_min ~ 2e-5, below the final half rounding (rel. 4.9e-4 float16, 3.9e-3 bf16).
    ref = gm.velocity(x.double(), process.t_min, process)
    rtol = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(v.double(), ref, rtol=rtol, atol=rtol)
    for name in ("denoiser", "score", "log_prob", "posterior_cov_trace"):
        out = getattr(gm, name)(x, process.t_min, process)
        assert out.dtype == dtype and bool(torch.isfinite(out).all()), name
