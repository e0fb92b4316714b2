"""IC, batch-OT and Sinkhorn transport costs (docs/paper.md section 4), their interval estimates
and the samplers they draw from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gcflows import checks, kernels
from gcflows.couplings import ot_coupling, sinkhorn_coupling
from gcflows.gmm import GaussianMixture
from gcflows.stats import Interval

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
        raise checks.bad_tensor(values, "values", "it is empty; pass at least one number")
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
            fix = f"use a non-empty float dataset (N, *dims) (dtype {source.dtype})"
            raise checks.bad_tensor(source, name, fix)
        checks.finite(source, name)

        def draw_rows(n: int, generator: torch.Generator | None) -> Tensor:
            dev = generator.device if generator is not None else torch.device("cpu")
            idx = torch.randint(source.shape[0], (n,), generator=generator, device=dev)
            return source[idx.to(source.device)]

        return draw_rows
    if callable(source):
        return source
    fix = "use a GaussianMixture, a dataset tensor (N, *dims) or a callable (n, generator) -> "
    fix += "(n, *dims)"
    raise checks.bad_tensor(source, name, fix)


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
        fix = f"return a tensor of shape ({n}, *dims)"
        raise checks.bad_tensor(data, "sample_data(n, generator)", fix)
    noise = _standard_noise(data, generator) if sample_noise is None else sample_noise(n, generator)
    if not torch.is_tensor(noise) or noise.shape != data.shape:
        fix = f"return a tensor of the data's shape {tuple(data.shape)}"
        raise checks.bad_tensor(noise, "sample_noise(n, generator)", fix)
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
        raise checks.bad_tensor(data, "data", "it is an empty batch; pass at least one pair")
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
        raise checks.bad("batch_sizes", batch_sizes, "it is empty; pass e.g. (16, 128, 512, 2048)")
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
