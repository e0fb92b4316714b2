"""The CT / CD discrepancy of Theorem 1, measured exactly on Gaussian mixtures.

docs/paper.md section 3.

Everything here uses the *exact* PF-ODE velocity ``v_t`` of a :class:`~gcflows.gmm.GaussianMixture`
(``gcflows.velocity.TrueVelocity``), so that CD, CT and the limit ``R(theta)`` can be compared
without a learned teacher. Shapes: data / noise / points ``(B, d)``, times ``(B,)``; a consistency
function is any callable ``model(x (B, d), t (B,)) -> (B, d)`` that treats rows independently
(e.g. a ``ConsistencyModel`` in float64, in eval mode; large batches are evaluated in chunks of
``EVAL_ROWS`` rows). Monte-Carlo results come as :class:`gcflows.stats.Interval` (mean,
standard error, 95 % interval, how it was computed).

1. ``R(theta)`` (Theorem 1, Eq. 11): :func:`r_theta`
---------------------------------------------------
With ``d_w f = df/dt (x_t, t) + df/dx (x_t, t) w`` (the derivative of ``f`` along the path
direction ``w``), ``d_CT f = d_{xdot} f`` and ``d_CD f = d_{v} f``::

    R(theta) = int_{t_min}^{t_max} lambda(t) E[ ||d_CT f||^alpha - ||d_CD f||^alpha ] dt.

For ``alpha = 2``, ``d_CT f = d_CD f + J (xdot - v)`` with ``J = df/dx`` and
``E[xdot - v | x_t] = 0``, so the cross term has mean zero and (Eq. 11)::

    R(theta) = int lambda(t) E || J(x_t, t) (xdot_t - v_t(x_t)) ||^2 dt,

Averaged over the pair given ``x_t`` this is ``tr(J Sigma J^T)`` with
``Sigma = Cov[xdot | x_t] = (a' - b' a / b)^2 Cov[data | x_t]``, known exactly for a mixture.
:func:`r_theta` evaluates, per ``form``: ``"posterior"`` (default for ``alpha = 2``)
``tr(J Sigma J^T)`` by ``d`` Jacobian-vector products (lowest variance); ``"jacobian"``
``||J (xdot - v)||^2`` (Eq. 11 as written); ``"difference"`` the general integrand (any alpha).
``J w`` is a Jacobian-vector product (``torch.func.jvp``, exact). The time derivative ``df/dt``
(needed only by the ``difference`` form) is by default a second-order one-sided finite difference
in float64 with a relative step ``1e-3`` (``time_derivative="fd"``), which works for any model,
including black boxes that detach ``t``; ``time_derivative="jvp"`` differentiates ``t`` by JVP
(``gcflows.consistency.ConsistencyModel`` keeps ``t`` differentiable, so both apply to it).

The integral over ``t`` is Monte Carlo with ``t ~ q`` (importance sampling)::

    q(t) = (1 - rho) / T + rho / (t log(t_max / t_min)),   T = t_max - t_min,

a defensive mixture of the uniform and the log-uniform law (``rho = log_fraction = 0.5``), so
the weights ``lambda(t) / q(t)`` are bounded by ``2 T lambda`` while the small times, where the
integrand of a VE process concentrates, get half of the samples. The draws are stratified:
``t = F^{-1}(u)`` with ``u`` two per stratum of ``[0, 1)`` (:func:`stratified_uniforms`), and
standard errors use the within-stratum variance.

2. The discrete losses and the scaled gap: :func:`loss_gaps`, :func:`gradient_gaps`
----------------------------------------------------------------------------------
Equally spaced grid ``t_i = t_min + i h``, ``h = T / N``, ``i = 0..N``. The losses are the
average over the ``N`` intervals (the uniform-index expectation; the student at ``t_{i+1}``,
the teacher at ``t_i``, weight ``lambda(t_{i+1})``)::

    L(N) = (1/N) sum_{i=0}^{N-1} lambda(t_{i+1}) E[ phi(|| f(y, t_{i+1}) - f(x_teacher, t_i) ||) ],
    y = x_{t_{i+1}},   CT: x_teacher = x_{t_i} = y - h xdot,   CD: x_teacher = y - h v(y, t_{i+1}).

(``x_t`` is affine *in t* for ``ve`` and ``linear``, so the CT teacher point is exactly an Euler
step with the one-sample velocity ``xdot``: CT and CD differ only in ``xdot`` versus ``v``.)
``gcflows.consistency.ConsistencyObjective(fixed_grid=uniform_grid(N), index_probs="uniform")``
computes the same per-sample distances (:func:`discrete_terms`; checked in the tests); its weight
``1 / (t_{i+1} - t_i) = N / T`` is ``lambda = N / T``, a constant: its loss is ``(N / T) L(N)``
with ``lambda = 1``.

Scaling. A Taylor expansion at the student point gives
``f(y, t_{i+1}) - f(y - h w, t_i) = h d_w f(y, t_{i+1}) + O(h^2)``, and ``phi(u) = C u^alpha
(1 + o(1))`` gives ``E phi(...) = C h^alpha E||d_w f||^alpha + o(h^alpha)``. Hence::

    N^alpha L(N) = C T^alpha (1/N) sum_i lambda(t_{i+1}) E||d_w f(y, t_{i+1})||^alpha + o(1)
                 -> C T^alpha (1/T) int lambda E||d_w f||^alpha dt
    N^alpha (L_CT(N) - L_CD(N)) -> C T^(alpha - 1) R(theta).

The ``(1/N) sum`` is a right-endpoint Riemann sum, so the approach is ``O(1/N)``: its leading
error is ``-(h / 2) (g(t_min) - g(t_max))`` for an integrand ``g``; a VE integrand that varies on
the scale of the data's standard deviation near ``t_min`` needs ``h`` below that scale.
For pseudo-Huber, ``phi(u) = sqrt(u^2 + c^2) - c ~ u^2 / (2c)`` only for ``u << c``: the limit is
reached only once ``h ||d f|| << c``, i.e. ``N >> T ||d f|| / c``; below that the loss behaves
like ``alpha = 1``.

Monte Carlo with common random numbers: one draw ``(t ~ q, data, noise)`` serves everything.
The limit's integrand is evaluated at ``(x_t, t)``; for every ``N`` the interval containing ``t``
is used, so ``i ~ p_i = F(t_{i+1}) - F(t_i)`` with weight ``w_i = lambda(t_{i+1}) / (N p_i)``
(every expectation over the uniform index is unchanged); CT and CD use the same pair. The
per-sample ``N^alpha w_i (D_CT - D_CD)`` and ``C T^(alpha-1) lambda(t) r(t) / q(t)`` move
together, so the paired ratio ``N^alpha (L_CT - L_CD) / (C T^(alpha-1) R)`` has a small interval
(delta method) even where each estimate alone has a wider one; the curves against ``N`` are
smooth because all ``N`` share the draws.

Gradients (the teacher under stop-gradient). ``grad L = (1/N) sum_i lambda E[ J_theta f(y)^T
psi(f(y) - a) ]`` with ``psi = grad_b D``. For squared L2 (``psi(u) = 2u``)
``grad L_CT - grad L_CD = (1/N) sum lambda E[2 J_theta^T (a_CD - a_CT)]`` and
``a_CD - a_CT = h J(x_CD, t_i) (xdot - v) + O(h^2)``: the ``O(h)`` term has conditional mean zero
given ``y`` (``E[xdot | y] = v``), so ``N (grad L_CT - grad L_CD) = O(h) -> 0`` while
``N grad L_CD = O(1)`` (Theorem 1 (ii), ``alpha = 2``). For ``alpha = 1`` (``psi(u) = u / ||u||``)
the unit vectors of the CT and CD differences differ at ``O(1)``: the scaled gap stays.
The ``O(h)`` term is pure noise of zero mean, of the size of the signal divided by ``sqrt(M)`` at
every ``N``; for a quadratic distance :func:`gradient_gaps` also reports the estimate with that
term removed as a control variate (``D(a_CT, b) - D(a_CT + h J (xdot - v), b)``, whose gradient
has exact mean zero), which leaves the expectation unchanged and exposes the ``O(1/N)`` decay.

3. The proxy ``R~_t = E||xdot_t - v_t(x_t)||^2`` (Eq. 17)
--------------------------------------------------------
For the independent coupling (IC), ``Cov[xdot | x_t] = (a' - b' a / b)^2 Cov[data | x_t]``
(``xdot = a' data + b' (x - a data) / b`` given ``x_t = x``), so :func:`ic_proxy` is
``E[(a' - b' a / b)^2 tr Cov[data | x_t]]`` (``E tr Cov[data | x_t] / t^2`` for both processes)
from the mixture's exact posterior covariance. A coupling ``(data', noise')`` (batch-OT, GC)
defines its own path ``x_t = a data' + b noise'`` and its own velocity ``E[xdot | x_t]``;
:func:`knn_proxy` estimates ``R~_t`` from samples of ``(x_t, xdot)`` by leave-one-out
``k``-nearest-neighbour regression (scikit-learn; local-linear by default, with the residual
variance corrected for the regression's own noise through the leverage). Validated against
:func:`ic_proxy` on IC.

4. Against the exact flow map: :class:`FlowMapGenerator` (the ideal GC generator, a module around
``GaussianMixture.flow_map``), :func:`flow_map_reference` and :func:`flow_map_error`
(``E||f_theta(x_t, t) - flow_map(x_t, t)||^2`` per ``t``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp

from gcflows import checks, couplings
from gcflows.checks import batch_times
from gcflows.consistency import Distance, get_distance
from gcflows.gmm import GaussianMixture
from gcflows.processes import Process, get_process, uniform_grid
from gcflows.stats import Interval, paired_ratio
from gcflows.velocity import TrueVelocity

__all__ = [
    "paired_ratio",
    "grid_interval",
    "time_density",
    "stratified_uniforms",
    "time_quantile",
    "time_cdf",
    "sample_times",
    "interval_probs",
    "directional_derivative",
    "jacobian_vector_product",
    "posterior_jacobian_trace",
    "r_integrand",
    "r_theta",
    "limit_constant",
    "discrete_terms",
    "GapResult",
    "loss_gaps",
    "GradientGapResult",
    "gradient_gaps",
    "ic_proxy",
    "mc_proxy",
    "coupled_path",
    "knn_proxy",
    "FlowMapGenerator",
    "multistep_flow_map",
    "flow_map_reference",
    "flow_map_error",
]

Model = Callable[[Tensor, Tensor], Tensor]
Weight = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------------
# Time sampling (importance sampling over t and over the grid index)
# ------------------------------------------------------------------------------------------------
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
        raise ValueError("weight(t) must return a tensor shaped like t (B,)")
    return w.to(t.dtype)


# ------------------------------------------------------------------------------------------------
# Derivatives of the consistency function
# ------------------------------------------------------------------------------------------------
# Rows per model evaluation. A consistency function applied row-wise (eval mode, no batch
# statistics) gives the same rows whatever the batch; in chunks of a few thousand rows a small
# MLP's activations stay in cache: on the toy study's 64-wide ToyMLP in float64 (one thread),
# 2048-row chunks made a forward pass over 20000 rows 2.1x and a JVP 3.7x faster, with bitwise
# the same values.
EVAL_ROWS = 2048


def _by_rows(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``fn(*tensors)`` evaluated on row chunks of at most ``EVAL_ROWS`` and concatenated."""
    n = tensors[0].shape[0]
    if n <= EVAL_ROWS:
        return fn(*tensors)
    return torch.cat([fn(*(a[s : s + EVAL_ROWS] for a in tensors)) for s in range(0, n, EVAL_ROWS)])


