"""The one exact flow map, ``GaussianMixture.flow_map``, and its integrators (gcflows.flowmap).

References: the closed-form affine flow map of one Gaussian, the adaptive dopri5 solve at tight
tolerance (itself checked against the closed form in tests/test_gmm.py), the mixture's own
velocity and denoiser (for the fast matrix-product forms), and the schedule's definition (equal
steps in log sigma).
"""

from __future__ import annotations

import math

import pytest
import torch

from gcflows import flowmap
from gcflows.discrepancy import FlowMapGenerator, multistep_flow_map
from gcflows.gmm import GaussianMixture, get_preset, two_gaussians_1to2
from gcflows.processes import LinearProcess, TrigFlowProcess, VEProcess, get_process
from gcflows.transport import ideal_flow_map

VE = VEProcess(t_min=1e-3, t_max=5.0)
LIN = LinearProcess(t_min=1e-3, t_max=0.99)
TRIG = TrigFlowProcess()
PROCESSES = [VE, LIN, TRIG]
IDS = ["ve", "linear", "trigflow"]


def _gaussian(lam: torch.Tensor) -> GaussianMixture:
    d = lam.numel()
    mean = torch.linspace(-0.5, 0.5, d, dtype=torch.float64)[None]
    return GaussianMixture([1.0], mean, stds=lam.sqrt()[None])


