"""continuous.py and the TrigFlow process: the continuous objective is the limit of discrete CT
(Richardson), CT's continuous gradient is unbiased for CD with the exact covariance of Eq. (*),
TrigFlow identities, and the sCM stabilizers. docs/theory.md, "Continuous-time consistency
training"."""

from __future__ import annotations

import math

import pytest
import torch

from gcflows import gmm as G
from gcflows.consistency import (
    ConsistencyModel,
    ConsistencyObjective,
    lognormal_index_probs,
)
from gcflows.continuous import (
    ContinuousObjective,
    TrigFlowConsistencyModel,
    exact_noise_terms,
    gradient_noise,
    normalize_tangent,
    sample_times,
    tangent,
)
from gcflows.networks import ToyMLP
from gcflows.processes import (
    LinearProcess,
    TrigFlowProcess,
    VEProcess,
    get_process,
    uniform_grid,
)
from gcflows.velocity import MonteCarloVelocity, TrueVelocity

VE2D = VEProcess(t_min=1e-3, t_max=5.0)


def _model(dim: int, process, hidden: int = 32, seed: int = 0) -> ConsistencyModel:
    # time_scale=1: a smooth time embedding, so that d_t f is O(1) on the grid spacings used
    # (the default 1000 oscillates on a time scale t / 250, finer than T / 2560).
    torch.manual_seed(seed)
    return ConsistencyModel(ToyMLP(dim, hidden, 2, time_scale=1.0), process).double().eval()


