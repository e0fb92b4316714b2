"""The mixture evaluation against closed forms.

Tolerances are sampling tolerances stated per test: with ``n`` samples of the target itself the
mode shares are multinomial (TV ~ sqrt(K / n)), a mode's sample mean has squared error
``tr Sigma_k / n_k`` in expectation, and a Gaussian's flow map is linear (exact formula).
"""

import math

import numpy as np
import pytest
import torch

from gcflows.gmm import GaussianMixture, get_preset
from gcflows.mixture_eval import (
    METRICS,
    consistency_error,
    evaluate,
    make_eval_set,
    sample_metrics,
    samples,
)
from gcflows.processes import get_process


def _mixture(dim=6):
    """Three unequal, well-separated modes with full covariances (not axis aligned)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, dim, dim, generator=g, dtype=torch.float64)
    covs = 0.01 * (a @ a.transpose(1, 2) / dim + 0.2 * torch.eye(dim, dtype=torch.float64))
    means = 3.0 * torch.randn(3, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), means, covs=covs)


def _draw(target, n, seed):
    """Samples with their component labels (the mixture's sampler, component by component)."""
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(target.weights, n, replacement=True, generator=g)
    lam, rot = target.eigen
    eps = torch.randn(n, target.dim, generator=g, dtype=torch.float64) * lam.sqrt()[comp]
    z = torch.einsum("nij,nj->ni", rot[comp], eps) if rot is not None else eps
    return target.means[comp] + z, comp


def test_target_samples_score_sampling_noise_only():
    target = _mixture()
    x, _ = _draw(target, 20000, 0)
    ref = target.sample(4000, generator=torch.Generator().manual_seed(1))
    m = sample_metrics(target, x, ref)
    # TV of a multinomial share with n = 20000, K = 3: about sqrt(K / n) / 2 ~ 0.006
    assert m["mode_tv"] < 0.02
    # mean error ~ sum_k w_k tr Sigma_k / (n_k d) ~ 1e-6 here; a shift of 0.01 would be 1e-4
    assert m["mean_err"] < 1e-5
    # covariance: relative Frobenius error ~ sqrt(d / n_k) ~ 0.03
    assert m["cov_err"] < 0.08
    # sliced W2 carries the mode shares' noise times the mode distances (~7 here), so it is
    # not near zero at this n; it is far below that of the same samples shifted by 1
    shifted = sample_metrics(target, x + 1.0, ref)
    assert m["sw2"] < 0.5 * shifted["sw2"]


def test_shifted_mode_gives_the_known_mean_error_and_tv_stays_zero():
    """Mode 1 (weight 0.3) moved by delta: mean error w_1 ||delta||^2 / d (+ sampling noise
    ~1e-6, against 0.3 * 0.04 / 6 = 2e-3), the mode shares unchanged (the shift is small
    against the separation)."""
    target = _mixture()
    x, comp = _draw(target, 20000, 2)
    delta = torch.tensor([0.2, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    x = x + (comp == 1)[:, None] * delta
    m = sample_metrics(target, x, target.sample(2000, generator=torch.Generator().manual_seed(4)))
    want = 0.3 * float(delta @ delta) / 6
    assert m["mean_err"] == pytest.approx(want, rel=0.03)
    assert m["mode_tv"] < 0.02


def test_scaled_modes_give_the_known_covariance_error():
    """Every sample pulled away from its mode by 1.5: Cov = 2.25 Sigma, relative error 1.25
    (sampling error about 0.03 relative, as above)."""
    target = _mixture()
    x, comp = _draw(target, 20000, 5)
    x = target.means[comp] + 1.5 * (x - target.means[comp])
    m = sample_metrics(target, x, target.sample(2000, generator=torch.Generator().manual_seed(4)))
    assert m["cov_err"] == pytest.approx(1.25, abs=0.1)


def test_all_mass_in_one_mode_gives_tv_one_minus_its_weight():
    target = _mixture()
    x = target.means[0] + 0.01 * torch.randn(500, 6, generator=torch.Generator().manual_seed(0))
    m = sample_metrics(target, x.double(), target.sample(500, generator=torch.Generator()))
    assert m["mode_tv"] == pytest.approx(1 - 0.5, abs=1e-12)


def test_consistency_error_of_a_gaussian_closed_form():
    """One isotropic Gaussian N(m, s^2 I) under ve: Phi_t(x) = m + c_t (x - m) with
    c_t = sqrt(s^2 + t_min^2) / sqrt(s^2 + t^2). A model m + k c_t (x - m) has error
    (k - 1)^2 c_t^2 E||x_t - m||^2 / d = (k - 1)^2 c_t^2 (s^2 + t^2) = (k - 1)^2 (s^2 + t_min^2)
    at every t, in expectation (256 draws: sampling error ~ sqrt(2 / (256 d)) relative)."""
    s, dim = 0.3, 8
    target = GaussianMixture(
        torch.ones(1, dtype=torch.float64),
        torch.full((1, dim), 0.5, dtype=torch.float64),
        stds=torch.full((1,), s, dtype=torch.float64),
    )
    ev = make_eval_set(target, n_flow=256, n_ref=16, times=(0.2, 1.0, 5.0))
    t_min = get_process("ve").t_min
    ks = torch.tensor([1.0, 1.1, 0.7])

    def apply(x, t):
        c = math.sqrt(s**2 + t_min**2) / torch.sqrt(s**2 + t**2)
        return 0.5 + ks[:, None, None] * c[..., None] * (x - 0.5)

    err = consistency_error(apply, 3, ev)
    assert err.shape == (3, 3)
    assert float(err[0].abs().max()) < 1e-6  # the exact map (RK4 error only)
    for i in (1, 2):
        want = (float(ks[i]) - 1) ** 2 * (s**2 + t_min**2)
        torch.testing.assert_close(err[i], torch.full((3,), want), rtol=0.15, atol=0)


def test_samples_one_and_two_steps_use_the_documented_times():
    seen = []

    def apply(x, t):
        seen.append(float(t[0, 0]))
        return x / 2

    g = torch.Generator().manual_seed(0)
    one = samples(apply, 2, 3, 5, 1, g)
    assert one.shape == (2, 5, 3) and seen == [80.0]
    z = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one, 40.0 * z)
    seen.clear()
    samples(apply, 2, 3, 5, 2, torch.Generator())
    assert seen == pytest.approx([80.0, 0.8], rel=1e-7)  # float32 times
    with pytest.raises(ValueError, match="n_steps=3"):
        samples(apply, 2, 3, 5, 3, g)


def test_evaluate_returns_every_metric_per_model_and_ranks_a_bad_model_worse():
    """Model 0 = the exact flow map (one-step samples are the target's), model 1 collapses every
    sample to the origin: worse on every sample metric."""
    target = get_preset("random_16")
    ev = make_eval_set(target, n_flow=64, n_ref=500)

    def apply(x, t):
        good = target.flow_map(x[0].double(), t[0].double(), "ve", method="rk4", steps=24).float()
        return torch.stack([good, torch.zeros_like(x[1])])

    out = evaluate(target, apply, 2, ev, n_samples=500)
    assert set(out) == set(METRICS)
    for k, v in out.items():
        assert v.shape == (2,) and np.isfinite(v).all(), k
        assert v[1] > v[0], k
    assert out["mode_tv_1step"][0] < 0.1 and out["cons_err"][0] < 1e-4


def test_bad_arguments():
    target = get_preset("random_16")
    with pytest.raises(ValueError, match="n_flow=1"):
        make_eval_set(target, n_flow=1)
    with pytest.raises(ValueError, match="x="):
        sample_metrics(target, torch.zeros(4, 3), torch.zeros(4, 16))
    nan = sample_metrics(target, torch.full((4, 16), float("nan")), torch.zeros(4, 16))
    assert all(math.isinf(v) for v in nan.values())
