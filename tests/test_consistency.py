"""consistency.py: parametrization (Eq. 3), iCT schedules, distances, CT / CD / OT / GC losses.

The mathematics is checked in float64 against closed forms: the boundary condition bit for bit,
the curriculum and lognormal formulas of docs/paper.md section 2, the order of the CD loss with the
exact velocity on one Gaussian (closed-form flow map), the leading term of the CT - CD gap
(docs/paper.md section 3, Eq. 11 integrand), and the identities GC(mu=0) = CT, GC(paired data) = CT,
OT(optimal batch) = CT, CD(one-sample velocity) = CT.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from scipy.special import erfc as np_erfc
from torch import nn

from gcflows.consistency import (
    DISTANCES,
    ConsistencyModel,
    ConsistencyObjective,
    ObjectiveConfig,
    default_huber_c,
    get_distance,
    ict_curriculum,
    ict_weights,
    l2_norm,
    lognormal_index_probs,
    pseudo_huber,
    pseudo_huber_elementwise,
    sample_indices,
    shared_dropout_passes,
    squared_l2,
)
from gcflows.couplings import ot_coupling
from gcflows.gmm import GaussianMixture
from gcflows.networks import ToyMLP
from gcflows.processes import LinearProcess, VEProcess, karras_grid, uniform_grid
from gcflows.velocity import MonteCarloVelocity, TrueVelocity

F64 = torch.float64
PROCESSES = {"ve": VEProcess(), "linear": LinearProcess()}
# A bounded VE horizon for the theory checks: the asymptotic regime h << sigma_data is reached
# with few intervals.
VE_SHORT = VEProcess(t_min=0.002, t_max=2.0)


# --- helpers ------------------------------------------------------------------------------------
class TanhBackbone(nn.Module):
    """A fixed random smooth backbone ``F(x, c) = W2 tanh(W1 [x, c])`` for any ``(B, *dims)``."""

    def __init__(self, dim: int, width: int = 32, seed: int = 0, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(width, dim + 1, generator=g, dtype=F64))
        self.w2 = nn.Parameter(scale * torch.randn(dim, width, generator=g, dtype=F64) / width**0.5)

    def forward(self, x, c_noise):
        flat = x.reshape(x.shape[0], -1)
        inp = torch.cat([flat, c_noise[:, None].to(flat.dtype)], 1)
        out = torch.tanh(inp @ self.w1.T.to(flat.dtype)) @ self.w2.T.to(flat.dtype)
        return out.reshape(x.shape)


class GaussianFlowMap(nn.Module):
    """Exact PF-ODE flow map to ``t_min`` of ``data ~ N(m, s^2 I)``, ``x_t = a data + b noise``.

    The marginal is ``N(a m, r^2 I)`` with ``r = sqrt(a^2 s^2 + b^2)`` and trajectories are
    ``x_t = a(t) m + r(t) u`` (u fixed), so ``f(x, t) = a(t_min) m + r(t_min) / r(t) (x - a(t) m)``
    (for ``ve``: ``m + sqrt((s^2 + t_min^2) / (s^2 + t^2)) (x - m)``).
    """

    def __init__(self, m: torch.Tensor, s: float, process):
        super().__init__()
        self.m, self.s, self.p = m, s, process

    def _r(self, t):
        return torch.sqrt(self.p.a(t) ** 2 * self.s**2 + self.p.b(t) ** 2)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])[:, None]
        t0 = torch.full_like(t, self.p.t_min)
        return self.p.a(t0) * self.m + self._r(t0) / self._r(t) * (x - self.p.a(t) * self.m)


class DropoutRecorder(nn.Module):
    """Backbone ``x * dropout(1)`` (p = 0.5) that records each pass's keep-mask."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(p=0.5)
        self.masks: list[torch.Tensor] = []

    def forward(self, x, c_noise):
        mask = self.drop(torch.ones_like(x))
        self.masks.append(mask != 0)
        return x * mask


def one_gaussian(m=(0.3, -0.2), s=0.5):
    mean = torch.tensor([m], dtype=F64)
    return GaussianMixture(torch.ones(1, dtype=F64), mean, stds=torch.tensor([s], dtype=F64))


def two_gaussians():
    means = torch.tensor([[1.0, 0.5], [-1.0, -0.5]], dtype=F64)
    return GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=F64), means, stds=torch.tensor([0.3, 0.2], dtype=F64)
    )


def _batch(n, d=2, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


# ================================================================================================
# Parametrization
# ================================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", ["ve", "linear"])
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 7))
def test_boundary_condition_is_exact(name, dtype, seed, batch):
    # f(x, t_min) = x bit for bit: c_skip = 1 and c_out = 0 exactly, even for a backbone whose
    # output is huge (1e6), so no "tiny c_out" can hide.
    process = PROCESSES[name]
    model = ConsistencyModel(TanhBackbone(12, seed=seed % 1000, scale=1e6), process)
    g = torch.Generator().manual_seed(seed)
    x = (10 * torch.randn(batch, 3, 2, 2, generator=g, dtype=F64)).to(dtype)
    t_vec = torch.full((batch,), process.t_min, dtype=dtype)
    assert torch.equal(model(x, t_vec), x)
    assert torch.equal(model(x, process.t_min), x)
    c_skip, c_out, _, _ = model.preconditioning(t_vec)
    assert bool((c_skip == 1).all()) and bool((c_out == 0).all())
    # Away from the boundary the backbone does act (the check above is not vacuous).
    assert not torch.equal(model(x, torch.full((batch,), 0.5, dtype=dtype)), x)