def _flat_grad(loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


# ------------------------------------------------------------------------------------------------
# (c) TrigFlow
# ------------------------------------------------------------------------------------------------
def test_trigflow_registered_and_validated():
    p = get_process("trigflow")
    assert isinstance(p, TrigFlowProcess) and p.t_max == pytest.approx(math.atan(80.0))
    with pytest.raises(ValueError, match="t_max must be < pi/2"):
        TrigFlowProcess(t_max=math.pi / 2)


def test_trigflow_xdot_and_conversions(gen):
    p = TrigFlowProcess()
    data = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    t = torch.linspace(p.t_min, p.t_max, 7, dtype=torch.float64).requires_grad_(True)
    x = p.interpolate(data, noise, t)
    dxdt = torch.stack(
        [torch.autograd.grad(x[:, k].sum(), t, retain_graph=True)[0] for k in range(3)], 1
    )
    t = t.detach()
    torch.testing.assert_close(p.xdot(data, noise, t), dxdt, rtol=1e-12, atol=1e-12)
    x = x.detach()
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    # closed forms: v = (cos x - D) / sin = cos E[noise | x] - sin D
    v = p.velocity_from_denoiser(x, data, t)
    torch.testing.assert_close(v, (c * x - data) / s, rtol=1e-10, atol=1e-10)
    eps = p.noise_from_denoiser(x, data, t)
    torch.testing.assert_close(eps, noise, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(v, c * eps - s * data, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p.denoiser_from_velocity(x, v, t), data, rtol=1e-9, atol=1e-9)


def test_trigflow_gmm_oracle_closed_forms(gen):
    """One Gaussian N(m, s^2 I): D = a m + ..., velocity and the linear flow map in closed form."""
    p = TrigFlowProcess()
    m, s = torch.tensor([[0.3, -0.7]], dtype=torch.float64), 0.4
    gmm = G.GaussianMixture([1.0], m, stds=s)
    t = torch.tensor([0.01, 0.3, 0.9, 1.5], dtype=torch.float64)
    x = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    a, b = torch.cos(t)[:, None], torch.sin(t)[:, None]
    den = m + a * s**2 / (a * a * s**2 + b * b) * (x - a * m)
    torch.testing.assert_close(gmm.denoiser(x, t, p), den, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gmm.velocity(x, t, p), (a * x - den) / b, rtol=1e-10, atol=1e-10)
    a0, b0 = math.cos(p.t_min), math.sin(p.t_min)
    scale = torch.sqrt((a0 * a0 * s**2 + b0 * b0) / (a * a * s**2 + b * b))
    torch.testing.assert_close(
        gmm.flow_map(x, t, p), a0 * m + scale * (x - a * m), rtol=1e-6, atol=1e-6
    )


def test_trigflow_consistency_models_boundary(gen):
    p = TrigFlowProcess()
    x = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    t0 = torch.full((5,), p.t_min, dtype=torch.float64)
    for model in (
        ConsistencyModel(ToyMLP(2, 16, 1), p).double(),
        TrigFlowConsistencyModel(ToyMLP(2, 16, 1), p).double(),
    ):
        assert torch.equal(model(x, t0), x)
        assert torch.isfinite(model(x, torch.full((5,), p.t_max, dtype=torch.float64))).all()
    with pytest.raises(ValueError, match="trigflow"):
        TrigFlowConsistencyModel(ToyMLP(2, 16, 1), "ve")


# ------------------------------------------------------------------------------------------------
# (a) the continuous objective is the limit of the discrete one
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "process"),
    [("ct", VE2D), ("gc", VE2D), ("ct", TrigFlowProcess())],
    ids=["ct-ve", "gc-ve", "ct-trigflow"],
)
def test_continuous_gradient_is_richardson_limit_of_discrete(method, process):
    """Discrete CT (uniform grid of N intervals, weight N / T, student at a fixed t) has gradient
    G_N = G + c / N + O(1 / N^2); Richardson on N = 160 ... 2560 reaches the continuous one.
    TrigFlow's path is not affine in t (the teacher point is not an Euler step): same limit."""
    model, gc_model = _model(2, process, seed=0), _model(2, process, seed=1)
    target = G.two_gaussians_1to2()
    g = torch.Generator().manual_seed(0)
    data = target.sample(8, g)
    noise = torch.randn(8, 2, generator=g, dtype=torch.float64)
    k = torch.tensor([3, 10, 30, 60, 100, 130, 150, 159])  # t = grid_160[k + 1]
    kw = {"gc_model": gc_model} if method == "gc" else {}
    grads = []
    for m in range(5):
        n = 160 * 2**m
        obj = ConsistencyObjective(
            process,
            method,
            distance="squared_l2",
            mu=0.5,
            fixed_grid=uniform_grid(n, process.t_min, process.t_max),
            index_probs="uniform",
        )
        out = obj(
            model,
            data,
            generator=torch.Generator().manual_seed(5),
            noise=noise,
            indices=(k + 1) * 2**m - 1,
            **kw,
        )
        grads.append(_flat_grad(out.loss, model))
    t = uniform_grid(160, process.t_min, process.t_max)[k + 1]
    cont = ContinuousObjective(process, method, distance="squared_l2", mu=0.5, tangent_norm=None)
    out = cont(model, data, generator=torch.Generator().manual_seed(5), noise=noise, times=t, **kw)
    limit = _flat_grad(out.loss, model)
    errs = [float((gn - limit).norm() / limit.norm()) for gn in grads]
    # first order in 1/N: each doubling halves the error (within 10 %)
    # (TrigFlow's c_noise = log(tan t) / 4 varies on the scale cos(t) near t_max = atan(80):
    # the coarsest grids are not yet asymptotic there: the ratio 2 is checked on the finest pair)
    for e0, e1 in zip(errs, errs[1:], strict=False):
        assert e0 / e1 > 1.6, errs
    assert 1.8 < errs[-2] / errs[-1] < 2.2, errs
    rich = 2 * grads[-1] - grads[-2]
    rich_err = float((rich - limit).norm() / limit.norm())
    rich2 = (4 * rich - (2 * grads[-2] - grads[-3])) / 3
    rich2_err = float((rich2 - limit).norm() / limit.norm())
    print(f"{method}-{process.name}: errors {errs}, Richardson {rich_err:.2e}, {rich2_err:.2e}")
    assert rich_err < 0.01
    assert rich2_err < 1e-3


