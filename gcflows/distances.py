"""Distances ``D(a, b)`` between the two consistency outputs (docs/paper.md sections 2-3).

The small-distance behaviour ``phi(u) ~ C u^alpha`` enters Theorem 1: ``squared_l2`` (alpha 2,
C 1), ``pseudo_huber`` on the whole flattened vector (alpha 2, C 1 / (2c), the default with
``c = 0.00054 sqrt(d)``), ``pseudo_huber_elementwise`` (summed per element; not a function of the
norm), ``l2_norm`` (alpha 1, C 1). Each is ``(B, *dims), (B, *dims) -> (B,)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gcflows.checks import bad as bad_value
from gcflows.checks import bad_tensor, choice, integer

__all__ = [
    "Distance",
    "DISTANCES",
    "squared_l2",
    "pseudo_huber",
    "pseudo_huber_elementwise",
    "l2_norm",
    "get_distance",
    "default_huber_c",
]


def default_huber_c(dim: int) -> float:
    """``c = 0.00054 sqrt(d)`` (iCT; docs/paper.md section 2) for ``d`` elements per sample."""
    return 0.00054 * math.sqrt(integer(dim, "dim", lo=1))


def _flat_diff(a: Tensor, b: Tensor) -> Tensor:
    if a.shape != b.shape:
        raise ValueError(f"distance needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 1:
        raise bad_tensor(a, "a", "the distance needs batched inputs (B, *dims)")
    return (a - b).reshape(a.shape[0], -1)


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||^2`` per sample ``(B, *dims) -> (B,)``; ``phi(u) = u^2`` (alpha 2, C 1)."""
    d = _flat_diff(a, b)
    return (d * d).sum(1)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """``sqrt(||a - b||^2 + c^2) - c`` on the whole flattened vector ``-> (B,)``.

    Evaluated as ``u^2 / (sqrt(u^2 + c^2) + c)`` (no cancellation at small ``u``);
    ``phi(u) ~ u^2 / (2c)`` (alpha 2, C 1 / (2c)).
    """
    sq = squared_l2(a, b)
    return sq / (torch.sqrt(sq + c * c) + c)


def pseudo_huber_elementwise(a: Tensor, b: Tensor, c: float) -> Tensor:
    """``sum_k (sqrt((a_k - b_k)^2 + c^2) - c)`` per sample ``-> (B,)``.

    Not a function of ``||a - b||`` (so outside Theorem 1's ``phi(||.||)`` form); near 0 it
    behaves like ``||a - b||^2 / (2c)``.
    """
    d = _flat_diff(a, b)
    sq = d * d
    return (sq / (torch.sqrt(sq + c * c) + c)).sum(1)


def l2_norm(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||`` per sample ``-> (B,)``; ``phi(u) = u`` (alpha 1, C 1). Subgradient 0 at 0."""
    return torch.linalg.vector_norm(_flat_diff(a, b), dim=1)


@dataclass(frozen=True)
class Distance:
    """A per-sample distance ``D(a, b) -> (B,)`` with ``phi(u) ~ C u^alpha`` as ``u -> 0``.

    ``radial`` is True when ``D(a, b) = phi(||a - b||)`` (the form Theorem 1 assumes); ``c`` is the
    pseudo-Huber constant (None otherwise).
    """

    name: str
    alpha: float
    C: float
    radial: bool = True
    c: float | None = None
    fn: Callable[[Tensor, Tensor], Tensor] = field(default=squared_l2, repr=False, compare=False)

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        return self.fn(a, b)


DISTANCES = ("squared_l2", "pseudo_huber", "pseudo_huber_elementwise", "l2_norm")


def get_distance(name: str | Distance, dim: int, *, c: float | None = None) -> Distance:
    """Build a :class:`Distance` by name for samples of ``dim`` elements.

    ``name`` in ``DISTANCES``; ``c`` (pseudo-Huber only) defaults to ``0.00054 sqrt(dim)`` for both
    pseudo-Huber forms (so both share ``C = 1 / (2c)``). A ``Distance`` is returned unchanged.
    """
    if isinstance(name, Distance):
        return name
    choice(name, "distance", DISTANCES)
    dim = integer(dim, "dim", lo=1)
    if name == "squared_l2":
        return Distance("squared_l2", 2.0, 1.0, True, None, squared_l2)
    if name == "l2_norm":
        return Distance("l2_norm", 1.0, 1.0, True, None, l2_norm)
    c = default_huber_c(dim) if c is None else float(c)
    if not (math.isfinite(c) and c > 0):
        raise bad_value("c", c, "use a positive float (the pseudo-Huber constant)")
    if name == "pseudo_huber":
        return Distance("pseudo_huber", 2.0, 1.0 / (2.0 * c), True, c, _bind(pseudo_huber, c))
    return Distance(
        "pseudo_huber_elementwise",
        2.0,
        1.0 / (2.0 * c),
        False,
        c,
        _bind(pseudo_huber_elementwise, c),
    )


def _bind(fn: Callable[[Tensor, Tensor, float], Tensor], c: float) -> Callable:
    def bound(a: Tensor, b: Tensor) -> Tensor:
        return fn(a, b, c)

    return bound