@pytest.mark.parametrize("name", ["ve", "linear"])
@given(u=st.floats(0.0, 1.0), sd=st.floats(0.1, 2.0))
@example(u=0.0, sd=0.5)
@example(u=1.0, sd=0.5)
def test_coefficients_match_the_closed_forms(name, u, sd):
    # Eq. 3 for ve; its VE-coordinates analogue for linear (module doc). Same arithmetic in a
    # different order: agreement to 1e-13 relative (a few hundred ulps) in float64.
    process = PROCESSES[name]
    t0, t1 = process.t_min, process.t_max
    t = math.exp(math.log(t0) + u * (math.log(t1) - math.log(t0)))
    model = ConsistencyModel(TanhBackbone(2), process, sigma_data=sd)
    c_skip, c_out, c_in, c_noise = (
        c.item() for c in model.preconditioning(torch.tensor([t], dtype=F64))
    )
    if name == "ve":
        exp_skip = sd**2 / ((t - t0) ** 2 + sd**2)
        exp_out = sd * (t - t0) / math.sqrt(sd**2 + t**2)
        exp_in = 1 / math.sqrt(sd**2 + t**2)
        exp_noise = math.log(t) / 4
    else:
        a, b, a0 = 1 - t, t, 1 - t0
        sig, sig0 = b / a, t0 / a0
        exp_skip = (a0 / a) * sd**2 / ((sig - sig0) ** 2 + sd**2)
        exp_out = a0 * sd * (sig - sig0) / math.sqrt(sd**2 + sig**2)
        exp_in = 1 / math.sqrt(a**2 * sd**2 + b**2)
        exp_noise = math.log(sig) / 4
    for got, exp in ((c_skip, exp_skip), (c_out, exp_out), (c_in, exp_in), (c_noise, exp_noise)):
        assert got == pytest.approx(exp, rel=1e-13, abs=1e-15)
    # c_in normalises x_t to unit variance when the data has std sd: c_in^2 (a^2 sd^2 + b^2) = 1.
    tt = torch.tensor(t, dtype=F64)
    var = process.a(tt) ** 2 * sd**2 + process.b(tt) ** 2
    assert float(c_in**2 * var) == pytest.approx(1.0, rel=1e-13)


