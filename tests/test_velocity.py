"""Velocity estimators (gcflows.velocity) against the exact Gaussian-mixture field, in float64."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from gcflows.gmm import GaussianMixture, random_mixture, two_gaussians_1to2
from gcflows.processes import VEProcess, get_process, karras_grid
from gcflows.velocity import (
    DistilledVelocity,
    GeneratorInducedVelocity,
    MonteCarloVelocity,
    PreconditionedDenoiser,
    TrueVelocity,
    euler_step,
    fit_denoiser,
    heun_step,
)

F64 = torch.float64


def time_from_unit(process, u: float) -> float:
    """Log-uniform time in the process domain; ``u = 0`` gives t_min, ``u = 1`` gives t_max."""
    return math.exp((1 - u) * math.log(process.t_min) + u * math.log(process.t_max))


def mixture(seed: int, dim: int, full: bool) -> GaussianMixture:
    """A random 3-component mixture, isotropic (one a Dirac) or with full covariances."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(3, generator=g, dtype=F64) + 0.2
    means = torch.randn(3, dim, generator=g, dtype=F64)
    if full:
        a = 0.4 * torch.randn(3, dim, dim, generator=g, dtype=F64)
        return GaussianMixture(w / w.sum(), means, covs=a @ a.transpose(1, 2))
    stds = 0.3 * torch.rand(3, generator=g, dtype=F64)
    stds[0] = 0.0
    return GaussianMixture(w / w.sum(), means, stds=stds)


def marginal_points(gm, process, t, n, g):
    data = gm.sample(n, generator=g)
    noise = torch.randn(data.shape, generator=g, dtype=F64)
    return process.interpolate(data, noise, t), data, noise


processes = st.sampled_from(["ve", "linear"])
units = st.floats(0.0, 1.0)
seeds = st.integers(0, 2**31 - 1)


@given(pname=processes, u=units, seed=seeds, dim=st.integers(1, 3), full=st.booleans())
@example(pname="ve", u=0.0, seed=0, dim=2, full=False)
@example(pname="ve", u=1.0, seed=1, dim=1, full=True)
@example(pname="linear", u=0.0, seed=2, dim=3, full=True)
@example(pname="linear", u=1.0, seed=3, dim=2, full=False)
def test_one_sample_xdot_averaged_over_the_posterior_is_the_true_velocity(
    pname, u, seed, dim, full
):
    """Average of MonteCarloVelocity with data ~ p(data | x) (exact draws, n = 4000 per point,
    generator from the drawn seed) and noise = (x - a data) / b. That xdot is affine in data,
    xdot = (a' - b' a / b) data + b' x / b, so its std per coordinate is
    |a' - b' a / b| sqrt(C_ii): bound k = 5 of those over sqrt(n) (for ve: E[noise | x])."""
    process = get_process(pname)
    t = time_from_unit(process, u)
    gm = mixture(seed, dim, full)
    g = torch.Generator().manual_seed(seed)
    x, _, _ = marginal_points(gm, process, t, 3, g)
    n, k = 4000, 5.0
    xs = x.repeat_interleave(n, 0)
    data = gm.sample_posterior(xs, t, process, generator=g)
    tt = torch.tensor(t, dtype=F64)
    a, b, da, db = process.a(tt), process.b(tt), process.da(tt), process.db(tt)
    noise = (xs - a * data) / b
    # The pairs reproduce x (up to rounding of the division by b).
    torch.testing.assert_close(process.interpolate(data, noise, t), xs, rtol=1e-9, atol=1e-9)
    mc = MonteCarloVelocity(process)(xs, t, data=data, noise=noise).reshape(len(x), n, dim)
    true = TrueVelocity(gm, process)(x, t)
    std = (da - db * a / b).abs() * gm.posterior_cov(x, t, process).diagonal(dim1=1, dim2=2).sqrt()
    # + 1e-9 |v|: rounding of noise = (x - a data) / b when b is tiny and the posterior a Dirac.
    bound = k * std / math.sqrt(n) + 1e-9 * (1 + true.abs())
    assert bool(((mc.mean(1) - true).abs() <= bound).all())


