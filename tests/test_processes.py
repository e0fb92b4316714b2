"""processes.py: boundary values, xdot = d/dt x_t, conversions round-trip, grids, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from gcflows.processes import (
    LinearProcess,
    Process,
    TrigFlowProcess,
    VEProcess,
    get_process,
    karras_grid,
    uniform_grid,
)

PROCESSES = [VEProcess(), LinearProcess(), VEProcess(t_min=1e-3, t_max=5.0)]
IDS = ["ve", "linear", "ve-2d"]


def _times(process, u: float, batch: int) -> torch.Tensor:
    """Times inside the domain from u in [0, 1] (log-spaced for ve, linear otherwise)."""
    lo, hi = process.t_min, process.t_max
    base = torch.linspace(0, 1, batch, dtype=torch.float64) * 0.5 + u * 0.5
    if process.name == "ve":
        return torch.exp(math.log(lo) + base * (math.log(hi) - math.log(lo)))
    return lo + base * (hi - lo)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_boundary_values(process):
    # At t_min the process is (almost) the data: a -> 1, b -> t_min; exact coefficients checked.
    t = torch.tensor([process.t_min, process.t_max], dtype=torch.float64)
    a, b = process.a(t), process.b(t)
    if process.name == "ve":
        torch.testing.assert_close(a, torch.ones(2, dtype=torch.float64), rtol=0, atol=0)
        torch.testing.assert_close(b, t, rtol=0, atol=0)
    else:
        torch.testing.assert_close(a, 1 - t, rtol=0, atol=0)
        torch.testing.assert_close(b, t, rtol=0, atol=0)


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 9),
    dim=st.integers(1, 6),
    u=st.floats(0.0, 1.0),
    which=st.integers(0, 2),
)
@example(seed=0, batch=1, dim=1, u=0.0, which=0)
@example(seed=0, batch=3, dim=2, u=1.0, which=1)
def test_xdot_is_time_derivative(seed, batch, dim, u, which):
    """xdot(data, noise, t) equals the autograd derivative of interpolate in t (float64, 1e-12)."""
    process = PROCESSES[which]
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    t = _times(process, u, batch).requires_grad_(True)
    x = process.interpolate(data, noise, t)
    # Row j only depends on t_j, so the gradient of sum(x[:, k]) w.r.t. t is d x[:, k] / dt.
    grads = torch.stack(
        [torch.autograd.grad(x[:, k].sum(), t, retain_graph=True)[0] for k in range(dim)], 1
    )
    torch.testing.assert_close(process.xdot(data, noise, t.detach()), grads, rtol=1e-12, atol=1e-12)


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 9),
    u=st.floats(0.0, 1.0),
    which=st.integers(0, 2),
)
@example(seed=1, batch=2, u=0.0, which=0)
@example(seed=1, batch=2, u=1.0, which=0)
@example(seed=1, batch=2, u=1.0, which=1)
def test_conversions_round_trip(seed, batch, u, which):
    """denoiser -> velocity -> denoiser and noise -> denoiser -> noise are identities.

    Tolerance: float64 with t up to 80 and down to 1e-3 amplifies rounding by at most ~1e5
    (division by b and by a' - b' a / b), so rtol 1e-9 leaves a wide margin over 1e-16 * 1e5.
    """
    process = PROCESSES[which]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    d = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    t = _times(process, u, batch)
    v = process.velocity_from_denoiser(x, d, t)
    torch.testing.assert_close(process.denoiser_from_velocity(x, v, t), d, rtol=1e-9, atol=1e-9)
    eps = process.noise_from_denoiser(x, d, t)
    torch.testing.assert_close(process.denoiser_from_noise(x, eps, t), d, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(process.velocity_from_noise(x, eps, t), v, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(process.noise_from_velocity(x, v, t), eps, rtol=1e-9, atol=1e-9)
    # Both processes share v = (x - D) / t (docs/design.md, conventions).
    torch.testing.assert_close(v, (x - d) / t[:, None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_velocity_of_a_dirac_is_the_path_derivative(process):
    """With data a single point, D = data exactly, so v(x_t) must equal xdot along every path."""
    g = torch.Generator().manual_seed(0)
    data = torch.full((5, 2), 0.3, dtype=torch.float64)
    noise = torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = _times(process, 0.4, 5)
    x = process.interpolate(data, noise, t)
    v = process.velocity_from_denoiser(x, data, t)
    torch.testing.assert_close(v, process.xdot(data, noise, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_score_matches_gaussian_score(process):
    """Tweedie with a Dirac at m: p_t = N(a m, b^2 I), score = -(x - a m) / b^2."""
    x = torch.tensor([[0.5, -1.0], [2.0, 0.1]], dtype=torch.float64)
    m = torch.tensor([[0.2, 0.3], [0.2, 0.3]], dtype=torch.float64)
    t = _times(process, 0.2, 2)
    a, b = process.a(t)[:, None], process.b(t)[:, None]
    torch.testing.assert_close(process.score_from_denoiser(x, m, t), -(x - a * m) / b**2)


def test_karras_grid_formula_and_ends():
    s = karras_grid(10, 0.002, 80.0, rho=7.0)
    assert s[0].item() == 0.002 and s[-1].item() == 80.0
    assert bool((s[1:] > s[:-1]).all())
    i = torch.arange(11, dtype=torch.float64)
    expected = (0.002 ** (1 / 7) + i / 10 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    torch.testing.assert_close(s, expected, rtol=1e-13, atol=0)


def test_uniform_grid_spacing():
    s = uniform_grid(8, 0.001, 5.0)
    torch.testing.assert_close(s[1:] - s[:-1], torch.full((8,), (5.0 - 0.001) / 8, dtype=s.dtype))


def test_image_shaped_batches_broadcast_per_sample_times():
    p = VEProcess()
    data = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    x = p.interpolate(data, noise, t)
    for j in range(4):
        torch.testing.assert_close(x[j], data[j] + t[j] * noise[j], rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: VEProcess(t_min=1.0, t_max=0.5), "t_min"),
        (lambda: VEProcess(t_min=0.0, t_max=1.0), "t_min"),
        (lambda: LinearProcess(t_max=1.0), "t_max"),
        (lambda: get_process("vp"), "process"),
        (lambda: VEProcess().check_time(torch.tensor([100.0])), "t must lie"),
        (lambda: VEProcess().check_time(torch.tensor([float("nan")])), "t contains NaN"),
        (lambda: VEProcess().interpolate(torch.zeros(2, 3), torch.zeros(2, 4), 1.0), "same shape"),
        (
            lambda: VEProcess().interpolate(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3)),
            "t must",
        ),
        (lambda: karras_grid(0, 0.1, 1.0), "n=0 is invalid: use a positive integer"),
        (lambda: karras_grid(5, 1.0, 0.1), "t_min"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_processes_reject_times_outside_their_domain():
    data, noise = torch.zeros(3, 2), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"t must lie in \[0.002, 80.0\] for the ve process"):
        VEProcess().interpolate(data, noise, -1.0)
    with pytest.raises(ValueError, match=r"t must lie in \[0.001, 0.999\] for the linear process"):
        LinearProcess().interpolate(data, noise, 1.5)
    with pytest.raises(ValueError, match="t must lie in"):
        VEProcess().xdot(data, noise, torch.tensor([1.0, 90.0, 1.0]))
    with pytest.raises(ValueError, match="t contains NaN or inf"):
        LinearProcess().xdot(data, noise, torch.tensor([0.5, math.nan, 0.5]))


@pytest.mark.parametrize("process", [VEProcess(), LinearProcess()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_domain_ends_rounded_to_the_time_dtype_are_accepted(process, dtype):
    # float32(0.999) = 0.99900001 > t_max: the bound is widened by 2 eps of the times' dtype.
    t = torch.tensor([process.t_min, process.t_max, process.t_max], dtype=torch.float64).to(dtype)
    data, noise = torch.zeros(3, 2, dtype=dtype), torch.ones(3, 2, dtype=dtype)
    x = process.interpolate(data, noise, t)
    torch.testing.assert_close(x[:, 0], process.b(t), rtol=0, atol=0)


ALL_THREE = [VEProcess(), LinearProcess(), TrigFlowProcess(), VEProcess(t_min=1e-3, t_max=5.0)]
ALL_IDS = ["ve", "linear", "trigflow", "ve-2d"]


@pytest.mark.parametrize("process", ALL_THREE, ids=ALL_IDS)
def test_time_of_sigma_round_trips_and_matches_bisection(process):
    """``t -> sigma(t) = b / a -> time_of_sigma`` returns ``t`` (1e-12 relative: the rounding of
    the closed forms), the closed form equals the base class's bisection (1e-12 relative, an
    independent inversion), ``sigma`` is ``b / a`` (``t`` for ve, ``t / (1 - t)`` for linear,
    ``tan t`` for trigflow), and levels outside the range give the ends of the domain."""
    t = torch.exp(
        torch.linspace(math.log(process.t_min), math.log(process.t_max), 41, dtype=torch.float64)
    )
    sigma = process.sigma(t)
    want = {"ve": t, "linear": t / (1 - t), "trigflow": torch.tan(t)}[process.name]
    torch.testing.assert_close(sigma, want, rtol=1e-14, atol=0)
    back = process.time_of_sigma(sigma)
    assert back.dtype == torch.float64
    torch.testing.assert_close(back, t, rtol=1e-12, atol=0)
    torch.testing.assert_close(Process.time_of_sigma(process, sigma), t, rtol=1e-12, atol=0)
    outside = process.time_of_sigma(torch.tensor([sigma[0] / 2, sigma[-1] * 2]))
    assert outside.tolist() == [process.t_min, process.t_max]
    assert float(process.time_of_sigma(float(sigma[20]))) == pytest.approx(float(t[20]), rel=1e-12)


def test_time_of_sigma_bisects_for_a_process_without_a_closed_form():
    """A process with no closed-form inverse (``a = exp(-t)``, ``b = t``: ``sigma = t e^t``) is
    inverted by bisection to float64 resolution."""

    class Curved(Process):
        def a(self, t):
            return torch.exp(-t)

        def b(self, t):
            return t

        def da(self, t):
            return -torch.exp(-t)

        def db(self, t):
            return torch.ones_like(t)

    process = Curved(t_min=1e-3, t_max=3.0, name="curved")
    t = torch.linspace(1e-3, 3.0, 17, dtype=torch.float64)
    torch.testing.assert_close(process.time_of_sigma(t * torch.exp(t)), t, rtol=1e-13, atol=0)
