"""Triton kernel: fused interpolation of a (data, noise) pair at two times with its squared cost.

One pass over memory (docs/design.md, "The kernels"; docs/paper.md section 1): each program owns
``BLOCK_B`` rows, walks their ``D`` columns in ``BLOCK_D`` tiles, reads ``data`` and ``noise``
once and writes

    x_lo = a(t_lo) data + b(t_lo) noise,   x_hi = a(t_hi) data + b(t_hi) noise,
    sqcost_j = sum_k (data_jk - noise_jk)^2

with ``ve``: ``x = data + t noise`` and ``linear``: ``x = data - t (data - noise)`` (the
expressions of ``cpu.py``; ``reference.py`` states the mathematics). Loads are upcast to float32,
all arithmetic is float32, the squared cost is accumulated in float32 per lane and reduced per
row; ``x`` is rounded once to the input dtype (float32, float16 or bfloat16). Columns are masked,
so any ``D >= 1`` and any ``B >= 1`` work. Rows may have any stride (columns must be unit-stride;
the wrapper copies otherwise); offsets are 64-bit.

This module imports triton at import: ``gcflows.kernels`` imports it lazily, only for a Triton
call. For CPU tests set ``TRITON_INTERPRET=1`` before this module is first imported (``triton.jit``
picks the interpreter when it decorates); ``INTERPRETED`` records which mode was taken.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "interpolate_pair_triton",
    "launch_config",
    "interpreting",
    "INTERPRETED",
    "SUPPORTED_DTYPES",
]


def interpreting() -> bool:
    """Whether triton runs its interpreter now (``TRITON_INTERPRET``; ``triton.knobs`` if any)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRETED = interpreting()  # the mode triton.jit took when this module was imported
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _interpolate_pair_kernel(
    data_ptr,
    noise_ptr,
    t_lo_ptr,
    t_hi_ptr,
    x_lo_ptr,
    x_hi_ptr,
    sq_ptr,
    B,
    D,
    stride_data,
    stride_noise,
    stride_out,
    LINEAR: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    t_lo = tl.load(t_lo_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    t_hi = tl.load(t_hi_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    d_base = data_ptr + rows64 * stride_data
    n_base = noise_ptr + rows64 * stride_noise
    lo_base = x_lo_ptr + rows64 * stride_out
    hi_base = x_hi_ptr + rows64 * stride_out
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)[None, :]
        mask = row_ok[:, None] & (cols < D)
        dat = tl.load(d_base + cols, mask=mask, other=0.0).to(tl.float32)
        noi = tl.load(n_base + cols, mask=mask, other=0.0).to(tl.float32)
        diff = dat - noi
        if LINEAR:
            x_lo = dat - t_lo * diff
            x_hi = dat - t_hi * diff
        else:
            x_lo = dat + t_lo * noi
            x_hi = dat + t_hi * noi
        tl.store(lo_base + cols, x_lo.to(x_lo_ptr.dtype.element_ty), mask=mask)
        tl.store(hi_base + cols, x_hi.to(x_hi_ptr.dtype.element_ty), mask=mask)
        acc += diff * diff
    tl.store(sq_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


def launch_config(B: int, D: int) -> tuple[int, int, int]:
    """``(BLOCK_B, BLOCK_D, num_warps)`` for a ``(B, D)`` problem.

    A tile of about 4096 elements per program (16 float32 per thread and operand at 8 warps):
    ``BLOCK_D`` covers ``D`` up to 1024 columns, and rows are stacked into the tile for small
    ``D`` (the 2D toy problems), but only while enough programs remain to fill a GPU (about 1024
    programs, 8 per SM on an H100). ``experiments/bench_kernels.py`` times alternatives.
    """
    block_d = min(triton.next_power_of_2(max(D, 1)), 1024)
    block_b = max(1, 4096 // block_d)
    while block_b > 1 and triton.cdiv(B, block_b) < 1024:
        block_b //= 2
    num_warps = 8 if block_b * block_d >= 4096 else 4
    return block_b, block_d, num_warps


def interpolate_pair_triton(
    data: Tensor,
    noise: Tensor,
    t_lo: Tensor,
    t_hi: Tensor,
    process: str = "ve",
    *,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
    config: tuple[int, int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton ``interpolate_pair``: computes ``reference.interpolate_pair``.

    Trusts its inputs (``gcflows.kernels.interpolate_pair`` checks them and the values).
    data, noise: ``(B, *dims)`` float32 / float16 / bfloat16 on one device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``); t_lo, t_hi: ``(B,)`` float tensors. ``out``: preallocated contiguous
    ``(x_lo, x_hi, sqcost)`` (the tests poison them with NaN). ``config``: ``(BLOCK_B, BLOCK_D,
    num_warps)`` overriding ``launch_config`` (benchmarks). Returns ``x_lo, x_hi`` ``(B, *dims)``
    in the input dtype and ``sqcost`` ``(B,)`` float32.
    """
    B = data.shape[0]
    t_lo, t_hi = t_lo.contiguous(), t_hi.contiguous()
    data2 = _rows(data)
    noise2 = _rows(noise)
    D = data2.shape[1]
    if out is None:
        x_lo = torch.empty(data.shape, dtype=data.dtype, device=data.device)
        x_hi = torch.empty(data.shape, dtype=data.dtype, device=data.device)
        sqcost = torch.empty(B, dtype=torch.float32, device=data.device)
    else:
        x_lo, x_hi, sqcost = out
    block_b, block_d, num_warps = config if config is not None else launch_config(B, D)
    grid = (triton.cdiv(B, block_b),)
    _interpolate_pair_kernel[grid](
        data2,
        noise2,
        t_lo,
        t_hi,
        x_lo,
        x_hi,
        sqcost,
        B,
        D,
        data2.stride(0),
        noise2.stride(0),
        D,
        LINEAR=process == "linear",
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return x_lo, x_hi, sqcost


def _rows(x: Tensor) -> Tensor:
    """``(B, *dims) -> (B, D)`` with unit column stride (a view when possible, else a copy)."""
    x2 = x.reshape(x.shape[0], -1)
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2