@given(pname=processes, u=units, seed=seeds, dim=st.integers(1, 4), batch=st.integers(1, 9))
@example(pname="ve", u=0.0, seed=0, dim=2, batch=1)
@example(pname="linear", u=1.0, seed=1, dim=3, batch=9)
def test_generator_returning_the_paired_data_equals_monte_carlo(pname, u, seed, dim, batch):
    """GC with the ideal 'generator' that returns the very data of the pair reduces to CT."""
    process = get_process(pname)
    t = time_from_unit(process, u)
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, dim, generator=g, dtype=F64)
    noise = torch.randn(batch, dim, generator=g, dtype=F64)
    x = process.interpolate(data, noise, t)
    grad_modes = []

    def paired(x_t, t_):
        grad_modes.append(torch.is_grad_enabled())
        assert t_.shape == (batch,)
        return data

    gc = GeneratorInducedVelocity(paired, process)(x, t, noise=noise)
    ct = MonteCarloVelocity(process)(x, t, data=data, noise=noise)
    assert torch.equal(gc, ct)
    assert grad_modes == [False]  # the generator ran under no_grad (stop-gradient)


def test_generator_output_carries_no_gradient():
    process = VEProcess()
    lin = torch.nn.Linear(2, 2, dtype=F64)
    gc = GeneratorInducedVelocity(lambda x, t: lin(x), process)
    x = torch.randn(4, 2, dtype=F64, requires_grad=True)
    v = gc(x, 1.0, noise=torch.zeros(4, 2, dtype=F64))
    # ve: xdot = noise exactly, and nothing flows back to the generator's parameters.
    assert not v.requires_grad
    torch.testing.assert_close(v, torch.zeros(4, 2, dtype=F64))
    lin_linear = GeneratorInducedVelocity(lambda x, t: lin(x), get_process("linear"))
    v = lin_linear(x.detach(), 0.5, noise=torch.zeros(4, 2, dtype=F64))
    torch.testing.assert_close(v, -lin(x.detach()).detach())  # linear: xdot = -xhat + noise


@given(pname=processes, u=units, seed=seeds, dim=st.integers(1, 3), full=st.booleans())
@example(pname="ve", u=0.0, seed=0, dim=2, full=False)
@example(pname="linear", u=1.0, seed=1, dim=2, full=True)
def test_distilled_with_the_exact_denoiser_is_the_true_velocity(pname, u, seed, dim, full):
    process = get_process(pname)
    t = time_from_unit(process, u)
    gm = mixture(seed, dim, full)
    x, _, _ = marginal_points(gm, process, t, 6, torch.Generator().manual_seed(seed))
    seen = []

    def exact(x_t, t_):
        seen.append(t_.shape)
        return gm.denoiser(x_t, t_, process)

    distilled = DistilledVelocity(exact, process)(x, t)
    true = TrueVelocity(gm, process)(x, t)
    # v = a' D + b' (x - a D) / b against the cancellation-free form: x - a D loses
    # ~1e-16 |x| / |x - a D| relative, at most ~1e-12 here (|x - a D| >= 1e-4 |x|).
    torch.testing.assert_close(distilled, true, rtol=1e-9, atol=1e-9)
    assert seen == [(6,)]
    # docs/design.md: for both processes v = (x - D) / t; for ve also v = -t score.
    d = gm.denoiser(x, t, process)
    torch.testing.assert_close(true, (x - d) / t, rtol=1e-9, atol=1e-9)
    if pname == "ve":
        torch.testing.assert_close(true, -t * gm.score(x, t, process), rtol=1e-9, atol=1e-9)


def test_true_velocity_accepts_image_shaped_batches():
    gm = random_mixture(6, 3, 0)
    process = VEProcess()
    x = torch.randn(5, 1, 2, 3, dtype=F64)
    v = TrueVelocity(gm, process)(x, 0.7)
    assert v.shape == x.shape
    torch.testing.assert_close(v.reshape(5, 6), gm.velocity(x.reshape(5, 6), 0.7, process))


