"""Sample-quality metrics: exact W2, sliced W2, MMD, Frechet distance, mode coverage.

All functions take point clouds ``(n, *dims)`` (flattened to ``(n, D)``; a 1-D tensor ``(n,)``
is ``n`` scalar samples), as torch tensors or numpy arrays, compute in float64 and return Python
floats (or a JSON-ready dict), so results can be written to ``results.json`` as they are.

- ``exact_w2``: ``W2(mu, nu) = (min_pi sum_ij pi_ij ||x_i - y_j||^2)^(1/2)`` by POT's network
  simplex (``ot.emd2``) with an iteration cap that grows with the problem; a non-optimal
  solver exit raises instead of returning a wrong number.
- ``sliced_w2``: ``SW2 = (E_theta W2^2(theta # mu, theta # nu))^(1/2)``, theta uniform on the
  sphere, by sorting projections (torch, with a generator). ``SW2 <= W2``, with equality in 1D.
- ``mmd``: the unbiased estimator of ``MMD^2`` (it can be negative).
- ``frechet_distance``: ``||m_x - m_y||^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))`` between the
  Gaussians fitted to two feature sets, i.e. the squared W2 distance between those Gaussians
  (the FID formula when the features are Inception features), via a symmetric eigenproblem.
- ``mode_coverage``: per-mode counts, modes covered, balance against the target weights, outliers.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from gcflows import checks

__all__ = [
    "exact_w2",
    "wasserstein_1d_squared",
    "sliced_w2",
    "mmd",
    "median_bandwidth",
    "feature_statistics",
    "frechet_distance_from_stats",
    "frechet_distance",
    "assign_modes",
    "mode_coverage",
]


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def _as_points(x, name: str, device: torch.device | None = None) -> Tensor:
    """``(n, *dims)`` -> float64 ``(n, D)``; ``(n,)`` -> ``(n, 1)``. Raises ``ValueError``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise checks.bad_tensor(x, name, "pass a torch.Tensor or numpy array (N, *dims)")
    if x.dim() == 0:
        raise checks.bad_tensor(x, name, "use a leading sample dimension (N, *dims)")
    if x.shape[0] == 0:
        raise checks.bad_tensor(x, name, "it is empty: pass at least one sample")
    if x.is_complex() or x.dtype == torch.bool:
        raise checks.bad(f"{name}.dtype", x.dtype, "use real values (a float or integer dtype)")
    if x.dim() > 1 and x[0].numel() == 0:
        raise checks.bad_tensor(x, name, "use at least one feature per sample")
    x = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    x = x.to(dtype=torch.float64, device=device if device is not None else x.device)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; drop or fix those samples first")
    return x


def _check_same_dim(x: Tensor, y: Tensor, nx: str, ny: str) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{nx} and {ny} must have the same number of features per sample, got "
            f"{x.shape[1]} and {y.shape[1]}"
        )


def _as_weights(w, n: int, name: str) -> Tensor:
    """``None`` -> uniform; otherwise non-negative finite ``(n,)`` normalised to sum 1."""
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if isinstance(w, np.ndarray):
        w = torch.from_numpy(w)
    w = torch.as_tensor(w, dtype=torch.float64).detach().cpu().reshape(-1)
    if w.shape != (n,):
        raise checks.bad_tensor(w, name, f"use shape ({n},) (one weight per sample)")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise checks.bad(name, w, "use finite, non-negative weights, not all zero")
    return w / w.sum()


