"""Pure-torch reference of each kernel op: the specification the Triton kernels are tested against.

This module imports nothing from gcflows (DESIGN.md, "The kernels").
"""

from __future__ import annotations

import torch
from torch import Tensor

PROCESSES = ("ve", "linear")


def _coefficients(t: Tensor, process: str) -> tuple[Tensor, Tensor]:
    if process == "ve":
        return torch.ones_like(t), t
    if process == "linear":
        return 1.0 - t, t
    raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")


def interpolate_pair(
    data: Tensor, noise: Tensor, t_lo: Tensor, t_hi: Tensor, process: str = "ve"
) -> tuple[Tensor, Tensor, Tensor]:
    """Noise one (data, noise) pair at two times and return its squared transport cost.

    data, noise: ``(B, *dims)``; t_lo, t_hi: ``(B,)``. Returns ``x_lo = a(t_lo) data + b(t_lo)
    noise`` and ``x_hi`` likewise, both ``(B, *dims)`` in the input dtype, and
    ``sqcost_j = ||data_j - noise_j||^2`` ``(B,)`` accumulated in float32 (float64 for float64).
    """
    a_lo, b_lo = _coefficients(t_lo, process)
    a_hi, b_hi = _coefficients(t_hi, process)
    shape = (-1,) + (1,) * (data.dim() - 1)
    x_lo = a_lo.reshape(shape).to(data.dtype) * data + b_lo.reshape(shape).to(data.dtype) * noise
    x_hi = a_hi.reshape(shape).to(data.dtype) * data + b_hi.reshape(shape).to(data.dtype) * noise
    acc = torch.float64 if data.dtype == torch.float64 else torch.float32
    diff = data.reshape(data.shape[0], -1).to(acc) - noise.reshape(noise.shape[0], -1).to(acc)
    return x_lo, x_hi, (diff * diff).sum(1)


def pairwise_sqdist(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``||a_i - b_j||^2``, ``(Ba, D) x (Bb, D) -> (Ba, Bb)``.

    Computed as ``||a||^2 + ||b||^2 - 2 a b^T`` in float32 or wider, clamped at 0, with exact zeros
    where a row is compared with itself (``a is b``).
    """
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a2 = a.reshape(a.shape[0], -1).to(acc)
    b2 = b.reshape(b.shape[0], -1).to(acc)
    d = (a2 * a2).sum(1)[:, None] + (b2 * b2).sum(1)[None, :] - 2.0 * (a2 @ b2.T)
    d.clamp_(min=0.0)
    if a is b:
        d.fill_diagonal_(0.0)
    return d
