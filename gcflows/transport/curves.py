"""The GC transport cost curve ``c(t) = E_IC || f(x_t, t) - noise ||^2`` (docs/paper.md section 4,
Lemma 1) of the ideal flow map or of a model, on a grid of noise levels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gcflows import checks, flowmap, kernels
from gcflows.gmm import GaussianMixture
from gcflows.processes import Process, get_process
from gcflows.stats import Interval
from gcflows.transport.costs import (
    _check_level,
    _check_positive_int,
    _draw,
    _row_sqnorm,
    as_sampler,
    estimate,
)


# --- the GC cost curve c(t) ---------------------------------------------------------------------
def sigma_grid(
    process: Process | str, n: int, t_min: float | None = None, t_max: float | None = None
) -> Tensor:
    """``n`` times from ``t_min`` to ``t_max`` equally spaced in ``log(b(t) / a(t))`` -> ``(n,)``.

    ``sigma = b / a`` is the VE-equivalent noise level (``t`` for ``ve``, ``t / (1 - t)`` for
    ``linear``), so both processes get the same spread of noise levels; float64, increasing.
    """
    process = get_process(process)
    n = _check_positive_int(n, "n", 2)
    lo = process.t_min if t_min is None else float(t_min)
    hi = process.t_max if t_max is None else float(t_max)
    process.check_time(torch.tensor([lo, hi]), "t_min / t_max")
    if not lo < hi:
        raise ValueError(f"need t_min < t_max, got {lo} and {hi}")
    ends = torch.tensor([lo, hi], dtype=torch.float64)
    s = process.b(ends) / process.a(ends)
    sig = torch.exp(torch.linspace(float(s[0].log()), float(s[1].log()), n, dtype=torch.float64))
    t = process.time_of_sigma(sig)
    t[0], t[-1] = lo, hi
    return t


#: the earlier name of ``GaussianMixture.flow_map(..., method="segmented")``, kept importable
ideal_flow_map = flowmap.method_alias("segmented", "ideal_flow_map")


@dataclass(frozen=True)
class CostCurve:
    """``c(t)`` on a time grid with intervals; ``gain[i] = ic - c(t_i)`` paired on the same pairs.

    ``ic`` is the IC cost of the very pairs the curve was measured on (common random numbers).
    """

    times: Tensor
    points: tuple[Interval, ...]
    gain: tuple[Interval, ...]
    ic: Interval
    process: str
    label: str = ""

    @property
    def mean(self) -> Tensor:
        return torch.tensor([p.mean for p in self.points], dtype=torch.float64)

    @property
    def lo(self) -> Tensor:
        return torch.tensor([p.lo for p in self.points], dtype=torch.float64)

    @property
    def hi(self) -> Tensor:
        return torch.tensor([p.hi for p in self.points], dtype=torch.float64)

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "process": self.process,
            "times": self.times.tolist(),
            "cost": [p.as_dict() for p in self.points],
            "gain_vs_ic": [g.as_dict() for g in self.gain],
            "ic": self.ic.as_dict(),
        }


def _noised_pair(
    data: Tensor, noise: Tensor, t_lo: Tensor, t_hi: Tensor, process: Process
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_lo, x_hi, ||data - noise||^2)`` by ``gcflows.kernels.interpolate_pair`` when the process
    is one the kernel knows (``ve`` / ``linear`` coefficients), else by ``process.interpolate``."""
    probe = torch.tensor([0.25, 0.5], dtype=torch.float64)
    known = {
        "ve": (torch.ones_like(probe), probe),
        "linear": (1 - probe, probe),
    }.get(process.name)
    if known is not None and torch.equal(process.a(probe), known[0]):
        if torch.equal(process.b(probe), known[1]):
            return kernels.interpolate_pair(data, noise, t_lo, t_hi, process.name)
    sq = _row_sqnorm(data - noise)
    return process.interpolate(data, noise, t_lo), process.interpolate(data, noise, t_hi), sq


def _per_time(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, n: int, chunk):
    """Apply ``fn`` to consecutive blocks of ``n`` rows (one time each), in chunks of ``chunk``.

    One call per time, not one for all: every row of an ODE solve shares the adaptive steps, and
    rows started at different times meet their stiff phase (the posterior choosing a mode) at
    different points of the log-time axis, so a joint solve costs far more steps than the sum.
    """
    size = n if chunk is None else min(n, chunk)
    parts = []
    for start in range(0, x.shape[0], n):
        for i in range(start, start + n, size):
            j = min(i + size, start + n)
            parts.append(fn(x[i:j], t[i:j]))
    return torch.cat(parts)


