"""Theorem 1's limit ``R(theta)`` (docs/paper.md section 3, Eq. 11): :func:`r_theta`.

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

Time sampling: :mod:`gcflows.discrepancy.times`; derivatives:
:mod:`gcflows.discrepancy.derivatives`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gcflows import checks
from gcflows.consistency import Distance
from gcflows.discrepancy.derivatives import (
    _jacobian_products,
    _path_derivatives,
    jacobian_vector_product,
)
from gcflows.discrepancy.times import Model, Weight, _weight, sample_times, stratified_uniforms
from gcflows.gmm import GaussianMixture
from gcflows.processes import Process, get_process
from gcflows.stats import Interval
from gcflows.velocity import TrueVelocity


def _check_alpha(alpha: float) -> float:
    return checks.real(alpha, "alpha", lo=1.0, fix="use a number >= 1 (Theorem 1)")


def _resolve_velocity(target: GaussianMixture, process: Process, velocity):
    if velocity is None:
        return TrueVelocity(target, process)
    if not callable(velocity):
        fix = "use a callable velocity(x_t, t) -> v"
        raise checks.bad("type(velocity)", type(velocity).__name__, fix)
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
            fix = "form='posterior' needs target=, the GaussianMixture of the data"
            raise checks.bad("target", None, fix)
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