# --- steps ----------------------------------------------------------------------------------------
@given(
    pname=processes, u0=units, u1=units, seed=seeds, dim=st.integers(1, 4), batch=st.integers(1, 6)
)
@example(pname="ve", u0=1.0, u1=0.0, seed=0, dim=2, batch=3)
@example(pname="linear", u0=0.0, u1=1.0, seed=1, dim=1, batch=1)
def test_steps_follow_straight_sample_paths_exactly(pname, u0, u1, seed, dim, batch):
    """Both processes have paths affine in t: with the one-sample velocity (data / noise passed
    through **kw) one Euler or Heun step from x_t lands on x_{t'} = interpolate(data, noise, t')."""
    process = get_process(pname)
    t, t_next = time_from_unit(process, u0), time_from_unit(process, u1)
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, dim, generator=g, dtype=F64)
    noise = torch.randn(batch, dim, generator=g, dtype=F64)
    x = process.interpolate(data, noise, t)
    target = process.interpolate(data, noise, t_next)
    mc = MonteCarloVelocity(process)
    # Rounding only: |x| <= 80 |noise| for ve at t_max.
    for step in (euler_step, heun_step):
        out = step(mc, x, t, t_next, data=data, noise=noise)
        torch.testing.assert_close(out, target, rtol=1e-12, atol=1e-12 * (1 + t + t_next))


