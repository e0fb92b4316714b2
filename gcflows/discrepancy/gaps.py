"""Theorem 1's discrete losses, the scaled loss gap and the gradient gap (docs/paper.md section 3):
:func:`loss_gaps`, :func:`gradient_gaps`.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from gcflows import checks
from gcflows.consistency import Distance, get_distance
from gcflows.discrepancy.derivatives import _by_rows, _path_derivatives, jacobian_vector_product
from gcflows.discrepancy.theorem1 import _chunks, _resolve_velocity
from gcflows.discrepancy.times import (
    Model,
    Weight,
    _grid,
    _weight,
    grid_interval,
    interval_probs,
    sample_times,
    stratified_uniforms,
)
from gcflows.gmm import GaussianMixture
from gcflows.processes import Process, get_process
from gcflows.stats import Interval, paired_ratio


def _distances(distances: Sequence[str | Distance], dim: int) -> list[Distance]:
    out = []
    for d in distances:
        dist = get_distance(d, dim)
        if not dist.radial:
            fix = (
                "it is not a function of ||a - b||; Theorem 1 needs phi(||a - b||) (use "
                "squared_l2, pseudo_huber or l2_norm)"
            )
            raise checks.bad("distance", dist.name, fix)
        out.append(dist)
    if not out:
        raise checks.bad("distances", distances, "name at least one distance")
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
    fix = f"use (B,) = ({data.shape[0]},) integers in [0, {n}), one per row of data"
    if index.shape != (data.shape[0],):
        raise checks.bad_tensor(index, "index", fix)
    if bool((index < 0).any()) or bool((index >= n).any()):
        raise checks.bad("(index.min(), index.max())", (int(index.min()), int(index.max())), fix)
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
        fix = "pass a model with trainable parameters (requires_grad=True)"
        raise checks.bad("len(trainable parameters of model)", 0, fix)
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