@given(seed=st.integers(0, 2**31 - 1), u=st.floats(0.0, 1.0))
@example(seed=0, u=0.0)
def test_linear_parametrization_is_ve_in_scaled_coordinates(seed, u):
    # f_lin(x, t) = a(t_min) f_ve(x / a(t), sigma(t)) with sigma = t / (1 - t) and the VE
    # boundary at sigma(t_min), for one shared backbone (the derivation of the module doc).
    # float64; the two evaluation orders differ by rounding only: rtol 1e-11.
    lin = LinearProcess()
    sig = lambda t: t / (1 - t)  # noqa: E731
    ve = VEProcess(t_min=sig(lin.t_min), t_max=sig(lin.t_max))
    backbone = TanhBackbone(2, seed=seed % 997)
    f_lin, f_ve = ConsistencyModel(backbone, lin), ConsistencyModel(backbone, ve)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 2, generator=g, dtype=F64)
    t = lin.t_min + (lin.t_max - lin.t_min) * torch.rand(5, generator=g, dtype=F64) * u
    a = (1 - t)[:, None]
    expected = (1 - lin.t_min) * f_ve(x / a, sig(t))
    torch.testing.assert_close(f_lin(x, t), expected, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", ["ve", "linear"])
def test_model_is_differentiable_in_time(name, gen):
    # df/dt flows through the preconditioning and c_noise (Theorem 1's d f needs it): autograd
    # against a central difference, float64, step 1e-6: error O(eps^2) + rounding 1e-16 / eps,
    # both below 1e-8 relative; tolerance 1e-6.
    process = PROCESSES[name]
    model = ConsistencyModel(TanhBackbone(2, seed=7), process)
    x = torch.randn(6, 2, generator=gen, dtype=F64)
    t = torch.linspace(0.05, 0.9, 6, dtype=F64).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x, t).sum(), t)
    eps = 1e-6
    with torch.no_grad():
        fd = (model(x, t + eps) - model(x, t - eps)).sum(1) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_model_rejects_bad_times_and_shapes():
    model = ConsistencyModel(TanhBackbone(2), "ve")
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="t must lie in"):
        model(x, torch.full((3,), 100.0, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="sigma_data=0.0 is invalid"):
        ConsistencyModel(TanhBackbone(2), "ve", sigma_data=0.0)
    bad = ConsistencyModel(lambda x, c: x[:, :1], "ve")
    with pytest.raises(ValueError, match="backbone returned shape"):
        bad(x, 1.0)
    # The domain check can be switched off (it reads times on the host).
    ConsistencyModel(TanhBackbone(2), "ve", check_inputs=False)(x, torch.full((3,), 100.0))


# ================================================================================================
# Schedules
# ================================================================================================
@pytest.mark.parametrize("total, s0, s1", [(8000, 10, 1280), (10000, 10, 100), (7, 10, 1280)])
def test_curriculum_matches_the_formula_at_the_ends_and_doublings(total, s0, s1):
    # N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)),
    # clamped to K' >= 1 (documented) for runs shorter than the number of doublings.
    k_prime = max(1, math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))
    assert ict_curriculum(0, total, s0, s1) == s0 + 1
    assert (
        ict_curriculum(total - 1, total, s0, s1) == min(s0 * 2 ** ((total - 1) // k_prime), s1) + 1
    )
    j = 1
    while s0 * 2 ** (j - 1) < s1:
        k = j * k_prime
        assert ict_curriculum(k - 1, total, s0, s1) == min(s0 * 2 ** (j - 1), s1) + 1
        assert ict_curriculum(k, total, s0, s1) == min(s0 * 2**j, s1) + 1
        j += 1
    assert ict_curriculum(10**9, total, s0, s1) == s1 + 1


def test_curriculum_paper_values():
    # docs/paper.md: s0 = 10, s1 = 1280, K = 8000 -> K' = 8000 / (log2 128 + 1) = 1000; the grid
    # doubles every 1000 steps: 11, 21, 41, 81, 161, 321, 641, 1281 points.
    got = [ict_curriculum(k, 8000) for k in range(0, 8000, 1000)]
    assert got == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_curriculum(999, 8000) == 11 and ict_curriculum(6999, 8000) == 641


@given(k=st.integers(0, 10**6), total=st.integers(1, 10**5), s0=st.integers(1, 50))
def test_curriculum_is_monotone_and_bounded(k, total, s0):
    s1 = s0 * 37
    n, n_next = ict_curriculum(k, total, s0, s1), ict_curriculum(k + 1, total, s0, s1)
    assert s0 + 1 <= n <= n_next <= s1 + 1
    intervals = n - 1
    assert intervals == s1 or (intervals % s0 == 0 and (intervals // s0).bit_count() == 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step=0, total_steps=10, s0=20, s1=10), "s0 <= s1"),
        (dict(step=-1, total_steps=10), "step"),
        (dict(step=0, total_steps=0), "total_steps"),
        (dict(step=0, total_steps=10, s0=0), "s0"),
        (dict(step=1.5, total_steps=10), "step"),
        (dict(step=None, total_steps=10), "step"),
        (dict(step=0, total_steps="many"), "total_steps"),
    ],
)
def test_curriculum_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ict_curriculum(**kwargs)


@pytest.mark.parametrize("n", [1, 10, 160, 1280])
@pytest.mark.parametrize("p_mean, p_std", [(-1.1, 2.0), (0.5, 0.7)])
def test_lognormal_probs_sum_to_one_and_match_the_erf_formula(n, p_mean, p_std):
    grid = karras_grid(n, 0.002, 80.0)
    probs = lognormal_index_probs(grid, p_mean, p_std)
    assert probs.shape == (n,) and probs.dtype == F64
    assert bool((probs >= 0).all())
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-14)
    erf = [math.erf((math.log(float(s)) - p_mean) / (math.sqrt(2) * p_std)) for s in grid]
    mass = torch.tensor([hi - lo for lo, hi in zip(erf, erf[1:], strict=False)], dtype=F64)
    # math.erf and torch's erf / erfc agree to a few ulps of 1; a difference of two erf values
    # carries an absolute error of ~1e-16, hence atol 1e-14 after normalisation.
    torch.testing.assert_close(probs, mass / mass.sum(), rtol=1e-10, atol=1e-14)


def test_lognormal_upper_tail_has_no_cancellation():
    # Far in the upper tail erf(u) rounds to 1 and plain erf differences are 0 or noise; the
    # implementation takes erfc differences there. Reference: scipy erfc (exact to ~1 ulp).
    grid = torch.exp(torch.linspace(15.0, 20.0, 6, dtype=F64))
    probs = lognormal_index_probs(grid)
    u = (np.log(grid.numpy()) + 1.1) / (math.sqrt(2) * 2.0)
    mass = np_erfc(u[:-1]) - np_erfc(u[1:])
    assert bool((probs > 0).all())
    torch.testing.assert_close(probs, torch.from_numpy(mass / mass.sum()), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="p_mean=-1.1 is invalid: the lognormal puts no mass"):
        lognormal_index_probs(torch.exp(torch.tensor([60.0, 61.0], dtype=F64)), p_std=0.5)


def test_sample_indices_follow_the_probabilities(gen):
    # n = 40000 draws; each bin count is Binomial(n, p_i): |freq - p| < 5 sd for all 10 bins
    # (false alarm < 1e-5 per run; the generator is seeded, so the run is fixed anyway).
    probs = lognormal_index_probs(karras_grid(10, 0.002, 80.0))
    n = 40000
    idx = sample_indices(probs, n, gen)
    assert idx.dtype == torch.long and idx.shape == (n,)
    freq = torch.bincount(idx, minlength=10).double() / n
    sd = torch.sqrt(probs * (1 - probs) / n)
    assert bool(((freq - probs).abs() <= 5 * sd + 1e-12).all())


def test_weights_are_inverse_spacings():
    grid = karras_grid(17, 0.002, 80.0)
    w = ict_weights(grid)
    assert torch.equal(w, 1.0 / (grid[1:] - grid[:-1]))
    with pytest.raises(
        ValueError, match=r"(?s)grid=tensor\(.*\) is invalid: use strictly increasing"
    ):
        ict_weights(grid.flip(0))


@pytest.mark.parametrize("name", ["ve", "linear"])
def test_objective_schedule_follows_the_curriculum(name):
    process = PROCESSES[name]
    obj = ConsistencyObjective(process, "ct", total_steps=8000)
    for step in (0, 999, 1000, 7500):
        sched = obj.schedule(step)
        n = ict_curriculum(step, 8000) - 1
        assert obj.num_intervals(step) == n
        assert torch.equal(sched.grid, karras_grid(n, process.t_min, process.t_max))
        sigma = process.b(sched.grid) / process.a(sched.grid)  # = grid for ve
        assert torch.equal(sched.probs, lognormal_index_probs(sigma))
        assert torch.equal(sched.weights, ict_weights(sched.grid))
    grid = uniform_grid(8, process.t_min, process.t_max)
    fixed = ConsistencyObjective(process, "ct", fixed_grid=grid, index_probs="uniform")
    assert torch.equal(fixed.schedule(123).grid, grid)
    assert torch.equal(fixed.schedule(0).probs, torch.full((8,), 1 / 8, dtype=F64))


# ================================================================================================
# Distances
# ================================================================================================
def test_distances_match_their_closed_forms(gen):
    a = torch.randn(6, 3, 4, generator=gen, dtype=F64)
    b = torch.randn(6, 3, 4, generator=gen, dtype=F64)
    diff = (a - b).reshape(6, -1)
    c = 0.3
    sq = (diff**2).sum(1)
    torch.testing.assert_close(squared_l2(a, b), sq, rtol=1e-14, atol=0)
    torch.testing.assert_close(l2_norm(a, b), sq.sqrt(), rtol=1e-14, atol=0)
    torch.testing.assert_close(pseudo_huber(a, b, c), torch.sqrt(sq + c**2) - c, rtol=1e-12, atol=0)
    elem = (torch.sqrt(diff**2 + c**2) - c).sum(1)
    torch.testing.assert_close(pseudo_huber_elementwise(a, b, c), elem, rtol=1e-12, atol=0)
    # The two pseudo-Huber forms differ away from 0 (peers mix them up silently).
    assert not torch.allclose(pseudo_huber(a, b, c), pseudo_huber_elementwise(a, b, c))


@pytest.mark.parametrize("name", DISTANCES)
def test_small_distance_behaviour_matches_alpha_and_c(name, gen):
    # phi(u) ~ C u^alpha as u -> 0 (Theorem 1). At u = 1e-3 c the pseudo-Huber forms deviate from
    # their quadratic limit by a relative u^2 / (4 c^2) = 2.5e-7: tolerance 1e-6.
    dim = 48
    dist = get_distance(name, dim)
    delta = torch.randn(4, dim, generator=gen, dtype=F64)
    delta = delta / delta.norm(dim=1, keepdim=True)
    u = 1e-3 * (dist.c if dist.c is not None else 1.0)
    zero = torch.zeros_like(delta)
    ratio = dist(zero, u * delta) / (dist.C * u**dist.alpha)
    if dist.radial:
        torch.testing.assert_close(ratio, torch.ones(4, dtype=F64), rtol=1e-6, atol=0)
    else:  # elementwise: near 0 it is sum_k delta_k^2 / (2c) = ||delta||^2 / (2c) as well
        torch.testing.assert_close(ratio, torch.ones(4, dtype=F64), rtol=1e-6, atol=0)
    expected = {"squared_l2": (2, 1.0), "l2_norm": (1, 1.0)}
    if name in expected:
        assert (dist.alpha, dist.C) == expected[name]
    else:
        assert dist.alpha == 2 and dist.C == pytest.approx(1 / (2 * 0.00054 * math.sqrt(dim)))
    assert dist.radial == (name != "pseudo_huber_elementwise")


def test_pseudo_huber_has_no_cancellation_and_default_c():
    # Naive sqrt(u^2 + c^2) - c is 0 in float64 at u = 1e-12; the stable form gives u^2 / (2c).
    c = default_huber_c(3 * 32 * 32)
    assert c == pytest.approx(0.00054 * math.sqrt(3072))
    a = torch.zeros(1, 3, 32, 32, dtype=F64)
    b = a.clone()
    b[0, 0, 0, 0] = 1e-12
    got = get_distance("pseudo_huber", 3072)(a, b)
    assert float(got) == pytest.approx(1e-24 / (2 * c), rel=1e-12)
    assert get_distance("pseudo_huber", 3072, c=0.1).c == 0.1


def test_norm_gradient_at_zero_is_finite():
    a = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    l2_norm(a, torch.zeros(2, 3, dtype=F64)).sum().backward()
    assert torch.equal(a.grad, torch.zeros(2, 3, dtype=F64))


def test_unknown_distance_lists_the_options():
    with pytest.raises(ValueError) as err:
        get_distance("huber", 2)
    for name in DISTANCES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="pseudo_huber_elementwise"):
        ConsistencyObjective("ve", "ct", total_steps=10, distance="l1")