def jacobian_vector_product(model: Model, x: Tensor, t: Tensor, vector: Tensor) -> Tensor:
    """``df/dx (x, t) vector`` per sample ``(B, d)``, by ``torch.func.jvp`` (``t`` held fixed)."""
    return _by_rows(lambda xx, tt, vv: jvp(lambda z: model(z, tt), (xx,), (vv,))[1], x, t, vector)


def _jacobian_rows(model: Model, x: Tensor, t: Tensor) -> Tensor:
    """``df/dx (x, t)`` per sample ``(B, d_out, d)``: ``d_out`` reverse-mode passes of
    ``sum_rows f_i`` (rows are independent, so its gradient is each row's ``df_i/dx``).

    Preferred to JVPs when at least ``d_out`` directions are needed: on the toy study's ToyMLP
    (float64, 2000 rows) the whole 2 x 2 Jacobian took 17 ms, one JVP 25 ms.
    """

    def rows(xx: Tensor, tt: Tensor) -> Tensor:
        with torch.enable_grad():
            xx = xx.detach().requires_grad_(True)
            out = model(xx, tt)
            n_out = out.shape[1]
            grads = [
                torch.autograd.grad(out[:, i].sum(), xx, retain_graph=i + 1 < n_out)[0]
                for i in range(n_out)
            ]
        return torch.stack(grads, dim=1)

    return _by_rows(rows, x, t)


