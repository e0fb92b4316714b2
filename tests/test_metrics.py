"""Tests of gcflows.metrics: the mathematics of each metric, against closed forms and oracles."""

from __future__ import annotations

import itertools
import math

import numpy as np
import ot
import ot.gaussian
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcflows import metrics
from gcflows.metrics import (
    assign_modes,
    exact_w2,
    frechet_distance,
    frechet_distance_from_stats,
    median_bandwidth,
    mmd,
    mode_coverage,
    sliced_w2,
    wasserstein_1d_squared,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


# ------------------------------------------------------------------------------------------------
# exact W2
# ------------------------------------------------------------------------------------------------


def test_exact_w2_weighted_diracs_closed_form():
    # a on {p1, p2}, b a single Dirac at q: the only coupling sends everything to q, so
    # W2^2 = sum_i a_i ||p_i - q||^2 = 0.25 * 25 + 0.75 * 1 = 7.
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=F64)
    y = torch.tensor([[0.0, 0.0]], dtype=F64)
    a = torch.tensor([0.25, 0.75], dtype=F64)
    assert exact_w2(x, y, a=a) == pytest.approx(math.sqrt(7.0), rel=1e-12)
    # Repeated Diracs: n copies of p against m copies of q -> ||p - q||; weights given as counts
    # are normalised.
    p, q = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0, 4.0])
    assert exact_w2(p.expand(4, 3), q.expand(7, 3), a=torch.full((4,), 3.0)) == pytest.approx(
        float((p - q).norm()), rel=1e-12
    )


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 40),
    d=st.integers(1, 6),
    scale=st.floats(0.0, 50.0),
)
def test_exact_w2_translated_cloud_is_translation_norm(seed, n, d, scale):
    # For any coupling pi of mu with itself, sum pi (x_i - x_j) = 0, so the cost of moving mu to
    # mu + s is ||s||^2 + (cost of pi on mu, mu) >= ||s||^2, attained by the identity.
    x = _randn(n, d, seed=seed)
    s = scale * _randn(d, seed=seed + 1)
    # rel 1e-9: the simplex sums n float64 products; atol covers s = 0 (sqrt of round-off).
    assert exact_w2(x, x + s) == pytest.approx(float(s.norm()), rel=1e-9, abs=1e-7)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 30))
def test_exact_w2_1d_equals_sorted_matching(seed, n):
    x, y = _randn(n, seed=seed), 2.0 * _randn(n, seed=seed + 1) + 0.5
    expected = math.sqrt(float(((x.sort().values - y.sort().values) ** 2).mean()))
    assert exact_w2(x, y) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 25), m=st.integers(1, 25))
def test_exact_w2_1d_unequal_sizes_equals_quantile_formula(seed, n, m):
    # Two independent routes: the network simplex and the quantile-function integral.
    x, y = _randn(n, seed=seed), _randn(m, seed=seed + 1) + 1.0
    q = float(wasserstein_1d_squared(x[None], y[None])[0])
    assert exact_w2(x, y) == pytest.approx(math.sqrt(q), rel=1e-9, abs=1e-12)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), d=st.integers(1, 4))
def test_exact_w2_equals_best_permutation(seed, n, d):
    # Birkhoff: with n = m uniform points an optimal plan is a permutation; brute force n! <= 720.
    x, y = _randn(n, d, seed=seed), _randn(n, d, seed=seed + 1)
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    best = min(float(cost[range(n), list(p)].mean()) for p in itertools.permutations(range(n)))
    assert exact_w2(x, y) == pytest.approx(math.sqrt(best), rel=1e-9)


def test_exact_w2_flattens_images_and_accepts_numpy():
    x, y = _randn(5, 1, 2, 3, seed=0), _randn(6, 1, 2, 3, seed=1)
    ref = exact_w2(x.reshape(5, -1), y.reshape(6, -1))
    assert exact_w2(x.numpy(), y.float()) == pytest.approx(ref, rel=1e-6)  # float32 input


def test_exact_w2_raises_when_solver_is_not_optimal(monkeypatch):
    def fake_emd2(a, b, m, numItermax, log):
        assert numItermax >= 50 * len(a) * len(b)  # the cap grows with the problem
        return 1.0, {"result_code": 3, "warning": "numItermax reached before optimality"}

    monkeypatch.setattr(ot, "emd2", fake_emd2)
    with pytest.raises(RuntimeError, match="optimum"):
        exact_w2(_randn(4, 2, seed=0), _randn(4, 2, seed=1))


