"""Sampling: one-step and multistep consistency sampling; Euler / Heun ODE sampling of a velocity.

Time runs from data (``t_min``) to noise (``t_max``); a batch is ``(B, *dims)``.

- :func:`one_step_sample`: ``f(x_T, T)`` with ``x_T = b(T) noise`` (docs/paper.md section 5:
  ``f(80 z, 80)`` for ``ve``). The terminal marginal ``a(T) data + b(T) noise`` is approximated by
  dropping the data term: for ``ve`` it is the data itself against a noise of std 80, for
  ``linear`` it is ``(1 - t_max) data`` (0.001 data by default).
- :func:`multistep_sample` (Song et al. 2023, Algorithm 1, generalised to affine processes): after
  the first step, each later time ``s`` re-noises the current estimate ``x`` of ``x_{t_min}`` to
  ``x_s = (a(s) / a(t_min)) x + sqrt(b(s)^2 - (a(s) b(t_min) / a(t_min))^2) z`` (for ``ve``:
  ``x + sqrt(s^2 - t_min^2) z``), which has the law of ``x_s`` when ``x`` has the law of
  ``x_{t_min}``, then applies ``f(x_s, s)``.
- :func:`ode_sample`: integrates ``dx/dt = v(x, t)`` along a grid with Euler or Heun steps
  (``gcflows.velocity.euler_step`` / ``heun_step``), for any velocity estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gcflows import velocity as velocity_mod
from gcflows.checks import bad, bad_tensor, batch, choice, finite
from gcflows.processes import Process, expand_time, get_process

__all__ = ["one_step_sample", "multistep_sample", "ode_sample", "check_sigmas"]

ODE_METHODS = ("euler", "heun")


def _check_noise(noise: Tensor, name: str = "noise") -> Tensor:
    return finite(batch(noise, name), name)


def _time_list(values: Sequence[float] | Tensor, name: str) -> list[float]:
    """A 1-D tensor or sequence of times as a list of finite floats, else ``ValueError``."""
    if torch.is_tensor(values):
        if values.dim() != 1:
            raise bad_tensor(values, name, "use a 1-D list of times")
        out = [float(s) for s in values.detach().cpu().tolist()]
    else:
        try:
            out = [float(s) for s in values]
        except (TypeError, ValueError):
            raise bad(name, values, "use a sequence of floats") from None
    if not all(math.isfinite(s) for s in out):
        raise bad(name, out, "use finite times")
    return out


def _times(value: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(value), dtype=x.dtype, device=x.device)


def check_sigmas(sigmas: Sequence[float] | Tensor, process: Process | str) -> list[float]:
    """Validate a multistep schedule: non-empty, finite, strictly decreasing, in the domain.

    Returns the times as a list of floats. Raise ``ValueError`` naming the fix otherwise.
    """
    process = get_process(process)
    values = _time_list(sigmas, "sigmas")
    if not values:
        raise bad("sigmas", values, "use at least one time (e.g. [process.t_max])")
    if any(b >= a for a, b in zip(values, values[1:], strict=False)):
        raise bad("sigmas", values, "use strictly decreasing times (noise towards data)")
    process.check_time(torch.tensor(values, dtype=torch.float64), "sigmas")
    return values


@torch.no_grad()
def one_step_sample(
    model: Callable[[Tensor, Tensor], Tensor], noise: Tensor, process: Process | str
) -> Tensor:
    """``f(b(T) noise, T)`` with ``T = process.t_max``; ``noise (B, *dims) -> (B, *dims)``."""
    process = get_process(process)
    noise = _check_noise(noise)
    t = _times(process.t_max, noise)
    return model(expand_time(process.b(t), noise) * noise, t)


@torch.no_grad()
def multistep_sample(
    model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    sigmas: Sequence[float] | Tensor,
    process: Process | str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multistep consistency sampling along ``sigmas`` (module doc); ``-> (B, *dims)``.

    ``sigmas[0]`` is the start (usually ``t_max``): ``x = f(b(sigmas[0]) noise, sigmas[0])``;
    each later ``s`` re-noises with fresh ``z ~ N(0, I)`` drawn from ``generator`` (the global
    RNG if None) and applies ``f(x_s, s)``. With one time this is :func:`one_step_sample` at it.
    """
    process = get_process(process)
    noise = _check_noise(noise)
    values = check_sigmas(sigmas, process)
    t = _times(values[0], noise)
    x = model(expand_time(process.b(t), noise) * noise, t)
    t0 = torch.tensor(process.t_min, dtype=torch.float64)
    a0, b0 = float(process.a(t0)), float(process.b(t0))
    for s in values[1:]:
        s64 = torch.tensor(s, dtype=torch.float64)
        a_s, b_s = float(process.a(s64)), float(process.b(s64))
        scale = a_s / a0
        extra = b_s * b_s - (scale * b0) ** 2
        std = math.sqrt(max(extra, 0.0))
        z_device = generator.device if generator is not None else noise.device
        z = torch.randn(noise.shape, generator=generator, device=z_device, dtype=noise.dtype)
        x_s = scale * x + std * z.to(noise.device)
        x = model(x_s, _times(s, noise))
    return x


@torch.no_grad()
def ode_sample(
    velocity: Callable[..., Tensor],
    x: Tensor,
    grid: Sequence[float] | Tensor,
    method: str = "euler",
    **velocity_kwargs,
) -> Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``grid[0]`` to ``grid[-1]`` along ``grid``.

    ``x`` ``(B, *dims)`` is the state at ``grid[0]``; ``grid`` is a strictly monotone list of at
    least two times (decreasing to sample: e.g. ``karras_grid(n, t_min, t_max).flip(0)`` with
    ``x = b(t_max) noise``). ``method`` is ``"euler"`` (order 1) or ``"heun"`` (order 2, two
    velocity calls per step); ``velocity_kwargs`` go to every velocity call. Returns the state
    at ``grid[-1]``.
    """
    choice(method, "method", ODE_METHODS)
    if not callable(velocity):
        raise bad("velocity", velocity, "pass a callable velocity(x, t)")
    x = _check_noise(x, "x")
    times = _time_list(grid, "grid")
    if len(times) < 2:
        raise bad("grid", times, "use at least two times (start and end)")
    steps = list(zip(times, times[1:], strict=False))
    if not (all(b < a for a, b in steps) or all(b > a for a, b in steps)):
        fix = "use strictly monotone times (decreasing to go from noise to data)"
        raise bad("grid", times, fix)
    step = velocity_mod.euler_step if method == "euler" else velocity_mod.heun_step
    for t, t_next in steps:
        x = step(velocity, x, _times(t, x), _times(t_next, x), **velocity_kwargs)
    return x
