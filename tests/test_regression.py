"""The learned proxy estimator R~_t (regressor of the noise on x_t)."""

import pytest
import torch

from gcflows.discrepancy import ic_proxy
from gcflows.gmm import GaussianMixture, get_preset
from gcflows.regression import RegressorConfig, estimate_proxy

SMALL = dict(hidden=64, batch=256)


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


@pytest.mark.parametrize("per_time", [True, False])
def test_recovers_known_conditional_variance_of_a_gaussian(per_time):
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
        config=RegressorConfig(per_time=per_time, **SMALL),
        generator=torch.Generator().manual_seed(0),
    )
    for t, v, h in zip(est.times, est.value, est.half_width, strict=True):
        exact = float((lam / (lam + t * t)).sum())
        assert h < 0.05 * exact
        # upper estimate: never more than 3 half-widths below, and within 5 % above
        assert exact - 3 * h < v < 1.05 * exact + 3 * h, (t, v, exact)
    assert not any(est.capped)  # early stopping ended every fit, before the step cap
    assert est.n_train == [4096] * 4 and est.config["per_time"] is per_time


def test_cross_fitting_scores_every_training_pair_once():
    """cross_fit: two fits on halves, each scored on the other half; no test pairs drawn."""
    lam = torch.tensor([0.04, 0.25, 1.0], dtype=torch.float64)
    gm = _gaussian(lam)
    calls = []

    def sampler(t, n, g):
        calls.append(n)
        return _ic_sampler(gm)(t, n, g)

    est = estimate_proxy(
        sampler,
        [0.3, 1.0],
        n_train=[2048, 4096],
        n_test=999,
        config=RegressorConfig(**SMALL),
        cross_fit=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert calls == [2048, 4096]  # the training pairs only; n_test is not used
    for t, v, h in zip(est.times, est.value, est.half_width, strict=True):
        exact = float((lam / (lam + t * t)).sum())
        assert exact - 3 * h < v < 1.08 * exact + 3 * h, (t, v, exact)


def test_product_estimator_recovers_known_conditional_variance():
    """product=True on the anisotropic Gaussian of the first test (R~_t = sum lam / (lam + t^2)):
    two fits on halves, the held-out mean of the product of their residuals. Its expectation is
    R~_t plus the squared systematic error of the fits (the variance part cancels), so it is held
    to 5 % above and, being no longer one-sided in a single draw, 3 half-widths below."""
    lam = torch.tensor([0.01, 0.04, 0.25, 1.0, 2.25, 0.09], dtype=torch.float64)
    times = [0.1, 0.3, 1.0, 3.0]
    est = estimate_proxy(
        _ic_sampler(_gaussian(lam)),
        times,
        n_train=4096,
        n_test=8192,
        config=RegressorConfig(**SMALL),
        product=True,
        generator=torch.Generator().manual_seed(0),
    )
    for t, v, h in zip(est.times, est.value, est.half_width, strict=True):
        exact = float((lam / (lam + t * t)).sum())
        assert exact - 3 * h < v < 1.05 * exact + 3 * h, (t, v, exact)
    assert est.config["product"] is True and est.config["cross_fit"] is False


def test_product_estimator_is_below_the_mean_half_fit_residual():
    """Row by row <a, b> <= (|a|^2 + |b|^2) / 2, so the product estimate can never exceed the
    mean held-out residual of its two half-fits on the same rows: checked by refitting the two
    halves the way estimate_proxy does (same generator stream) and scoring them directly."""
    from gcflows.regression import _draw, _fit

    gm = _gaussian(torch.tensor([0.04, 0.25, 1.0], dtype=torch.float64))
    cfg = RegressorConfig(hidden=16, batch=128, max_steps=100)
    est = estimate_proxy(
        _ic_sampler(gm),
        [0.5],
        n_train=512,
        n_test=1024,
        config=cfg,
        product=True,
        generator=torch.Generator().manual_seed(3),
    )
    g = torch.Generator().manual_seed(3)
    x, z = _draw(_ic_sampler(gm), 0.5, 512, g, None)
    f1 = _fit([x[:256]], [z[:256]], [0.5], cfg, g)
    f2 = _fit([x[256:]], [z[256:]], [0.5], cfg, g)
    xt, zt = _draw(_ic_sampler(gm), 0.5, 1024, g, None)
    with torch.no_grad():
        e1 = zt.double() - f1.predict(xt, 0.5).double()
        e2 = zt.double() - f2.predict(xt, 0.5).double()
    assert est.value[0] == pytest.approx(float((e1 * e2).sum(1).mean()), rel=1e-12)
    assert est.value[0] <= 0.5 * float((e1.pow(2) + e2.pow(2)).sum(1).mean())


def test_fixed_length_product_fit_recovers_known_conditional_variance():
    """early_stopping=False: each fit runs exactly max_steps and keeps its last weights; with the
    product estimate the overfitting this allows cancels, so the closed form of the first test
    is still met within 5 % (3 half-widths below)."""
    lam = torch.tensor([0.01, 0.04, 0.25, 1.0, 2.25, 0.09], dtype=torch.float64)
    est = estimate_proxy(
        _ic_sampler(_gaussian(lam)),
        [0.1, 0.3, 1.0, 3.0],
        n_train=2048,
        n_test=8192,
        config=RegressorConfig(early_stopping=False, max_steps=700, eval_every=100, **SMALL),
        product=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert est.steps == [1400] * 4 and all(est.capped)  # two fits of exactly 700 steps
    for t, v, h in zip(est.times, est.value, est.half_width, strict=True):
        exact = float((lam / (lam + t * t)).sum())
        assert exact - 3 * h < v < 1.05 * exact + 3 * h, (t, v, exact)


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
        config=RegressorConfig(per_time=False, **SMALL),
        generator=torch.Generator().manual_seed(1),
    )
    for t, v in zip(times, est.value, strict=True):
        gen = torch.Generator().manual_seed(2)
        exact = ic_proxy(gm, "ve", t, n_samples=8192, generator=gen).mean
        assert abs(v - exact) < 0.10 * exact, (t, v, exact)


def test_early_stopping_stops_and_the_cap_caps():
    """Isotropic Gaussian data: the skip term alone is exact, so the validation score stops
    improving within a few hundred steps and the fit ends by patience, far below the cap; a cap
    below one patience window ends it at the cap instead."""
    gm = GaussianMixture([1.0], torch.zeros(1, 4, dtype=torch.float64), stds=0.5)

    def fit(max_steps: int):
        cfg = RegressorConfig(hidden=16, eval_every=20, patience=3, max_steps=max_steps)
        gen = torch.Generator().manual_seed(0)
        return estimate_proxy(
            _ic_sampler(gm), [1.0], n_train=1024, n_test=256, config=cfg, generator=gen
        )

    est = fit(5000)
    assert not est.capped[0] and est.steps[0] < 1000 and est.steps[0] % 20 == 0
    est = fit(50)
    assert est.capped[0] and est.steps[0] == 50


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(times=[]), "times"),
        (dict(times=[0.0]), "times"),
        (dict(n_train=2), "n_train"),
        (dict(n_train=[64, 64]), "n_train"),
        (dict(n_test=0), "n_test"),
        (dict(cross_fit="yes"), "cross_fit"),
        (dict(product=1), "product"),
        (dict(product=True, cross_fit=True), "product"),
        (dict(config=dict(hidden=8)), "config"),
    ],
)
def test_bad_arguments(kwargs, match):
    gm = get_preset("random_16")
    args = dict(times=[1.0], n_train=64, n_test=8, config=RegressorConfig(max_steps=10)) | kwargs
    with pytest.raises(ValueError, match=match):
        estimate_proxy(_ic_sampler(gm), **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(hidden=0), "RegressorConfig.hidden"),
        (dict(max_steps=0), "RegressorConfig.max_steps"),
        (dict(early_stopping="no"), "RegressorConfig.early_stopping"),
        (dict(patience=0), "RegressorConfig.patience"),
        (dict(warmup=-1), "RegressorConfig.warmup"),
        (dict(dropout=1.0), "RegressorConfig.dropout"),
        (dict(lr=0.0), "RegressorConfig.lr"),
        (dict(val_fraction=1.0), "RegressorConfig.val_fraction"),
        (dict(per_time=1), "RegressorConfig.per_time"),
    ],
)
def test_bad_regressor_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegressorConfig(**kwargs)


def test_a_sampler_with_the_wrong_shape_is_named():
    def sampler(t, n, g):
        return torch.zeros(n, 3), torch.zeros(n, 4)

    with pytest.raises(ValueError, match="sampler"):
        estimate_proxy(sampler, [1.0], n_train=16, n_test=8)
