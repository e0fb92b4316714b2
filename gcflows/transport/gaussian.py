"""Closed forms (docs/paper.md section 4): Lemma 1's ``g(t)`` of any affine process, and the flow
map, transport cost curve and Lemma 1 of one Gaussian ``N(m, diag(s^2))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gcflows.checks import bad, bad_tensor, batch_times
from gcflows.processes import Process, get_process


def effective_sdot(process: Process | str, t: Tensor) -> Tensor:
    """``g(t) = b'(t) - a'(t) b(t) / a(t) = a d(b/a)/dt``: the ``s_dot`` of Lemma 1 for any affine
    process (``1`` for ``ve``, ``1 / (1 - t)`` for ``linear``); ``xdot_t - v_t(x_t) = g w_t``."""
    process = get_process(process)
    t = torch.as_tensor(t, dtype=torch.float64)
    return process.db(t) - process.da(t) * process.b(t) / process.a(t)


# --- one Gaussian in closed form ------------------------------------------------------------
def _gaussian_parts(
    times: Tensor, process: Process, mean: Tensor, std: Tensor | float
) -> tuple[Tensor, ...]:
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    process.check_time(times, "times")
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float64)
    if std.dim() == 0:
        std = std.expand(mean.shape[0])
    if std.shape != mean.shape:
        fix = f"use a float or the mean's shape {tuple(mean.shape)}"
        raise bad_tensor(std, "std", fix)
    if bool((std < 0).any()):
        raise bad("std.min()", float(std.min()), "use non-negative stds")
    var = std**2
    tm = torch.tensor([process.t_min], dtype=torch.float64)
    a, b = process.a(times)[:, None], process.b(times)[:, None]
    am, bm = process.a(tm), process.b(tm)
    v_t = a * a * var + b * b  # (T, d): variance of each coordinate of x_t
    v_m = am * am * var + bm * bm
    k = torch.sqrt(v_m / v_t)  # J = diag(k): the flow map to t_min is affine
    return times, mean, var, a, b, am, v_t, k


def gaussian_flow_map(
    x: Tensor, t: Tensor | float, process: Process | str, mean: Tensor, std: Tensor | float
) -> Tensor:
    """Exact PF-ODE flow map to ``t_min`` of data ``N(mean, diag(std^2))``: ``(B, d) -> (B, d)``.

    Every coordinate of ``x_t`` is ``N(a m, V(t))`` with ``V = a^2 s^2 + b^2``; the flow map is the
    affine map ``fo(x, t) = a(t_min) m + sqrt(V(t_min) / V(t)) (x - a(t) m)``.
    """
    process = get_process(process)
    t = batch_times(t, x.shape[0], x.to(torch.float64))
    process.check_time(t)
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
    std = torch.as_tensor(std, dtype=torch.float64)
    tm = torch.tensor(process.t_min, dtype=torch.float64)
    a, b = process.a(t)[:, None], process.b(t)[:, None]
    v_t = a * a * std**2 + b * b
    v_m = process.a(tm) ** 2 * std**2 + process.b(tm) ** 2
    out = process.a(tm) * mean + torch.sqrt(v_m / v_t) * (x.to(torch.float64) - a * mean)
    return out.to(x.dtype)


def gaussian_ic_cost(mean: Tensor, std: Tensor | float) -> float:
    """``E||data - noise||^2 = |m|^2 + sum s^2 + d`` for data ``N(m, diag(s^2))``."""
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float64).expand(mean.shape[0])
    return float((mean**2).sum() + (std**2).sum() + mean.shape[0])


def gaussian_cost_curve(
    times: Tensor, process: Process | str, mean: Tensor, std: Tensor | float
) -> Tensor:
    """Exact ``c(t)`` of the ideal flow map for data ``N(m, diag(s^2))``: ``(T,)``.

    ``fo - noise = a_m m + k a (data - m) + (k b - 1) noise`` per coordinate (``a_m = a(t_min)``,
    ``k = sqrt(V(t_min) / V(t))``), so
    ``c(t) = sum_i a_m^2 m_i^2 + k_i^2 a^2 s_i^2 + (k_i b - 1)^2``.
    """
    process = get_process(process)
    _, mean, var, a, b, am, _, k = _gaussian_parts(times, process, mean, std)
    return (am * am * mean**2 + k * k * a * a * var + (k * b - 1) ** 2).sum(1)


def gaussian_cost_derivative(
    times: Tensor, process: Process | str, mean: Tensor, std: Tensor | float
) -> Tensor:
    """Exact Lemma 1 right side for data ``N(m, diag(s^2))``: ``(T,)``.

    ``J = diag(k)`` and ``E[w_i^2] = 1 - b^2 / V = a^2 s_i^2 / V``, so
    ``c'(t) = -2 g(t) sum_i k_i a^2 s_i^2 / V_i(t)``
    (``ve``: ``-2 sum_i k_i s_i^2 / (s_i^2 + t^2)``).
    """
    process = get_process(process)
    times, _, var, a, _, _, v_t, k = _gaussian_parts(times, process, mean, std)
    g = effective_sdot(process, times)
    return -2.0 * g * (k * a * a * var / v_t).sum(1)


def gaussian_s0(process: Process | str, variance: float) -> float:
    """Corollary 2's ``S0`` for one Gaussian of per-coordinate ``variance``:
    ``sqrt(a(t_min)^2 variance + b(t_min)^2)`` (``J -> S0 / b(t)`` as ``b(t) / a(t) -> inf``)."""
    process = get_process(process)
    tm = torch.tensor(process.t_min, dtype=torch.float64)
    return float(torch.sqrt(process.a(tm) ** 2 * variance + process.b(tm) ** 2))
