"""Noise-to-data transport cost of a coupling: IC, batch-OT, Sinkhorn and GC.

docs/paper.md section 4.

The transport cost of a coupling is the mean squared distance ``E ||data - noise||^2`` between
the data point and the *unscaled* noise it is paired with. gcflows measures it for

- IC, the independent coupling: ``c_IC = E ||data - noise||^2`` (:func:`ic_cost`);
- batch-OT: the mean cost after the exact assignment inside a batch of ``B`` pairs
  (:func:`batch_ot_cost`, :func:`batch_ot_curve` for ``B = 16, 128, 512, 2048``), and its entropic
  relaxation (:func:`sinkhorn_cost`, the plan's expected cost ``<P, C>``);
- GC, the generator-induced coupling of docs/paper.md Eq. 13-15: the data point is replaced by the
  prediction ``f(x_t, t)`` made from the noised pair, with the same noise, so

      c(t) = E_IC || f(x_t, t) - noise ||^2,   x_t = a(t) data + b(t) noise          (Lemma 1)

  for the ideal flow map ``f = fo`` of a :class:`~gcflows.gmm.GaussianMixture` (the exact PF-ODE
  solution down to ``t_min``) or for any model ``f(x, t)``, e.g. a trained consistency model
  (:func:`gc_cost_curve`).

Lemma 1 (docs/paper.md Eq. 20), written for any affine process. With
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

Conventions: time runs from data (``t_min``) to noise (``t_max``); batches are ``(B, *dims)``;
per-sample times ``(B,)``; all randomness comes from the ``generator`` argument (data is drawn
first, then noise, batch by batch). Intervals are two-sided Student-t intervals at ``level``
(default 95 %) over independent units: samples for IC and GC, whole batches for batch-OT.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torchdiffeq import odeint

from gcflows import checks, kernels
from gcflows.checks import batch_times
from gcflows.couplings import ot_coupling, sinkhorn_coupling
from gcflows.gmm import GaussianMixture
from gcflows.processes import Process, get_process
from gcflows.stats import Interval

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_SINKHORN_REG",
    "BatchCost",
    "CostCurve",
    "Lemma1Result",
    "estimate",
    "as_sampler",
    "ic_cost",
    "batch_ot_cost",
    "sinkhorn_cost",
    "batch_ot_curve",
    "sigma_grid",
    "gc_cost_curve",
    "effective_sdot",
    "flow_map_jvp",
    "ideal_flow_map",
    "lemma1_check",
    "effective_s0",
    "corollary2_prediction",
    "gaussian_flow_map",
    "gaussian_ic_cost",
    "gaussian_cost_curve",
    "gaussian_cost_derivative",
    "gaussian_s0",
]

DEFAULT_BATCH_SIZES = (16, 128, 512, 2048)
# Entropic weight of sinkhorn_cost, relative to the batch's mean squared distance (the convention
# of gcflows.couplings.sinkhorn_coupling): epsilon = 0.05 * mean_ij ||data_i - noise_j||^2.
DEFAULT_SINKHORN_REG = 0.05

Sampler = Callable[[int, "torch.Generator | None"], Tensor]


# --- interval estimates -------------------------------------------------------------------------
def _check_level(level: float) -> float:
    fix = "use a probability in (0, 1), e.g. 0.95"
    return checks.real(level, "level", lo_open=0.0, hi_open=1.0, fix=fix)


def estimate(values: Tensor, level: float = 0.95) -> Interval:
    """Mean, standard error ``std / sqrt(n)`` (unbiased std) and Student-t interval of ``values``
    ``(n,)`` (an unbounded interval for one value)."""
    level = _check_level(level)
    values = torch.as_tensor(values).detach().reshape(-1).to(torch.float64)
    if values.numel() == 0:
        raise ValueError("values is empty; pass at least one number")
    checks.finite(values, "values")
    return Interval.from_samples(values, "student-t", level)


# --- samplers -----------------------------------------------------------------------------------
def as_sampler(source, name: str = "sample_data") -> Sampler:
    """Turn ``source`` into a sampler ``(n, generator) -> (n, *dims)``.

    ``source`` is a :class:`GaussianMixture` (its ``sample``), a tensor ``(N, *dims)`` (rows drawn
    uniformly with replacement) or a callable ``(n, generator) -> (n, *dims)`` (returned as is).
    """
    if isinstance(source, GaussianMixture):
        return lambda n, generator: source.sample(n, generator=generator)
    if torch.is_tensor(source):
        if source.dim() < 2 or source.shape[0] == 0 or not source.is_floating_point():
            raise ValueError(
                f"{name} as a tensor must be a non-empty float dataset (N, *dims), "
                f"got shape {tuple(source.shape)} and dtype {source.dtype}"
            )
        checks.finite(source, name)

        def draw_rows(n: int, generator: torch.Generator | None) -> Tensor:
            dev = generator.device if generator is not None else torch.device("cpu")
            idx = torch.randint(source.shape[0], (n,), generator=generator, device=dev)
            return source[idx.to(source.device)]

        return draw_rows
    if callable(source):
        return source
    raise ValueError(
        f"{name} must be a GaussianMixture, a dataset tensor (N, *dims) or a callable "
        f"(n, generator) -> (n, *dims); got {type(source).__name__}"
    )


def _standard_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``N(0, I)`` of the shape, dtype and device of ``like``, drawn with ``generator``."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=dev).to(
        like.device
    )


def _draw(
    sample_data: Sampler, sample_noise: Sampler | None, n: int, generator
) -> tuple[Tensor, Tensor]:
    data = sample_data(n, generator)
    if not torch.is_tensor(data) or data.dim() < 2 or data.shape[0] != n:
        raise ValueError(
            f"sample_data must return a tensor of shape ({n}, *dims), got "
            f"{tuple(data.shape) if torch.is_tensor(data) else type(data).__name__}"
        )
    noise = _standard_noise(data, generator) if sample_noise is None else sample_noise(n, generator)
    if not torch.is_tensor(noise) or noise.shape != data.shape:
        raise ValueError(
            f"sample_noise must return a tensor of the data's shape {tuple(data.shape)}, got "
            f"{tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__}"
        )
    return data, noise.to(dtype=data.dtype, device=data.device)


def _row_sqnorm(x: Tensor) -> Tensor:
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    return (x * x).sum(1)


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
    return checks.integer(value, name, lo=minimum)


# --- IC and batch couplings -----------------------------------------------------------------------
def ic_cost(data: Tensor, noise: Tensor, level: float = 0.95) -> Interval:
    """IC transport cost ``E ||data - noise||^2`` over the rows of the given pairs.

    data, noise: ``(B, *dims)``, rows independent (docs/paper.md section 4, ``c(0)``). The per-row
    cost is accumulated in float64; the interval treats rows as independent samples.
    """
    if not torch.is_tensor(data) or not torch.is_tensor(noise) or data.shape != noise.shape:
        raise ValueError("data and noise must be tensors of the same shape (B, *dims)")
    if data.dim() < 1 or data.shape[0] == 0:
        raise ValueError("data is an empty batch; pass at least one pair")
    checks.finite(data, "data")
    checks.finite(noise, "noise")
    return estimate(_row_sqnorm(data.to(torch.float64) - noise.to(torch.float64)), level)


@dataclass(frozen=True)
class BatchCost:
    """Transport cost of a batch coupling, estimated over ``n_batches`` independent batches.

    ``cost`` and ``ic`` are intervals over the per-batch mean costs of the coupled and the
    as-drawn pairing of the same batches; ``gain = ic - cost`` is their paired difference.
    """

    coupling: str
    batch_size: int
    cost: Interval
    ic: Interval
    gain: Interval
    per_batch: tuple[float, ...]
    reg: float | None = None
    status: str = ""

    def as_dict(self) -> dict:
        return {
            "coupling": self.coupling,
            "batch_size": self.batch_size,
            "cost": self.cost.as_dict(),
            "ic": self.ic.as_dict(),
            "gain": self.gain.as_dict(),
            "per_batch": list(self.per_batch),
            "reg": self.reg,
            "status": self.status,
        }


def _batch_costs(
    coupling: str,
    solve: Callable[[Tensor, Tensor], tuple[float, str]],
    sample_data,
    sample_noise,
    batch_size: int,
    n_batches: int,
    generator,
    level: float,
    reg: float | None = None,
) -> BatchCost:
    level = _check_level(level)
    batch_size = _check_positive_int(batch_size, "batch_size")
    n_batches = _check_positive_int(n_batches, "n_batches")
    sample_data = as_sampler(sample_data, "sample_data")
    sample_noise = None if sample_noise is None else as_sampler(sample_noise, "sample_noise")
    after, before, statuses = [], [], []
    for _ in range(n_batches):
        data, noise = _draw(sample_data, sample_noise, batch_size, generator)
        cost, status = solve(data, noise)
        after.append(cost)
        before.append(float(_row_sqnorm(data - noise).mean()))
        statuses.append(status)
    a = torch.tensor(after, dtype=torch.float64)
    b = torch.tensor(before, dtype=torch.float64)
    return BatchCost(
        coupling=coupling,
        batch_size=batch_size,
        cost=estimate(a, level),
        ic=estimate(b, level),
        gain=estimate(b - a, level),
        per_batch=tuple(after),
        reg=reg,
        status=statuses[-1],
    )


def batch_ot_cost(
    sample_data,
    sample_noise,
    batch_size: int,
    n_batches: int,
    generator: torch.Generator | None = None,
    *,
    solver: str = "auto",
    level: float = 0.95,
) -> BatchCost:
    """Batch-OT transport cost: mean ``||data_j - noise_perm(j)||^2`` after the exact assignment.

    For each of ``n_batches`` batches, ``batch_size`` data rows then ``batch_size`` noise rows are
    drawn (``sample_noise=None``: standard normal of the data's shape) and re-paired by
    :func:`gcflows.couplings.ot_coupling` (exact permutation; cost matrix from
    ``gcflows.kernels.pairwise_sqdist``). The batch's cost is recomputed in float64 from the
    returned pairs. The interval is over batches (pairs inside a batch are dependent).
    """

    def solve(data: Tensor, noise: Tensor) -> tuple[float, str]:
        res = ot_coupling(data, noise, solver=solver)
        return float(_row_sqnorm(res.data - res.noise).mean()), res.status

    return _batch_costs(
        "ot", solve, sample_data, sample_noise, batch_size, n_batches, generator, level
    )


def sinkhorn_cost(
    sample_data,
    sample_noise,
    batch_size: int,
    n_batches: int,
    generator: torch.Generator | None = None,
    *,
    reg: float = DEFAULT_SINKHORN_REG,
    max_iter: int = 5000,
    tol: float = 1e-6,
    level: float = 0.95,
) -> BatchCost:
    """Entropic batch-OT cost: the plan's expected cost ``<P, C>`` (``P`` of total mass 1).

    ``P`` is :func:`gcflows.couplings.sinkhorn_coupling`'s plan at entropic weight ``reg``
    *relative to the batch's mean squared distance* (epsilon = ``reg * mean_ij C_ij``), ``C`` the
    float64 ``pairwise_sqdist`` matrix. A batch on which Sinkhorn does not reach the marginal
    tolerance raises ``RuntimeError`` (no silent fallback to exact OT, which would mislabel the
    number). ``<P, C>`` is the expected cost of the pairs the coupling draws from ``P``.
    """

    def solve(data: Tensor, noise: Tensor) -> tuple[float, str]:
        res = sinkhorn_coupling(
            data, noise, reg=reg, max_iter=max_iter, tol=tol, on_failure="raise"
        )
        b = data.shape[0]
        cmat = kernels.pairwise_sqdist(
            data.reshape(b, -1).to(torch.float64), noise.reshape(b, -1).to(torch.float64)
        )
        plan = res.plan.to(cmat.device)
        return float((plan * cmat).sum() / plan.sum()), res.status

    return _batch_costs(
        "sinkhorn", solve, sample_data, sample_noise, batch_size, n_batches, generator, level, reg
    )


def batch_ot_curve(
    sample_data,
    sample_noise=None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    n_pairs: int = 4096,
    generator: torch.Generator | None = None,
    *,
    min_batches: int = 3,
    solver: str = "auto",
    level: float = 0.95,
) -> list[BatchCost]:
    """Batch-OT cost against batch size: one :func:`batch_ot_cost` per size in ``batch_sizes``.

    Each size uses ``max(min_batches, ceil(n_pairs / B))`` batches, so every size sees about
    ``n_pairs`` pairs and at least ``min_batches`` independent batches for its interval.
    """
    if len(batch_sizes) == 0:
        raise ValueError("batch_sizes is empty; pass e.g. (16, 128, 512, 2048)")
    n_pairs = _check_positive_int(n_pairs, "n_pairs")
    min_batches = _check_positive_int(min_batches, "min_batches")
    out = []
    for bs in batch_sizes:
        bs = _check_positive_int(int(bs), "batch_sizes entries")
        n_batches = max(min_batches, math.ceil(n_pairs / bs))
        out.append(
            batch_ot_cost(
                sample_data,
                sample_noise,
                bs,
                n_batches,
                generator,
                solver=solver,
                level=level,
            )
        )
    return out


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
    t = _time_of_sigma(process, sig)
    t[0], t[-1] = lo, hi
    return t


def _time_of_sigma(process: Process, sigma: Tensor) -> Tensor:
    """Invert ``sigma(t) = b(t) / a(t)`` (increasing) on ``[t_min, t_max]`` by bisection, float64;
    100 halvings of the domain reach float64 resolution."""
    sigma = sigma.to(torch.float64)
    t_lo = torch.full_like(sigma, process.t_min)
    t_hi = torch.full_like(sigma, process.t_max)
    for _ in range(100):
        mid = 0.5 * (t_lo + t_hi)
        above = process.b(mid) / process.a(mid) > sigma
        t_hi = torch.where(above, mid, t_hi)
        t_lo = torch.where(above, t_lo, mid)
    return 0.5 * (t_lo + t_hi)


def ideal_flow_map(
    mixture: GaussianMixture,
    x: Tensor,
    t: Tensor | float,
    process: Process | str,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    segments_per_decade: int = 2,
) -> Tensor:
    """The ideal flow map ``fo(x, t)`` down to ``t_min``, integrated in segments: ``(B, d)``.

    ``GaussianMixture.flow_map`` in one solve from a large ``t`` lets the adaptive dopri5 step
    grow while the field is nearly linear (``x`` far from the data) and then jump across the
    short stretch where the posterior picks a mode: in 3072-D with ``rtol = 1e-5`` it took 3 steps
    from ``t = 80`` and returned a cost 34 % off (``rtol = 1e-6``: 296 evaluations, correct). Here
    the path is cut at ``segments_per_decade`` points per decade of ``sigma = b / a`` (per row,
    log-uniform from ``sigma(t)`` to ``sigma(t_min)``), one ``flow_map`` call per segment, so no
    step spans more than a segment and each segment restarts the step-size control.
    """
    process = get_process(process)
    x64 = x.detach().to(torch.float64)
    t64 = batch_times(t, x.shape[0], x64)
    process.check_time(t64)
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
            nxt = torch.minimum(_time_of_sigma(process, sig), cur)
        y = mixture.flow_map(y, cur, process, t_end=nxt, rtol=rtol, atol=atol)
        cur = nxt
    return y.to(x.dtype)


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
            return ideal_flow_map(mix, flat, t, process, rtol=rtol, atol=atol).reshape(x.shape)

        return ideal
    if not callable(f):
        raise ValueError(
            "f must be a GaussianMixture (its ideal flow map is used) or a callable model "
            f"f(x, t) -> data estimate; got {type(f).__name__}"
        )

    def model(x: Tensor, t: Tensor) -> Tensor:
        dtype, device = x.dtype, x.device
        if isinstance(f, nn.Module):
            p = next(iter(f.parameters()), None)
            if p is not None:
                dtype, device = p.dtype, p.device
        with torch.no_grad():
            out = f(x.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device))
        if not torch.is_tensor(out) or out.shape != x.shape:
            raise ValueError(
                f"f must return a tensor of the input's shape {tuple(x.shape)}, got "
                f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}"
            )
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
            (``GaussianMixture.flow_map``, torchdiffeq dopri5 at ``rtol`` / ``atol``) -- or a model
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
        raise ValueError("times is empty; pass a grid such as sigma_grid(process, 12)")
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


# --- Lemma 1 --------------------------------------------------------------------------------------
def effective_sdot(process: Process | str, t: Tensor) -> Tensor:
    """``g(t) = b'(t) - a'(t) b(t) / a(t) = a d(b/a)/dt``: the ``s_dot`` of Lemma 1 for any affine
    process (``1`` for ``ve``, ``1 / (1 - t)`` for ``linear``); ``xdot_t - v_t(x_t) = g w_t``."""
    process = get_process(process)
    t = torch.as_tensor(t, dtype=torch.float64)
    return process.db(t) - process.da(t) * process.b(t) / process.a(t)


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
        raise ValueError("mixture must be a GaussianMixture (the ideal flow map's oracle)")
    if direction.shape != x.shape:
        raise ValueError(
            f"direction must have the shape of x {tuple(x.shape)}, got {tuple(direction.shape)}"
        )
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
            raise ValueError("method='fd' maps to process.t_min; pass t_end=None")
        both = ideal_flow_map(
            mixture,
            torch.cat([x64, x64 + h * u64, x64 - h * u64]),
            t64.repeat(3),
            process,
            rtol=rtol,
            atol=atol,
        )
        f0, fp, fm = both.chunk(3)
        return f0, (fp - fm) / (2 * h)
    if method != "tangent":
        raise ValueError(f"method must be 'tangent' or 'fd', got {method!r}")
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
    # cap the step as ideal_flow_map does: at most 1 / segments of log-time per step, with
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
        raise ValueError("mixture must be a GaussianMixture (Lemma 1 needs the exact flow map)")
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    if times.numel() == 0:
        raise ValueError("times is empty")
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
        ends = ideal_flow_map(mix, xs, torch.cat([lo_all[rows], hi_all[rows]]), process, **tol)
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
        raise ValueError(
            f"std must be a float or have the mean's shape {tuple(mean.shape)}, "
            f"got {tuple(std.shape)}"
        )
    if bool((std < 0).any()):
        raise ValueError("std must be non-negative")
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
