"""The iCT schedules of consistency training (docs/paper.md section 2).

:func:`ict_curriculum` (the number of grid points ``N(k)`` at training step ``k``),
``processes.karras_grid`` (the grid), :func:`lognormal_index_probs` (the probability of each grid
interval), :func:`sample_indices`, :func:`ict_weights` (``lambda_i = 1 / (s_{i+1} - s_i)``); an
equally spaced grid (``processes.uniform_grid``) can be passed to the objective as ``fixed_grid``
for the theory checks of docs/paper.md section 3.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gcflows.checks import bad as bad_value
from gcflows.checks import bad_tensor, finite, integer, real

__all__ = ["ict_curriculum", "lognormal_index_probs", "sample_indices", "ict_weights", "check_grid"]


def ict_curriculum(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Number of grid **points** ``N(k)`` of the iCT curriculum at training step ``k``.

    ``N(k) = min(s0 * 2^floor(k / K'), s1) + 1`` with ``K' = floor(K / (log2 floor(s1 / s0) + 1))``
    (docs/paper.md section 2, ``K = total_steps``). The grid has ``N(k)`` points and ``N(k) - 1``
    intervals: ``processes.karras_grid(N(k) - 1, ...)``. ``K'`` is clamped to at least 1 so that
    runs shorter than ``log2(s1 / s0) + 1`` steps still double once per step.
    """
    step = integer(step, "step", lo=0)
    total_steps = integer(total_steps, "total_steps", lo=1)
    s0 = integer(s0, "s0", lo=1)
    s1 = integer(s1, "s1", lo=1)
    if s0 > s1:
        raise bad_value("s0", s0, f"need s0 <= s1 (s1={s1}): s0 is the initial number of intervals")
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    doublings = min(step // k_prime, 64)  # 2^64 * s0 > any s1: the min below is reached
    return min(s0 * 2**doublings, s1) + 1


def check_grid(grid: Tensor, name: str = "grid") -> Tensor:
    if not torch.is_tensor(grid) or grid.dim() != 1 or grid.numel() < 2:
        raise bad_tensor(grid, name, "use a 1-D tensor of at least 2 times")
    finite(grid, name)
    if not bool((grid[1:] > grid[:-1]).all()):
        raise bad_value(name, grid, "use strictly increasing times (data first, noise last)")
    return grid


def lognormal_index_probs(grid: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Discretised lognormal over the intervals of ``grid`` ``(N+1,) -> (N,)`` (float64, sum 1).

    ``p(i) ∝ erf((log s_{i+1} - Pm) / (sqrt2 Ps)) - erf((log s_i - Pm) / (sqrt2 Ps))``
    (docs/paper.md section 2): the probability that ``log sigma ~ N(Pm, Ps^2)`` falls in
    ``[s_i, s_{i+1})``, renormalised over the grid. Differences of ``erf`` near +1 are taken as
    differences of ``erfc`` to avoid cancellation. ``grid``: positive, strictly increasing.
    """
    grid = check_grid(grid).to(torch.float64)
    if not bool((grid > 0).all()):
        fix = "use positive times (the lognormal is over log sigma)"
        raise bad_value("grid.min()", float(grid.min()), fix)
    real(p_mean, "p_mean")
    real(p_std, "p_std", lo_open=0.0)
    u = (torch.log(grid) - p_mean) / (math.sqrt(2.0) * p_std)
    lo, hi = u[:-1], u[1:]
    upper = lo >= 0  # both arguments >= 0: erf(hi) - erf(lo) = erfc(lo) - erfc(hi)
    mass = torch.where(upper, torch.erfc(lo) - torch.erfc(hi), torch.erf(hi) - torch.erf(lo))
    total = mass.sum()
    if not bool(total > 0):
        fix = "the lognormal puts no mass on this grid; move p_mean into the grid's log range"
        raise bad_value("p_mean", p_mean, fix)
    return mass / total


def sample_indices(probs: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` interval indices ``i ~ probs`` with replacement -> ``(n,)`` long.

    Drawn on the generator's device (probs' device without one) and returned there.
    """
    n = integer(n, "n", lo=1)
    if not torch.is_tensor(probs) or probs.dim() != 1 or probs.numel() < 1:
        raise bad_tensor(probs, "probs", "use a non-empty 1-D tensor")
    if bool((probs < 0).any()) or not bool(probs.sum() > 0):
        raise bad_value("probs", probs, "use non-negative probabilities with a positive sum")
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, n, replacement=True, generator=generator)


def ict_weights(grid: Tensor) -> Tensor:
    """``lambda_i = 1 / (s_{i+1} - s_i)`` ``(N+1,) -> (N,)`` (docs/paper.md section 2)."""
    grid = check_grid(grid)
    return 1.0 / (grid[1:] - grid[:-1])