# ================================================================================================
# Losses: theory
# ================================================================================================
def _full_grid_cd_loss(process, n, distance, cd_step, reps=64):
    """Mean over all n intervals of an equally spaced grid of lambda_i D_i, each interval seen by
    the same ``reps`` (data, noise) pairs (common random numbers across n)."""
    gmm = one_gaussian()
    g = torch.Generator().manual_seed(0)
    data = gmm.sample(reps, generator=g).repeat(n, 1)
    noise = torch.randn(reps, 2, generator=g, dtype=F64).repeat(n, 1)
    idx = torch.arange(n).repeat_interleave(reps)
    obj = ConsistencyObjective(
        process,
        "cd",
        distance=distance,
        velocity=TrueVelocity(gmm, process),
        cd_step=cd_step,
        fixed_grid=uniform_grid(n, process.t_min, process.t_max),
        index_probs="uniform",
    )
    model = GaussianFlowMap(gmm.means[0], float(gmm.stds[0]), process)
    return obj(model, data, noise=noise, indices=idx).loss.item()


@pytest.mark.parametrize(
    "name, distance, cd_step, order, alpha",
    [
        ("ve", "squared_l2", "euler", 1, 2),
        ("ve", "squared_l2", "heun", 2, 2),
        ("ve", "l2_norm", "euler", 1, 1),
        ("linear", "squared_l2", "euler", 1, 2),
        ("linear", "squared_l2", "heun", 2, 2),
    ],
)
def test_cd_loss_with_exact_velocity_shrinks_at_the_step_order(
    name, distance, cd_step, order, alpha
):
    # The model is the exact flow map, so f(x_lo, t_lo) - f(x_hi, t_hi) = J (x_lo - Phi(x_hi)),
    # the solver's local error O(h^(order+1)). Then lambda D = h^-1 C ||.||^alpha
    # = O(h^(alpha (order + 1) - 1)) per interval, and so is the mean over intervals:
    # L_CD(N) ~ N^-(alpha (order + 1) - 1), i.e. -3 (Euler, squared L2), -5 (Heun), -1 (Euler,
    # norm). The next term is O(h) relative, which moves the fitted slope over N = 32..128 by
    # < 0.1 (measured: within 0.06); tolerance 0.15, far below the gap of 1-2 between orders.
    process = VE_SHORT if name == "ve" else PROCESSES[name]
    ns = [32, 64, 128]
    losses = [_full_grid_cd_loss(process, n, distance, cd_step) for n in ns]
    x = np.log(ns)
    y = np.log(losses)
    slope = np.polyfit(x, y, 1)[0]
    expected = -(alpha * (order + 1) - 1)
    assert abs(slope - expected) < 0.15, (slope, expected, losses)


