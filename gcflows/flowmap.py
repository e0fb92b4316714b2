"""The integrators behind the one exact flow map, ``GaussianMixture.flow_map`` (docs/design.md
section 4).

The PF-ODE ``dx/ds = v_s(x)`` of a Gaussian mixture is integrated from per-row start times ``t``
down to ``t_end`` (default ``t_min``) by one of four methods; ``GaussianMixture.flow_map(x, t,
process, t_end=None, method=...)`` validates its arguments once and calls the function here (the
functions below take validated float64 points and times and do no checks of their own):

- ``"dopri5"`` (:func:`dopri5`): adaptive Dormand-Prince (torchdiffeq) over the linear change of
  time ``s(u) = t + u (t_end - t)``, all rows in one solve; the reference (``rtol`` 1e-9).
- ``"segmented"`` (:func:`segmented`): ``dopri5`` in segments, ``segments_per_decade`` per decade
  of the noise level ``sigma = b / a``, so a loose tolerance cannot step across the short stretch
  where the posterior commits to a mode (from ``t = 80`` in 3072-D, one solve at ``rtol = 1e-5``
  took 3 steps and gave a transport cost 34 % off).
- ``"rk4"`` (:func:`rk4`): classical RK4 with ``steps`` equal steps in log-time
  ``s(u) = t^(1-u) t_min^u``, vectorised and in row chunks; with matrix-product forms of the exact
  velocity for isotropic mixtures (:func:`isotropic_velocity`) and, under ``ve`` with one start
  time for all rows, for full covariances (:func:`shared_time_velocity`).
- ``"multistep"`` (:func:`multistep`): the second-order exponential multistep integrator
  DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095) with ``steps`` equal steps in
  ``log sigma`` (:func:`multistep_times`), ``steps`` posterior means of the batch whatever the
  spread of start times; closed-form per-step posterior means for diagonal covariances
  (:func:`scheduled_denoiser`).

This module imports no mixture: it reaches the mixture's exact velocity and posterior mean through
the object it is given (``velocity``, ``denoiser``, the private unchecked ``_velocity``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

from gcflows.processes import Process

__all__ = [
    "METHODS",
    "dopri5",
    "segmented",
    "rk4",
    "multistep",
    "multistep_times",
    "isotropic_velocity",
    "shared_time_velocity",
    "scheduled_denoiser",
    "method_alias",
]

#: the integrators of ``GaussianMixture.flow_map``; adaptive ones take ``rtol`` / ``atol``,
#: fixed-step ones ``steps``
METHODS = ("dopri5", "segmented", "rk4", "multistep")
ADAPTIVE = {"dopri5": (1e-9, 1e-11), "segmented": (1e-5, 1e-7)}  # default (rtol, atol)
FIXED_STEPS = {"rk4": 48, "multistep": 64}  # default steps

# rows of the RK4 flow map are integrated in chunks of about this many values per intermediate
_CHUNK_ELEMENTS = 1 << 17
# the largest precomputed schedule of scheduled_denoiser, in float64 elements (128 MiB)
_SCHEDULE_ELEMENTS = 1 << 24


# --- adaptive -----------------------------------------------------------------------------------
def dopri5(mix, x64: Tensor, t64: Tensor, te64: Tensor, process: Process, rtol, atol) -> Tensor:
    """Adaptive dopri5 from ``t64`` to ``te64`` (both ``(B,)``) in one solve, float64 ``(B, d)``.

    Through ``s(u) = t + u (t_end - t)``, ``u in [0, 1]``: ``dx/du = v_{s(u)}(x) (t_end - t)``. In
    this time the trajectories are nearly straight: for one Gaussian ``x - a m`` scales with
    ``sqrt(a^2 sigma^2 + b^2)``, exactly linear in ``s`` for a Dirac under ``ve``. ``mix`` is the
    mixture in float64 on the device of ``x64``.
    """
    span = te64 - t64

    def field(u: Tensor, state: Tensor) -> Tensor:
        s = t64 + u * span
        v = mix._velocity(state, process.a(s), process.b(s), process.da(s), process.db(s))
        return v * span[:, None]

    grid = torch.tensor([0.0, 1.0], dtype=torch.float64, device=x64.device)
    return odeint(field, x64, grid, rtol=rtol, atol=atol, method="dopri5")[-1]


def segmented(
    mix, x64: Tensor, t64: Tensor, process: Process, rtol, atol, segments_per_decade: int
) -> Tensor:
    """:func:`dopri5` to ``t_min`` in segments: the path of every row is cut at
    ``segments_per_decade`` points per decade of ``sigma = b / a`` (log-uniform from
    ``sigma(t)`` to ``sigma(t_min)``; the number of segments is set by the largest span), one
    solve per segment, so no step spans more than a segment and each segment restarts the
    step-size control."""
    tm = torch.tensor(process.t_min, dtype=torch.float64, device=x64.device)
    s_start = process.b(t64) / process.a(t64)
    s_end = process.b(tm) / process.a(tm)
    decades = float(torch.log10(s_start / s_end).max())
    m = max(1, math.ceil(decades * segments_per_decade))
    y, cur = x64, t64
    for k in range(1, m + 1):
        if k == m:
            nxt = torch.full_like(cur, process.t_min)
        else:
            sig = s_start * (s_end / s_start) ** (k / m)
            nxt = torch.minimum(process.time_of_sigma(sig), cur)
        y = dopri5(mix, y, cur, nxt, process, rtol, atol)
        cur = nxt
    return y


# --- RK4 in log-time ----------------------------------------------------------------------------
def isotropic_velocity(mixture, process: Process, dtype, device):
    """``(x (B, d), t (B,)) -> v_t(x)`` for a mixture of isotropic components, or None.

    The exact velocity ``da D + db b sum_k r_k (x - a mu_k) / S_k`` (``S_k = a^2 lam_k + b^2``,
    ``D = sum_k r_k (mu_k + a lam_k (x - a mu_k) / S_k)``, as ``GaussianMixture.velocity``), with
    the squared distances and the sums over components as matrix products: ``O(B K d)`` work in
    three products instead of several ``(B, K, d)`` temporaries.
    """
    stds = mixture.stds
    if stds is None or (stds.dim() == 2 and not bool((stds == stds[:, :1]).all())):
        return None
    lam = (stds if stds.dim() == 1 else stds[:, 0]).to(dtype=dtype, device=device) ** 2  # (K,)
    mu = mixture.means.to(dtype=dtype, device=device)  # (K, d)
    logw = mixture.weights.to(dtype=dtype, device=device).log()
    mu2 = (mu * mu).sum(1)
    d = mu.shape[1]

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        a, b, da, db = process.a(t), process.b(t), process.da(t), process.db(t)
        var = (a * a)[:, None] * lam[None] + (b * b)[:, None]  # (B, K)
        sq = (x * x).sum(1, keepdim=True) - 2 * a[:, None] * (x @ mu.T) + (a * a)[:, None] * mu2
        logits = logw - 0.5 * d * torch.log(var) - 0.5 * sq.clamp_min(0.0) / var
        r = torch.softmax(logits, dim=1)
        q = r / var  # (B, K)
        resid = q.sum(1, keepdim=True) * x - a[:, None] * (q @ mu)  # sum_k r_k (x - a mu_k)/S_k
        g = q * lam  # r_k lam_k / S_k
        denoised = (r @ mu) + a[:, None] * (g.sum(1, keepdim=True) * x - a[:, None] * (g @ mu))
        return da[:, None] * denoised + (db * b)[:, None] * resid

    return velocity


def shared_time_velocity(mixture, process: Process, dtype, device):
    """``(x (B, d), t (B,) all equal) -> v_t(x)`` under ``ve`` for full covariances, or None.

    With one time for every row, ``S_k^{-1} = U_k diag(1 / (lam_k + t^2)) U_k^T`` is formed once
    per call (``K d^3``) and the exact ve velocity is one batched product::

        v_t(x) = t sum_k r_k(x) S_k^{-1} (x - mu_k),    S_k = Sigma_k + t^2 I

    (``D = x - t^2 sum_k r_k S_k^{-1} (x - mu_k)``), ``B K d^2`` work against three rotations in
    ``GaussianMixture.velocity``. Other processes and diagonal covariances: None.
    """
    if process.name != "ve" or mixture.stds is not None:
        return None
    lam, rot = torch.linalg.eigh(mixture.covariances.to(dtype=dtype, device=device))
    lam = lam.clamp_min(0.0)  # (K, d)
    mu = mixture.means.to(dtype=dtype, device=device)  # (K, d)
    logw = mixture.weights.to(dtype=dtype, device=device).log()
    d = mu.shape[1]

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        tt = float(t[0])
        var = lam + tt * tt  # (K, d)
        prec = (rot / var[:, None, :]) @ rot.transpose(1, 2)  # (K, d, d)
        diff = x[None] - mu[:, None]  # (K, B, d)
        y = torch.bmm(diff, prec)  # S_k^{-1} (x - mu_k), (K, B, d)
        logits = logw[:, None] - 0.5 * torch.log(var).sum(1)[:, None] - 0.5 * (diff * y).sum(-1)
        r = torch.softmax(logits - 0.5 * d * math.log(2 * math.pi), dim=0)  # (K, B)
        return tt * torch.einsum("kb,kbd->bd", r, y)

    return velocity


def rk4(mixture, x64: Tensor, t64: Tensor, process: Process, steps: int) -> Tensor:
    """Classical RK4 to ``t_min`` in ``steps`` equal steps of log-time, float64 ``(B, d)``.

    Integrates ``dx/du = v_{t(u)}(x) t(u) log(t_min / t)`` with ``t(u) = t^(1-u) t_min^u``,
    ``u in [0, 1]`` (uniform in log-time, where the trajectories of a Gaussian mixture are
    smooth); fourth order in the step (48 steps: relative error about 1e-4 from t = 80 against the
    closed form of a Gaussian). ``mixture`` in any dtype (the fast velocities convert it).
    """
    y = x64
    t0 = t64.clone()
    span = math.log(process.t_min) - torch.log(t0)  # (B,), <= 0
    fast = isotropic_velocity(mixture, process, torch.float64, y.device)
    if fast is None and bool((t0 == t0[0]).all()):
        fast = shared_time_velocity(mixture, process, torch.float64, y.device)
    if fast is None:
        gm = mixture.to(dtype=torch.float64, device=y.device)

        def velocity(state: Tensor, tt: Tensor) -> Tensor:
            return gm.velocity(state, tt, process)
    else:
        velocity = fast

    def integrate(y: Tensor, t0: Tensor, span: Tensor) -> Tensor:
        def field_(u: float, state: Tensor) -> Tensor:
            tt = torch.exp(torch.log(t0) + u * span).clamp_min(process.t_min)
            return velocity(state, tt) * (tt * span)[:, None]

        h = 1.0 / steps
        for i in range(steps):
            u = i * h
            k1 = field_(u, y)
            k2 = field_(u + h / 2, y + (h / 2) * k1)
            k3 = field_(u + h / 2, y + (h / 2) * k2)
            k4 = field_(u + h, y + h * k3)
            y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        return y

    # rows in chunks of about _CHUNK_ELEMENTS values per (rows, K or 1, d) intermediate: large
    # temporaries (tens of MB) cost more in fresh allocations than in arithmetic
    per_row = y.shape[1] * (mixture.n_components if fast is None or mixture.stds is None else 1)
    size = max(1, _CHUNK_ELEMENTS // per_row)
    return torch.cat(
        [
            integrate(y[i : i + size], t0[i : i + size], span[i : i + size])
            for i in range(0, y.shape[0], size)
        ]
    )


# --- the exponential multistep integrator -------------------------------------------------------
def multistep_times(process: Process, t64: Tensor, steps: int) -> Tensor:
    """The schedule of :func:`multistep`: ``(steps + 1, B)`` float64, row ``k`` the times of step
    ``k`` of each row (row 0 the start times ``t64``, the last row ``t_min``), equally spaced in
    ``log sigma`` (``sigma = b / a``; ``Process.time_of_sigma`` inverts it)."""
    tm = torch.full_like(t64, process.t_min)
    s_start, s_end = process.b(t64) / process.a(t64), process.b(tm) / process.a(tm)
    frac = torch.arange(1, steps, dtype=torch.float64, device=t64.device)[:, None] / steps
    levels = s_start * (s_end / s_start) ** frac  # (steps - 1, B)
    return torch.cat([t64[None], process.time_of_sigma(levels), tm[None]])


def scheduled_denoiser(mix, a: Tensor, b: Tensor) -> Callable[[int, Tensor], Tensor] | None:
    """The posterior mean ``D(x) = E[data | x_s = x]`` at known noise levels, as ``step(k, x)``.

    ``a``, ``b`` ``(S, B)``: the coefficients of row ``j`` at step ``k``. For a mixture with
    diagonal covariances ``diag(lam_k)`` (``mix.stds`` given), ``x_s`` given component ``k`` is
    ``N(a mu_k, diag(v_k))``, ``v_k = a^2 lam_k + b^2``, and::

        D(x) = sum_k r_k(x) (mu_k + (a lam_k / v_k) (x - a mu_k)),
        r_k(x) = softmax_k(log w_k - 0.5 sum_i (log(2 pi v_ki) + (x - a mu_k)_i^2 / v_ki)),

    the formula of ``GaussianMixture.denoiser``. Everything that does not depend on ``x`` is
    computed once for all ``S`` steps, so a step costs about ten tensor operations instead of a
    validated ``denoiser`` call (the multistep loop's points are finite by construction and its
    times in the process domain). Returns ``None`` (use ``mix.denoiser``) for full covariances or
    when the schedule would exceed ``_SCHEDULE_ELEMENTS``.
    """
    stds = mix.stds
    n_comp, dim = mix.means.shape
    if stds is None or a.numel() * n_comp * dim > _SCHEDULE_ELEMENTS:
        return None
    mu = mix.means  # (K, d)
    lam = (stds if stds.dim() == 2 else stds[:, None].expand(n_comp, dim)) ** 2
    a4, b4 = a[:, :, None, None], b[:, :, None, None]
    var = a4 * a4 * lam + b4 * b4  # (S, B, K, d)
    centre = a4 * mu  # a mu_k
    inv_var = 1.0 / var
    shrink = a4 * lam * inv_var  # a lam_k / v_k
    log_norm = mix.weights.log() - 0.5 * (torch.log(var) + math.log(2.0 * math.pi)).sum(-1)

    def step(k: int, x: Tensor) -> Tensor:
        diff = x[:, None, :] - centre[k]  # (B, K, d)
        r = torch.softmax(log_norm[k] - 0.5 * (diff * diff * inv_var[k]).sum(-1), dim=-1)
        return (r[:, :, None] * (mu + shrink[k] * diff)).sum(1)

    return step


def multistep(mix, x64: Tensor, t64: Tensor, process: Process, steps: int) -> Tensor:
    """DPM-Solver++(2M) to ``t_min`` in ``steps`` equal steps of ``log sigma``, float64 ``(B, d)``.

    In the log noise level ``lam = -log(b / a)`` the PF-ODE is linear in ``x`` up to the posterior
    mean ``D(x, s)``; with ``D`` held at the extrapolation ``1.5 D_k - 0.5 D_{k-1}`` over a step
    (the first with ``D_0``) the step is exact for that ``D``::

        x_{k+1} = (b_{k+1} / b_k) x_k + (a_{k+1} - b_{k+1} a_k / b_k) D_hat_k.

    ``mix`` is the mixture in float64 on the device of ``x64``. Mean squared error against
    ``dopri5`` at ``rtol = 1e-10`` on the authors' 2D target: below 3e-7 at 32 steps, 5e-8 at 64
    (tests/test_flowmap.py).
    """
    times = multistep_times(process, t64, steps)  # the whole schedule at once
    a, b = process.a(times), process.b(times)
    keep = (b[1:] / b[:-1])[:, :, None]  # (steps, B, 1)
    gain = (a[1:] - b[1:] * a[:-1] / b[:-1])[:, :, None]
    denoise = scheduled_denoiser(mix, a[:-1], b[:-1])
    prev_d = None
    for k in range(steps):
        d = mix.denoiser(x64, times[k], process) if denoise is None else denoise(k, x64)
        d_hat = d if prev_d is None else 1.5 * d - 0.5 * prev_d
        x64 = keep[k] * x64 + gain[k] * d_hat
        prev_d = d
    return x64


def method_alias(method: str, name: str) -> Callable[..., Tensor]:
    """``name(mixture, x, t, process, **options) = mixture.flow_map(x, t, process, method=method,
    **options)``: the name an earlier release gave to one method of the flow map, kept importable
    (``gcflows.discrepancy.multistep_flow_map``, ``gcflows.transport.ideal_flow_map``)."""

    def alias(mixture, x: Tensor, t: Tensor | float, process, **options) -> Tensor:
        return mixture.flow_map(x, t, process, method=method, **options)

    alias.__name__ = alias.__qualname__ = name
    alias.__doc__ = (
        f"``mixture.flow_map(x, t, process, method={method!r}, **options)``: "
        "the earlier name of one method of ``GaussianMixture.flow_map``, kept importable."
    )
    return alias