def _sqdist(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distances ``(n, m)`` in float64, clamped at 0.

    Direct differences (no cancellation, exact zeros for equal points) while ``n m D <= 2^22``
    (32 MiB of float64); above that the ``|x|^2 + |y|^2 - 2 x.y`` form (float64 keeps its
    relative error near 1e-16 of the squared norms).
    """
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    if n * m * d <= 2**22:
        return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return d2.clamp_min_(0.0)


# ------------------------------------------------------------------------------------------------
# Wasserstein distances
# ------------------------------------------------------------------------------------------------


def exact_w2(x, y, a=None, b=None) -> float:
    """Exact 2-Wasserstein distance (not squared) between two weighted point clouds.

    ``W2 = (min_{pi in Pi(a, b)} sum_ij pi_ij ||x_i - y_j||^2)^(1/2)`` for ``x (n, *dims)``,
    ``y (m, *dims)``, weights ``a (n,)``, ``b (m,)`` (uniform when ``None``; normalised to sum
    1). Solved in float64 by POT's ``ot.emd2`` with ``numItermax = max(1e5, 50 n m)`` (POT's
    default 1e5 stops short from a few thousand points); a solver exit other than "optimal"
    raises ``RuntimeError``. Cost O(n m D) memory-light, the solver about O((n + m)^3) worst case.
    """
    import ot

    x, y = _as_points(x, "x").cpu(), _as_points(y, "y").cpu()
    _check_same_dim(x, y, "x", "y")
    wa, wb = _as_weights(a, x.shape[0], "a"), _as_weights(b, y.shape[0], "b")
    cost = _sqdist(x, y).numpy()
    n_iter = max(100_000, 50 * x.shape[0] * y.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the result code below is checked instead
        value, log = ot.emd2(wa.numpy(), wb.numpy(), cost, numItermax=n_iter, log=True)
    if int(log.get("result_code", 1)) != 1:
        raise RuntimeError(
            f"ot.emd2 did not reach the optimum ({log.get('warning')!r}) for n={x.shape[0]}, "
            f"m={y.shape[0]}; subsample the clouds or use sliced_w2"
        )
    return math.sqrt(max(float(value), 0.0))


def _sorted_rows(a: Tensor) -> Tensor:
    """Each row of ``a (P, n)`` sorted ascending. On the CPU without autograd numpy's sort (the
    same values, about 4x faster than ``Tensor.sort`` single-threaded on 128 x 20 000 doubles:
    docs/performance.md); elsewhere ``Tensor.sort``."""
    if a.device.type == "cpu" and not a.requires_grad:
        return torch.from_numpy(np.sort(a.numpy(), axis=1))
    return a.sort(dim=1).values


def wasserstein_1d_squared(u: Tensor, v: Tensor) -> Tensor:
    """Squared W2 between uniform empirical measures on the rows of ``u (P, n)`` and ``v (P, m)``.

    Row by row, ``W2^2 = int_0^1 (F_u^-1(s) - F_v^-1(s))^2 ds`` with the empirical quantile
    functions, which are piecewise constant between the breakpoints ``{i / n} U {j / m}``; for
    ``n = m`` this is the sorted matching ``mean_i (u_(i) - v_(i))^2``. Returns ``(P,)``.
    """
    if u.dim() != 2 or v.dim() != 2 or u.shape[0] != v.shape[0]:
        raise ValueError(f"u and v must be (P, n) and (P, m), got {tuple(u.shape)}, {v.shape}")
    n, m = u.shape[1], v.shape[1]
    us, vs = _sorted_rows(u), _sorted_rows(v)
    if n == m:
        return ((us - vs) ** 2).mean(1)
    dev = u.device
    levels = torch.cat(
        [
            torch.arange(1, n + 1, dtype=torch.float64, device=dev) / n,
            torch.arange(1, m + 1, dtype=torch.float64, device=dev) / m,
        ]
    )
    levels = torch.unique(torch.cat([levels.new_zeros(1), levels]))  # sorted, 0 .. 1
    widths = levels.diff()
    keep = widths > 0
    mid = ((levels[1:] + levels[:-1]) / 2)[keep]
    widths = widths[keep]
    iu = (mid * n).floor().long().clamp_(0, n - 1)
    iv = (mid * m).floor().long().clamp_(0, m - 1)
    return (((us[:, iu] - vs[:, iv]) ** 2) * widths).sum(1)


def sliced_w2(
    x,
    y,
    n_projections: int = 128,
    generator: torch.Generator | None = None,
    projections: Tensor | None = None,
) -> float:
    """Sliced 2-Wasserstein distance (not squared) between uniform point clouds.

    ``SW2 = (mean_k W2^2(<theta_k, x>, <theta_k, y>))^(1/2)`` over ``n_projections`` directions
    ``theta_k`` drawn uniformly on the unit sphere with ``generator`` (a CPU generator; normal
    draws normalised), each 1D distance exact by quantile matching
    (:func:`wasserstein_1d_squared`), so ``n != m`` is allowed. ``projections`` ``(D, P)``
    overrides the draw (its columns are normalised). By the 1-Lipschitz projection,
    ``SW2 <= W2``; in 1D, ``SW2 = W2``. Memory ``O(P (n + m))``, time ``O(P (n + m) log)``.
    """
    x, y = _as_points(x, "x"), _as_points(y, "y")
    y = y.to(x.device)
    _check_same_dim(x, y, "x", "y")
    d = x.shape[1]
    if projections is None:
        checks.integer(n_projections, "n_projections", lo=1)
        theta = torch.randn(d, int(n_projections), generator=generator, dtype=torch.float64)
    else:
        theta = _as_points(projections, "projections").cpu()
        if theta.shape[0] != d:
            fix = f"use shape ({d}, P) to match the {d} features"
            raise checks.bad_tensor(theta, "projections", fix)
    norms = theta.norm(dim=0, keepdim=True)
    if bool((norms == 0).any()):
        fix = "every direction (column) needs a non-zero norm"
        raise checks.bad("projections.norm(dim=0).min()", float(norms.min()), fix)
    theta = (theta / norms).to(x.device)
    w2sq = wasserstein_1d_squared((x @ theta).T, (y @ theta).T)
    return math.sqrt(max(float(w2sq.mean()), 0.0))


# ------------------------------------------------------------------------------------------------
# MMD
# ------------------------------------------------------------------------------------------------


def median_bandwidth(x, y) -> float:
    """Median heuristic: the median Euclidean distance between distinct points of ``x U y``.

    Computed on at most the first 1000 points of each sample (deterministic). Zero (all points
    equal) raises ``ValueError``: pass an explicit bandwidth.
    """
    x, y = _as_points(x, "x"), _as_points(y, "y")
    _check_same_dim(x, y, "x", "y")
    z = torch.cat([x[:1000], y[:1000].to(x.device)])
    d2 = _sqdist(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    if iu.shape[1] == 0:
        fix = "the median bandwidth needs at least two points in x and y together"
        raise checks.bad("len(x) + len(y)", z.shape[0], fix)
    h = float(d2[iu[0], iu[1]].median().sqrt())
    if h == 0.0:
        fix = "all points coincide: the median bandwidth is 0; pass bandwidth > 0"
        raise checks.bad("bandwidth", None, fix)
    return h


def _kernel(a: Tensor, b: Tensor, kernel: str, bandwidth: float | None) -> Tensor:
    if kernel == "rbf":
        return torch.exp(-_sqdist(a, b) / (2.0 * bandwidth**2))
    if kernel == "linear":
        return a @ b.T
    # "poly": the cubic kernel of KID, (a.b / D + 1)^3
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd(x, y, kernel: str = "rbf", bandwidth: float | None = None) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy ``MMD^2(P, Q)``.

    ``MMD_u^2 = 1/(n(n-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
    - 2/(n m) sum_{i, j} k(x_i, y_j)`` for ``x (n, *dims)``, ``y (m, *dims)``, ``n, m >= 2``.
    Its expectation is exactly ``MMD^2`` (0 when P = Q), so single estimates can be negative;
    its standard deviation is O(1/n) under P = Q. Kernels:

    - ``"rbf"``: ``exp(-||a - b||^2 / (2 h^2))``, ``h = bandwidth`` or, when ``None``, the median
      heuristic of :func:`median_bandwidth` (data-dependent, so then only nearly unbiased);
    - ``"linear"``: ``a . b`` (``MMD^2 = ||E x - E y||^2``);
    - ``"poly"``: ``(a . b / D + 1)^3``, the kernel of KID.
    """
    checks.choice(kernel, "kernel", ("rbf", "linear", "poly"))
    x, y = _as_points(x, "x"), _as_points(y, "y")
    y = y.to(x.device)
    _check_same_dim(x, y, "x", "y")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        fix = "the unbiased MMD needs at least 2 samples in x and in y"
        raise checks.bad("(len(x), len(y))", (n, m), fix)
    if kernel == "rbf":
        if bandwidth is None:
            bandwidth = median_bandwidth(x, y)
        else:
            bandwidth = checks.real(bandwidth, "bandwidth", lo_open=0.0)
    kxx, kyy = _kernel(x, x, kernel, bandwidth), _kernel(y, y, kernel, bandwidth)
    kxy = _kernel(x, y, kernel, bandwidth)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