@pytest.mark.parametrize("pname", ["ve", "linear"])
def test_heun_is_second_order_and_euler_first_order(pname):
    """One step from t = 0.5 against the closed-form flow map of one Gaussian: halving h divides
    the local error by ~8 for Heun (O(h^3)) and by ~4 for Euler (O(h^2)). Bands [6, 10] and [3, 5]
    leave room for the next-order term at these step sizes."""
    process = get_process(pname)
    m, s = torch.tensor([0.3, -0.2], dtype=F64), 0.4
    gm = GaussianMixture([1.0], m[None], stds=s)
    v = TrueVelocity(gm, process)
    x = torch.tensor([[0.9, 0.1], [-0.5, 0.7]], dtype=F64)
    t = 0.5

    def sig(tt):
        return torch.sqrt(process.a(tt) ** 2 * s * s + process.b(tt) ** 2)

    def exact(h):
        t1 = torch.tensor(t + h, dtype=F64)
        t0 = torch.tensor(t, dtype=F64)
        return process.a(t1) * m + sig(t1) / sig(t0) * (x - process.a(t0) * m)

    for step, lo, hi in ((heun_step, 6.0, 10.0), (euler_step, 3.0, 5.0)):
        errs = [float((step(v, x, t, t - h) - exact(-h)).norm()) for h in (0.04, 0.02)]
        assert lo <= errs[0] / errs[1] <= hi, (step.__name__, errs)


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 between two empirical measures with uniform weights (POT, network simplex)."""
    cost = ot.dist(a.numpy(), b.numpy())  # squared Euclidean
    wa, wb = np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b))
    return math.sqrt(ot.emd2(wa, wb, cost, numItermax=10**7))


def test_heun_with_the_true_velocity_carries_noise_to_the_mixture():
    """n = 1000 draws of p_{t_max} (generator seed 20) through 40 Heun steps on the Karras grid
    (rho = 7) from 80 to 0.002 with the exact field of two_gaussians_1to2.

    - mode balance: upper-mode fraction within 5 binomial SE of 1/2;
    - exact W2 against fresh draws of p_{t_min} with the same per-mode counts (so W2 measures
      the within-mode law, not the binomial count noise): two independent such samples give
      W2 ~ 0.0027 (calibrated over seeds); bound 0.004. Stopping at t = 0.01 instead of 0.002
      would widen the modes from 0.0102 to 0.014 and add ~0.005;
    - per point against the exact flow map (dopri5): mean deviation < 1e-3, a tenth of a mode std.
    """
    gm = two_gaussians_1to2()
    process = VEProcess()
    g = torch.Generator().manual_seed(20)
    n = 1000
    x, _, _ = marginal_points(gm, process, process.t_max, n, g)
    start = x.clone()
    grid = karras_grid(40, process.t_min, process.t_max).flip(0)
    v = TrueVelocity(gm, process)
    for i in range(40):
        x = heun_step(v, x, grid[i], grid[i + 1])
    up = int((x[:, 1] > 0).sum())
    assert abs(up / n - 0.5) <= 5 * math.sqrt(0.25 / n)
    std = math.hypot(0.01, process.t_min)
    means = gm.means
    ref = torch.cat(
        [
            means[1] + std * torch.randn(up, 2, generator=g, dtype=F64),
            means[0] + std * torch.randn(n - up, 2, generator=g, dtype=F64),
        ]
    )
    assert w2(x, ref) < 0.004
    exact = gm.flow_map(start, process.t_max, process)
    assert float((x - exact).norm(dim=1).mean()) < 1e-3


# --- a fitted denoiser --------------------------------------------------------------------------
def test_fit_denoiser_gives_a_close_velocity_at_moderate_t():
    """Default settings (2000 steps) on 4096 draws of two_gaussians_1to2, ve, generator seed 0.
    Relative RMS error of the distilled velocity against the truth on 2000 marginal draws:
    measured 0.043 / 0.010 / 0.003 at t = 0.3 / 1 / 3; bounds 0.1 / 0.03 / 0.02 leave about 2x
    for platform differences in float32 training. (Near t_min the error is larger: the network
    must resolve the 0.01-wide modes; that is what a distilled teacher is like.)"""
    gm = two_gaussians_1to2()
    process = VEProcess()
    g = torch.Generator().manual_seed(0)
    net = fit_denoiser(gm.sample(4096, generator=g), process, generator=g)
    assert isinstance(net, PreconditionedDenoiser) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    distilled, true = DistilledVelocity(net, process), TrueVelocity(gm, process)
    for t, bound in ((0.3, 0.1), (1.0, 0.03), (3.0, 0.02)):
        x, _, _ = marginal_points(gm, process, t, 2000, g)
        err = (distilled(x, t) - true(x, t)).pow(2).sum(1).mean()
        rel = math.sqrt(float(err / true(x, t).pow(2).sum(1).mean()))
        assert rel < bound, (t, rel)
    out = net(x, 3.0)
    assert out.dtype == F64 and out.shape == x.shape
    torch.testing.assert_close(out, net(x, torch.full((len(x),), 3.0, dtype=F64)))


@pytest.mark.parametrize("pname", ["ve", "linear"])
def test_fit_denoiser_is_deterministic_given_the_generator(pname):
    process = get_process(pname)
    samples = two_gaussians_1to2().sample(64, generator=torch.Generator().manual_seed(1))
    nets = [
        fit_denoiser(
            samples, process, steps=15, hidden=16, generator=torch.Generator().manual_seed(7)
        )
        for _ in range(2)
    ]
    x = torch.randn(8, 2, dtype=F64)
    assert torch.equal(nets[0](x, 0.5 * process.t_max), nets[1](x, 0.5 * process.t_max))
    other = fit_denoiser(
        samples, process, steps=15, hidden=16, generator=torch.Generator().manual_seed(8)
    )
    assert not torch.equal(other(x, 0.5 * process.t_max), nets[0](x, 0.5 * process.t_max))


def test_preconditioning_leaves_the_input_at_small_noise():
    """c_skip -> 1 and c_out -> 0 as sigma -> 0: D(x, t) = x / a + O(sigma) for any weights."""
    process = get_process("linear")
    net = PreconditionedDenoiser(2, process, 0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 2, dtype=F64)
    t = 1e-6  # below t_min on purpose: the network is defined for any positive time
    out = net(x, t)
    # float32 network; |D - x / a| <= c_out |F| + (1 - c_skip)|y| ~ 2e-6 |F| with |F| = O(1).
    torch.testing.assert_close(out, x / (1 - t), rtol=0, atol=1e-4)


# --- bad input ----------------------------------------------------------------------------------
def test_missing_or_bad_keywords_raise():
    process = VEProcess()
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="data=None is invalid: .*needs the keyword data"):
        MonteCarloVelocity(process)(x, 1.0, noise=x)
    with pytest.raises(ValueError, match="noise=None is invalid: .*needs the keyword noise"):
        MonteCarloVelocity(process)(x, 1.0, data=x)
    with pytest.raises(ValueError, match="noise=None is invalid: .*needs the keyword noise"):
        GeneratorInducedVelocity(lambda z, t: z, process)(x, 1.0, data=x)
    with pytest.raises(ValueError, match=r"noise.shape=\(2, 2\) is invalid: use the shape of x_t"):
        MonteCarloVelocity(process)(x, 1.0, data=x, noise=x[:2])
    with pytest.raises(ValueError, match="data contains NaN"):
        MonteCarloVelocity(process)(x, 1.0, data=x * math.nan, noise=x)
    with pytest.raises(ValueError, match="t must lie in"):
        MonteCarloVelocity(process)(x, 100.0, data=x, noise=x)
    with pytest.raises(ValueError, match="x_t must have shape"):
        TrueVelocity(two_gaussians_1to2(), process)(torch.zeros(0, 2, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="x_t contains NaN"):
        DistilledVelocity(lambda z, t: z, process)(x * math.nan, 1.0)
    with pytest.raises(
        ValueError, match=r"denoiser\(x_t, t\).shape=\(4, 1\) is invalid: the denoiser must return"
    ):
        DistilledVelocity(lambda z, t: z[:, :1], process)(x, 1.0)
    with pytest.raises(
        ValueError,
        match=r"type\(gc_model\(x_t, t\)\)='NoneType' is invalid: the gc_model must return",
    ):
        GeneratorInducedVelocity(lambda z, t: None, process)(x, 1.0, noise=x)
    with pytest.raises(ValueError, match="denoiser=3 is invalid: pass a callable"):
        DistilledVelocity(3, process)
    with pytest.raises(ValueError, match="gc_model='gen' is invalid: pass a callable"):
        GeneratorInducedVelocity("gen", process)
    with pytest.raises(
        ValueError, match=r"type\(gmm\)='str' is invalid: pass a gcflows.gmm.GaussianMixture"
    ):
        TrueVelocity("gmm", process)
    with pytest.raises(ValueError, match="t_next must be a scalar or have shape"):
        euler_step(MonteCarloVelocity(process), x, 1.0, torch.ones(3), data=x, noise=x)
    with pytest.raises(ValueError, match="x contains NaN"):
        heun_step(MonteCarloVelocity(process), x * math.nan, 1.0, 0.5, data=x, noise=x)


def test_fit_denoiser_bad_input_raises():
    process = VEProcess()
    samples = torch.randn(16, 2)
    with pytest.raises(
        ValueError, match=r"samples.shape=\(2,\) is invalid: pass a floating-point tensor"
    ):
        fit_denoiser(samples[0], process)
    with pytest.raises(ValueError, match="samples contains NaN"):
        fit_denoiser(samples * math.nan, process)
    with pytest.raises(
        ValueError, match=r"samples.shape=\(1, 2\) is invalid: use at least 2 points"
    ):
        fit_denoiser(samples[:1], process)
    with pytest.raises(ValueError, match="steps=0 is invalid: use a positive integer"):
        fit_denoiser(samples, process, steps=0)
    with pytest.raises(ValueError, match="batch_size=-3 is invalid: use a positive integer"):
        fit_denoiser(samples, process, batch_size=-3)
    with pytest.raises(ValueError, match="lr=0.0 is invalid: use a positive"):
        fit_denoiser(samples, process, lr=0.0)
    with pytest.raises(ValueError, match="sigma_data=None is invalid: the samples are all zero"):
        fit_denoiser(torch.zeros(16, 2), process)
    with pytest.raises(ValueError, match="process must be one of"):
        fit_denoiser(samples, "vp")