def _ct_cd_terms(process, t_hi, h, model, data, noise, velocity):
    """Per-sample ``gap = D_CT - D_CD`` (squared L2, one interval ``[t_hi - h, t_hi]``) and the
    two terms of its expansion: ``cross = -2h <A, J u>`` and ``quad = h^2 ||J u||^2`` with
    ``u = xdot - v(x_hi)``, ``J = df/dx(x_hi, t_hi)``,
    ``A = f(x_hi - h v, t_lo) - f(x_hi, t_hi)``."""
    grid = torch.tensor([t_hi - h, t_hi], dtype=F64)
    ct = ConsistencyObjective(process, "ct", distance="squared_l2", fixed_grid=grid)
    cd = ConsistencyObjective(
        process, "cd", distance="squared_l2", fixed_grid=grid, velocity=velocity
    )
    gap = ct(model, data, noise=noise).diagnostics["distance"]
    gap = gap - cd(model, data, noise=noise).diagnostics["distance"]
    n = data.shape[0]
    th, tl = grid[1].expand(n), grid[0].expand(n)
    x_hi = process.interpolate(data, noise, th)
    v = velocity(x_hi, th)
    u = process.xdot(data, noise, th) - v
    # J u by the double-vjp trick: g(w) = J^T w is linear in w, so d<g(w), u>/dw = J u.
    x = x_hi.clone().requires_grad_(True)
    out = model(x, th)
    w = torch.zeros_like(out, requires_grad=True)
    (jt_w,) = torch.autograd.grad(out, x, w, create_graph=True)
    (ju,) = torch.autograd.grad(jt_w, w, u)
    with torch.no_grad():
        a_term = model(x_hi - h * v, tl) - out
    cross = -2 * h * (a_term * ju).sum(1)
    return gap.detach(), cross.detach(), (h**2 * (ju**2).sum(1)).detach()


@pytest.mark.parametrize("name, t_hi, h", [("ve", 1.0, 0.05), ("linear", 0.5, 0.025)])
def test_ct_minus_cd_is_the_eq11_leading_term(name, t_hi, h):
    # docs/paper.md section 3 for squared L2, one interval [t_hi - h, t_hi], a smooth model f.
    # Per sample, with A = f(x_CD) - f(x_hi) = O(h) and delta = f(x_CT) - f(x_CD)
    # = -h J (xdot - v) + O(h^2):
    #   D_CT - D_CD = 2 <A, delta> + ||delta||^2 = cross + quad + O(h^3).      (1)
    # The first-order term has zero mean, E[cross] = -2h E<A, J (E[xdot | x_hi] - v)> = 0, so CT
    # equals CD to first order and E[D_CT - D_CD] = h^2 E ||J (xdot - v)||^2 (1 + O(h)): the
    # Eq. 11 integrand. Checks:
    # (i) (1) pointwise: the max remainder shrinks as h^3 (log2 ratio 3 +- 0.5; measured 3.05-3.07).
    # (ii) mean(gap - cross) / mean(quad) = 1 + O(h): Richardson 2 r(h/2) - r(h) is 1 up to
    #     O(h^2) (measured within 0.005; tolerance 0.02). This holds for any velocity.
    # (iii) E[cross] = 0 with the exact velocity: |mean| < 4 standard errors (B = 2^14); with a
    #     wrong teacher (v = 0) the first-order term survives (> 8 standard errors; measured 85
    #     for ve, 10.6 for linear). Hence the raw ratio mean(gap) / mean(quad) -> 1.
    process = VE_SHORT if name == "ve" else PROCESSES[name]
    gmm = two_gaussians()
    g = torch.Generator().manual_seed(1)
    n = 2**14
    data = gmm.sample(n, generator=g)
    noise = torch.randn(n, 2, generator=g, dtype=F64)
    model = ConsistencyModel(TanhBackbone(2, seed=3), process)
    exact = TrueVelocity(gmm, process)

    for velocity in (exact, lambda x, t, **kw: torch.zeros_like(x)):
        terms = [_ct_cd_terms(process, t_hi, s, model, data, noise, velocity) for s in (h, h / 2)]
        rem = [float((gap - cross - quad).abs().max()) for gap, cross, quad in terms]
        assert abs(math.log2(rem[0] / rem[1]) - 3) < 0.5, rem
        ratio = [float((gap - cross).mean() / quad.mean()) for gap, cross, quad in terms]
        assert abs(2 * ratio[1] - ratio[0] - 1) < 0.02, ratio
        for _gap, cross, quad in terms:
            z = float(cross.mean() / quad.mean())
            se = float(cross.std() / math.sqrt(n) / quad.mean())
            if velocity is exact:
                assert abs(z) < 4 * se, (z, se)
            else:
                assert abs(z) > 8 * se, (z, se)
    gap, cross, quad = _ct_cd_terms(process, t_hi, h / 2, model, data, noise, exact)
    assert abs(float(gap.mean() / quad.mean()) - 1) < 0.1  # measured 0.06 / 0.07: O(h) + noise


@pytest.mark.parametrize("name", ["ve", "linear"])
@pytest.mark.parametrize("cd_step", ["euler", "heun"])
def test_cd_with_the_one_sample_velocity_is_ct(name, cd_step):
    # xdot is constant along each sample path for both processes, so one Euler (or Heun) step of
    # MonteCarloVelocity from x_hi lands on x_lo = a(t_lo) data + b(t_lo) noise (Eq. 6) up to
    # rounding: float64, rtol 1e-12.
    process = PROCESSES[name]
    model = ConsistencyModel(TanhBackbone(2), process)
    data, noise = _batch(64)
    kw = dict(distance="squared_l2", total_steps=100)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ct = ConsistencyObjective(process, "ct", **kw)(model, data, 50, generator=g1, noise=noise)
    cd = ConsistencyObjective(
        process, "cd", velocity=MonteCarloVelocity(process), cd_step=cd_step, **kw
    )(model, data, 50, generator=g2, noise=noise)
    assert torch.equal(ct.diagnostics["index"], cd.diagnostics["index"])
    torch.testing.assert_close(cd.loss, ct.loss, rtol=1e-12, atol=1e-14)


# ================================================================================================
# Losses: identities between the methods
# ================================================================================================
def _ct(process, model, data, noise, seed, **kw):
    obj = ConsistencyObjective(process, "ct", total_steps=100, **kw)
    return obj(model, data, 60, generator=torch.Generator().manual_seed(seed), noise=noise)


