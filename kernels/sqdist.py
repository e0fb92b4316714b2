"""Triton kernel: pairwise squared Euclidean distances, the cost matrix of the batch-OT coupling.

``C_ij = ||a_i||^2 + ||b_j||^2 - 2 a_i . b_j`` (docs/design.md, "The kernels"): each program
computes a ``BLOCK_M x BLOCK_N`` tile of ``a b^T`` with ``tl.dot`` over ``BLOCK_K`` slices of the
feature axis (float32 accumulation), then applies the norm epilogue, clamps at 0 and, when
``a is b``, writes exact zeros on the diagonal. Tiles are visited in groups of ``GROUP_M`` row
blocks so that neighbouring programs share ``b`` tiles in L2.

``precision`` is the ``input_precision`` of ``tl.dot`` for float32 operands: ``"ieee"`` (default:
exact float32 products; exact OT is sensitive to ties and cancellation), ``"tf32"`` (tensor cores,
inputs rounded to 10 mantissa bits) or ``"tf32x3"`` (three tf32 products, close to float32).
float16 / bfloat16 operands use the tensor cores with exact products and float32 accumulation.
The row norms are computed by torch in float32 from the same operands, and both point sets are
shifted by a common vector first when an offset dominates their norms (``reference.recenter``).

This module imports triton at import; ``gcflows.kernels`` imports it lazily. For CPU tests set
``TRITON_INTERPRET=1`` before this module is first imported; ``INTERPRETED`` records the mode.
The interpreter computes every ``tl.dot`` in float32, whatever ``precision``, and (triton 3.9)
multiplies bfloat16 operands as their raw 16-bit integers; under the interpreter bfloat16 tiles are
therefore upcast to float32 before ``tl.dot`` (``UPCAST``, exact: bfloat16 products are exact in
float32). Compiled kernels use the bfloat16 tensor-core dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interpolate import interpreting
from .reference import recenter, sqnorms
from .validation import check_norms

__all__ = ["pairwise_sqdist_triton", "launch_config", "INTERPRETED", "SUPPORTED_DTYPES"]

INTERPRETED = interpreting()  # the mode triton.jit took when this module was imported
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _sqdist_kernel(
    a_ptr,
    b_ptr,
    an_ptr,
    bn_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_a,
    stride_b,
    stride_out,
    SAME: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_a + rk[None, :]
    b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * stride_b + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + rk) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    an = tl.load(an_ptr + rm, mask=m_ok, other=0.0)
    bn = tl.load(bn_ptr + rn, mask=n_ok, other=0.0)
    d = an[:, None] + bn[None, :] - 2.0 * acc
    d = tl.maximum(d, 0.0)
    if SAME:
        d = tl.where(rm[:, None] == rn[None, :], 0.0, d)
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_out + rn[None, :]
    tl.store(out_ptrs, d, mask=m_ok[:, None] & n_ok[None, :])


def launch_config(
    M: int, N: int, K: int, dtype: torch.dtype, precision: str
) -> tuple[int, int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)`` for the problem.

    float32 with ``"ieee"`` runs on the FMA units: 64 x 64 tiles keep the accumulator in
    registers. tf32 / tf32x3 / 16-bit operands run on the tensor cores: 128 x 128 tiles with
    ``BLOCK_K`` of 32 (float32) or 64 (16-bit), 3 pipeline stages. Small problems shrink the tiles
    (down to the 16 that ``tl.dot`` needs). ``experiments/bench_kernels.py`` times alternatives.
    """
    if dtype == torch.float32 and precision == "ieee":
        bm, bn, bk, warps, stages = 64, 64, 32, 4, 3
    elif dtype == torch.float32:
        bm, bn, bk, warps, stages = 128, 128, 32, 8, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    bm = max(16, min(bm, triton.next_power_of_2(M)))
    bn = max(16, min(bn, triton.next_power_of_2(N)))
    bk = max(16, min(bk, triton.next_power_of_2(K)))
    return bm, bn, bk, 8, warps, stages


def pairwise_sqdist_triton(
    a: Tensor,
    b: Tensor,
    precision: str = "ieee",
    *,
    out: Tensor | None = None,
    validate: bool = True,
    config: tuple[int, int, int, int, int, int] | None = None,
) -> Tensor:
    """Triton ``pairwise_sqdist``: computes ``reference.pairwise_sqdist``.

    Trusts its arguments (``gcflows.kernels.pairwise_sqdist`` checks them). a: ``(Ba, *dims)``,
    b: ``(Bb, *dims)`` (``b is a`` for the self matrix), float32 / float16 / bfloat16, one device
    (CUDA, or CPU under ``TRITON_INTERPRET=1``). Returns ``(Ba, Bb)`` float32, clamped at 0,
    exact zeros on the diagonal when ``a is b``. ``out``: a preallocated contiguous ``(Ba, Bb)``
    float32 tensor (the tests poison it with NaN). ``validate``: the finiteness check of
    ``validation.check_norms`` on the row norms. ``config`` overrides ``launch_config``.
    """
    same = a is b
    a2, b2 = recenter(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), same)
    a2 = _unit_columns(a2)
    b2 = a2 if same else _unit_columns(b2)
    an = sqnorms(a2)
    bn = an if same else sqnorms(b2)
    if validate:
        check_norms(an, bn, a, b)
    M, N, K = a2.shape[0], b2.shape[0], a2.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=torch.float32, device=a2.device)
    bm, bn_, bk, group_m, num_warps, num_stages = (
        config if config is not None else launch_config(M, N, K, a2.dtype, precision)
    )
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn_),)
    _sqdist_kernel[grid](
        a2,
        b2,
        an,
        bn,
        out,
        M,
        N,
        K,
        a2.stride(0),
        b2.stride(0),
        out.stride(0),
        SAME=same,
        PRECISION=precision,
        BLOCK_M=bm,
        BLOCK_N=bn_,
        BLOCK_K=bk,
        GROUP_M=group_m,
        UPCAST=INTERPRETED and a2.dtype == torch.bfloat16,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def _unit_columns(x: Tensor) -> Tensor:
    return x.contiguous() if x.shape[1] > 1 and x.stride(1) != 1 else x
