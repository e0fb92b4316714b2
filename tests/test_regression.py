"""The learned proxy estimator R~_t (regressor of the noise on x_t) and the RK4 flow map."""

import pytest
import torch

from gcflows.gmm import GaussianMixture, get_preset
from gcflows.regression import estimate_proxy, exact_ic_proxy, rk4_flow_map


def _gaussian(lam: torch.Tensor) -> GaussianMixture:
    d = lam.numel()
    mean = torch.linspace(-0.5, 0.5, d, dtype=torch.float64)[None]
    return GaussianMixture([1.0], mean, stds=lam.sqrt()[None])


def _ic_sampler(gm):
    def sampler(t, n, g):
        data = gm.sample(n, generator=g)
        noise = torch.randn(data.shape, generator=g, dtype=data.dtype)
        return data + t * noise, noise

    return sampler


def test_recovers_known_conditional_variance_of_a_gaussian():
    """Data N(m, diag(lam)), IC, ve: Var(noise | x_t) = diag(lam / (lam + t^2)), so
    R~_t = sum_i lam_i / (lam_i + t^2) exactly. Anisotropic: the network has to learn the
    per-coordinate shrinkage (its zero output is exact only for an isotropic Gaussian)."""
    lam = torch.tensor([0.01, 0.04, 0.25, 1.0, 2.25, 0.09], dtype=torch.float64)
    gm = _gaussian(lam)
    times = [0.1, 0.3, 1.0, 3.0]
    est = estimate_proxy(
        _ic_sampler(gm),
        times,
        n_train=4096,
        n_test=8192,
        steps=500,
        hidden=64,
        generator=torch.Generator().manual_seed(0),
    )
    for t, v, h in zip(est.times, est.value, est.half_width, strict=True):
        exact = float((lam / (lam + t * t)).sum())
        assert h < 0.05 * exact
        # upper estimate: never more than 3 half-widths below, and within 5 % above
        assert exact - 3 * h < v < 1.05 * exact + 3 * h, (t, v, exact)


def test_exact_ic_proxy_single_gaussian_closed_form():
    lam = torch.tensor([0.04, 1.0, 0.25], dtype=torch.float64)
    gm = _gaussian(lam)
    for t in (0.2, 1.0):
        v, h = exact_ic_proxy(gm, t, 256, torch.Generator().manual_seed(0))
        assert v == pytest.approx(float((lam / (lam + t * t)).sum()), rel=1e-10)
        assert h < 1e-8  # constant integrand: no sampling spread


def test_regressor_within_ten_percent_on_a_mixture():
    """IC on a 4-D two-mode mixture against the exact posterior-covariance value."""
    means = torch.tensor([[1.0, 0.0, 0.0, 0.5], [-1.0, 0.0, 0.0, -0.5]], dtype=torch.float64)
    gm = GaussianMixture([0.5, 0.5], means, stds=0.15)
    times = [0.1, 0.5, 1.0, 2.0]
    est = estimate_proxy(
        _ic_sampler(gm),
        times,
        n_train=4096,
        n_test=4096,
        steps=600,
        hidden=64,
        generator=torch.Generator().manual_seed(1),
    )
    for t, v in zip(times, est.value, strict=True):
        exact, _ = exact_ic_proxy(gm, t, 8192, torch.Generator().manual_seed(2))
        assert abs(v - exact) < 0.10 * exact, (t, v, exact)


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
        got = rk4_flow_map(gm, x, t, "ve", steps=steps)
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
    got = rk4_flow_map(gm, x, t, "ve", steps=48)
    rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(rel.max()) < 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(times=[]), "times"), (dict(times=[0.0]), "times"), (dict(steps=0), "steps")],
)
def test_bad_arguments(kwargs, match):
    gm = get_preset("random_16")
    args = dict(times=[1.0], steps=10, n_train=8, n_test=8) | kwargs
    with pytest.raises(ValueError, match=match):
        estimate_proxy(_ic_sampler(gm), **args)