def test_objective_interface_all_methods(gen):
    model = _model(2, VE2D)
    target = G.two_gaussians_1to2()
    data = target.sample(16, gen)
    for method, kw in (
        ("ct", {}),
        ("ot", {}),
        ("gc", {"gc_model": _model(2, VE2D, seed=3)}),
        ("cd", {"velocity": TrueVelocity(target, VE2D)}),
    ):
        obj_kw = {"velocity": kw.pop("velocity")} if "velocity" in kw else {}
        obj = ContinuousObjective(VE2D, method, **obj_kw)
        out = obj(model, data, 3, generator=torch.Generator().manual_seed(1), **kw)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert out.num_intervals == 0 and out.diagnostics["t"].shape == (16,)
        assert torch.isfinite(_flat_grad(out.loss, model)).all()
    # sCM's parametrization on TrigFlow goes through the same objective
    torch.manual_seed(0)
    trig = TrigFlowConsistencyModel(ToyMLP(2, 16, 1, time_scale=1.0)).double()
    out = ContinuousObjective("trigflow", "ct")(
        trig, data, generator=torch.Generator().manual_seed(1)
    )
    assert torch.isfinite(out.loss) and torch.isfinite(_flat_grad(out.loss, trig)).all()
    # cd with the one-sample velocity is ct exactly (same draws)
    outs = [
        ContinuousObjective(VE2D, m, **k)(model, data, generator=torch.Generator().manual_seed(2))
        for m, k in (("ct", {}), ("cd", {"velocity": MonteCarloVelocity(VE2D)}))
    ]
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="gc_model"):
        ContinuousObjective(VE2D, "gc")(model, data)
    with pytest.raises(ValueError, match="velocity"):
        ContinuousObjective(VE2D, "cd")
    with pytest.raises(ValueError, match="alpha = 2"):
        ContinuousObjective(VE2D, "ct", distance="l2_norm")(model, data)


def test_lognormal_times_are_the_limit_of_the_index_law():
    """The CDF of sample_times matches the cumulative iCT index probabilities on a fine grid."""
    p = VEProcess()
    t = sample_times(p, 40_000, generator=torch.Generator().manual_seed(0))
    grid = torch.exp(torch.linspace(math.log(p.t_min), math.log(p.t_max), 201, dtype=torch.float64))
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), lognormal_index_probs(grid).cumsum(0)])
    emp = (t[None, :] <= grid[:, None]).double().mean(1)
    assert float((emp - cdf).abs().max()) < 0.01  # DKW: 0.0068 at 95 % for n = 40000
    tu = sample_times(p, 1000, kind="uniform", generator=torch.Generator().manual_seed(0))
    assert float(tu.min()) >= p.t_min and float(tu.max()) <= p.t_max


# ------------------------------------------------------------------------------------------------
# (b) unbiasedness and the exact covariance (squared L2)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dim", "n", "times"), [(2, 512, (0.05, 0.5, 2.0)), (64, 96, (0.1, 1.0))], ids=["2d", "64d"]
)
def test_ct_gradient_unbiased_with_exact_covariance(dim, n, times):
    target = G.two_gaussians_1to2() if dim == 2 else G.random_mixture(64, 8, 0)
    model = _model(dim, VE2D, hidden=32 if dim == 2 else 16)
    for t in times:
        res = gradient_noise(
            model, target, VE2D, t, n=n, keep=True, generator=torch.Generator().manual_seed(7)
        )
        delta = res.gamma - res.gamma_cd
        # E[gamma_CT - gamma_CD] = 0: the projection on the CD mean is a z-score ...
        direction = res.gamma_cd.mean(0) / res.gamma_cd.mean(0).norm()
        proj = delta @ direction
        assert abs(float(proj.mean())) < 4 * float(proj.std()) / math.sqrt(n), t
        # ... and ||mean(delta)||^2 has expectation tr Cov[delta] / n when unbiased
        assert res.bias < 4 * res.bias_null, (t, res.bias, res.bias_null)
        # tr Cov[gamma_CT] = tr Cov[gamma_CD] + E 4 tr(J_th^T J_x Sigma J_x^T J_th), paired per x_t
        terms = exact_noise_terms(model, *_points(res, target, dim, n, t), VE2D, target)
        gam_c = ((res.gamma - res.gamma.mean(0)) ** 2).sum(1)
        cd_c = ((res.gamma_cd - res.gamma_cd.mean(0)) ** 2).sum(1)
        diff = gam_c - cd_c - terms.noise
        assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(n), t
        assert float(diff.std()) > 0  # a real Monte Carlo interval
        # E||gamma - gamma_CD||^2 = the exact conditional term
        z = (res.noise - res.exact_noise) / float((delta.pow(2).sum(1) - terms.noise).std())
        assert abs(z) * math.sqrt(n) < 4, t
        # relation to R(theta): the kernel sandwiches the noise around its integrand
        lo, hi = 4 * terms.lam_min * terms.r, 4 * terms.lam_max * terms.r
        assert bool((terms.noise >= lo * (1 - 1e-9) - 1e-15).all())
        assert bool((terms.noise <= hi * (1 + 1e-9) + 1e-15).all())
        assert res.r_t == pytest.approx(float(terms.r.mean()), rel=1e-12)


