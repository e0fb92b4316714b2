"""Lemma 1 (docs/paper.md Eq. 20), written for any affine process. With
``w_t = noise - E[noise | x_t]`` and ``J = d fo / dx (x_t, t)``,

      c'(t) = -2 g(t) E < J w_t, w_t >,     g(t) = b'(t) - a'(t) b(t) / a(t)

Derivation: ``fo`` is constant along PF-ODE paths, so ``d/dt fo(x_t, t) = J (xdot_t - v_t(x_t))``;
with ``x_t`` fixed, ``data - E[data | x_t] = -(b / a) w_t``, hence ``xdot_t - v_t = g w_t``. Then
``c' = 2 g E<fo - noise, J w_t>`` and, since ``E[w_t | x_t] = 0`` while ``fo`` and ``J`` are
functions of ``x_t``, ``E<fo, J w_t> = E<E[noise | x_t], J w_t> = 0`` and
``E<noise, J w_t> = E<w_t, J w_t>``.
``g = a d(b/a)/dt`` is the paper's ``s_dot`` in the VE-equivalent noise level ``sigma = b / a``:
``g = 1`` for ``ve`` (``s_t = t``) and ``g = 1 / (1 - t)`` for ``linear``.

- Corollary 1: at ``t_min`` the flow map is the identity (``J = I``), so
  ``c'(t_min) = -2 g E||w||^2 < 0`` whenever ``E||w_{t_min}||^2 > 0`` (data with a density; for
  Dirac data the noise is identified from ``x_t`` at small ``t``, ``w -> 0`` and ``c`` is flat
  there).
- Corollary 2: if the flow map acts as a scaling, ``J = (S0 / b(t)) I``, then
  ``c'(t) = -2 g (S0 / b(t)) E||w_t||^2 < 0``. For ``ve`` this is the paper's
  ``fo(x, s) = (s_0 / s) x``.
  What ``S0`` is: the flow map of Dirac data at the origin is exactly ``(b(t_min) / b(t)) x``, so
  the paper's literal ``s_0`` is ``b(t_min)`` (``= t_min``). For data with spread, the flow map
  from large ``t`` is asymptotically a scaling with a *larger* constant: for one Gaussian of
  per-coordinate variance ``s^2`` it is ``S0 = sqrt(a(t_min)^2 s^2 + b(t_min)^2)`` (the scale of the
  endpoint, not ``t_min``); for a mixture :func:`effective_s0` measures
  ``S0_eff(t) = b(t) E<J w, w> / E||w||^2`` (constant in ``t`` exactly in the scaling regime).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torchdiffeq import odeint

from gcflows import checks
from gcflows.checks import batch_times
from gcflows.gmm import GaussianMixture
from gcflows.processes import Process, get_process
from gcflows.stats import Interval
from gcflows.transport.costs import (
    _check_level,
    _check_positive_int,
    _row_sqnorm,
    _standard_noise,
    estimate,
)
from gcflows.transport.curves import _noised_pair
from gcflows.transport.gaussian import effective_sdot, gaussian_cost_derivative


# --- Lemma 1 --------------------------------------------------------------------------------------
def flow_map_jvp(
    mixture: GaussianMixture,
    x: Tensor,
    t: Tensor | float,
    process: Process | str,
    direction: Tensor,
    *,
    t_end: float | None = None,
    method: str = "tangent",
    fd_step: float = 1e-4,
    rtol: float = 1e-9,
    atol: float = 1e-11,
) -> tuple[Tensor, Tensor]:
    """Ideal flow map and its directional derivative: ``(fo(x, t), J u)``, ``J = d fo / dx``.

    x, direction: ``(B, d)``; t: float or ``(B,)``; float64 throughout.

    ``method="tangent"`` (default) integrates the variational equation next to the PF-ODE,
    ``dx/ds = v_s(x)``, ``dy/ds = (d v_s / dx)(x) y``, ``y(t) = u``, with ``d v / dx . y`` by
    forward-mode AD (``torch.autograd.forward_ad``) through ``GaussianMixture.velocity``, in one
    torchdiffeq dopri5 solve over log-time ``s(r) = t (t_end / t)^r`` (the substitution of
    ``GaussianMixture.flow_map``); the step control sees both ``x`` and ``y``, so ``J u`` is
    accurate to the solver tolerance. (Forward AD through ``GaussianMixture.flow_map`` itself is
    not possible: it detaches its input.)

    ``method="fd"`` is the cross-check: central differences
    ``(fo(x + h u) - fo(x - h u)) / (2 h)`` with ``h = fd_step * max(b(t), 1) / |u|`` per row, both
    evaluations in one ``flow_map`` solve, so they share the adaptive step sequence and the
    difference is that of one smooth discrete map (error ``O(h^2)`` plus the solver's).
    """
    process = get_process(process)
    if not isinstance(mixture, GaussianMixture):
        fix = "use a GaussianMixture (the ideal flow map's oracle)"
        raise checks.bad("type(mixture)", type(mixture).__name__, fix)
    if direction.shape != x.shape:
        raise checks.bad_tensor(direction, "direction", f"use the shape of x {tuple(x.shape)}")
    checks.finite(direction, "direction")
    x64 = x.detach().to(torch.float64)
    u64 = direction.detach().to(torch.float64)
    t64 = batch_times(t, x.shape[0], x64)
    process.check_time(t64)
    te = float(process.t_min if t_end is None else t_end)
    if method == "fd":
        scale = torch.clamp(process.b(t64), min=1.0) * fd_step
        norm = u64.norm(dim=1).clamp_min(1e-300)
        h = (scale / norm)[:, None]
        if t_end is not None:
            raise checks.bad("t_end", t_end, "method='fd' maps to process.t_min; pass t_end=None")
        both = mixture.flow_map(
            torch.cat([x64, x64 + h * u64, x64 - h * u64]),
            t64.repeat(3),
            process,
            rtol=rtol,
            atol=atol,
            method="segmented",
        )
        f0, fp, fm = both.chunk(3)
        return f0, (fp - fm) / (2 * h)
    if method != "tangent":
        raise checks.bad("method", method, "use 'tangent' or 'fd'")
    gm = mixture.to(dtype=torch.float64, device=x.device)
    log_t = torch.log(t64)
    span = math.log(te) - log_t
    d = x64.shape[1]

    def field(r: Tensor, state: Tensor) -> Tensor:
        # torchdiffeq's initial-step probe may evaluate past r = 1: keep s inside the domain
        s = torch.exp(log_t + r * span).clamp(process.t_min, process.t_max)
        xs, ys = state[:, :d], state[:, d:]
        with fwAD.dual_level():
            v = gm.velocity(fwAD.make_dual(xs, ys), s, process)
            v, jv = fwAD.unpack_dual(v)
        rate = (s * span)[:, None]
        return torch.cat([v * rate, jv * rate], dim=1)

    grid = torch.tensor([0.0, 1.0], dtype=torch.float64, device=x.device)
    # cap the step as the segmented flow map does: at most 1 / segments of log-time per step, with
    # segments = 2 per decade of the largest start time's span
    decades = float((span.abs() / math.log(10)).max())
    segments = max(1, math.ceil(2 * decades))
    step_t = torch.linspace(0.0, 1.0, segments + 1, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        out = odeint(
            field,
            torch.cat([x64, u64], dim=1),
            grid,
            rtol=rtol,
            atol=atol,
            options={"step_t": step_t},
        )[-1]
    return out[:, :d], out[:, d:]


@dataclass(frozen=True)
class Lemma1Result:
    """Both sides of Lemma 1 on a time grid, measured on the same pairs (docs/paper.md Eq. 20).

    Per time ``t_i``: ``fd`` is the finite-difference slope of the measured curve,
    ``(|fo(x_hi, t_hi) - noise|^2 - |fo(x_lo, t_lo) - noise|^2) / (t_hi - t_lo)`` per pair with
    ``t_lo, t_hi = t (1 -/+ h_rel)`` clipped to the domain (central where possible); ``lemma`` is
    ``-2 g(t) <J w, w>`` per pair; ``diff = fd - lemma`` (paired); ``w2 = |w|^2`` and
    ``jww = <J w, w>``; ``s0`` is Corollary 2's ``S0_eff = b(t) E<J w, w> / E|w|^2`` with a
    delta-method interval (influence ``b (jww_i - S0_eff w2_i / b) / E|w|^2``).
    ``exact`` holds the closed-form ``c'(t)`` when one is known (one Gaussian), else None.
    """

    times: Tensor
    t_lo: Tensor
    t_hi: Tensor
    g: Tensor
    fd: tuple[Interval, ...]
    lemma: tuple[Interval, ...]
    diff: tuple[Interval, ...]
    w2: tuple[Interval, ...]
    jww: tuple[Interval, ...]
    s0: tuple[Interval, ...]
    process: str
    jvp: str
    exact: Tensor | None = None
    label: str = ""
    info: dict = field(default_factory=dict)

    def agree(self) -> Tensor:
        """``(T,)`` bool: the paired interval of ``fd - lemma`` contains 0."""
        return torch.tensor([d.lo <= 0.0 <= d.hi for d in self.diff])

    def as_dict(self) -> dict:
        out = {
            "label": self.label,
            "process": self.process,
            "jvp": self.jvp,
            "times": self.times.tolist(),
            "t_lo": self.t_lo.tolist(),
            "t_hi": self.t_hi.tolist(),
            "g": self.g.tolist(),
            "fd": [e.as_dict() for e in self.fd],
            "lemma": [e.as_dict() for e in self.lemma],
            "diff": [e.as_dict() for e in self.diff],
            "w2": [e.as_dict() for e in self.w2],
            "jww": [e.as_dict() for e in self.jww],
            "s0_eff": [e.as_dict() for e in self.s0],
            "agree": self.agree().tolist(),
            "info": self.info,
        }
        if self.exact is not None:
            out["exact"] = self.exact.tolist()
        return out


def lemma1_check(
    mixture: GaussianMixture,
    process: Process | str,
    times: Tensor | Sequence[float],
    n: int,
    generator: torch.Generator | None = None,
    *,
    h_rel: float = 1e-2,
    jvp: str = "tangent",
    rtol: float = 1e-9,
    atol: float = 1e-11,
    level: float = 0.95,
    label: str = "",
) -> Lemma1Result:
    """Measure both sides of Lemma 1 for the ideal flow map of ``mixture`` (float64).

    ``n`` pairs are drawn once (data, then noise) and reused at every time (common random numbers),
    so the finite-difference quotient is a per-pair slope. The left side uses two flow-map solves
    per time (at ``t_lo`` and ``t_hi``, all rows of all times in one solve); the right side uses
    ``w = noise - E[noise | x_t]`` (``GaussianMixture.expected_noise``) and ``J w`` from
    :func:`flow_map_jvp` (``jvp="tangent"`` or ``"fd"``). The finite-difference bias is
    ``O(h_rel^2 t^2 c''')``; the default ``h_rel = 1e-2`` keeps it far below the sampling error.

    For one component with isotropic or diagonal std, ``exact`` is the closed form
    :func:`gaussian_cost_derivative` (``J = diag(k)``, see there).
    """
    process = get_process(process)
    level = _check_level(level)
    n = _check_positive_int(n, "n", 2)
    checks.real(h_rel, "h_rel", lo_open=0.0, hi_open=0.5)
    if not isinstance(mixture, GaussianMixture):
        fix = "use a GaussianMixture (Lemma 1 needs the exact flow map)"
        raise checks.bad("type(mixture)", type(mixture).__name__, fix)
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    if times.numel() == 0:
        raise checks.bad_tensor(times, "times", "it is empty; pass at least one time")
    process.check_time(times, "times")
    mix = mixture.to(dtype=torch.float64)
    data = mix.sample(n, generator=generator)
    noise = _standard_noise(data, generator)
    n_t = times.numel()
    t_lo = torch.clamp(times * (1 - h_rel), min=process.t_min)
    t_hi = torch.clamp(times * (1 + h_rel), max=process.t_max)
    data_r, noise_r = data.repeat(n_t, 1), noise.repeat(n_t, 1)
    lo_all, hi_all = t_lo.repeat_interleave(n), t_hi.repeat_interleave(n)
    t_all = times.repeat_interleave(n)
    x_lo, x_hi, _ = _noised_pair(data_r, noise_r, lo_all, hi_all, process)
    x_t, _, _ = _noised_pair(data_r, noise_r, t_all, t_all, process)
    w = noise_r - mix.expected_noise(x_t, t_all, process)
    tol = {"rtol": rtol, "atol": atol}
    f_lo, f_hi, jw = _lemma1_solves(
        mix, process, (x_lo, lo_all), (x_hi, hi_all), (x_t, t_all), w, n, jvp, tol
    )
    slope = (_row_sqnorm(f_hi - noise_r) - _row_sqnorm(f_lo - noise_r)) / (hi_all - lo_all)
    jww = (jw * w).sum(1)
    g = effective_sdot(process, times)
    lemma_rows = -2.0 * g.repeat_interleave(n) * jww
    w2 = (w * w).sum(1)

    def per_t(v: Tensor) -> tuple[Interval, ...]:
        v = v.reshape(n_t, n)
        return tuple(estimate(v[i], level) for i in range(n_t))

    s0 = _s0_estimates(process.b(times), jww.reshape(n_t, n), w2.reshape(n_t, n), level)
    exact = None
    if mix.n_components == 1 and mix.stds is not None:
        exact = gaussian_cost_derivative(times, process, mix.means[0], mix.stds[0])
    return Lemma1Result(
        times=times,
        t_lo=t_lo,
        t_hi=t_hi,
        g=g,
        fd=per_t(slope),
        lemma=per_t(lemma_rows),
        diff=per_t(slope - lemma_rows),
        w2=per_t(w2),
        jww=per_t(jww),
        s0=tuple(s0),
        process=process.name,
        jvp=jvp,
        exact=exact,
        label=label,
        info={"n": n, "h_rel": h_rel, "rtol": rtol, "atol": atol, "level": level},
    )


def _lemma1_solves(mix, process, lo, hi, mid, w, n: int, jvp: str, tol: dict):
    """``fo`` at ``(x_lo, t_lo)`` and ``(x_hi, t_hi)``, and ``J w`` at ``(x_t, t)``: one flow-map
    solve per time (see ``_per_time``), its ``t_lo`` and ``t_hi`` rows together."""
    (x_lo, lo_all), (x_hi, hi_all), (x_t, t_all) = lo, hi, mid
    f_lo, f_hi, jw = [], [], []
    for start in range(0, x_t.shape[0], n):
        rows = slice(start, start + n)
        xs = torch.cat([x_lo[rows], x_hi[rows]])
        ends = mix.flow_map(
            xs, torch.cat([lo_all[rows], hi_all[rows]]), process, **tol, method="segmented"
        )
        f_lo.append(ends[:n])
        f_hi.append(ends[n:])
        j = flow_map_jvp(mix, x_t[rows], t_all[rows], process, w[rows], method=jvp, **tol)
        jw.append(j[1])
    return torch.cat(f_lo), torch.cat(f_hi), torch.cat(jw)


def _s0_estimates(b_t: Tensor, jww: Tensor, w2: Tensor, level: float) -> tuple[Interval, ...]:
    """Corollary 2's ``S0_eff = b E<J w, w> / E|w|^2`` per time (rows of ``jww``, ``w2``
    ``(T, n)``) with a delta-method Student-t interval (influence
    ``b (jww_i - S0_eff w2_i / b) / E|w|^2``)."""
    out = []
    for i in range(jww.shape[0]):
        w2_mean = w2[i].mean().clamp_min(1e-300)
        ratio = float(b_t[i] * jww[i].mean() / w2_mean)
        influence = b_t[i] * (jww[i] - ratio / b_t[i] * w2[i]) / w2_mean
        out.append(Interval(ratio, estimate(influence, level).se, jww.shape[1], "delta-t", level))
    return tuple(out)


def effective_s0(result: Lemma1Result) -> Tensor:
    """``S0_eff(t) = b(t) E<J w, w> / E||w||^2`` per time ``(T,)``: the constant ``S0`` for which
    the scaling ``J = (S0 / b(t)) I`` reproduces the measured ``E<J w, w>`` (Corollary 2).
    Constant in ``t`` exactly in the scaling regime; compare with the paper's literal
    ``s_0 = b(t_min)``. Intervals: ``result.s0``."""
    return torch.tensor([e.mean for e in result.s0], dtype=torch.float64)


def corollary2_prediction(result: Lemma1Result, s0: float) -> tuple[Interval, ...]:
    """Corollary 2's ``c'(t) = -2 g(t) (S0 / b(t)) E||w_t||^2`` per time, with the interval of
    ``E||w_t||^2`` scaled (``S0`` is taken as exact)."""
    process = get_process(result.process)
    factor = -2.0 * result.g * s0 / process.b(result.times)
    out = []
    for k, e in zip(factor.tolist(), result.w2, strict=True):
        out.append(e.scaled(k))
    return tuple(out)