@pytest.mark.parametrize("name", ["ve", "linear"])
def test_gc_with_mu_zero_is_ct(name):
    process = PROCESSES[name]
    model = ConsistencyModel(TanhBackbone(2), process)
    data, noise = _batch(32)
    ct = _ct(process, model, data, noise, 9)
    called = []
    gc = ConsistencyObjective(process, "gc", mu=0.0, total_steps=100)(
        model,
        data,
        60,
        generator=torch.Generator().manual_seed(9),
        noise=noise,
        gc_model=lambda x, t: called.append(1) or x,
    )
    assert torch.equal(gc.loss, ct.loss)
    assert not bool(gc.diagnostics["gc_mask"].any()) and not called
    # Also with noise drawn inside from the same generator seed.
    ct2 = _ct(process, model, data, None, 11)
    gc2 = ConsistencyObjective(process, "gc", mu=0.0, total_steps=100)(
        model, data, 60, generator=torch.Generator().manual_seed(11), gc_model=model
    )
    assert torch.equal(gc2.loss, ct2.loss)


@pytest.mark.parametrize("name", ["ve", "linear"])
@pytest.mark.parametrize("mu", [0.5, 1.0])
def test_gc_with_a_generator_returning_the_paired_data_is_ct(name, mu):
    process = PROCESSES[name]
    model = ConsistencyModel(TanhBackbone(2), process)
    data, noise = _batch(32)
    ct = _ct(process, model, data, noise, 3)
    seen_t = []

    def rows_of(x_t, t):
        # The generator sees only the GC rows: find each row's pair by the exact recovery
        # (x_t - b noise_j) / a = data_j (the residual is exactly 0 for the true j).
        tt = t[:, None, None]
        rec = (x_t[:, None] - process.b(tt) * noise[None]) / process.a(tt)
        return ((rec - data[None]) ** 2).sum(-1).argmin(1)

    def paired(x_t, t):
        seen_t.append(t.clone())
        return data[rows_of(x_t, t)].clone()

    obj = ConsistencyObjective(process, "gc", mu=mu, total_steps=100)
    gc = obj(
        model, data, 60, generator=torch.Generator().manual_seed(3), noise=noise, gc_model=paired
    )
    assert torch.equal(gc.loss, ct.loss)
    assert torch.equal(gc.diagnostics["pair_cost"], ct.diagnostics["pair_cost"])
    # The generator is queried at s_i = t_lo (Eq. 13) on the GC rows; mu = 1 makes every row GC.
    mask = gc.diagnostics["gc_mask"]
    assert torch.equal(seen_t[0], gc.diagnostics["t_lo"][mask])
    if mu == 1.0:
        assert bool(mask.all())

    # The ideal recovery (x_t - b noise) / a returns the pairs up to rounding: rtol 1e-12.
    def recover(x_t, t):
        tt = t[:, None]
        return (x_t - process.b(tt) * noise[rows_of(x_t, t)]) / process.a(tt)

    gc_ideal = obj(
        model, data, 60, generator=torch.Generator().manual_seed(3), noise=noise, gc_model=recover
    )
    torch.testing.assert_close(gc_ideal.loss, ct.loss, rtol=1e-12, atol=0)


def test_gc_with_another_generator_trains_on_its_pairs():
    # A check that can fail: a generator returning data + 1 changes the pairs, the costs and the
    # loss (mu = 1: every row).
    process = PROCESSES["ve"]
    model = ConsistencyModel(TanhBackbone(2), process)
    data, noise = _batch(32)
    ct = _ct(process, model, data, noise, 3)
    gc = ConsistencyObjective(process, "gc", mu=1.0, total_steps=100)(
        model,
        data,
        60,
        generator=torch.Generator().manual_seed(3),
        noise=noise,
        gc_model=lambda x, t: data + 1.0,
    )
    torch.testing.assert_close(
        gc.diagnostics["pair_cost"], ((data + 1.0 - noise) ** 2).sum(1), rtol=1e-12, atol=0
    )
    assert not torch.allclose(gc.loss, ct.loss)


def test_ot_on_an_optimally_paired_batch_is_ct(gen):
    # noise_j = data_j + 0.01 e_j with well separated data: the identity is the unique optimal
    # assignment, so batch-OT keeps the pairs and its loss is the CT loss bit for bit.
    process = PROCESSES["ve"]
    model = ConsistencyModel(TanhBackbone(2), process)
    data = 3 * torch.randn(24, 2, generator=gen, dtype=F64)
    noise = data + 0.01 * torch.randn(24, 2, generator=gen, dtype=F64)
    ct = _ct(process, model, data, noise, 4)
    ot = ConsistencyObjective(process, "ot", total_steps=100)(
        model, data, 60, generator=torch.Generator().manual_seed(4), noise=noise
    )
    assert torch.equal(ot.coupling.permutation.cpu(), torch.arange(24))
    assert torch.equal(ot.loss, ct.loss)
    # A shuffled batch is re-paired: lower transport cost, a different loss.
    perm = torch.randperm(24, generator=gen)
    ct_s = _ct(process, model, data, noise[perm], 4)
    ot_s = ConsistencyObjective(process, "ot", total_steps=100)(
        model, data, 60, generator=torch.Generator().manual_seed(4), noise=noise[perm]
    )
    assert float(ot_s.diagnostics["pair_cost"].mean()) < float(ct_s.diagnostics["pair_cost"].mean())
    assert float(ot_s.diagnostics["pair_cost"].mean()) == pytest.approx(ot_s.coupling.cost_after)
    assert not torch.allclose(ot_s.loss, ct_s.loss)


def test_ot_uses_the_given_coupling_function():
    calls = []

    def spy(data, noise):
        calls.append(data.shape)
        return ot_coupling(data, noise)

    data, noise = _batch(16)
    model = ConsistencyModel(TanhBackbone(2), "ve")
    ConsistencyObjective("ve", "ot", total_steps=10, ot_coupling_fn=spy)(
        model, data, 0, noise=noise
    )
    assert calls == [data.shape]