def _points(res, target, dim, n, t):
    """The x_t and t that gradient_noise used (same generator, same draw order)."""
    g = torch.Generator().manual_seed(7)
    data = target.sample(n, g)
    noise = torch.randn(data.shape, generator=g, dtype=torch.float64)
    tt = torch.full((n,), float(t), dtype=torch.float64)
    return VE2D.interpolate(data, noise, tt), tt


# ------------------------------------------------------------------------------------------------
# (d) stabilizers
# ------------------------------------------------------------------------------------------------
def test_tangent_normalization_bounds_the_tangent(gen):
    g = torch.randn(6, 3, generator=gen, dtype=torch.float64) * torch.logspace(-3, 6, 6)[:, None]
    gn = normalize_tangent(g, 0.1)
    assert bool((gn.norm(dim=1) < 1).all())
    torch.testing.assert_close(gn.norm(dim=1), g.norm(dim=1) / (g.norm(dim=1) + 0.1))
    # in the objective: a network blown up by 1e6 still gives a loss value <= C = 1 per sample
    model = _model(2, VE2D)
    big = lambda x, t: 1e6 * model(x, t)  # noqa: E731
    data = G.two_gaussians_1to2().sample(32, gen)
    sq = {"distance": "squared_l2"}  # C = 1
    out = ContinuousObjective(VE2D, "ct", tangent_norm=0.1, **sq)(big, data, generator=gen)
    assert float(out.loss.detach()) <= 1.0 and float(out.diagnostics["tangent_norm"].max()) > 1e3
    raw = ContinuousObjective(VE2D, "ct", tangent_norm=None, **sq)(big, data, generator=gen)
    assert float(raw.loss.detach()) > 1e6


