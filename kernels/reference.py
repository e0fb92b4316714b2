"""The mathematics of each kernel op, in plain torch: the specification.

Every implementation (the tuned torch path in ``cpu.py``, the Triton kernels in ``interpolate.py``
and ``sqdist.py``) computes these functions; the tests hold each of them, and these functions
themselves, to float64 mathematics within stated rounding bounds. They are also the
differentiable path taken when an input requires grad. They check nothing: ``validation.py``
checks the arguments at the public entry points (``gcflows.kernels``).

- ``interpolate_pair``: a (data, noise) pair noised at two times, ``x_t = a(t) data + b(t) noise``
  (docs/paper.md section 1) with ``ve``: ``a = 1, b = t`` and ``linear``: ``a = 1 - t, b = t``,
  and the pair's squared transport cost ``||data_j - noise_j||^2``.
- ``pairwise_sqdist``: the batch-OT cost matrix ``C_ij = ||a_i - b_j||^2``.

Arithmetic (``compute_dtype``): float32 for float32 / float16 / bfloat16 inputs (16-bit inputs
are upcast and the noised points rounded once to the input dtype), float64 for float64.
This module imports nothing from gcflows and never touches a GPU driver at import.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "PROCESSES",
    "PRECISIONS",
    "compute_dtype",
    "interpolate_pair",
    "pairwise_sqdist",
    "recenter",
    "sqnorms",
]

PROCESSES = ("ve", "linear")
PRECISIONS = ("ieee", "tf32", "tf32x3")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for an input dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpolate_pair(
    data: Tensor, noise: Tensor, t_lo: Tensor, t_hi: Tensor, process: str = "ve"
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_lo, x_hi, sqcost)`` of a pair ``data, noise`` ``(B, *dims)`` at times ``(B,)``.

    ``x = a(t) data + b(t) noise`` (docs/paper.md section 1) in the input dtype,
    ``sqcost_j = sum_k (data_jk - noise_jk)^2`` ``(B,)`` in the arithmetic dtype.
    """
    B, acc = data.shape[0], compute_dtype(data.dtype)
    d, n = data.reshape(B, -1).to(acc), noise.reshape(B, -1).to(acc)

    def at(t: Tensor) -> Tensor:
        t = t.to(acc)[:, None]
        x = d + t * n if process == "ve" else (1.0 - t) * d + t * n
        return x.to(data.dtype).reshape(data.shape)

    diff = d - n
    return at(t_lo), at(t_hi), (diff * diff).sum(1)


def pairwise_sqdist(a: Tensor, b: Tensor) -> Tensor:
    """``C_ij = ||a_i - b_j||^2`` for ``(Ba, *dims), (Bb, *dims)`` -> ``(Ba, Bb)``.

    Matmul form ``||a_i||^2 + ||b_j||^2 - 2 a_i . b_j`` after a common translation
    (``recenter``), clamped at 0 (rounding can make it negative), exact zeros on the diagonal
    when ``a is b``.
    """
    same = a is b
    a2, b2 = recenter(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), same)
    acc = compute_dtype(a.dtype)
    a2 = a2.to(acc)
    b2 = a2 if same else b2.to(acc)
    c = (sqnorms(a2)[:, None] + sqnorms(b2)[None, :] - 2.0 * (a2 @ b2.T)).clamp(min=0.0)
    if same:
        c = c.masked_fill(torch.eye(c.shape[0], dtype=torch.bool, device=c.device), 0.0)
    return c


def recenter(a2: Tensor, b2: Tensor, same: bool) -> tuple[Tensor, Tensor]:
    """Translate both point sets by a common vector when an offset dominates their norms.

    ``||a_i - b_j||^2`` is invariant under a common translation, but the matmul form loses
    ``~eps (||a_i||^2 + ||b_j||^2)`` to cancellation. When the mean of a sample of rows (the first
    64 of each set) carries more than half of their mean squared norm (points far from the
    origin), both sets are shifted by that mean, which divides the error by the ratio of the mean
    squared norms before and after (at least 2). Inputs ``(Ba, D)``, ``(Bb, D)``; returns them
    unchanged, or shifted in the arithmetic dtype (``b`` is ``a`` again when ``same``). One host
    synchronisation on a GPU.
    """
    acc = compute_dtype(a2.dtype)
    k = 64
    sample = (a2[:k] if same else torch.cat([a2[:k], b2[:k]])).to(acc)
    mu = sample.mean(0)
    mean_sq = torch.linalg.vector_norm(sample, dim=1).square().mean()
    if not bool(torch.linalg.vector_norm(mu).square() > 0.5 * mean_sq):
        return a2, b2
    a2 = a2.to(acc) - mu
    return (a2, a2) if same else (a2, b2.to(acc) - mu)


def sqnorms(x: Tensor) -> Tensor:
    """Row squared norms ``(B, D) -> (B,)`` in the arithmetic dtype (float32 for 16-bit input)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype)).square()