def _spread_times(process, n: int, g: torch.Generator) -> torch.Tensor:
    """Start times log-uniform over the whole domain, the first three at its ends."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    t = process.t_min * (process.t_max / process.t_min) ** u
    t[:3] = torch.tensor([process.t_min, process.t_max, 2 * process.t_min], dtype=torch.float64)
    return t


# ------------------------------------------------------------------------------------------------
# multistep
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps, bound", [(32, 3e-7), (64, 5e-8)])
@pytest.mark.parametrize(
    "process", [VE, LinearProcess(t_min=1e-3, t_max=0.999)], ids=["ve", "linear"]
)
def test_multistep_flow_map_matches_the_exact_ode(process, steps, bound):
    """The cheap ideal generator of the toy study (32 multistep steps there) against the ODE flow
    map at rtol 1e-10, on training-like inputs (authors' 2D target, times spread over the whole
    range): mean squared error below ``bound`` (3e-7 at 32 steps: an rms error of 5e-4 where the
    trained models' squared consistency errors are ~1e-2), second order (64 steps: < 5e-8)."""
    gmm = two_gaussians_1to2()
    g = torch.Generator().manual_seed(4)
    n = 400
    u = torch.rand(n, generator=g, dtype=torch.float64)
    t = process.t_min * (process.t_max / process.t_min) ** u
    t[:3] = torch.tensor([process.t_min, process.t_max, 2 * process.t_min], dtype=torch.float64)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = process.interpolate(gmm.sample(n, g), noise, t)
    exact = gmm.flow_map(x, t, process, rtol=1e-10, atol=1e-12)
    cheap = gmm.flow_map(x, t, process, method="multistep", steps=steps)
    mse = float(((cheap - exact) ** 2).sum(1).mean())
    assert mse < bound, mse
    torch.testing.assert_close(cheap[0], x[0], rtol=0, atol=1e-12)  # t_min: the identity
    assert cheap.dtype == x.dtype
    assert gmm.flow_map(x.float(), t, process, method="multistep").dtype == torch.float32


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_multistep_schedule_is_equal_steps_in_log_sigma(process):
    """The schedule has ``steps + 1`` times per row, from the start time to t_min, and every step
    is the same ``log sigma`` decrement ``log(sigma(t_min) / sigma(t)) / steps`` (to 1e-12
    relative, the rounding of the closed-form inverses). A schedule divided by ``steps - 1`` (its
    last step empty) or missing a step fails."""
    g = torch.Generator().manual_seed(2)
    t = _spread_times(process, 50, g)[1:]  # t_min itself has an empty span
    for steps in (1, 2, 7, 32):
        times = flowmap.multistep_times(process, t, steps)
        assert times.shape == (steps + 1, t.numel())
        torch.testing.assert_close(times[0], t, rtol=0, atol=0)
        assert bool((times[-1] == process.t_min).all())
        log_sigma = torch.log(process.sigma(times))
        s_min = float(process.sigma(torch.tensor(process.t_min, dtype=torch.float64)))
        want = math.log(s_min) - torch.log(process.sigma(t))
        want = (want / steps).expand(steps, -1)
        torch.testing.assert_close(log_sigma[1:] - log_sigma[:-1], want, rtol=1e-12, atol=1e-12)


def test_multistep_is_exact_for_a_dirac_and_second_order_on_a_gaussian():
    """One Dirac: the posterior mean is constant, so every step is exact whatever ``steps``
    (1e-14). One Gaussian (ve, closed-form affine map): halving the step divides the error by
    about 4 (second order; more than 3 demanded)."""
    ve = VEProcess(t_min=2e-3, t_max=80.0)
    dirac = GaussianMixture([1.0], [[0.3, -0.2]], stds=0.0)
    g = torch.Generator().manual_seed(3)
    x = 5.0 * torch.randn(20, 2, generator=g, dtype=torch.float64)
    t = torch.full((20,), 5.0, dtype=torch.float64)
    want = dirac.means + (x - dirac.means) * (ve.t_min / t[:, None])
    for steps in (1, 3):
        got = dirac.flow_map(x, t, ve, method="multistep", steps=steps)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    lam = torch.tensor([0.01, 0.3], dtype=torch.float64)
    gm = _gaussian(lam)
    m = gm.mean()
    want = m + (x - m) * ((lam + ve.t_min**2) / (lam + t[:, None] ** 2)).sqrt()
    errs = [
        float((gm.flow_map(x, t, ve, method="multistep", steps=s) - want).abs().max())
        for s in (16, 32)
    ]
    assert errs[0] / errs[1] > 3, errs


def _mixtures():
    """Diagonal (isotropic, per-axis, Dirac and zero-weight components) and full covariances."""
    yield "isotropic", two_gaussians_1to2()
    yield (
        "per-axis",
        GaussianMixture(
            [0.2, 0.5, 0.3],
            [[0.0, 1.0], [1.0, -1.0], [-2.0, 0.5]],
            stds=[[0.1, 0.3], [0.5, 0.05], [0.2, 0.2]],
        ),
    )
    yield (
        "dirac+zero-weight",
        GaussianMixture(
            [0.0, 0.6, 0.4], [[3.0, 0.0], [0.0, 0.5], [0.0, -0.5]], stds=[0.1, 0.0, 0.02]
        ),
    )
    covs = torch.tensor([[[0.04, 0.01], [0.01, 0.02]], [[0.01, -0.005], [-0.005, 0.03]]])
    yield "full", GaussianMixture([0.4, 0.6], [[0.0, 0.5], [0.5, -0.5]], covs=covs)


@pytest.mark.parametrize("process", [VE, LIN], ids=["ve", "linear"])
def test_multistep_scheduled_denoiser_equals_the_mixture_denoiser(process, monkeypatch):
    """The precomputed posterior mean of the multistep loop (diagonal covariances) is
    GaussianMixture.denoiser's formula: the flow map agrees with the loop over ``denoiser`` to
    float64 rounding (1e-13 absolute on points of size ~1), and full covariances take that loop."""
    g = torch.Generator().manual_seed(11)
    for name, gmm in _mixtures():
        n = 200
        u = torch.rand(n, generator=g, dtype=torch.float64)
        t = process.t_min * (process.t_max / process.t_min) ** u
        t[:2] = torch.tensor([process.t_min, process.t_max], dtype=torch.float64)
        x = process.interpolate(
            gmm.sample(n, g), torch.randn(n, 2, generator=g, dtype=torch.float64), t
        )
        fast = gmm.flow_map(x, t, process, method="multistep", steps=16)
        monkeypatch.setattr(flowmap, "_SCHEDULE_ELEMENTS", 0)  # forces the per-step denoiser
        slow = gmm.flow_map(x, t, process, method="multistep", steps=16)
        monkeypatch.undo()
        assert torch.isfinite(fast).all(), name
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-13, msg=name)
        if gmm.stds is None:
            assert torch.equal(fast, slow)  # the same code path
        ones = torch.ones(2, 3, dtype=torch.float64)
        assert (flowmap.scheduled_denoiser(gmm, ones, ones) is None) == (gmm.stds is None)