def test_warmup_zero_drops_the_time_derivative(gen):
    model = _model(2, VE2D)
    data = G.two_gaussians_1to2().sample(16, gen)
    obj = ContinuousObjective(
        VE2D, "ct", distance="squared_l2", tangent_norm=None, tangent_warmup=10
    )
    assert [obj.warmup(s) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]

    def grad_at(step):
        out = obj(model, data, step, generator=torch.Generator().manual_seed(3))
        return _flat_grad(out.loss, model), out

    g0, out = grad_at(0)
    # by hand: the tangent with r = 0 is J_x f u only
    g_ = torch.Generator().manual_seed(3)
    noise = torch.randn(data.shape, generator=g_, dtype=torch.float64)
    t = sample_times(VE2D, 16, generator=g_)
    x, u = VE2D.interpolate(data, noise, t), VE2D.xdot(data, noise, t)
    with torch.no_grad():
        jx = torch.func.jvp(lambda xx: model(xx, t), (x,), (u,))[1]
    f = model(x, t)
    manual = _flat_grad(((f - f.detach() + jx) ** 2).sum(1).mean(), model)
    torch.testing.assert_close(g0, manual, rtol=1e-10, atol=1e-12)
    g1, _ = grad_at(10)
    with torch.no_grad():
        full = tangent(model, x, t, u)[1]
    assert float((full - jx).norm()) > 1e-3 * float(full.norm())  # d_t f matters here
    g5, _ = grad_at(5)  # the tangent, hence the gradient, is linear in r
    torch.testing.assert_close(g5, 0.5 * (g0 + g1), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# (e) the objective's weight, distance constant and time law, written out independently
# ------------------------------------------------------------------------------------------------
PROCESSES = [VE2D, LinearProcess(), TrigFlowProcess()]
# sigma(t) = b(t) / a(t) written out per process (not through Process.a / Process.b)
SIGMA = {"ve": lambda t: t, "linear": lambda t: t / (1 - t), "trigflow": torch.tan}


def _fd_tangent(model, process, data, noise, t, rel_h=1e-5):
    """d/dt f(x_t, t) along the path by a central difference (error O(h^2), about 1e-10 here)."""
    h = rel_h * (process.t_max - process.t_min)
    hi, lo = t + h, t - h
    with torch.no_grad():
        f_hi = model(process.interpolate(data, noise, hi), hi)
        f_lo = model(process.interpolate(data, noise, lo), lo)
    return (f_hi - f_lo) / (2 * h)


def _interior_times(process, n):
    return process.t_min + (process.t_max - process.t_min) * torch.linspace(
        0.15, 0.85, n, dtype=torch.float64
    )


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_weighted_loss_is_the_mean_of_w_times_the_squared_tangent(process):
    """loss = mean_j w(t_j) C ||g_j||^2 in value, and its gradient is that of the surrogate
    w C ||f - sg f + sg g||^2, with g by finite differences along the path (no JVP) and a weight
    w(t) = 0.5 + 3 t^2 far from 1 (rtol 1e-6: the difference quotient's O(h^2) error)."""
    model = _model(3, process, hidden=16)
    g = torch.Generator().manual_seed(11)
    data = torch.randn(6, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = _interior_times(process, 6)

    def weight(tt):
        return 0.5 + 3.0 * tt**2

    obj = ContinuousObjective(
        process, "ct", distance="squared_l2", weight=weight, tangent_norm=None
    )
    out = obj(model, data, noise=noise, times=t)
    fd = _fd_tangent(model, process, data, noise, t)
    w = 0.5 + 3.0 * t**2
    assert float(w.max() / w.min()) > 1.5  # a weight that is not a constant
    ref = float((w * (fd * fd).sum(1)).mean())
    assert float(out.loss.detach()) == pytest.approx(ref, rel=1e-6)
    torch.testing.assert_close(out.diagnostics["weight"], w, rtol=1e-15, atol=0)
    x = process.interpolate(data, noise, t)
    f = model(x, t)
    surrogate = (w * ((f - f.detach() + fd) ** 2).sum(1)).mean()
    torch.testing.assert_close(
        _flat_grad(out.loss, model), _flat_grad(surrogate, model), rtol=1e-6, atol=1e-9
    )


def _image_model(x, t):
    """A smooth consistency-like map on (B, 3, 2, 2) images (any callable works in the loss)."""
    scale = torch.linspace(0.5, 1.5, 12, dtype=x.dtype).reshape(1, 3, 2, 2)
    return torch.tanh(scale * x) * torch.exp(-t).reshape(-1, 1, 1, 1) + 0.1 * x * t.reshape(
        -1, 1, 1, 1
    )


@pytest.mark.parametrize("shape", [(12,), (3, 2, 2)], ids=["flat", "image"])
@pytest.mark.parametrize("tangent_norm", [None, 0.1])
def test_pseudo_huber_loss_is_its_quadratic_constant_times_squared_l2(tangent_norm, shape):
    """In continuous time only D's small-distance constant enters: the pseudo-Huber loss is C times
    the squared-L2 loss on the same draws, with C measured on the distance itself in its
    quadratic regime (D(a, a + e) / ||e||^2 at ||e|| = 1e-7, relative error ~1e-9) for d = 12
    elements per sample (flat, or images 3 x 2 x 2), and a batch of 8: C of the 96 elements of
    the batch would be sqrt(8) times smaller, C of the 3 channels twice larger."""
    from gcflows.consistency import get_distance

    d, bsz = 12, 8
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, d, generator=g, dtype=torch.float64)
    e = torch.randn(3, d, generator=g, dtype=torch.float64)
    e = 1e-7 * e / e.norm(dim=1, keepdim=True)
    c_ref = get_distance("pseudo_huber", d)(a, a + e) / (e * e).sum(1)
    assert float((c_ref / c_ref[0] - 1).abs().max()) < 1e-8
    c_ref = float(c_ref[0])
    assert c_ref == pytest.approx(1.0 / (2 * 0.00054 * math.sqrt(d)), rel=1e-6)  # iCT's c

    model = _model(d, VE2D, hidden=16) if len(shape) == 1 else _image_model
    data = torch.randn(bsz, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(bsz, *shape, generator=g, dtype=torch.float64)
    t = _interior_times(VE2D, bsz)
    losses = {}
    for name in ("pseudo_huber", "squared_l2"):
        obj = ContinuousObjective(
            VE2D, "ct", distance=name, weight=lambda tt: 1.0 + tt, tangent_norm=tangent_norm
        )
        losses[name] = obj(model, data, noise=noise, times=t).loss
    assert float(losses["squared_l2"].detach()) > 1e-3  # a loss that is not ~0
    ratio = float(losses["pseudo_huber"].detach() / losses["squared_l2"].detach())
    assert ratio == pytest.approx(c_ref, rel=1e-8)


@pytest.mark.parametrize(
    "process", [VEProcess(), LinearProcess(), TrigFlowProcess()], ids=lambda p: p.name
)
@pytest.mark.parametrize(("p_mean", "p_std"), [(-1.1, 2.0), (0.4, 0.9)])
def test_lognormal_time_law_on_every_process(process, p_mean, p_std):
    """log sigma(t) of sample_times follows N(p_mean, p_std^2) truncated to
    [log sigma(t_min), log sigma(t_max)] (scipy.stats.truncnorm, sigma written out per process):
    Kolmogorov-Smirnov distance < 0.015 for n = 20000 (DKW: P(exceed) <= 2 exp(-9) = 2.5e-4)."""
    from scipy.stats import kstest, truncnorm

    sigma = SIGMA[process.name]
    n = 20_000
    t = sample_times(
        process, n, p_mean=p_mean, p_std=p_std, generator=torch.Generator().manual_seed(3)
    )
    assert t.dtype == torch.float64 and t.shape == (n,)
    ends = torch.tensor([process.t_min, process.t_max], dtype=torch.float64)
    lo, hi = torch.log(sigma(ends)).tolist()
    log_s = torch.log(sigma(t))
    assert lo - 1e-9 <= float(log_s.min()) and float(log_s.max()) <= hi + 1e-9
    law = truncnorm((lo - p_mean) / p_std, (hi - p_mean) / p_std, loc=p_mean, scale=p_std)
    assert kstest(log_s.numpy(), law.cdf).statistic < 0.015, (process.name, lo, hi)
    # uniform: t ~ U[t_min, t_max] on every process
    tu = sample_times(process, n, kind="uniform", generator=torch.Generator().manual_seed(4))
    uni = kstest(tu.numpy(), "uniform", args=(process.t_min, process.t_max - process.t_min))
    assert uni.statistic < 0.015


def test_sample_times_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind='bogus' is invalid: use one of"):
        sample_times(VEProcess(), 4, kind="bogus")


def test_objective_refuses_data_in_another_dtype_than_the_model():
    model = ConsistencyModel(ToyMLP(2, 16, 1), VE2D)  # float32
    data = G.two_gaussians_1to2().sample(8, torch.Generator().manual_seed(0))  # float64
    obj = ContinuousObjective(VE2D, "ct")
    with pytest.raises(ValueError, match=r"data.dtype=torch.float64 is invalid: .*float32"):
        obj(model, data)
    out = obj(model, data.float(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------------------------
# (f) gradient-noise summaries, TrigFlow's input scaling, exact terms off the axes
# ------------------------------------------------------------------------------------------------
def test_gradient_noise_summaries_are_the_written_out_statistics():
    """Each summary of gradient_noise against its formula on the kept rows (n = 48 pairs): the
    null bias is tr Cov[delta] / n, the value ||mean delta||^2 takes on average when unbiased."""
    n = 48
    model = _model(2, VE2D, hidden=16)
    res = gradient_noise(
        model,
        G.two_gaussians_1to2(),
        VE2D,
        0.7,
        n=n,
        keep=True,
        exact=False,
        generator=torch.Generator().manual_seed(2),
    )
    gam, cd = res.gamma, res.gamma_cd
    delta = gam - cd
    sq = (delta**2).sum(1)
    assert res.n == n and res.bias_null > 0
    assert res.bias_null == pytest.approx(float(delta.var(0, unbiased=True).sum()) / n, rel=1e-10)
    assert res.bias == pytest.approx(float((delta.mean(0) ** 2).sum()), rel=1e-10)
    assert res.trace_ct == pytest.approx(float(gam.var(0, unbiased=True).sum()), rel=1e-10)
    assert res.trace_cd == pytest.approx(float(cd.var(0, unbiased=True).sum()), rel=1e-10)
    assert res.noise == pytest.approx(float(sq.mean()), rel=1e-10)
    assert res.noise_se == pytest.approx(float(sq.std()) / math.sqrt(n), rel=1e-10)
    assert res.grad_norm2 == pytest.approx(float((cd.mean(0) ** 2).sum()), rel=1e-10)


class _Probe(torch.nn.Module):
    """Backbone F(x_in, c_noise) = 0.7 x_in that remembers its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x_in, c_noise):
        self.x_in, self.c_noise = x_in, c_noise
        return self.scale * x_in


@pytest.mark.parametrize("sigma_data", [0.5, 1.7])
def test_trigflow_c_in_gives_the_backbone_unit_variance_inputs(sigma_data):
    """c_in = 1 / std(x_t) for data of std sigma_data: the backbone sees inputs of variance 1 at
    every t (n = 20000 x 2 values: the sample variance's sd is 0.007, tolerance 0.05); the output
    is cos(s) x - sin(s) sigma_d F with s = t - t_min, written out."""
    p = TrigFlowProcess()
    probe = _Probe()
    model = TrigFlowConsistencyModel(probe, p, sigma_data=sigma_data)
    g = torch.Generator().manual_seed(8)
    for t0 in (0.2, 0.8, 1.3):
        data = sigma_data * torch.randn(20_000, 2, generator=g, dtype=torch.float64)
        noise = torch.randn(20_000, 2, generator=g, dtype=torch.float64)
        t = torch.full((20_000,), t0, dtype=torch.float64)
        x = math.cos(t0) * data + math.sin(t0) * noise
        with torch.no_grad():
            out = model(x, t)
        assert float(probe.x_in.var()) == pytest.approx(1.0, abs=0.05), (t0, sigma_data)
        torch.testing.assert_close(probe.c_noise, t, rtol=0, atol=0)
        s = t0 - p.t_min
        ref = math.cos(s) * x - math.sin(s) * sigma_data * 0.7 * probe.x_in
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_exact_noise_terms_on_a_non_axis_aligned_posterior():
    """One Gaussian N(m, S) with a full S: Cov[data | x_t] = (S^-1 + (a/b)^2 I)^-1 in closed form,
    Sigma = (a' - b' a / b)^2 of that; r = tr(J_x Sigma J_x^T) and noise = 4 tr(K J_x Sigma J_x^T)
    with J_x and J_theta by autograd, sample by sample (rtol 1e-8: float64 round-off only).
    The posterior is far from axis-aligned, so any root's rows and columns differ."""
    m = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    s = torch.tensor([[1.0, 0.7, 0.2], [0.7, 0.9, -0.3], [0.2, -0.3, 0.6]], dtype=torch.float64)[
        None
    ]
    target = G.GaussianMixture([1.0], m, covs=s)
    process = LinearProcess()
    model = _model(3, process, hidden=8, seed=2)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    terms = exact_noise_terms(model, x, t, process, target)
    params = [p for p in model.parameters() if p.requires_grad]
    for j in range(4):
        a, b = 1 - float(t[j]), float(t[j])
        post = torch.linalg.inv(torch.linalg.inv(s[0]) + (a / b) ** 2 * torch.eye(3))
        coef = -1.0 - 1.0 * a / b  # a' - b' a / b with a' = -1, b' = 1
        sigma = coef**2 * post
        assert float(sigma[0, 1].abs()) > 0.2 * float(sigma.diagonal().max())  # off the axes
        tj = t[j : j + 1]
        jx = torch.autograd.functional.jacobian(lambda xx, tj=tj: model(xx[None], tj)[0], x[j])
        out = model(x[j : j + 1], tj)[0]
        rows = [torch.autograd.grad(out[i], params, retain_graph=True) for i in range(3)]
        jth = torch.stack([torch.cat([gr.reshape(-1) for gr in row]) for row in rows])
        kern = jth @ jth.T
        inner = jx @ sigma @ jx.T
        assert float(terms.r[j]) == pytest.approx(float(inner.trace()), rel=1e-8)
        assert float(terms.noise[j]) == pytest.approx(4 * float((kern @ inner).trace()), rel=1e-8)
        lam = torch.linalg.eigvalsh(kern)
        assert float(terms.lam_min[j]) == pytest.approx(float(lam[0]), rel=1e-6, abs=1e-12)
        assert float(terms.lam_max[j]) == pytest.approx(float(lam[-1]), rel=1e-8)
