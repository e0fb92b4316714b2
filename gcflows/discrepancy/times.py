"""Time sampling for Theorem 1 (docs/paper.md section 3): importance sampling over ``t`` and
over the grid index.

The integral over ``t`` is Monte Carlo with ``t ~ q`` (importance sampling)::

    q(t) = (1 - rho) / T + rho / (t log(t_max / t_min)),   T = t_max - t_min,

a defensive mixture of the uniform and the log-uniform law (``rho = log_fraction = 0.5``), so
the weights ``lambda(t) / q(t)`` are bounded by ``2 T lambda`` while the small times, where the
integrand of a VE process concentrates, get half of the samples. The draws are stratified:
``t = F^{-1}(u)`` with ``u`` two per stratum of ``[0, 1)`` (:func:`stratified_uniforms`), and
standard errors use the within-stratum variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from gcflows import checks
from gcflows.processes import Process, uniform_grid

Model = Callable[[Tensor, Tensor], Tensor]
Weight = Callable[[Tensor], Tensor]


def _check_fraction(log_fraction: float) -> float:
    return checks.real(log_fraction, "log_fraction", lo=0.0, hi_open=1.0)


def time_density(t: Tensor, process: Process, log_fraction: float = 0.5) -> Tensor:
    """Density ``q(t) = (1 - rho) / T + rho / (t log(t_max / t_min))`` on ``[t_min, t_max]``."""
    rho = _check_fraction(log_fraction)
    span = process.t_max - process.t_min
    return (1.0 - rho) / span + rho / (t * math.log(process.t_max / process.t_min))


def stratified_uniforms(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` (even) uniforms on ``[0, 1)``, stratified in pairs: ``u_k = (k // 2 + U_k) / (n / 2)``.

    Each of the ``S = n / 2`` equal strata receives two independent draws, so the within-stratum
    variance (hence a standard error) can be estimated
    (:meth:`gcflows.stats.Interval.from_samples`).
    """
    if not checks.is_int(n) or n < 2 or n % 2:
        raise checks.bad("n", n, "use an even integer >= 2 (two draws per stratum)")
    n = int(n)
    strata = torch.arange(n, dtype=torch.float64) // 2
    return (strata + torch.rand(n, generator=generator, dtype=torch.float64)) / (n // 2)


def time_cdf(t: Tensor, process: Process, log_fraction: float = 0.5) -> Tensor:
    """CDF of ``q``: ``F(t) = (1 - rho)(t - t_min) / T + rho log(t / t_min) / log(r)``."""
    rho = _check_fraction(log_fraction)
    lo_t, hi_t = process.t_min, process.t_max
    return (1.0 - rho) * (t - lo_t) / (hi_t - lo_t) + rho * torch.log(t / lo_t) / math.log(
        hi_t / lo_t
    )


def time_quantile(u: Tensor, process: Process, log_fraction: float = 0.5) -> Tensor:
    """Inverse of :func:`time_cdf`, by bisection in float64 (``F`` is increasing) to ``2^-60``."""
    lo_t, hi_t = process.t_min, process.t_max
    u = u.double()
    lo = torch.full_like(u, lo_t)
    hi = torch.full_like(u, hi_t)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = time_cdf(mid, process, log_fraction) < u
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (0.5 * (lo + hi)).clamp(lo_t, hi_t)


def sample_times(
    u: Tensor, process: Process, log_fraction: float = 0.5, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Times ``t = F^{-1}(u) ~ q`` from uniforms ``u`` (e.g. :func:`stratified_uniforms`) and
    their density ``q(t)``: ``(t, q)``, each shaped like ``u``."""
    t = time_quantile(u, process, log_fraction)
    return t.to(dtype), time_density(t, process, log_fraction).to(dtype)


def _grid(n_intervals: int, process: Process) -> Tensor:
    """The equally spaced grid ``t_i = t_min + i T / N``, ``i = 0..N``: ``(N + 1,)`` float64."""
    return uniform_grid(n_intervals, process.t_min, process.t_max)


def grid_interval(t: Tensor, n_intervals: int, process: Process) -> tuple[Tensor, Tensor, Tensor]:
    """The interval ``[t_i, t_{i+1}]`` of the ``N``-interval grid that contains each ``t`` ``(B,)``.

    Returns ``(i, t_lo, t_hi)``: the index ``(B,)`` (long) and the interval ends in the dtype of
    ``t``; ``t_lo <= t <= t_hi`` and ``t_hi - t_lo = T / N`` (``t = t_max`` lies in the last
    interval).
    """
    grid = _grid(n_intervals, process)
    idx = torch.searchsorted(grid, t.double().contiguous(), right=True) - 1
    idx = idx.clamp_(0, n_intervals - 1)
    grid = grid.to(t.dtype)
    return idx, grid[idx], grid[idx + 1]


def interval_probs(n_intervals: int, process: Process, log_fraction: float = 0.5) -> Tensor:
    """``p_i = F(t_{i+1}) - F(t_i)``, the mass of ``q`` on each interval of the grid: ``(N,)``.

    The interval containing ``t ~ q`` is then ``i ~ p``: one draw of ``t`` serves the continuous
    integral and every grid (common random numbers).
    """
    grid = _grid(n_intervals, process)
    cdf = time_cdf(grid, process, log_fraction)
    cdf[0], cdf[-1] = 0.0, 1.0
    return cdf[1:] - cdf[:-1]


def _weight(weight: Weight | None, t: Tensor) -> Tensor:
    if weight is None:
        return torch.ones_like(t)
    w = weight(t)
    if not torch.is_tensor(w) or w.shape != t.shape:
        raise checks.bad_tensor(w, "weight(t)", f"return a tensor shaped like t {tuple(t.shape)}")
    return w.to(t.dtype)
