"""sampling.py: one-step and multistep consistency sampling, Euler / Heun ODE sampling.

The oracle is one Gaussian ``N(m, s^2 I)``: its flow map is closed-form (an affine map), so the
samplers' outputs and laws are known exactly (float64).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gcflows.consistency import ConsistencyModel
from gcflows.gmm import GaussianMixture
from gcflows.networks import ToyMLP
from gcflows.processes import LinearProcess, VEProcess, karras_grid
from gcflows.sampling import check_sigmas, multistep_sample, ode_sample, one_step_sample
from gcflows.velocity import TrueVelocity

F64 = torch.float64
M = torch.tensor([1.0, -0.5], dtype=F64)
S = 0.5
PROCESSES = {"ve": VEProcess(t_min=0.002, t_max=2.0), "linear": LinearProcess()}


class GaussianFlowMap(nn.Module):
    """Exact flow map to ``t_min`` of ``N(m, s^2 I)``: ``a0 m + r(t_min) / r(t) (x - a(t) m)``,
    ``r = sqrt(a^2 s^2 + b^2)``; records the times it is called with."""

    def __init__(self, process):
        super().__init__()
        self.p = process
        self.times: list[torch.Tensor] = []

    def r(self, t):
        return torch.sqrt(self.p.a(t) ** 2 * S**2 + self.p.b(t) ** 2)

    def forward(self, x, t):
        self.times.append(t.clone())
        tt = t[:, None]
        t0 = torch.full_like(tt, self.p.t_min)
        return self.p.a(t0) * M + self.r(t0) / self.r(tt) * (x - self.p.a(tt) * M)


def gaussian():
    return GaussianMixture(torch.ones(1, dtype=F64), M[None], stds=torch.tensor([S], dtype=F64))


def _coef(process, t):
    tt = torch.tensor(t, dtype=F64)
    return float(process.a(tt)), float(process.b(tt))


@pytest.mark.parametrize("name", ["ve", "linear"])
def test_one_step_is_the_model_at_t_max_on_scaled_noise(name, gen):
    # f(b(T) z, T); closed form for the exact flow map (float64, same arithmetic: rtol 1e-12).
    process = PROCESSES[name]
    model = GaussianFlowMap(process)
    z = torch.randn(50, 2, generator=gen, dtype=F64)
    out = one_step_sample(model, z, process)
    a_t, b_t = _coef(process, process.t_max)
    a0, _ = _coef(process, process.t_min)
    r = lambda a, b: math.sqrt(a * a * S * S + b * b)  # noqa: E731
    expected = a0 * M + r(a0, process.t_min) / r(a_t, b_t) * (b_t * z - a_t * M)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(model.times[0], torch.full((50,), process.t_max, dtype=F64))


@pytest.mark.parametrize("name", ["ve", "linear"])
def test_multistep_matches_a_hand_written_replica(name):
    # Re-noising x_s = (a(s) / a0) x + sqrt(b(s)^2 - (a(s) b0 / a0)^2) z (for ve:
    # x + sqrt(s^2 - t_min^2) z), then f(x_s, s); same generator stream. rtol 1e-12 (float64).
    process = PROCESSES[name]
    sigmas = [process.t_max, 0.8, 0.3, 0.05] if name == "ve" else [process.t_max, 0.6, 0.2]
    model = GaussianFlowMap(process)
    noise = torch.randn(20, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = multistep_sample(model, noise, sigmas, process, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    a0, b0 = _coef(process, process.t_min)
    t = torch.full((20,), sigmas[0], dtype=F64)
    x = model(process.b(t)[:, None] * noise, t)
    for s in sigmas[1:]:
        a_s, b_s = _coef(process, s)
        z = torch.randn(20, 2, generator=g, dtype=F64)
        x_s = (a_s / a0) * x + math.sqrt(b_s**2 - (a_s * b0 / a0) ** 2) * z
        x = model(x_s, torch.full((20,), s, dtype=F64))
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-14)
    called = [float(t[0]) for t in model.times[: len(sigmas)]]
    assert called == pytest.approx(sigmas, rel=1e-15)


@pytest.mark.parametrize("name", ["ve", "linear"])
def test_multistep_law_follows_the_gaussian_recursion(name):
    # With the exact flow map every stage is affine, so the output is Gaussian with a mean and
    # variance given by the recursion: start x_T = b_T z (mean 0, var b_T^2); f maps (mu, v) to
    # (a0 m + g (mu - a m), g^2 v), g = r0 / r(t); re-noising maps (mu, v) to
    # (c mu, c^2 v + b_s^2 - c^2 b0^2), c = a_s / a0. The fixed point is the law of x_{t_min}
    # (mean a0 m, var r0^2), so each step moves the law towards it.
    # Statistics: n = 40000 draws per coordinate; means within 5 standard errors sqrt(v / n),
    # variances within 5 sqrt(2 / n) relative (false alarm < 1e-5 per check; seeded anyway).
    process = PROCESSES[name]
    sigmas = [process.t_max, 0.8, 0.3] if name == "ve" else [process.t_max, 0.5, 0.2]
    n = 40000
    model = GaussianFlowMap(process)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    gen = torch.Generator().manual_seed(4)
    a0, b0 = _coef(process, process.t_min)
    r0 = math.sqrt(a0**2 * S**2 + b0**2)

    def predict(steps):
        a_t, b_t = _coef(process, steps[0])
        mu, var = torch.zeros(2, dtype=F64), b_t**2
        g = r0 / math.sqrt(a_t**2 * S**2 + b_t**2)
        mu, var = a0 * M + g * (mu - a_t * M), g * g * var
        for s in steps[1:]:
            a_s, b_s = _coef(process, s)
            c = a_s / a0
            mu, var = c * mu, c * c * var + b_s**2 - c * c * b0**2
            g = r0 / math.sqrt(a_s**2 * S**2 + b_s**2)
            mu, var = a0 * M + g * (mu - a_s * M), g * g * var
        return mu, var

    errors = []
    for k in (1, len(sigmas)):
        out = multistep_sample(model, noise, sigmas[:k], process, gen)
        mu, var = predict(sigmas[:k])
        se = math.sqrt(var / n)
        assert bool(((out.mean(0) - mu).abs() < 5 * se).all()), (out.mean(0), mu)
        torch.testing.assert_close(
            out.var(0), torch.full((2,), var, dtype=F64), rtol=5 * math.sqrt(2 / n), atol=0
        )
        errors.append(float((mu - a0 * M).norm()))
    assert errors[1] < 0.5 * errors[0]  # multistep moves the mean towards the target


def test_samplers_on_a_toy_network(gen):
    # A ConsistencyModel over ToyMLP (float32): finite samples of the noise's shape, no graph,
    # the generator fixes the draws, and a one-time multistep schedule is the one-step sampler.
    process = VEProcess()
    model = ConsistencyModel(ToyMLP(2, hidden=32), process).eval()
    noise = torch.randn(64, 2, generator=gen)
    one = one_step_sample(model, noise, process)
    assert one.shape == noise.shape and one.dtype == torch.float32
    assert not one.requires_grad and bool(torch.isfinite(one).all())
    assert torch.equal(multistep_sample(model, noise, [process.t_max], process), one)
    sig = [80.0, 10.0, 1.0]
    a = multistep_sample(model, noise, sig, process, torch.Generator().manual_seed(5))
    b = multistep_sample(model, noise, sig, process, torch.Generator().manual_seed(5))
    c = multistep_sample(model, noise, sig, process, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(torch.isfinite(a).all())


@pytest.mark.parametrize("name", ["ve", "linear"])
@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2)])
def test_ode_sample_converges_at_the_method_order(name, method, order):
    # Exact draws x_T = a(T) data + b(T) noise carried to t_min along a decreasing Karras grid with
    # the exact velocity; the reference is the closed-form flow map. Global error O(n^-order):
    # log2(e(n) / e(2n)) at n = 32 -> 64 is the order up to O(1/n) (measured: 0.97 / 2.05 for
    # ve, 0.98 / 2.00 for linear); tolerance 0.15, far from the neighbouring order.
    process = VEProcess() if name == "ve" else LinearProcess()
    gmm = gaussian()
    g = torch.Generator().manual_seed(0)
    data = gmm.sample(256, generator=g)
    noise = torch.randn(256, 2, generator=g, dtype=F64)
    x_t = process.interpolate(data, noise, process.t_max)
    exact = GaussianFlowMap(process)(x_t, torch.full((256,), process.t_max, dtype=F64))
    vel = TrueVelocity(gmm, process)
    errs = []
    for n in (32, 64):
        grid = karras_grid(n, process.t_min, process.t_max).flip(0)
        out = ode_sample(vel, x_t, grid, method=method)
        errs.append(float((out - exact).norm(dim=1).max()))
    rate = math.log2(errs[0] / errs[1])
    assert abs(rate - order) < 0.15, (errs, rate)


def test_ode_sample_runs_both_ways(gen):
    # Heun forward from t_min to t_max then back on the same grid returns the start. One way
    # errs by ~2e-4 at n = 256 (against n = 2048); the leading local errors (odd in the step)
    # cancel on the way back: round trip measured 4e-7. Tolerance 1e-5, 20x below the one-way
    # error, so a wrong direction or time pairing fails.
    process = VEProcess(t_min=0.002, t_max=2.0)
    vel = TrueVelocity(gaussian(), process)
    x0 = gaussian().sample(16, generator=gen)
    grid = karras_grid(256, process.t_min, process.t_max)
    there = ode_sample(vel, x0, grid, method="heun")
    back = ode_sample(vel, there, grid.flip(0), method="heun")
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-5)
    assert float((there - x0).norm(dim=1).min()) > 0.1  # it did move


@pytest.mark.parametrize(
    "sigmas, match",
    [
        ([], r"sigmas=\[\] is invalid: use at least one time"),
        ([1.0, 2.0], r"sigmas=\[1.0, 2.0\] is invalid: use strictly decreasing"),
        ([1.0, 1.0], r"sigmas=\[1.0, 1.0\] is invalid: use strictly decreasing"),
        ([100.0, 1.0], "sigmas must lie in"),
        ([80.0, 0.001], "sigmas must lie in"),
        ([float("nan")], r"sigmas=\[nan\] is invalid: use finite times"),
        (torch.ones(2, 2), r"sigmas.shape=\(2, 2\) is invalid: use a 1-D list"),
        ("abc", "sigmas='abc' is invalid: use a sequence of floats"),
    ],
)
def test_bad_sigma_lists_raise(sigmas, match):
    with pytest.raises(ValueError, match=match):
        check_sigmas(sigmas, "ve")
    with pytest.raises(ValueError, match=match):
        multistep_sample(lambda x, t: x, torch.zeros(2, 2), sigmas, "ve")


def test_check_sigmas_accepts_lists_and_tensors():
    assert check_sigmas([80, 10.0, 0.5], "ve") == [80.0, 10.0, 0.5]
    assert check_sigmas(torch.tensor([0.9, 0.1]), "linear") == pytest.approx([0.9, 0.1])
    assert check_sigmas(np.array([0.5]), "ve") == [0.5]


def test_bad_ode_and_noise_inputs_raise():
    vel = TrueVelocity(gaussian(), "ve")
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="method='rk4' is invalid: use one of"):
        ode_sample(vel, x, [1.0, 0.5], method="rk4")
    with pytest.raises(ValueError, match=r"grid=\[1.0\] is invalid: use at least two times"):
        ode_sample(vel, x, [1.0])
    with pytest.raises(
        ValueError, match=r"grid=\[1.0, 0.5, 0.7\] is invalid: use strictly monotone"
    ):
        ode_sample(vel, x, [1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="NaN"):
        ode_sample(vel, torch.full((3, 2), float("nan")), [1.0, 0.5])
    with pytest.raises(ValueError, match="B >= 1"):
        one_step_sample(lambda x, t: x, torch.zeros(0, 2), "ve")