@pytest.mark.parametrize(
    "x, y, kw, match",
    [
        (torch.tensor([[0.0, float("nan")]]), torch.zeros(2, 2), {}, "x contains NaN"),
        (torch.zeros(2, 2), torch.tensor([[0.0, float("inf")]]), {}, "y contains NaN"),
        (torch.zeros(0, 2), torch.zeros(2, 2), {}, r"x.shape=\(0, 2\) is invalid: it is empty"),
        (torch.zeros(3, 2), torch.zeros(2, 3), {}, "same number of features"),
        (
            torch.zeros(2, 2),
            torch.zeros(2, 2),
            {"a": torch.tensor([1.0, -1.0])},
            r"a=tensor\(.*\) is invalid: use finite, non-negative",
        ),
        (
            torch.zeros(2, 2),
            torch.zeros(2, 2),
            {"b": torch.ones(3)},
            r"b.shape=\(3,\) is invalid: use shape \(2,\)",
        ),
    ],
)
def test_exact_w2_bad_input(x, y, kw, match):
    with pytest.raises(ValueError, match=match):
        exact_w2(x, y, **kw)


# ------------------------------------------------------------------------------------------------
# sliced W2
# ------------------------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 30),
    m=st.integers(1, 30),
    d=st.integers(2, 8),
    n_proj=st.integers(1, 64),
)
def test_sliced_w2_at_most_exact_w2(seed, n, m, d, n_proj):
    # Every projection is 1-Lipschitz, so the optimal coupling pushed forward is a coupling of the
    # projections: W2(theta#mu, theta#nu) <= W2(mu, nu) for each theta, hence SW2 <= W2 for the
    # empirical measures themselves (no sampling error involved). Slack: float64 round-off.
    x, y = _randn(n, d, seed=seed), _randn(m, d, seed=seed + 1) * 1.5 + 0.3
    sw = sliced_w2(x, y, n_projections=n_proj, generator=_gen(seed + 2))
    assert sw <= exact_w2(x, y) * (1 + 1e-9) + 1e-12


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 30), m=st.integers(1, 30))
def test_sliced_w2_equals_w2_in_1d(seed, n, m):
    # In 1D every direction is +-1 and W2 is invariant under x -> -x.
    x, y = _randn(n, 1, seed=seed), _randn(m, 1, seed=seed + 1) - 0.7
    sw = sliced_w2(x, y, n_projections=5, generator=_gen(seed))
    assert sw == pytest.approx(exact_w2(x, y), rel=1e-9, abs=1e-12)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 20), d=st.integers(1, 5))
def test_sliced_w2_of_translation_is_projected_shift(seed, n, d):
    # Each 1D projection of x + s is the projection of x shifted by theta.s, whose W2 is |theta.s|.
    x, s = _randn(n, d, seed=seed), _randn(d, seed=seed + 1)
    theta = _randn(d, 7, seed=seed + 2)
    unit = theta / theta.norm(dim=0)
    expected = math.sqrt(float(((unit.T @ s) ** 2).mean()))
    assert sliced_w2(x, x + s, projections=theta) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_sliced_w2_matches_pot_with_same_projections():
    x, y = _randn(40, 3, seed=0), _randn(55, 3, seed=1) + 1.0  # unequal sizes on purpose
    theta = _randn(3, 20, seed=2)
    theta = theta / theta.norm(dim=0)
    ref = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), projections=theta.numpy())
    assert sliced_w2(x, y, projections=theta) == pytest.approx(float(ref), rel=1e-10)


def test_sliced_w2_is_deterministic_given_the_generator():
    x, y = _randn(30, 4, seed=0), _randn(30, 4, seed=1)
    a = sliced_w2(x, y, 16, _gen(5))
    assert a == sliced_w2(x, y, 16, _gen(5))
    assert a != sliced_w2(x, y, 16, _gen(6))