# ================================================================================================
# Losses: mechanics
# ================================================================================================
@pytest.mark.parametrize("method", ["ct", "cd", "ot", "gc"])
def test_diagnostics_are_consistent_with_the_loss(method, gen):
    process = PROCESSES["ve"]
    model = ConsistencyModel(TanhBackbone(2), process)
    data, noise = _batch(48)
    kw = {"velocity": TrueVelocity(one_gaussian(), process)} if method == "cd" else {}
    obj = ConsistencyObjective(process, method, total_steps=1000, **kw)
    out = obj(
        model, data, 400, generator=gen, noise=noise, gc_model=model if method == "gc" else None
    )
    d = out.diagnostics
    grid = obj.schedule(400).grid
    assert out.num_intervals == grid.numel() - 1 == ict_curriculum(400, 1000) - 1
    assert torch.equal(d["t_lo"], grid[d["index"]]) and torch.equal(d["t_hi"], grid[d["index"] + 1])
    torch.testing.assert_close(d["weight"], 1 / (d["t_hi"] - d["t_lo"]), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, (d["weight"] * d["distance"]).mean(), rtol=1e-12, atol=0)
    assert all(v.shape == (48,) and not v.requires_grad for v in d.values())
    assert d["gc_mask"].dtype == torch.bool
    if method in ("ct", "cd"):
        torch.testing.assert_close(d["pair_cost"], ((data - noise) ** 2).sum(1), rtol=1e-12, atol=0)


def test_teacher_is_under_stop_gradient():
    # Backbone F(x, c) = theta x: f(x, t) = k(t) x with k = c_skip + c_out c_in theta. With the
    # teacher detached, dL/dtheta = mean lambda 2 <k_hi x_hi - k_lo x_lo, c_out_hi c_in_hi x_hi>
    # (no term through the teacher). float64: rtol 1e-10.
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.tensor(0.7, dtype=F64))

        def forward(self, x, c):
            return self.theta * x

    process = PROCESSES["ve"]
    model = ConsistencyModel(Scale(), process)
    data, noise = _batch(40)
    obj = ConsistencyObjective(process, "ct", distance="squared_l2", total_steps=100)
    out = obj(model, data, 80, generator=torch.Generator().manual_seed(2), noise=noise)
    out.loss.backward()
    d = out.diagnostics
    x_lo = data + d["t_lo"][:, None] * noise
    x_hi = data + d["t_hi"][:, None] * noise
    with torch.no_grad():
        s_lo, o_lo, i_lo, _ = model.preconditioning(d["t_lo"])
        s_hi, o_hi, i_hi, _ = model.preconditioning(d["t_hi"])
        k_lo, k_hi = s_lo + o_lo * i_lo * 0.7, s_hi + o_hi * i_hi * 0.7
        resid = k_hi[:, None] * x_hi - k_lo[:, None] * x_lo
        expected = (d["weight"] * 2 * (resid * (o_hi * i_hi)[:, None] * x_hi).sum(1)).mean()
    torch.testing.assert_close(model.backbone.theta.grad, expected, rtol=1e-10, atol=0)


def test_shared_dropout_shares_the_mask():
    # p = 0.5 on 64 x 8 entries: student and teacher masks must be identical, non-trivial, and
    # fresh at the next step; the global RNG advances exactly as for one pass.
    backbone = DropoutRecorder()
    model = ConsistencyModel(backbone, "ve").train()
    data, noise = _batch(64, d=8)
    obj = ConsistencyObjective("ve", "ct", total_steps=100)
    torch.manual_seed(123)
    obj(model, data, 10, generator=torch.Generator().manual_seed(0), noise=noise)
    after = torch.rand(4)
    student, teacher = backbone.masks
    assert torch.equal(student, teacher)
    assert 0.3 < student.double().mean() < 0.7  # a real mask (Binomial(512, 0.5): sd 0.022)
    torch.manual_seed(123)
    ref = nn.Dropout(0.5)(torch.ones(64, 8, dtype=F64)) != 0  # one pass from the same state
    assert torch.equal(ref, student) and torch.equal(torch.rand(4), after)
    obj(model, data, 10, generator=torch.Generator().manual_seed(0), noise=noise)
    assert torch.equal(backbone.masks[2], backbone.masks[3])
    assert not torch.equal(backbone.masks[2], student)
    # Without the shared stream two passes differ (the recorder would notice a broken replay).
    model(data, 1.0), model(data, 1.0)
    assert not torch.equal(backbone.masks[4], backbone.masks[5])


@pytest.mark.gpu
def test_shared_dropout_on_cuda():
    dev = torch.device("cuda")
    backbone = DropoutRecorder()
    model = ConsistencyModel(backbone, "ve").train().to(dev)
    data = torch.randn(64, 8, device=dev)
    obj = ConsistencyObjective("ve", "ct", total_steps=100)
    torch.cuda.manual_seed(7)
    obj(model, data, 10, generator=torch.Generator(device=dev).manual_seed(0))
    after = torch.rand(4, device=dev)
    student, teacher = backbone.masks
    assert torch.equal(student, teacher)
    assert 0.3 < student.double().mean().item() < 0.7
    torch.cuda.manual_seed(7)
    ref = nn.Dropout(0.5)(torch.ones(64, 8, device=dev)) != 0
    assert torch.equal(ref, student) and torch.equal(torch.rand(4, device=dev), after)


def test_shared_dropout_passes_replays_the_cpu_stream():
    # Both passes see the same draws; afterwards the stream is where one pass leaves it.
    torch.manual_seed(0)
    ref, nxt = torch.rand(5), torch.rand(2)
    torch.manual_seed(0)
    a, b = shared_dropout_passes(lambda: torch.rand(5), lambda: torch.rand(5), torch.device("cpu"))
    assert torch.equal(a, ref) and torch.equal(b, ref) and torch.equal(torch.rand(2), nxt)


def test_float32_training_step_runs_with_the_toy_mlp(gen):
    model = ConsistencyModel(ToyMLP(2, hidden=64, dropout=0.1), "ve")
    data = torch.randn(128, 2, generator=gen)
    obj = ConsistencyObjective("ve", "ct", total_steps=1000)
    out = obj(model, data, 500, generator=gen)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads)
    assert any(float(gr.abs().sum()) > 0 for gr in grads)