def _jacobian_products(model: Model, x: Tensor, t: Tensor, vectors: Sequence[Tensor]) -> list:
    """``df/dx (x, t) w`` for each ``w`` ``(B, d)``: by the Jacobian when there are at least
    ``d`` vectors, else one JVP each (the same values up to rounding)."""
    if len(vectors) >= x.shape[1]:
        jac = _jacobian_rows(model, x, t)
        return [(jac @ w[:, :, None])[:, :, 0] for w in vectors]
    return [jacobian_vector_product(model, x, t, w) for w in vectors]


def _time_derivative(model: Model, x: Tensor, t: Tensor, process: Process, rel_step: float):
    """``df/dt`` by a second-order one-sided difference inside ``[t_min, t_max]``: ``(B, d)``.

    ``sigma * (3 f(t) - 4 f(t - sigma e) + f(t - 2 sigma e)) / (2 e)``, ``e = rel_step * t``,
    backwards (``sigma = +1``) where ``t - 2e >= t_min``, forwards otherwise; error ``O(e^2)``.
    """
    e = rel_step * t
    sign = torch.where(t - 2 * e >= process.t_min, 1.0, -1.0).to(t.dtype)
    t1 = (t - sign * e).clamp(process.t_min, process.t_max)
    t2 = (t - 2 * sign * e).clamp(process.t_min, process.t_max)
    f0, f1, f2 = _by_rows(model, x, t), _by_rows(model, x, t1), _by_rows(model, x, t2)
    h1, h2 = (t - t1)[:, None], (t - t2)[:, None]
    # exact weights of the 3-point one-sided formula for the actual (clamped) offsets h1, h2
    return f0 * (h1 + h2) / (h1 * h2) - f1 * h2 / (h1 * (h2 - h1)) + f2 * h1 / (h2 * (h2 - h1))


def directional_derivative(
    model: Model,
    x: Tensor,
    t: Tensor,
    direction: Tensor,
    process: Process,
    *,
    time_derivative: str = "fd",
    fd_rel_step: float = 1e-3,
) -> Tensor:
    """``d_w f = df/dt (x, t) + df/dx (x, t) w`` per sample: ``(B, d)``.

    ``df/dx w`` by JVP; ``df/dt`` by JVP (``time_derivative="jvp"``, for models that do not detach
    ``t``) or by the finite difference of :func:`_time_derivative` (``"fd"``, the default; see the
    module docstring).
    """
    return _path_derivatives(
        model, x, t, (direction,), process, time_derivative=time_derivative, fd_rel_step=fd_rel_step
    )[0]


def _path_derivatives(
    model: Model,
    x: Tensor,
    t: Tensor,
    directions: Sequence[Tensor],
    process: Process,
    *,
    time_derivative: str = "fd",
    fd_rel_step: float = 1e-3,
) -> list[Tensor]:
    """:func:`directional_derivative` along several directions, sharing ``df/dt``."""
    if time_derivative == "jvp":

        def time_and_space(xx: Tensor, tt: Tensor, ww: Tensor) -> Tensor:
            return jvp(model, (xx, tt), (ww, torch.ones_like(tt)))[1]

        return [_by_rows(time_and_space, x, t, w) for w in directions]
    if time_derivative != "fd":
        raise ValueError(f"time_derivative must be 'fd' or 'jvp', got {time_derivative!r}")
    checks.real(fd_rel_step, "fd_rel_step", lo_open=0.0, hi_open=0.1)
    dfdt = _time_derivative(model, x, t, process, fd_rel_step)
    return [jw + dfdt for jw in _jacobian_products(model, x, t, directions)]


# ------------------------------------------------------------------------------------------------
# R(theta)
# ------------------------------------------------------------------------------------------------
def _check_alpha(alpha: float) -> float:
    return checks.real(alpha, "alpha", lo=1.0, fix="use a number >= 1 (Theorem 1)")


def _resolve_velocity(target: GaussianMixture, process: Process, velocity):
    if velocity is None:
        return TrueVelocity(target, process)
    if not callable(velocity):
        raise ValueError("velocity must be callable as velocity(x_t, t) -> v")
    return velocity


def posterior_jacobian_trace(
    model: Model, x: Tensor, t: Tensor, process: Process, target: GaussianMixture
) -> Tensor:
    """``E[||J (xdot - v)||^2 | x_t = x] = tr(J Sigma J^T)`` per sample ``(B,)``, exactly.

    ``Sigma = Cov[xdot | x_t] = (a' - b' a / b)^2 Cov[data | x_t]`` from the mixture's posterior
    covariance; with ``Sigma = L L^T`` (``L = U diag(sqrt(lam))`` from ``eigh``, robust for a
    singular ``Sigma``), ``tr(J Sigma J^T) = sum_k ||J L e_k||^2 = ||J L||_F^2``: the ``d``
    products ``J L e_k`` (:func:`_jacobian_products`).
    """
    coef = process.da(t) - process.db(t) * process.a(t) / process.b(t)
    cov = target.posterior_cov(x, t, process) * (coef**2)[:, None, None]
    lam, vecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(1, 2)))
    root = vecs * lam.clamp_min(0.0).sqrt()[:, None, :]
    columns = [root[:, :, k].contiguous() for k in range(x.shape[1])]
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for jl in _jacobian_products(model, x, t, columns):
        total = total + (jl * jl).sum(1)
    return total