def test_sliced_w2_bad_input():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="n_projections"):
        sliced_w2(x, x, n_projections=0)
    with pytest.raises(
        ValueError, match=r"projections.shape=\(3, 4\) is invalid: use shape \(2, P\)"
    ):
        sliced_w2(x, x, projections=torch.ones(3, 4))
    with pytest.raises(
        ValueError, match=r"projections.norm\(dim=0\).min\(\)=0.0 is invalid: every direction"
    ):
        sliced_w2(x, x, projections=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="y contains NaN"):
        sliced_w2(x, torch.full((3, 2), float("nan")))


# ------------------------------------------------------------------------------------------------
# MMD
# ------------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 30), m=st.integers(2, 30))
def test_mmd_linear_kernel_identity(seed, n, m):
    # Algebra: MMD_u^2 with k(a, b) = a.b equals ||xbar - ybar||^2 - tr(S_x)/n - tr(S_y)/m with
    # unbiased sample covariances; the right side is unbiased for ||E x - E y||^2.
    x, y = _randn(n, 3, seed=seed), _randn(m, 3, seed=seed + 1) + 0.4
    trx = float(x.var(dim=0, unbiased=True).sum())
    try_ = float(y.var(dim=0, unbiased=True).sum())
    expected = float(((x.mean(0) - y.mean(0)) ** 2).sum()) - trx / n - try_ / m
    assert mmd(x, y, kernel="linear") == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_mmd_poly_kernel_matches_explicit_sums():
    x, y = _randn(5, 3, seed=0), _randn(4, 3, seed=1)

    def k(a, b):
        return (float(a @ b) / 3 + 1.0) ** 3

    sxx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    syy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    sxy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert mmd(x, y, kernel="poly") == pytest.approx(sxx + syy - 2 * sxy, rel=1e-12)


def _gaussian_rbf_mmd2(shift: float, d: int, sigma: float, h: float) -> float:
    # Population MMD^2 between N(0, s^2 I) and N(delta, s^2 I) for k = exp(-|a-b|^2 / (2 h^2)):
    # E k(X, X') = (h^2 / (h^2 + 2 s^2))^(d/2), E k(X, Y) = that * exp(-|delta|^2 / (2(h^2+2s^2))).
    c = (h**2 / (h**2 + 2 * sigma**2)) ** (d / 2)
    return 2 * c * (1 - math.exp(-(shift**2) / (2 * (h**2 + 2 * sigma**2))))


@pytest.mark.parametrize("shift", [0.0, 1.0, 2.0])
def test_mmd_rbf_is_unbiased_against_the_gaussian_closed_form(shift):
    # k = 40 independent replicates of n = m = 150 points of N(0, I_2) against N(shift e_1, I_2),
    # generator seed 7. With a fixed bandwidth the estimator is exactly unbiased, so the replicate
    # mean lies within 4 standard errors of the closed form (false alarm < 1e-3, t with 39 dof).
    k, n, d, h = 40, 150, 2, 1.0
    g = _gen(7)
    delta = torch.zeros(d, dtype=F64)
    delta[0] = shift
    vals = torch.tensor(
        [
            mmd(
                torch.randn(n, d, generator=g, dtype=F64),
                torch.randn(n, d, generator=g, dtype=F64) + delta,
                bandwidth=h,
            )
            for _ in range(k)
        ]
    )
    truth = _gaussian_rbf_mmd2(shift, d, 1.0, h)  # 0, 0.102, 0.324
    se = float(vals.std()) / math.sqrt(k)
    assert abs(float(vals.mean()) - truth) < 4 * se
    # Same-law bound: under P = Q the standard deviation of MMD_u^2 is about 0.004 at n = 150
    # (O(1/n)); 0.02 is 5 of them.
    bound = 0.02
    if shift == 0.0:
        # The unbiased estimate straddles 0: some replicates are negative.
        assert float(vals.min()) < 0.0 < float(vals.max())
        assert float(vals.abs().max()) < bound
    else:
        # Shifted laws: every single replicate is clearly above the same-law bound.
        assert truth > 5 * bound
        assert float(vals.min()) > bound


def test_mmd_median_bandwidth_matches_brute_force():
    from scipy.spatial.distance import pdist

    x, y = _randn(30, 3, seed=0), _randn(20, 3, seed=1) + 2.0
    expected = float(np.median(pdist(torch.cat([x, y]).numpy())))
    assert median_bandwidth(x, y) == pytest.approx(expected, rel=1e-12)
    assert mmd(x, y) == pytest.approx(mmd(x, y, bandwidth=expected), rel=1e-12)