# ================================================================================================
# Bad input
# ================================================================================================
_VEL = TrueVelocity(one_gaussian(), "ve")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="ctx"), r"method='ctx' is invalid: use one of"),
        (dict(method="gc", mu=-0.1), r"mu=-0.1 is invalid: use a probability in \[0, 1\]"),
        (dict(method="gc", mu=1.5), r"mu=1.5 is invalid: use a probability"),
        (dict(method="gc", mu=float("nan")), r"mu=nan is invalid: use a probability"),
        (dict(method="gc", mu=True), r"mu=True is invalid: use a probability"),
        (dict(method="ct", s0=20, s1=10), "s0 <= s1"),
        (dict(method="ct", total_steps=None), "total_steps is required"),
        (dict(method="ct", total_steps=0), "total_steps"),
        (dict(method="cd"), "velocity=None is invalid: method='cd' needs a gcflows.velocity"),
        (
            dict(method="ct", velocity=_VEL),
            r"type\(velocity\)=.* is invalid: velocity= is used by method='cd' only",
        ),
        (dict(method="cd", velocity=_VEL, cd_step="rk4"), "cd_step"),
        (dict(method="ct", distance="l1"), r"distance='l1' is invalid: use one of"),
        (dict(method="ct", p_std=0.0), "p_std"),
        (dict(method="ct", rho=0.0), "rho"),
        (dict(method="ct", index_probs="beta"), "index_probs"),
        (
            dict(method="ct", fixed_grid=torch.tensor([1.0, 0.5])),
            r"fixed_grid=tensor\(.*\) is invalid: use strictly increasing",
        ),
        (
            dict(method="ct", fixed_grid=torch.tensor([1.0])),
            r"fixed_grid.shape=\(1,\) is invalid: .* at least 2",
        ),
        (dict(method="ct", fixed_grid=torch.tensor([1.0, 100.0])), "fixed_grid must lie in"),
        (dict(method="ot", ot_coupling_fn=3), "ot_coupling_fn=3 is invalid: pass a callable"),
    ],
)
def test_bad_config_raises_before_any_work(kwargs, match):
    kwargs = {"total_steps": 100, **kwargs}
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        ConsistencyObjective("ve", method, **kwargs)


def test_bad_call_raises():
    model = ConsistencyModel(TanhBackbone(2), "ve")
    data, noise = _batch(8)
    ct = ConsistencyObjective("ve", "ct", total_steps=100)
    gc = ConsistencyObjective("ve", "gc", total_steps=100)
    with pytest.raises(ValueError, match="gc_model=None is invalid: method='gc' needs the network"):
        gc(model, data, 0)
    with pytest.raises(
        ValueError, match=r"type\(gc_model\)='ConsistencyModel' is invalid: .* method='gc' only"
    ):
        ct(model, data, 0, gc_model=model)
    with pytest.raises(
        ValueError, match=r"noise.shape=\(4, 2\) is invalid: use a tensor of the data's shape"
    ):
        ct(model, data, 0, noise=noise[:4])
    bad = data.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="data contains NaN"):
        ct(model, bad, 0)
    with pytest.raises(ValueError, match="step"):
        ct(model, data, -1)
    with pytest.raises(ValueError, match="B >= 1"):
        ct(model, data[:0], 0)
    with pytest.raises(
        ValueError,
        match=r"\(indices.min\(\), indices.max\(\)\)=\(10, 10\) is invalid: use indices in",
    ):
        ct(model, data, 0, indices=torch.full((8,), 10))


def test_objective_config_validates_once_and_the_objective_uses_it_whole():
    cfg = ObjectiveConfig(method="gc", mu=0.25, s0=2, s1=16, total_steps=40, rho=5.0)
    obj = ConsistencyObjective("ve", cfg)
    assert obj.config is cfg and obj.method == "gc"
    keywords = ConsistencyObjective("ve", "gc", mu=0.25, s0=2, s1=16, total_steps=40, rho=5.0)
    assert keywords.config == cfg
    assert torch.equal(obj.schedule(39).grid, keywords.schedule(39).grid)
    assert obj.num_intervals(39) == 16 and obj.num_intervals(0) == 2
    with pytest.raises(ValueError, match=r"TrainConfig\.mu=2\.0 is invalid"):
        ObjectiveConfig(method="gc", mu=2.0, total_steps=10, owner="TrainConfig")
    with pytest.raises(
        ValueError, match=r"settings=\['mu'\] is invalid: .* inside the ObjectiveConfig"
    ):
        ConsistencyObjective("ve", cfg, mu=0.5)


@pytest.mark.parametrize("method", ["ot", "gc"])
def test_objective_checks_the_batch_once(method, monkeypatch):
    """The objective checks data at its entry; the couplings it calls check nothing again
    (docs/design.md section 3); with ``validate=False`` (the training step) nothing is checked."""
    import gcflows.consistency as consistency_module
    import gcflows.couplings as couplings_module

    def checked_again(*args, **kwargs):
        raise AssertionError("the coupling re-checked a batch the objective had checked")

    monkeypatch.setattr(couplings_module, "pair", checked_again)
    monkeypatch.setattr(couplings_module, "finite", checked_again)
    seen = []
    real_finite = consistency_module.finite
    monkeypatch.setattr(
        consistency_module, "finite", lambda x, name: seen.append(name) or real_finite(x, name)
    )
    process = VEProcess(t_min=0.002, t_max=80.0)
    obj = ConsistencyObjective(process, method, mu=0.5, total_steps=10)
    model = ConsistencyModel(ToyMLP(3, hidden=8, depth=1), process)
    data = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    gc_model = (lambda x, t: 0.5 * x) if method == "gc" else None
    obj.schedule(0)  # the grid is checked once when it is built, then cached
    seen.clear()
    out = obj(model, data, 0, generator=torch.Generator().manual_seed(1), gc_model=gc_model)
    assert seen == ["data"] and torch.isfinite(out.loss)
    seen.clear()
    again = obj(
        model,
        data,
        0,
        generator=torch.Generator().manual_seed(1),
        gc_model=gc_model,
        validate=False,
    )
    assert seen == [] and torch.equal(again.loss, out.loss)