FORMS = ("auto", "posterior", "jacobian", "difference")


def r_integrand(
    model: Model,
    data: Tensor,
    noise: Tensor,
    t: Tensor,
    process: Process,
    velocity: Callable[..., Tensor],
    *,
    alpha: float = 2.0,
    form: str = "auto",
    target: GaussianMixture | None = None,
    time_derivative: str = "fd",
    fd_rel_step: float = 1e-3,
) -> Tensor:
    """Per-sample integrand of ``R(theta)`` at ``x_t = a data + b noise``: ``(B,)``.

    Forms (all with the same conditional mean given ``x_t`` when ``alpha = 2``):
    ``"difference"``: ``||d_CT f||^alpha - ||d_CD f||^alpha`` (any alpha);
    ``"jacobian"`` (alpha 2): ``||J (xdot - v)||^2`` (Eq. 11);
    ``"posterior"`` (alpha 2, needs ``target``): ``tr(J Cov[xdot | x_t] J^T)``, Eq. 11 averaged
    exactly over the posterior of the pair given ``x_t`` (:func:`posterior_jacobian_trace`; the
    lowest variance). ``"auto"``: ``posterior`` for alpha 2 with a target, ``jacobian`` for
    alpha 2 without, ``difference`` otherwise.
    """
    alpha = _check_alpha(alpha)
    checks.choice(form, "form", FORMS)
    if form == "auto":
        form = "difference" if alpha != 2.0 else ("posterior" if target is not None else "jacobian")
    if form in ("jacobian", "posterior") and alpha != 2.0:
        raise ValueError(f"form={form!r} (Eq. 11) holds for alpha = 2 only; use 'difference'")
    x = process.interpolate(data, noise, t)
    if form == "posterior":
        if target is None:
            raise ValueError("form='posterior' needs target=, the GaussianMixture of the data")
        return posterior_jacobian_trace(model, x, t, process, target.to(dtype=x.dtype))
    xdot = process.xdot(data, noise, t)
    v = velocity(x, t)
    if form == "jacobian":
        jw = jacobian_vector_product(model, x, t, xdot - v)
        return (jw * jw).sum(1)
    d_ct, d_cd = _path_derivatives(
        model, x, t, (xdot, v), process, time_derivative=time_derivative, fd_rel_step=fd_rel_step
    )
    return d_ct.norm(dim=1) ** alpha - d_cd.norm(dim=1) ** alpha


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of an even ``n``, each of even length."""
    if not checks.is_int(n) or n < 2 or n % 2:
        raise checks.bad("n_samples", n, "use an even integer >= 2 (stratified pairs)")
    checks.integer(size, "batch_size", lo=2)
    n, size = int(n), int(size) - int(size) % 2
    return [(s, min(s + size, n)) for s in range(0, n, size)]


@torch.no_grad()
def r_theta(
    model: Model,
    target: GaussianMixture,
    process: Process | str,
    *,
    alpha: float = 2.0,
    n_samples: int = 100_000,
    batch_size: int = 50_000,
    weight: Weight | None = None,
    log_fraction: float = 0.5,
    form: str = "auto",
    velocity: Callable[..., Tensor] | None = None,
    time_derivative: str = "fd",
    fd_rel_step: float = 1e-3,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Interval:
    """``R(theta) = int lambda(t) E[||d_CT f||^alpha - ||d_CD f||^alpha] dt`` by Monte Carlo.

    ``t ~ q`` (:func:`sample_times`), ``data ~ target``, ``noise ~ N(0, I)``; per-sample values
    ``lambda(t) r(t, data, noise) / q(t)`` with ``r`` from :func:`r_integrand`; ``velocity``
    defaults to the exact ``TrueVelocity(target, process)``. ``weight`` is ``lambda`` (None = 1).
    """
    process = get_process(process)
    alpha = _check_alpha(alpha)
    vel = _resolve_velocity(target, process, velocity)
    gmm = target.to(dtype=dtype)
    values = []
    chunks = _chunks(n_samples, batch_size)
    u_all = stratified_uniforms(n_samples, generator)
    for start, stop in chunks:
        m = stop - start
        t, q = sample_times(u_all[start:stop], process, log_fraction, dtype)
        data = gmm.sample(m, generator)
        noise = torch.randn(data.shape, generator=generator, dtype=dtype)
        r = r_integrand(
            model,
            data,
            noise,
            t,
            process,
            vel,
            alpha=alpha,
            form=form,
            target=gmm,
            time_derivative=time_derivative,
            fd_rel_step=fd_rel_step,
        )
        values.append(_weight(weight, t) * r / q)
    return Interval.from_samples(torch.cat(values), "stratified")


def limit_constant(distance: Distance, process: Process) -> float:
    """``C T^(alpha - 1)``: the factor between ``R(theta)`` and ``lim N^alpha (L_CT - L_CD)``."""
    return distance.C * (process.t_max - process.t_min) ** (distance.alpha - 1.0)


# ------------------------------------------------------------------------------------------------
# Discrete losses: the scaled gap and the gradient gap
# ------------------------------------------------------------------------------------------------
def _distances(distances: Sequence[str | Distance], dim: int) -> list[Distance]:
    out = []
    for d in distances:
        dist = get_distance(d, dim)
        if not dist.radial:
            raise ValueError(
                f"distance {dist.name!r} is not a function of ||a - b||; Theorem 1 needs "
                "phi(||a - b||) (use squared_l2, pseudo_huber or l2_norm)"
            )
        out.append(dist)
    if not out:
        raise ValueError("distances must name at least one distance")
    return out


def _is_quadratic(dist: Distance) -> bool:
    """True for ``phi(u) = C u^2`` exactly (squared L2): first-order control variates apply."""
    return dist.name == "squared_l2"


def _check_ns(n_intervals: Sequence[int]) -> list[int]:
    ns = list(n_intervals)
    if not ns or not all(checks.is_int(n) and n >= 1 for n in ns):
        raise checks.bad("n_intervals", ns, "use a non-empty list of integers >= 1")
    return [int(n) for n in ns]


def _grid_points(data: Tensor, noise: Tensor, t: Tensor, n: int, process: Process, probs: Tensor):
    """The interval ``i`` containing ``t`` on the ``n``-interval grid, and its CT / CD inputs.

    Returns ``t_lo, t_hi, y = x_{t_hi}, x_ct = x_{t_lo}, xdot, w_idx = 1 / (n p_i)``.
    """
    idx, t_lo, t_hi = grid_interval(t.to(data.dtype), n, process)
    y = process.interpolate(data, noise, t_hi)
    x_ct = process.interpolate(data, noise, t_lo)
    xdot = process.xdot(data, noise, t_hi)
    w_idx = 1.0 / (n * probs[idx].to(data.dtype))
    return t_lo, t_hi, y, x_ct, xdot, w_idx


def _student_and_teachers(
    model: Model,
    data: Tensor,
    noise: Tensor,
    t_lo: Tensor,
    t_hi: Tensor,
    process: Process,
    velocity: Callable[..., Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """``f(y, t_hi)``, ``f(x_CT, t_lo)``, ``f(x_CD, t_lo)`` with ``y = x_{t_hi}``,
    ``x_CT = x_{t_lo}`` and ``x_CD = y + (t_lo - t_hi) v(y, t_hi)`` (one Euler step)."""
    y = process.interpolate(data, noise, t_hi)
    x_ct = process.interpolate(data, noise, t_lo)
    x_cd = y + (t_lo - t_hi)[:, None] * velocity(y, t_hi)
    return _by_rows(model, y, t_hi), _by_rows(model, x_ct, t_lo), _by_rows(model, x_cd, t_lo)


@torch.no_grad()
def discrete_terms(
    model: Model,
    data: Tensor,
    noise: Tensor,
    index: Tensor,
    n_intervals: int,
    process: Process | str,
    target: GaussianMixture,
    distance: str | Distance = "squared_l2",
    *,
    velocity: Callable[..., Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample ``D_CT`` and ``D_CD`` ``(B,)`` on interval ``index`` ``(B,)`` of the grid.

    ``D(f(x_teacher, t_i), f(x_{t_{i+1}}, t_{i+1}))`` on the equally spaced ``n_intervals`` grid,
    CT teacher ``x_{t_i}``, CD teacher one Euler step of ``velocity`` (default: the exact one of
    ``target``). These are the terms :func:`loss_gaps` averages (unweighted).
    """
    process = get_process(process)
    (n,) = _check_ns([n_intervals])
    if index.shape != (data.shape[0],) or bool((index < 0).any()) or bool((index >= n).any()):
        raise ValueError(f"index must be (B,) integers in [0, {n}), one per row of data")
    dist = _distances([distance], target.dim)[0]
    grid = _grid(n, process).to(data.dtype)
    t_lo, t_hi = grid[index], grid[index + 1]
    vel = _resolve_velocity(target, process, velocity)
    b, a_ct, a_cd = _student_and_teachers(model, data, noise, t_lo, t_hi, process, vel)
    return dist(a_ct, b), dist(a_cd, b)