def test_mmd_bad_input():
    x = _randn(5, 2, seed=0)
    with pytest.raises(
        ValueError, match=r"\(len\(x\), len\(y\)\)=\(1, 5\) is invalid: .* at least 2"
    ):
        mmd(x[:1], x)
    with pytest.raises(ValueError, match="kernel"):
        mmd(x, x, kernel="laplace")
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(x, x, bandwidth=0.0)
    with pytest.raises(ValueError, match="same number of features"):
        mmd(x, _randn(5, 3, seed=1))
    with pytest.raises(ValueError, match="bandwidth=None is invalid: all points coincide"):
        median_bandwidth(torch.zeros(3, 2), torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------------
# Frechet distance
# ------------------------------------------------------------------------------------------------


def _features_with_stats(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n points whose sample mean is ``mean`` and unbiased sample covariance is ``cov`` exactly."""
    z = _randn(n, mean.shape[0], seed=seed)
    z = z - z.mean(0)
    lz = torch.linalg.cholesky(z.T @ z / (n - 1))
    white = torch.linalg.solve_triangular(lz, z.T, upper=False).T  # sample covariance I
    return mean + white @ torch.linalg.cholesky(cov).T


def _spd(d: int, seed: int) -> torch.Tensor:
    a = _randn(d, d, seed=seed)
    return a @ a.T + 0.5 * torch.eye(d, dtype=F64)


def test_frechet_distance_diagonal_gaussians_closed_form():
    # Commuting covariances: W2^2 = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    m1, m2 = torch.tensor([0.0, 1.0, -2.0], dtype=F64), torch.tensor([1.0, 1.0, 0.5], dtype=F64)
    a, b = torch.tensor([1.0, 4.0, 0.25], dtype=F64), torch.tensor([9.0, 1.0, 0.25], dtype=F64)
    fx = _features_with_stats(m1, torch.diag(a), 200, seed=0)
    fy = _features_with_stats(m2, torch.diag(b), 150, seed=1)
    expected = float(((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    # rel 1e-8: sqrtm of a 3x3 product and the whitening are accurate to ~1e-13.
    assert frechet_distance(fx, fy) == pytest.approx(expected, rel=1e-8)


@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 6))
def test_frechet_distance_equals_gaussian_w2_squared(seed, d):
    # General covariances: the Bures-Wasserstein formula (POT's implementation, which goes through
    # Sigma_x^(1/2) Sigma_y Sigma_x^(1/2) instead of sqrtm(Sigma_x Sigma_y)).
    m1, m2 = _randn(d, seed=seed), _randn(d, seed=seed + 1)
    c1, c2 = _spd(d, seed + 2), _spd(d, seed + 3)
    fx = _features_with_stats(m1, c1, 50, seed + 4)
    fy = _features_with_stats(m2, c2, 60, seed + 5)
    ref = float(
        ot.gaussian.bures_wasserstein_distance(m1.numpy(), m2.numpy(), c1.numpy(), c2.numpy())
    )
    assert frechet_distance(fx, fy) == pytest.approx(ref**2, rel=1e-7, abs=1e-9)
    # 1D: (m1 - m2)^2 + (s1 - s2)^2.
    if d == 1:
        assert frechet_distance(fx, fy) == pytest.approx(
            float((m1 - m2) ** 2 + (c1.sqrt() - c2.sqrt()) ** 2), rel=1e-9
        )


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 40), d=st.integers(1, 8))
def test_frechet_distance_identity_and_symmetry(seed, n, d):
    # n <= d makes the covariance singular: still 0 and symmetric.
    fx, fy = _randn(n, d, seed=seed), 2.0 * _randn(n + 3, d, seed=seed + 1)
    scale = float(fx.var(dim=0).sum())
    # 0 within 1e-6 relative to tr(S): sqrt of round-off eigenvalues (~1e-16 tr S) adds ~1e-8.
    assert frechet_distance(fx, fx) <= 1e-6 * max(scale, 1e-12)
    fxy, fyx = frechet_distance(fx, fy), frechet_distance(fy, fx)
    # tr sqrt(AB) = tr sqrt(BA) (same spectrum); rel 1e-7 covers sqrt of round-off eigenvalues.
    assert fxy == pytest.approx(fyx, rel=1e-7, abs=1e-9)


@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 6))
def test_frechet_distance_matches_scipy_sqrtm_formula(seed, d):
    # The textbook formula with scipy.linalg.sqrtm(S_x S_y), on well-conditioned covariances.
    from scipy.linalg import sqrtm

    m1, m2 = _randn(d, seed=seed).numpy(), _randn(d, seed=seed + 1).numpy()
    c1, c2 = _spd(d, seed + 2).numpy(), _spd(d, seed + 3).numpy()
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(sqrtm(c1 @ c2)))
    assert frechet_distance_from_stats(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-8, abs=1e-10)


def test_frechet_distance_singular_covariance_against_identity():
    # S_y = I exactly and S_x of rank 3 in 6 dims (4 samples): tr (S_x I)^(1/2) = sum sqrt(eig S_x).
    fx = _randn(4, 6, seed=0)
    my = torch.arange(6, dtype=F64)
    fy = _features_with_stats(my, torch.eye(6, dtype=F64), 40, seed=1)
    _, sx = metrics.feature_statistics(fx)
    lam = np.clip(np.linalg.eigvalsh(sx), 0, None)
    expected = float(((fx.mean(0) - my) ** 2).sum()) + np.trace(sx) + 6 - 2 * np.sqrt(lam).sum()
    # rel 1e-9: only eigen-decompositions of 6x6 symmetric matrices are involved.
    assert frechet_distance(fx, fy) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_translation():
    fx, s = _randn(100, 4, seed=0), torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=F64)
    assert frechet_distance(fx, fx + s) == pytest.approx(14.0, rel=1e-9)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match=r"len\(feats\)=1 is invalid: use at least 2 samples"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="feats_y contains NaN"):
        frechet_distance(torch.zeros(3, 2), torch.tensor([[0.0, 1.0], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="same number of features"):
        frechet_distance(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(
        ValueError, match=r"cov_y.shape=\(3, 3\) is invalid: use shape \(2, 2\) to match mean_x"
    ):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(
        ValueError, match=r"min eigenvalue of cov_x=-1.0 is invalid: pass a positive semi-definite"
    ):
        frechet_distance_from_stats(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------------------------
# mode coverage
# ------------------------------------------------------------------------------------------------

MODES = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=F64)


def _constructed_samples() -> torch.Tensor:
    near0 = torch.tensor([[0.1, 0.0], [0.0, -0.5], [-0.3, 0.3], [0.9, 0.0], [0.0, 0.0]])
    near1 = torch.tensor([[10.0, 0.2], [9.5, 0.0], [10.4, -0.4]])
    # Outliers: (50, 40) is nearest to mode 1 (56.6 vs 58.3), (-40, 2) to mode 0 (40.05 vs 40.8).
    far = torch.tensor([[50.0, 40.0], [-40.0, 2.0]])
    return torch.cat([near0, near1, far]).double()


def test_mode_coverage_exact_counts_with_radius():
    out = mode_coverage(_constructed_samples(), MODES, radius=1.0)
    assert out["counts"] == [5, 3, 0]
    assert out["fractions"] == pytest.approx([5 / 8, 3 / 8, 0.0], abs=1e-15)
    assert out["covered"] == [True, True, False]
    assert (out["n_covered"], out["n_modes"], out["n_samples"]) == (2, 3, 10)
    # TV to uniform: (|5/8 - 1/3| + |3/8 - 1/3| + 1/3) / 2 = (7/24 + 1/24 + 8/24) / 2 = 1/3.
    assert out["balance_tv"] == pytest.approx(1 / 3, abs=1e-15)
    assert out["outlier_fraction"] == pytest.approx(0.2, abs=1e-15)
    # stds with n_std give the same radius (2 * 0.5); a per-mode radius works too.
    assert mode_coverage(_constructed_samples(), MODES, stds=0.5, n_std=2.0) == out
    assert mode_coverage(_constructed_samples(), MODES, radius=[1.0, 1.0, 1.0]) == out


def test_mode_coverage_nearest_mode_without_radius_and_weights():
    out = mode_coverage(_constructed_samples(), MODES, weights=[0.6, 0.4, 0.0])
    assert out["counts"] == [6, 4, 0]
    assert out["outlier_fraction"] == 0.0
    assert out["balance_tv"] == pytest.approx(0.0, abs=1e-15)  # fractions equal the weights
    assert mode_coverage(_constructed_samples(), MODES, min_count=5)["covered"] == [
        True,
        False,
        False,
    ]
    assign = assign_modes(_constructed_samples(), MODES, radius=torch.tensor([1.0, 0.3, 1.0]))
    # radius 0.3 around mode 1 keeps only (10, 0.2).
    assert assign.tolist() == [0, 0, 0, 0, 0, 1, -1, -1, -1, -1]


@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_mode_coverage_counts_property(counts, seed):
    # Points scattered within 0.1 of well-separated modes (10 apart): counts are recovered exactly.
    k = len(counts)
    modes = 10.0 * torch.arange(k, dtype=F64)[:, None] * torch.tensor([[1.0, 0.5]], dtype=F64)
    labels = torch.repeat_interleave(torch.arange(k), torch.tensor(counts))
    if labels.numel() == 0:
        return
    jitter = 0.05 * torch.rand(labels.numel(), 2, generator=_gen(seed), dtype=F64)
    perm = torch.randperm(labels.numel(), generator=_gen(seed + 1))
    out = mode_coverage(modes[labels][perm] + jitter, modes, radius=0.1)
    assert out["counts"] == counts
    assert out["n_covered"] == sum(c > 0 for c in counts)
    total = sum(counts)
    tv = 0.5 * sum(abs(c / total - 1 / k) for c in counts)
    assert out["balance_tv"] == pytest.approx(tv, abs=1e-12)


def test_mode_coverage_all_outliers():
    out = mode_coverage(torch.full((4, 2), 100.0), MODES, radius=1.0)
    assert out["counts"] == [0, 0, 0] and out["n_covered"] == 0
    assert out["outlier_fraction"] == 1.0 and out["balance_tv"] == 1.0


def test_mode_coverage_bad_input():
    x = _constructed_samples()
    with pytest.raises(ValueError, match="radius=1.0 is invalid: pass either radius or stds"):
        mode_coverage(x, MODES, radius=1.0, stds=1.0)
    with pytest.raises(ValueError, match="same number of features"):
        mode_coverage(x, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="samples contains NaN"):
        mode_coverage(torch.tensor([[float("nan"), 0.0]]), MODES)
    with pytest.raises(ValueError, match="radius=-1.0 is invalid: use a positive float"):
        mode_coverage(x, MODES, radius=-1.0)
    with pytest.raises(ValueError, match=r"weights.shape=\(2,\) is invalid: use shape \(\d+,\)"):
        mode_coverage(x, MODES, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"means.shape=\(0, 2\) is invalid: it is empty"):
        mode_coverage(x, torch.zeros(0, 2))


def test_wasserstein_1d_sorts_each_row_on_both_paths():
    """The numpy sort (CPU, no autograd) and ``Tensor.sort`` (a tensor that needs gradients)
    give the same distances, each row of ``u`` matched with the same row of ``v``: rows given
    in shuffled order, against the sorted-matching closed form for n = m; and the gradient
    path is differentiable (d/du of mean (u_(i) - v_(i))^2 at sorted rows is 2 (u - v) / n)."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(5, 40, generator=g, dtype=torch.float64)
    v = torch.randn(5, 40, generator=g, dtype=torch.float64) + torch.arange(5.0)[:, None]
    closed = ((u.sort(1).values - v.sort(1).values) ** 2).mean(1)
    perm = torch.randperm(40, generator=g)
    fast = metrics.wasserstein_1d_squared(u[:, perm], v)
    assert torch.equal(fast, closed)  # the same sorted values: bitwise
    assert bool((fast[1:] != fast[:-1]).all())  # rows differ (shifted v): a row mix-up shows
    us = u.sort(1).values.clone().requires_grad_(True)
    slow = metrics.wasserstein_1d_squared(us, v)
    torch.testing.assert_close(slow.detach(), closed, rtol=0, atol=1e-12)
    slow.sum().backward()
    torch.testing.assert_close(us.grad, 2 * (us.detach() - v.sort(1).values) / 40)