# ------------------------------------------------------------------------------------------------
# Frechet distance
# ------------------------------------------------------------------------------------------------


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (divisor ``n - 1``) of ``feats (n, D)``."""
    f = _as_points(feats, "feats").cpu().numpy()
    if f.shape[0] < 2:
        raise checks.bad("len(feats)", f.shape[0], "use at least 2 samples for a covariance")
    mean = f.mean(0)
    c = f - mean
    return mean, c.T @ c / (f.shape[0] - 1)


def _psd_sqrt(cov: np.ndarray, name: str) -> np.ndarray:
    """Symmetric square root of a PSD matrix by ``eigh``; round-off negatives clipped to 0."""
    w, v = np.linalg.eigh(cov)
    if w.size and w.min() < -1e-8 * max(abs(w).max(), 1e-300):
        fix = "pass a positive semi-definite matrix"
        raise checks.bad(f"min eigenvalue of {name}", float(f"{w.min():.3g}"), fix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mean_x, cov_x, mean_y, cov_y) -> float:
    """``||m_x - m_y||^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))``: squared W2 between Gaussians.

    ``tr (S_x S_y)^(1/2)`` is computed as ``sum_i sqrt(l_i)`` over the eigenvalues ``l_i`` of the
    symmetric PSD matrix ``S_x^(1/2) S_y S_x^(1/2)``, which has the same spectrum as
    ``S_x S_y``: real by construction and exact for singular covariances (fewer samples than
    features), where ``scipy.linalg.sqrtm(S_x S_y)`` warns and the usual ``eps I`` offset moves
    each zero eigenvalue to ~``eps s``, adding ~``2 sqrt(eps s)`` per missing rank (1e-2 on a
    4-dim example). Covariances are symmetrised; round-off negatives (eigenvalues, the result)
    are clamped to 0; a clearly indefinite covariance raises ``ValueError``.
    """
    mx, my = np.asarray(mean_x, np.float64).reshape(-1), np.asarray(mean_y, np.float64).reshape(-1)
    sx, sy = np.asarray(cov_x, np.float64), np.asarray(cov_y, np.float64)
    d = mx.shape[0]
    if not np.isfinite(mx).all():
        raise ValueError("mean_x contains NaN or inf")
    for name, arr, shape in (("mean_y", my, (d,)), ("cov_x", sx, (d, d)), ("cov_y", sy, (d, d))):
        if arr.shape != shape:
            raise checks.bad(f"{name}.shape", arr.shape, f"use shape {shape} to match mean_x")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or inf")
    sx, sy = (sx + sx.T) / 2, (sy + sy.T) / 2
    root_x = _psd_sqrt(sx, "cov_x")
    _psd_sqrt(sy, "cov_y")  # validation only
    middle = root_x @ sy @ root_x
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mx - my
    value = diff @ diff + np.trace(sx) + np.trace(sy) - 2.0 * tr_covmean
    return max(float(value), 0.0)


def frechet_distance(feats_x, feats_y) -> float:
    """Frechet distance between the Gaussians fitted to ``feats_x (n, D)`` and ``feats_y (m, D)``.

    Equals the squared W2 distance between ``N(m_x, S_x)`` and ``N(m_y, S_y)`` (sample means,
    unbiased sample covariances); see :func:`frechet_distance_from_stats`. Symmetric, 0 for
    identical feature sets. Its value depends on n (biased estimator): compare at equal n.
    """
    fx, fy = _as_points(feats_x, "feats_x"), _as_points(feats_y, "feats_y")
    _check_same_dim(fx, fy, "feats_x", "feats_y")
    mx, sx = feature_statistics(fx)
    my, sy = feature_statistics(fy)
    return frechet_distance_from_stats(mx, sx, my, sy)


# ------------------------------------------------------------------------------------------------
# mode coverage
# ------------------------------------------------------------------------------------------------


def _as_radius(radius, k: int) -> Tensor | None:
    if radius is None:
        return None
    r = torch.as_tensor(radius, dtype=torch.float64).detach().cpu().reshape(-1)
    if r.numel() == 1:
        r = r.expand(k)
    if r.shape != (k,) or not bool(torch.isfinite(r).all()) or bool((r <= 0).any()):
        raise checks.bad("radius", radius, f"use a positive float or a positive ({k},) tensor")
    return r


def assign_modes(samples, means, radius=None) -> Tensor:
    """Index ``(n,)`` of the nearest mode of each sample, or ``-1`` when it is an outlier.

    ``samples (n, d)``, ``means (K, d)``; ties go to the lowest index. With ``radius`` (a float or
    ``(K,)``), a sample farther than ``radius[k]`` from its nearest mode ``k`` is an outlier.
    """
    x = _as_points(samples, "samples").cpu()
    mu = _as_points(means, "means").cpu()
    _check_same_dim(x, mu, "samples", "means")
    d2 = _sqdist(x, mu)
    best = d2.argmin(dim=1)
    r = _as_radius(radius, mu.shape[0])
    if r is not None:
        dist = d2.gather(1, best[:, None]).squeeze(1).sqrt()
        best = torch.where(dist > r[best], torch.full_like(best, -1), best)
    return best


def mode_coverage(
    samples,
    means,
    weights=None,
    radius=None,
    stds=None,
    n_std: float = 3.0,
    min_count: int = 1,
) -> dict:
    """How samples spread over the modes ``means (K, d)`` of a target mixture.

    Each sample goes to its nearest mode. Outliers: with ``radius`` (float or ``(K,)``), samples
    farther than ``radius[k]`` from their nearest mode ``k``; else with ``stds`` (float or
    ``(K,)``, isotropic standard deviations), farther than ``n_std * stds[k]``; else none.
    Returns a JSON-ready dict:

    - ``counts`` (K ints): inliers per mode; ``fractions`` (K floats): ``counts / n_inliers``;
    - ``covered`` (K bools): ``counts >= min_count``; ``n_covered`` and ``n_modes``;
    - ``balance_tv``: total-variation distance ``1/2 sum_k |fractions_k - weights_k|`` to the
      target weights (uniform when ``None``), in [0, 1], 1.0 when there are no inliers;
    - ``outlier_fraction``: outliers / n; ``n_samples``.
    """
    mu = _as_points(means, "means")
    k = mu.shape[0]
    if radius is not None and stds is not None:
        raise checks.bad("radius", radius, "pass either radius or stds (with n_std), not both")
    if stds is not None:
        n_std = checks.real(n_std, "n_std", lo_open=0.0)
        s = torch.as_tensor(stds, dtype=torch.float64).detach().cpu()
        radius = n_std * s
    checks.integer(min_count, "min_count", lo=1)
    w = _as_weights(weights, k, "weights")
    assignment = assign_modes(samples, mu, radius)
    n = assignment.shape[0]
    inlier = assignment >= 0
    counts = torch.bincount(assignment[inlier], minlength=k)
    n_in = int(inlier.sum())
    if n_in > 0:
        fractions = counts.double() / n_in
        balance = 0.5 * float((fractions - w).abs().sum())
    else:
        fractions = torch.zeros(k, dtype=torch.float64)
        balance = 1.0
    covered = counts >= int(min_count)
    return {
        "counts": [int(c) for c in counts],
        "fractions": [float(f) for f in fractions],
        "covered": [bool(c) for c in covered],
        "n_covered": int(covered.sum()),
        "n_modes": k,
        "balance_tv": balance,
        "outlier_fraction": (n - n_in) / n,
        "n_samples": n,
    }