# ------------------------------------------------------------------------------------------------
# RK4
# ------------------------------------------------------------------------------------------------
def test_rk4_flow_map_single_gaussian_closed_form():
    """ve flow map of N(m, diag(lam)) from t to t_min: m + (x - m) sqrt(lam + t_min^2) /
    sqrt(lam + t^2) per coordinate."""
    lam = torch.tensor([0.01, 0.3, 2.0], dtype=torch.float64)
    gm = _gaussian(lam)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.05, 1.0, 30.0, 80.0], dtype=torch.float64)
    x = gm.mean() + t[:, None] * torch.randn(4, 3, generator=g, dtype=torch.float64)
    want = gm.mean() + (x - gm.mean()) * ((lam + 0.002**2) / (lam + t[:, None] ** 2)).sqrt()
    errs = []
    for steps in (48, 96):
        got = gm.flow_map(x, t, "ve", method="rk4", steps=steps)
        errs.append(float(((got - want).abs() / (want - gm.mean()).abs()).max()))
    assert errs[0] < 3e-4  # relative error of the displacement from the mean, up to t = 80
    assert errs[0] / errs[1] > 10  # fourth order: 16x for half the step


def test_rk4_flow_map_matches_adaptive_solver_on_a_mixture():
    gm = get_preset("random_16")
    g = torch.Generator().manual_seed(0)
    t = torch.exp(torch.linspace(-3, 4, 16, dtype=torch.float64))
    x = gm.sample(16, generator=g) + t[:, None] * torch.randn(
        16, 16, generator=g, dtype=torch.float64
    )
    ref = gm.flow_map(x, t, "ve", rtol=1e-9, atol=1e-11)
    got = gm.flow_map(x, t, "ve", method="rk4", steps=48)
    rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(rel.max()) < 1e-3