@dataclass(frozen=True)
class GapResult:
    """Scaled loss gap at one ``N`` for one distance (module docstring, section 2).

    ``scaled_gap`` = ``N^alpha (L_CT - L_CD)``; ``limit`` = ``C T^(alpha-1) R(theta)`` estimated on
    the same draws (continuous ``t``, the difference form by JVP); ``ratio`` = their paired ratio
    (1 in the limit); ``loss_ct``, ``loss_cd`` = the unscaled losses.
    """

    distance: str
    alpha: float
    C: float
    n_intervals: int
    scaled_gap: Interval
    limit: Interval
    ratio: Interval
    loss_ct: Interval
    loss_cd: Interval

    def as_dict(self) -> dict:
        out = {"distance": self.distance, "alpha": self.alpha, "C": self.C, "N": self.n_intervals}
        for key in ("scaled_gap", "limit", "ratio", "loss_ct", "loss_cd"):
            out[key] = getattr(self, key).as_dict()
        return out


@torch.no_grad()
def loss_gaps(
    model: Model,
    target: GaussianMixture,
    process: Process | str,
    n_intervals: Sequence[int],
    distances: Sequence[str | Distance] = ("squared_l2", "pseudo_huber", "l2_norm"),
    *,
    n_samples: int = 20_000,
    batch_size: int = 20_000,
    weight: Weight | None = None,
    log_fraction: float = 0.5,
    velocity: Callable[..., Tensor] | None = None,
    time_derivative: str = "fd",
    fd_rel_step: float = 1e-3,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> list[GapResult]:
    """``N^alpha (L_CT(N) - L_CD(N))`` for every ``N`` and distance, against ``C T^(alpha-1) R``.

    One set of draws ``(u, data, noise)`` serves everything: ``t = F^{-1}(u) ~ q`` (stratified),
    the limit's integrand at ``(x_t, t)`` (difference form, ``lambda(t) / q(t)`` weights), and
    for each ``N`` the interval ``i`` containing ``t`` (so ``i ~ p_i = F(t_{i+1}) - F(t_i)``,
    weight ``lambda(t_{i+1}) / (N p_i)``), where CT and CD (one Euler step of ``velocity``,
    default the exact ``TrueVelocity``) are evaluated on the same pair. Returns one
    :class:`GapResult` per ``(N, distance)``, ``N`` major.
    """
    process = get_process(process)
    ns = _check_ns(n_intervals)
    dists = _distances(distances, target.dim)
    vel = _resolve_velocity(target, process, velocity)
    gmm = target.to(dtype=dtype)
    span = process.t_max - process.t_min
    probs = {n: interval_probs(n, process, log_fraction) for n in ns}
    alphas = sorted({dist.alpha for dist in dists})
    keys = [(n, k) for n in ns for k in range(len(dists))]
    acc: dict[tuple[int, int], dict[str, list[Tensor]]] = {
        key: {"gap": [], "ct": [], "cd": []} for key in keys
    }
    lim: dict[float, list[Tensor]] = {a: [] for a in alphas}
    chunks = _chunks(n_samples, batch_size)
    u_all = stratified_uniforms(n_samples, generator)
    kw = {"time_derivative": time_derivative, "fd_rel_step": fd_rel_step}
    for start, stop in chunks:
        t, q = sample_times(u_all[start:stop], process, log_fraction, dtype)
        data = gmm.sample(stop - start, generator)
        noise = torch.randn(data.shape, generator=generator, dtype=dtype)
        x = process.interpolate(data, noise, t)
        v = vel(x, t)
        d_ct, d_cd = _path_derivatives(
            model, x, t, (process.xdot(data, noise, t), v), process, **kw
        )
        w_t = _weight(weight, t) / q
        for a in alphas:
            diff = d_ct.norm(dim=1) ** a - d_cd.norm(dim=1) ** a
            lim[a].append(span ** (a - 1.0) * w_t * diff)
        for n in ns:
            t_lo, t_hi, y, x_ct, xdot, w_idx = _grid_points(data, noise, t, n, process, probs[n])
            w = w_idx * _weight(weight, t_hi)
            b, a_ct, a_cd = _student_and_teachers(model, data, noise, t_lo, t_hi, process, vel)
            for k, dist in enumerate(dists):
                d_ct_k, d_cd_k = dist(a_ct, b), dist(a_cd, b)
                slot = acc[(n, k)]
                slot["gap"].append(n**dist.alpha * w * (d_ct_k - d_cd_k))
                slot["ct"].append(w * d_ct_k)
                slot["cd"].append(w * d_cd_k)
    limits = {a: torch.cat(vals) for a, vals in lim.items()}
    return [_gap_result(dists[k], n, acc[(n, k)], limits) for n, k in keys]


def _gap_result(dist: Distance, n: int, slot: dict, limits: dict[float, Tensor]) -> GapResult:
    """Intervals of one ``(N, distance)`` from its per-sample values (stratified draws)."""
    vals = {name: torch.cat(v) for name, v in slot.items()}
    limit = dist.C * limits[dist.alpha]
    return GapResult(
        distance=dist.name,
        alpha=dist.alpha,
        C=dist.C,
        n_intervals=n,
        scaled_gap=Interval.from_samples(vals["gap"], "stratified"),
        limit=Interval.from_samples(limit, "stratified"),
        ratio=paired_ratio(vals["gap"], limit, True),
        loss_ct=Interval.from_samples(vals["ct"], "stratified"),
        loss_cd=Interval.from_samples(vals["cd"], "stratified"),
    )


@dataclass(frozen=True)
class GradientGapResult:
    """Scaled gradient gap at one ``N`` for one distance (module docstring, section 2).

    Norms over all parameters: ``grad_cd`` = ``||N^(alpha-1) grad L_CD||``, ``gap`` =
    ``||N^(alpha-1) (grad L_CT - grad L_CD)||`` (plain Monte Carlo); ``relative`` = gap / grad_cd;
    ``noise`` = the Monte-Carlo noise floor of ``relative`` (from ``n_groups`` independent groups:
    ``sqrt(sum_g ||G_g - G||^2 / (n_groups (n_groups - 1)))``); ``relative_debiased`` =
    ``sqrt(max(0, mean_{g != h} <G_g, G_h>)) / grad_cd`` (the squared norm without its noise
    term); ``relative_cv`` / ``noise_cv``: the same with the zero-mean control variate (quadratic
    distances only, else None).
    """

    distance: str
    alpha: float
    n_intervals: int
    grad_cd: float
    gap: float
    relative: float
    noise: float
    relative_debiased: float
    relative_cv: float | None
    noise_cv: float | None
    relative_cv_debiased: float | None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["N"] = out.pop("n_intervals")
        return out


def _flat_grad(loss: Tensor, params: list[Tensor]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _group_stats(groups: list[Tensor]) -> tuple[float, float, float]:
    """Norm of the mean, noise floor of that norm, and the debiased norm, over group vectors."""
    g = torch.stack(groups)
    r = g.shape[0]
    mean = g.mean(0)
    noise2 = float(((g - mean) ** 2).sum()) / (r * (r - 1))
    total = g.sum(0)
    cross = (float((total * total).sum()) - float((g * g).sum())) / (r * (r - 1))
    return float(mean.norm()), math.sqrt(noise2), math.sqrt(max(cross, 0.0))


def gradient_gaps(
    model: nn.Module,
    target: GaussianMixture,
    process: Process | str,
    n_intervals: Sequence[int],
    distances: Sequence[str | Distance] = ("squared_l2", "pseudo_huber", "l2_norm"),
    *,
    n_samples: int = 40_000,
    n_groups: int = 8,
    weight: Weight | None = None,
    log_fraction: float = 0.5,
    velocity: Callable[..., Tensor] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> list[GradientGapResult]:
    """Scaled gradient gaps ``||N^(alpha-1) (grad L_CT - grad L_CD)|| / ||N^(alpha-1) grad L_CD||``.

    Gradients over ``model.parameters()`` with the teacher under stop-gradient; ``n_samples``
    draws split into ``n_groups`` independent groups (each group: one gradient per loss); the
    same draws for both losses, every ``N`` and every distance. ``N^(alpha-1)`` cancels in the
    ratio; the norms are reported scaled.
    """
    process = get_process(process)
    ns = _check_ns(n_intervals)
    dists = _distances(distances, target.dim)
    vel = _resolve_velocity(target, process, velocity)
    checks.integer(n_groups, "n_groups", lo=2)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    gmm = target.to(dtype=dtype)
    checks.integer(n_samples, "n_samples", lo=2 * n_groups, fix="use an integer >= 2 n_groups")
    per_group = [2 * (int(n_samples) // (2 * n_groups))] * n_groups
    keys = [(n, k) for n in ns for k in range(len(dists))]
    acc = {key: {"cd": [], "gap": [], "cv": []} for key in keys}
    probs = {n: interval_probs(n, process, log_fraction) for n in ns}
    for m in per_group:
        t, _ = sample_times(stratified_uniforms(m, generator), process, log_fraction, dtype)
        data = gmm.sample(m, generator)
        noise = torch.randn(data.shape, generator=generator, dtype=dtype)
        for n in ns:
            t_lo, t_hi, y, x_ct, xdot, w_idx = _grid_points(data, noise, t, n, process, probs[n])
            w = w_idx * _weight(weight, t_hi)
            with torch.no_grad():
                v = vel(y, t_hi)
                x_cd = y + (t_lo - t_hi)[:, None] * v
                a_ct, a_cd = model(x_ct, t_lo), model(x_cd, t_lo)  # teachers: stop-gradient
                h = (t_hi - t_lo)[:, None]
                delta1 = h * jacobian_vector_product(model, x_cd, t_lo, xdot - v)
            b = model(y, t_hi)
            for k, dist in enumerate(dists):
                scale = float(n) ** (dist.alpha - 1.0)
                loss_ct = (w * dist(a_ct, b)).mean()
                loss_cd = (w * dist(a_cd, b)).mean()
                g_ct, g_cd = _flat_grad(loss_ct, params), _flat_grad(loss_cd, params)
                slot = acc[(n, k)]
                slot["cd"].append(scale * g_cd)
                slot["gap"].append(scale * (g_ct - g_cd))
                if _is_quadratic(dist):
                    cv = (w * (dist(a_ct, b) - dist(a_ct + delta1, b))).mean()
                    slot["cv"].append(scale * (g_ct - g_cd - _flat_grad(cv, params)))
            del b
    return [_gradient_result(dists[k], n, acc[(n, k)]) for n, k in keys]


def _gradient_result(dist: Distance, n: int, slot: dict) -> GradientGapResult:
    """Norms and noise floors of one ``(N, distance)`` from its group gradients."""
    cd_norm, _, _ = _group_stats(slot["cd"])
    gap_norm, gap_noise, gap_deb = _group_stats(slot["gap"])
    if slot["cv"]:
        cv_norm, cv_noise, cv_deb = _group_stats(slot["cv"])
        rel_cv, noise_cv, deb_cv = cv_norm / cd_norm, cv_noise / cd_norm, cv_deb / cd_norm
    else:
        rel_cv = noise_cv = deb_cv = None
    return GradientGapResult(
        distance=dist.name,
        alpha=dist.alpha,
        n_intervals=n,
        grad_cd=cd_norm,
        gap=gap_norm,
        relative=gap_norm / cd_norm,
        noise=gap_noise / cd_norm,
        relative_debiased=gap_deb / cd_norm,
        relative_cv=rel_cv,
        noise_cv=noise_cv,
        relative_cv_debiased=deb_cv,
    )


# ------------------------------------------------------------------------------------------------
# The proxy R~_t
# ------------------------------------------------------------------------------------------------
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

    Exact given ``x_t`` (the mixture's posterior covariance); Monte Carlo over ``x_t`` only.
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
            raise ValueError("kind='gc' needs gc_model(x_t, t) -> data estimate")
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
        raise ValueError(f"k must be >= d + 2 = {d + 2} for local-linear regression, got {k}")
    if n < k + 2:
        raise ValueError(f"need more than k + 1 = {k + 1} samples, got {n}")
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


# ------------------------------------------------------------------------------------------------
# The exact flow map
# ------------------------------------------------------------------------------------------------
FLOW_MAP_METHODS = ("ode", "multistep")


class FlowMapGenerator(nn.Module):
    """The ideal GC generator ``x_t -> flow_map(x_t, t)``, the exact PF-ODE map down to ``t_min``.

    ``forward(x (B, d), t (B,) or float) -> (B, d)`` in the dtype of ``x``; no parameters, no
    gradient. Two solvers:

    - ``method="ode"`` (default): ``GaussianMixture.flow_map``, adaptive dopri5 in float64 at
      ``rtol`` / ``atol``; the reference. All rows share the adaptive steps, so rows started at
      many different times (a training batch) cost many steps.
    - ``method="multistep"``: :func:`multistep_flow_map` with ``steps`` steps per row, a fixed
      cost (``steps`` posterior means of the batch). Its mean squared error against the ODE at
      ``rtol = 1e-10`` on the authors' 2D target is below 3e-7 at 32 steps and 5e-8 at 64
      (tests/test_discrepancy.py).
    """

    def __init__(
        self,
        target: GaussianMixture,
        process: Process | str,
        *,
        rtol: float = 1e-6,
        atol: float = 1e-8,
        method: str = "ode",
        steps: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(target, GaussianMixture):
            raise ValueError("target must be a gcflows.gmm.GaussianMixture")
        checks.real(rtol, "rtol", lo_open=0.0, hi_open=1.0, where="FlowMapGenerator")
        checks.real(atol, "atol", lo_open=0.0, hi_open=1.0, where="FlowMapGenerator")
        self.method = checks.choice(method, "method", FLOW_MAP_METHODS, where="FlowMapGenerator")
        self.steps = checks.integer(steps, "steps", lo=1, where="FlowMapGenerator")
        self.target = target
        self.process = get_process(process)
        self.rtol, self.atol = float(rtol), float(atol)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        if self.method == "multistep":
            return multistep_flow_map(self.target, x, t, self.process, self.steps)
        return self.target.flow_map(x, t, self.process, rtol=self.rtol, atol=self.atol)


def _time_of_noise_level(process: Process, sigma: Tensor) -> Tensor:
    """``t`` with ``b(t) / a(t) = sigma``: closed form for ``ve`` (``t = sigma``) and ``linear``
    (``t = sigma / (1 + sigma)``), else bisection on ``[t_min, t_max]`` (float64 resolution)."""
    if process.name == "ve":
        return sigma.clone()
    if process.name == "linear":
        return sigma / (1.0 + sigma)
    lo, hi = torch.full_like(sigma, process.t_min), torch.full_like(sigma, process.t_max)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        above = process.b(mid) / process.a(mid) > sigma
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return 0.5 * (lo + hi)


# the largest precomputed schedule of _scheduled_denoiser, in float64 elements (128 MiB)
_SCHEDULE_ELEMENTS = 1 << 24


def _scheduled_denoiser(
    mix: GaussianMixture, a: Tensor, b: Tensor
) -> Callable[[int, Tensor], Tensor] | None:
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


@torch.no_grad()
def multistep_flow_map(
    target: GaussianMixture, x: Tensor, t: Tensor | float, process: Process | str, steps: int = 64
) -> Tensor:
    """The PF-ODE flow map to ``t_min`` by a second-order multistep exponential integrator.

    In the log noise level ``lam = -log(b / a)`` the PF-ODE is linear in ``x`` up to the posterior
    mean ``D(x, s) = E[data | x_s = x]``; with ``D`` held at the extrapolation
    ``1.5 D_k - 0.5 D_{k-1}`` over a step (DPM-Solver++(2M), Lu et al. 2022, arXiv:2211.01095,
    with equal steps in ``lam``) the step is exact for that ``D``::

        x_{k+1} = (b_{k+1} / b_k) x_k + (a_{k+1} - b_{k+1} a_k / b_k) D_hat_k.

    Every row takes ``steps`` equal steps in ``lam`` from its own ``t`` to ``t_min`` (the first
    with ``D_0``), so the cost is ``steps`` evaluations of ``D`` on the whole batch, whatever the
    spread of start times. Shapes ``x (B, d)``, ``t`` float or ``(B,)``; float64 inside, output in
    the dtype of ``x``.
    """
    process = get_process(process)
    steps = checks.integer(steps, "steps", lo=1, where="multistep_flow_map")
    x64 = x.detach().to(torch.float64)
    t64 = batch_times(t, x.shape[0], x64)
    mix = target.to(dtype=torch.float64, device=x64.device)
    # The whole schedule at once, (steps + 1, B): row k holds the times of step k (row 0 the start
    # times, the last row t_min), so the loop below only evaluates D and combines.
    tm = torch.full_like(t64, process.t_min)
    s_start, s_end = process.b(t64) / process.a(t64), process.b(tm) / process.a(tm)
    frac = torch.arange(1, steps, dtype=torch.float64, device=x64.device)[:, None] / steps
    levels = s_start * (s_end / s_start) ** frac  # (steps - 1, B)
    times = torch.cat([t64[None], _time_of_noise_level(process, levels), tm[None]])
    a, b = process.a(times), process.b(times)
    keep = (b[1:] / b[:-1])[:, :, None]  # (steps, B, 1)
    gain = (a[1:] - b[1:] * a[:-1] / b[:-1])[:, :, None]
    denoise = _scheduled_denoiser(mix, a[:-1], b[:-1])
    prev_d = None
    for k in range(steps):
        d = mix.denoiser(x64, times[k], process) if denoise is None else denoise(k, x64)
        d_hat = d if prev_d is None else 1.5 * d - 0.5 * prev_d
        x64 = keep[k] * x64 + gain[k] * d_hat
        prev_d = d
    return x64.to(x.dtype)


@torch.no_grad()
def flow_map_reference(
    target: GaussianMixture,
    process: Process | str,
    times: Sequence[float],
    n_per_time: int,
    *,
    generator: torch.Generator | None = None,
    rtol: float = 1e-8,
    atol: float = 1e-10,
) -> dict[str, Tensor]:
    """A fixed evaluation set: ``x_t`` (IC) at each time and its exact flow map to ``t_min``.

    Returns ``{"t": (T * n,), "x": (T * n, d), "target": (T * n, d), "times": (T,)}`` (float64),
    one solve for all rows.
    """
    process = get_process(process)
    times_t = torch.as_tensor([float(s) for s in times], dtype=torch.float64)
    if times_t.numel() < 1:
        raise ValueError("times must hold at least one time")
    process.check_time(times_t, "times")
    checks.integer(n_per_time, "n_per_time", lo=1)
    gmm = target.to(dtype=torch.float64)
    n = int(n_per_time)
    t = times_t.repeat_interleave(n)
    data = gmm.sample(t.numel(), generator)
    noise = torch.randn(data.shape, generator=generator, dtype=torch.float64)
    x = process.interpolate(data, noise, t)
    out = gmm.flow_map(x, t, process, rtol=rtol, atol=atol)
    return {"t": t, "x": x, "target": out, "times": times_t}


@torch.no_grad()
def flow_map_error(model: Model, reference: dict[str, Tensor]) -> dict[str, list[float]]:
    """``E||f(x_t, t) - flow_map(x_t, t)||^2`` per reference time, with standard errors.

    ``model`` is evaluated in the dtype of its parameters when it has any (else float64).
    Returns ``{"times": [...], "mse": [...], "se": [...]}``.
    """
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    dtype = params[0].dtype if params else torch.float64
    device = params[0].device if params else torch.device("cpu")
    x = reference["x"].to(device=device, dtype=dtype)
    t = reference["t"].to(device=device, dtype=dtype)
    pred = model(x, t).double().cpu()
    err = ((pred - reference["target"]) ** 2).sum(1)
    times = reference["times"]
    n = err.numel() // times.numel()
    err = err.reshape(times.numel(), n)
    se = err.std(1, unbiased=True) / math.sqrt(n) if n > 1 else torch.zeros(times.numel())
    return {
        "times": [float(s) for s in times],
        "mse": [float(e) for e in err.mean(1)],
        "se": [float(s) for s in se],
    }
