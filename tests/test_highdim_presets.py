"""The high-dimensional mixture presets: random well-separated mixtures and the digits mixture."""

import math

import numpy as np
import pytest
import torch

from gcflows.data import load_digits
from gcflows.gmm import HIGHDIM_DIMS, digits_mixture, get_preset


@pytest.mark.parametrize("dim", HIGHDIM_DIMS)
def test_random_presets_are_fixed_and_separated(dim):
    gm = get_preset(f"random_{dim}")
    again = get_preset(f"random_{dim}")
    assert gm.dim == dim and gm.n_components == 8
    assert torch.equal(gm.means, again.means)  # a fixed target, not a fresh draw
    dist = torch.cdist(gm.means, gm.means) + torch.eye(8) * 1e9
    # every pair of means at least 10 standard deviations apart (up to rounding)
    assert float(dist.min()) >= 10 * float(gm.stds[0]) * (1 - 1e-12)
    assert get_preset(f"random_{dim}", seed=1).means.ne(gm.means).any()


def _class_stats():
    images, labels = load_digits("all", dtype=torch.float64)
    x = images.reshape(len(images), -1).numpy()
    y = labels.numpy()
    return x, y


def test_digits_mixture_means_weights_and_positive_definite():
    gm = digits_mixture()
    x, y = _class_stats()
    assert gm.dim == 64 and gm.n_components == 10
    for c in range(10):
        np.testing.assert_allclose(gm.means[c].numpy(), x[y == c].mean(0), rtol=0, atol=1e-12)
        assert abs(float(gm.weights[c]) - (y == c).mean()) < 1e-12
    eig = torch.linalg.eigvalsh(gm.covariances)
    assert float(eig.min()) > 1e-3  # positive definite, with margin
    # the pixel scaling of the image pipeline: values in [-1, 1]
    assert float(gm.means.min()) >= -1 and float(gm.means.max()) <= 1


def test_digits_mixture_fixed_shrinkage_is_the_stated_formula():
    a = 0.2
    gm = digits_mixture(shrinkage=a)
    x, y = _class_stats()
    s = np.cov(x[y == 3], rowvar=False, bias=True)
    want = (1 - a) * s + a * np.trace(s) / 64 * np.eye(64)
    np.testing.assert_allclose(gm.covariances[3].numpy(), want, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="shrinkage"):
        digits_mixture(shrinkage=0.0)


def test_digits_mixture_oracle_total_variance():
    """Law of total variance with the exact posterior: E tr Cov[data|x_t] + E||D - E data||^2 =
    E||data - E data||^2 (exact), checked by Monte Carlo at t = 1 (5 standard errors)."""
    gm = digits_mixture()
    gen = torch.Generator().manual_seed(0)
    n = 4000
    data = gm.sample(n, generator=gen)
    x = data + 1.0 * torch.randn(data.shape, generator=gen, dtype=data.dtype)
    tr = gm.posterior_cov_trace(x, 1.0, "ve")
    dev = ((gm.denoiser(x, 1.0, "ve") - gm.mean()) ** 2).sum(1)
    total = float(gm.second_moment() - (gm.mean() ** 2).sum())
    v = tr + dev
    se = float(v.std()) / math.sqrt(n)
    assert abs(float(v.mean()) - total) < 5 * se