@pytest.mark.parametrize("process", ["ve", "linear"])
def test_isotropic_velocity_equals_the_mixture_velocity(process):
    """The matrix-product velocity of the RK4 flow map (isotropic components, per-component stds,
    per-row times) against GaussianMixture.velocity: float64 rounding only."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(5, 7, generator=g, dtype=torch.float64)
    gm = GaussianMixture(torch.full((5,), 0.2), means, stds=torch.linspace(0.05, 0.6, 5))
    proc = get_process(process)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x = 2 * torch.randn(64, 7, generator=g, dtype=torch.float64)
    got = flowmap.isotropic_velocity(gm, proc, torch.float64, "cpu")(x, t)
    assert torch.allclose(got, gm.velocity(x, t, proc), rtol=1e-10, atol=1e-12)
    assert (
        flowmap.isotropic_velocity(get_preset("digits_mixture"), proc, torch.float64, "cpu") is None
    )


def test_shared_time_velocity_equals_the_mixture_velocity():
    """Full covariances (digits mixture), one time for all rows, ve, from t_min to t_max."""
    gm = get_preset("digits_mixture")
    proc = get_process("ve")
    fast = flowmap.shared_time_velocity(gm, proc, torch.float64, "cpu")
    g = torch.Generator().manual_seed(0)
    for tt in (0.002, 0.05, 1.0, 80.0):
        x = gm.sample(64, generator=g) + tt * torch.randn(64, 64, generator=g, dtype=torch.float64)
        t = torch.full((64,), tt, dtype=torch.float64)
        ref = gm.velocity(x, t, proc)
        rel = (fast(x, t) - ref).norm(dim=1) / ref.norm(dim=1)
        assert float(rel.max()) < 1e-10, tt
    assert flowmap.shared_time_velocity(gm, get_process("linear"), torch.float64, "cpu") is None


def test_rk4_flow_map_in_row_chunks_equals_one_chunk(monkeypatch):
    """Rows are integrated in chunks (memory); each row's trajectory is independent of the rest."""
    g = torch.Generator().manual_seed(0)
    for gm in (get_preset("random_16"), get_preset("digits_mixture")):
        x = gm.sample(300, generator=g) + 0.5 * torch.randn(
            300, gm.dim, generator=g, dtype=torch.float64
        )
        monkeypatch.setattr(flowmap, "_CHUNK_ELEMENTS", 1 << 30)
        whole = gm.flow_map(x, 0.5, "ve", method="rk4", steps=6)
        monkeypatch.setattr(flowmap, "_CHUNK_ELEMENTS", 64 * gm.dim)
        chunked = gm.flow_map(x, 0.5, "ve", method="rk4", steps=6)
        assert torch.allclose(whole, chunked, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# one entry point: every method, its options, the earlier names
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_every_method_agrees_with_the_tight_dopri5(process):
    """Each integrator against dopri5 at rtol 1e-10 on a non-axis-aligned full-covariance mixture
    with unequal weights, from start times spread over the domain: mean squared errors below
    1e-6 (segmented at its loose default 1e-5, rk4 48 steps, multistep 64 steps; measured about
    1e-10 to 1e-8), the output in the dtype of x."""
    covs = torch.tensor([[[0.04, 0.015], [0.015, 0.02]], [[0.01, -0.006], [-0.006, 0.03]]])
    gm = GaussianMixture([0.3, 0.7], [[0.2, 0.5], [-0.4, -0.3]], covs=covs.double())
    g = torch.Generator().manual_seed(6)
    t = _spread_times(process, 120, g)
    x = process.interpolate(
        gm.sample(120, g), torch.randn(120, 2, generator=g, dtype=torch.float64), t
    )
    ref = gm.flow_map(x, t, process, rtol=1e-10, atol=1e-12)
    for method in ("segmented", "rk4", "multistep"):
        got = gm.flow_map(x, t, process, method=method)
        mse = float(((got - ref) ** 2).sum(1).mean())
        assert mse < 1e-6, (method, mse)
        assert gm.flow_map(x.float(), t, process, method=method).dtype == torch.float32


def test_earlier_names_call_the_one_flow_map():
    """``multistep_flow_map``, ``ideal_flow_map`` and ``FlowMapGenerator`` give exactly the flow
    map's numbers for the same method and options."""
    gm = two_gaussians_1to2()
    g = torch.Generator().manual_seed(7)
    t = _spread_times(VE, 64, g)
    x = VE.interpolate(gm.sample(64, g), torch.randn(64, 2, generator=g, dtype=torch.float64), t)
    ms = gm.flow_map(x, t, VE, method="multistep", steps=12)
    assert torch.equal(multistep_flow_map(gm, x, t, VE, steps=12), ms)
    assert torch.equal(FlowMapGenerator(gm, VE, method="multistep", steps=12)(x, t), ms)
    seg = gm.flow_map(x[:8], 4.0, VE, method="segmented", rtol=1e-6, atol=1e-8)
    assert torch.equal(ideal_flow_map(gm, x[:8], 4.0, VE, rtol=1e-6, atol=1e-8), seg)
    ode = gm.flow_map(x[:8], t[:8], VE, rtol=1e-7, atol=1e-9)
    assert torch.equal(FlowMapGenerator(gm, VE, rtol=1e-7, atol=1e-9)(x[:8], t[:8]), ode)
    rk4 = gm.flow_map(x[:8], t[:8], VE, method="rk4", steps=5)
    assert torch.equal(FlowMapGenerator(gm, VE, method="rk4", steps=5)(x[:8], t[:8]), rk4)
    with pytest.raises(ValueError, match="method"):
        FlowMapGenerator(gm, VE, method="euler")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="euler"), "flow_map.method"),
        (dict(method="rk4", rtol=1e-6), "flow_map.rtol"),
        (dict(method="multistep", atol=1e-6), "flow_map.atol"),
        (dict(method="dopri5", steps=10), "flow_map.steps"),
        (dict(method="segmented", steps=10), "flow_map.steps"),
        (dict(method="rk4", steps=0), "flow_map.steps"),
        (dict(method="multistep", steps=2.5), "flow_map.steps"),
        (dict(method="multistep", t_end=0.5), "flow_map.t_end"),
        (dict(method="segmented", segments_per_decade=0), "flow_map.segments_per_decade"),
        (dict(rtol=0.0), "flow_map.rtol"),
        (dict(t_end=100.0), "t_end"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    gm = two_gaussians_1to2()
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        gm.flow_map(x, 1.0, VE, **kwargs)