def _endpoint_fn(
    f, process: Process, rtol: float, atol: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x (B, *dims), t (B,)) -> prediction of data (B, *dims)`` for a mixture or a model."""
    if isinstance(f, GaussianMixture):
        mix = f

        def ideal(x: Tensor, t: Tensor) -> Tensor:
            flat = x.reshape(x.shape[0], -1)
            out = mix.flow_map(flat, t, process, rtol=rtol, atol=atol, method="segmented")
            return out.reshape(x.shape)

        return ideal
    if not callable(f):
        fix = "use a GaussianMixture (its ideal flow map is used) or a callable model f(x, t) "
        fix += "-> data estimate"
        raise checks.bad("type(f)", type(f).__name__, fix)

    def model(x: Tensor, t: Tensor) -> Tensor:
        dtype, device = x.dtype, x.device
        if isinstance(f, nn.Module):
            p = next(iter(f.parameters()), None)
            if p is not None:
                dtype, device = p.dtype, p.device
        with torch.no_grad():
            out = f(x.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device))
        if not torch.is_tensor(out) or out.shape != x.shape:
            fix = f"return a tensor of the input's shape {tuple(x.shape)}"
            raise checks.bad_tensor(out, "f(x, t)", fix)
        return out.to(dtype=x.dtype, device=x.device)

    return model


def gc_cost_curve(
    f,
    sample_data,
    process: Process | str,
    times: Tensor | Sequence[float],
    n: int,
    generator: torch.Generator | None = None,
    *,
    sample_noise=None,
    chunk: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    level: float = 0.95,
    label: str = "",
) -> CostCurve:
    """GC transport cost ``c(t) = E_IC || f(x_t, t) - noise ||^2`` on a grid (docs/paper.md
    section 4).

    Args:
        f: a :class:`GaussianMixture` -- its ideal flow map ``fo`` to ``process.t_min``
            (``GaussianMixture.flow_map(method="segmented")``, dopri5 restarted twice per decade of
            noise level, at ``rtol`` / ``atol``) -- or a model
            ``f(x (B, *dims), t (B,)) -> (B, *dims)`` (e.g. a trained ``ConsistencyModel``), called
            under ``torch.no_grad`` in eval mode, in its parameters' dtype and device.
        sample_data: a mixture, a dataset tensor ``(N, *dims)`` or a sampler ``(n, generator)``.
        process: the noising process ``x_t = a(t) data + b(t) noise``.
        times: ``(T,)`` times in ``[t_min, t_max]``.
        n: pairs ``(data, noise)`` drawn once (data first, then noise) and reused at every ``t``
            (common random numbers: differences across ``t`` and against IC are paired).
        chunk: rows per call of ``f`` (default: the ``n`` rows of one time per call; the times
            are never mixed in one call, see ``_per_time``).
        rtol, atol: ODE tolerances of the ideal flow map. The default 1e-5 / 1e-7 changed ``c(t)``
            by less than 1e-4 relative against 1e-8 / 1e-10 on 2D and 64-D mixtures (ve and
            linear), far below the sampling error of any ``n`` used here.

    Noising and the IC per-row costs come from ``gcflows.kernels.interpolate_pair``. Note that
    ``c(t_min)`` is not exactly the IC cost: ``fo(x, t_min) = x_{t_min} = a data + b noise`` at
    ``t_min``, so for ``ve``
    ``c(t_min) - c_IC = E[-2 t_min <data - noise, noise> + t_min^2 |noise|^2]``
    ``= (t_min^2 - 2 t_min) d`` (``d`` the dimension).

    Returns:
        :class:`CostCurve` with one interval per time, the paired gain ``c_IC - c(t)`` and ``c_IC``.
    """
    process = get_process(process)
    level = _check_level(level)
    n = _check_positive_int(n, "n")
    if chunk is not None:
        chunk = _check_positive_int(chunk, "chunk")
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    if times.numel() == 0:
        fix = "it is empty; pass a grid such as sigma_grid(process, 12)"
        raise checks.bad_tensor(times, "times", fix)
    process.check_time(times, "times")
    endpoint = _endpoint_fn(f, process, rtol, atol)
    noise_sampler = None if sample_noise is None else as_sampler(sample_noise, "sample_noise")
    data, noise = _draw(as_sampler(sample_data), noise_sampler, n, generator)
    n_t = times.numel()
    reps = (n_t,) + (1,) * (data.dim() - 1)
    data_r, noise_r = data.repeat(reps), noise.repeat(reps)
    t_all = times.to(device=data.device, dtype=data.dtype).repeat_interleave(n)
    x_t, _, ic_rows = _noised_pair(data_r, noise_r, t_all, t_all, process)
    pred = _per_time(endpoint, x_t, t_all, n, chunk)
    cost = _row_sqnorm(pred - noise_r).reshape(n_t, n)
    ic_rows = ic_rows.to(torch.float64).reshape(n_t, n)
    points = tuple(estimate(cost[i], level) for i in range(n_t))
    gain = tuple(estimate(ic_rows[i] - cost[i], level) for i in range(n_t))
    return CostCurve(
        times=times.cpu(),
        points=points,
        gain=gain,
        ic=estimate(ic_rows[0], level),
        process=process.name,
        label=label,
    )
