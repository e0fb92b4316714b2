"""The proxy ``R~_t = E||xdot_t - v_t(x_t)||^2`` of a coupling (docs/paper.md Eq. 17).

For the independent coupling (IC), ``Cov[xdot | x_t] = (a' - b' a / b)^2 Cov[data | x_t]``
(``xdot = a' data + b' (x - a data) / b`` given ``x_t = x``), so :func:`ic_proxy` is
``E[(a' - b' a / b)^2 tr Cov[data | x_t]]`` (``E tr Cov[data | x_t] / t^2`` for both processes)
from the mixture's exact posterior covariance. A coupling ``(data', noise')`` (batch-OT, GC)
defines its own path ``x_t = a data' + b noise'`` and its own velocity ``E[xdot | x_t]``;
:func:`knn_proxy` estimates ``R~_t`` from samples of ``(x_t, xdot)`` by leave-one-out
``k``-nearest-neighbour regression (scikit-learn; local-linear by default, with the residual
variance corrected for the regression's own noise through the leverage). Validated against
:func:`ic_proxy` on IC.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gcflows import checks, couplings
from gcflows.checks import batch_times
from gcflows.discrepancy.times import Model
from gcflows.gmm import GaussianMixture
from gcflows.processes import Process, get_process
from gcflows.stats import Interval


def _scalar_time(t: float, process: Process) -> float:
    t = float(t)
    process.check_time(torch.tensor(t), "t")
    return t


@torch.no_grad()
def ic_proxy(
    target: GaussianMixture,
    process: Process | str,
    t: float,
    *,
    n_samples: int = 20_000,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Interval:
    """``R~_t`` of the independent coupling: ``E[(a' - b' a / b)^2 tr Cov[data | x_t]]``.

    Exact given ``x_t`` (the mixture's posterior covariance); Monte Carlo over ``x_t`` only:
    ``n_samples`` draws of data, then noise, from ``generator``. The one exact IC proxy of the
    library (the toy and the high-dimensional studies both use it); the interval is the normal
    one over the draws (``.mean``, ``.half_width``).
    """
    process = get_process(process)
    t = _scalar_time(t, process)
    gmm = target.to(dtype=dtype)
    data = gmm.sample(n_samples, generator)
    noise = torch.randn(data.shape, generator=generator, dtype=dtype)
    tt = batch_times(t, n_samples, data)
    x = process.interpolate(data, noise, tt)
    coef = process.da(tt) - process.db(tt) * process.a(tt) / process.b(tt)
    return Interval.from_samples(coef**2 * gmm.posterior_cov_trace(x, tt, process))


def mc_proxy(xdot: Tensor, v: Tensor) -> Interval:
    """``E||xdot - v||^2`` from per-sample path derivatives and velocities ``(B, d)``."""
    if xdot.shape != v.shape or xdot.dim() != 2:
        raise ValueError("xdot and v must have the same shape (B, d)")
    return Interval.from_samples(((xdot - v) ** 2).sum(1))


COUPLINGS = ("ic", "ot", "gc")


@torch.no_grad()
def coupled_path(
    kind: str,
    data: Tensor,
    noise: Tensor,
    t: float,
    process: Process | str,
    *,
    gc_model: Model | None = None,
    mu: float = 1.0,
    ot_batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Points ``x_t`` and path derivatives ``xdot`` ``(B, d)`` of a coupling's path at time ``t``.

    ``kind``: ``"ic"`` (the pairs as drawn), ``"ot"`` (``couplings.ot_coupling`` within
    consecutive batches of ``ot_batch_size`` rows, as in training), ``"gc"``
    (``couplings.generator_induced_coupling`` at time ``t`` with ``gc_model`` and ``mu``; the
    same noise). Then ``x_t = a data' + b noise'`` and ``xdot = a' data' + b' noise'``.
    """
    process = get_process(process)
    t = _scalar_time(t, process)
    checks.choice(kind, "kind", COUPLINGS)
    if kind == "ic":
        d_out, n_out = data, noise
    elif kind == "ot":
        checks.integer(ot_batch_size, "ot_batch_size", lo=1)
        parts = [
            couplings.ot_coupling(data[s : s + ot_batch_size], noise[s : s + ot_batch_size])
            for s in range(0, data.shape[0], int(ot_batch_size))
        ]
        d_out = torch.cat([p.data for p in parts])
        n_out = torch.cat([p.noise for p in parts])
    else:
        if gc_model is None:
            raise checks.bad("gc_model", None, "kind='gc' needs gc_model(x_t, t) -> data estimate")
        res = couplings.generator_induced_coupling(
            data, noise, gc_model, t, process, mu=mu, generator=generator
        )
        d_out, n_out = res.data, res.noise
    tt = batch_times(t, data.shape[0], data)
    return process.interpolate(d_out, n_out, tt), process.xdot(d_out, n_out, tt)


KNN_METHODS = ("local_linear", "mean")


def knn_proxy(x_t: Tensor, xdot: Tensor, k: int = 32, method: str = "local_linear") -> Interval:
    """``R~_t = E||xdot - E[xdot | x_t]||^2`` by leave-one-out k-NN regression.

    ``x_t``, ``xdot`` ``(n, d)``: samples of one coupling's path at one time. For each point
    ``j`` its ``k`` nearest neighbours (itself excluded, scikit-learn ``NearestNeighbors``) give a
    prediction ``vhat_{-j}(x_j)`` of the velocity, independent of ``xdot_j``:

    - ``"mean"``: the neighbours' mean ``xdot``; ``E||xdot_j - vhat||^2 = R~ (1 + 1/k)`` plus the
      smoothing bias, so each squared residual is multiplied by ``k / (k + 1)``;
    - ``"local_linear"`` (default): least squares ``xdot ~ c + B (x - xbar)`` on the neighbours,
      evaluated at ``x_j``; for a locally linear field the residual has variance
      ``sigma^2 (1 + l_j)`` with the leverage ``l_j = 1/k + (x_j - xbar)^T M^{-1} (x_j - xbar)``
      (``M`` the neighbours' centred scatter matrix), so each squared residual is divided by
      ``1 + l_j``. This removes the first-order smoothing bias, large where ``v`` has a steep
      linear trend (e.g. ``v ~ x / t`` at large ``t``).

    Returns the mean with its standard error (per-sample values treated as independent).
    """
    from sklearn.neighbors import NearestNeighbors

    if x_t.dim() != 2 or xdot.shape != x_t.shape:
        raise ValueError("x_t and xdot must have the same shape (n, d)")
    checks.choice(method, "method", KNN_METHODS)
    checks.integer(k, "k", lo=1)
    n, d = x_t.shape
    k = int(k)
    if method == "local_linear" and k < d + 2:
        raise checks.bad("k", k, f"use k >= d + 2 = {d + 2} for local-linear regression")
    if n < k + 2:
        raise checks.bad("len(x_t)", n, f"use more than k + 1 = {k + 1} samples")
    checks.finite(x_t, "x_t")
    checks.finite(xdot, "xdot")
    xs = x_t.detach().double().cpu().numpy()
    ys = xdot.detach().double().cpu().numpy()
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(xs).kneighbors(xs)
    # drop each point itself (the first column unless exact duplicates reorder it)
    self_col = idx == np.arange(n)[:, None]
    keep = ~self_col
    keep[~self_col.any(1), -1] = False
    neigh = idx[keep].reshape(n, k)
    xn, yn = xs[neigh], ys[neigh]  # (n, k, d)
    if method == "mean":
        values = ((ys - yn.mean(1)) ** 2).sum(1) * (k / (k + 1.0))
    else:
        xbar, ybar = xn.mean(1), yn.mean(1)
        xc, yc = xn - xbar[:, None], yn - ybar[:, None]
        # batched matrix products (a three-operand einsum here took 10x longer)
        xct = xc.transpose(0, 2, 1)  # (n, d, k)
        scatter = xct @ xc
        ridge = 1e-12 * np.trace(scatter, axis1=1, axis2=2)[:, None, None] + 1e-300
        inv = np.linalg.inv(scatter + ridge * np.eye(d))
        coef = inv @ (xct @ yc)  # (n, d_in, d_out)
        dx = (xs - xbar)[:, None, :]  # (n, 1, d)
        pred = ybar + (dx @ coef)[:, 0]
        leverage = 1.0 / k + (dx @ inv @ dx.transpose(0, 2, 1))[:, 0, 0]
        values = ((ys - pred) ** 2).sum(1) / (1.0 + leverage)
    return Interval.from_samples(torch.from_numpy(values))
