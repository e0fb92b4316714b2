"""Pure-torch reference of each kernel op: the specification the Triton kernels are tested against.

Two ops (DESIGN.md, "The kernels"; PAPER.md section 1 for the processes):

- ``interpolate_pair(data, noise, t_lo, t_hi, process)`` returns
  ``x_lo = a(t_lo) data + b(t_lo) noise``, ``x_hi = a(t_hi) data + b(t_hi) noise`` and the squared
  transport cost of the pair ``sqcost_j = ||data_j - noise_j||^2``, for the ``ve`` process
  (``a = 1, b = t``, ``t > 0``) and the ``linear`` process (``a = 1 - t, b = t``, ``0 < t < 1``).
- ``pairwise_sqdist(a, b)`` returns the cost matrix ``C_ij = ||a_i - b_j||^2`` of the batch-OT
  coupling, clamped at 0, with exact zeros on the diagonal when ``a is b``.

Arithmetic: float32 for float32 / float16 / bfloat16 inputs (low-precision inputs are upcast, the
results rounded once to the input dtype), float64 for float64 inputs. This module imports nothing
from gcflows and never touches a GPU driver at import.

CPU speed (docs/performance.md): ``interpolate_pair`` walks the rows in cache-sized blocks, so that
``data`` and ``noise`` come from DRAM once for the three outputs, and writes with ``out=`` kernels
(no temporaries). Large CPU outputs are allocated on transparent huge pages when the kernel offers
them (``madvise``), which cuts the page-fault cost of fresh memory several-fold. Inputs that
require grad take a plain differentiable path instead.
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch
from torch import Tensor

__all__ = [
    "PROCESSES",
    "PRECISIONS",
    "interpolate_pair",
    "pairwise_sqdist",
    "check_pair",
    "check_times",
    "check_time_values",
    "check_points",
    "check_precision",
    "recenter",
    "prepare_points",
    "sqnorms",
    "compute_dtype",
    "empty_fast",
]

PROCESSES = ("ve", "linear")
PRECISIONS = ("ieee", "tf32", "tf32x3")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Rows per block of the CPU loop: about 2**20 elements (4 MiB of float32) per operand, so that a
# block of data, noise and their difference stays in L3 between the four passes over it.
# Measured at 4096 x 3072 float32 on the 2-core EPYC of docs/performance.md (out= timings):
# blocks of 2**18 and 2**20 elements 7.5 and 7.8 ms, 2**16 10.4 ms (per-call overhead), 2**21
# 11.6 ms, one whole-tensor pass per op 25 ms (DRAM traffic). When other processes oversubscribe
# the cores, every parallel region can stall on a descheduled thread: 2**20 (a dozen blocks)
# then lost 4x less than 2**18.
_BLOCK_ELEMENTS = 1 << 20
# Huge pages from 4 MiB (two pages of 2 MiB); below that the hint has nothing to cover.
_HUGE_PAGE_MIN_BYTES = 4 << 20
# interpolate_pair's outputs take their page faults in one parallel pass before the block loop:
# median 12.3 to 15.0 ms against 17.5 to 19.8 at 4096 x 3072 float32, no difference within the
# noise at 512 x 3072 (docs/performance.md). The cost
# matrix does not (its GEMM writes it in parallel anyway; zeroing first cost 1 ms of 2.3 at
# 2048 x 2048 x 2).
_PREFAULT = True
_MADV_HUGEPAGE = 14  # Linux <asm-generic/mman-common.h>


# --------------------------------------------------------------------------------------------
# validation shared with the Triton wrappers
# --------------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for an input dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float_tensor(x, name: str) -> Tensor:
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}; "
            f"convert it with {name}.float()"
        )
    return x


def check_pair(data: Tensor, noise: Tensor) -> None:
    """Shape / dtype / device checks of a pair ``(B, *dims)``; ``ValueError`` on misuse."""
    _check_float_tensor(data, "data")
    _check_float_tensor(noise, "noise")
    if data.dim() < 1 or data.shape[0] == 0:
        raise ValueError(
            f"data must be a non-empty batch (B, *dims) with B >= 1, got shape {tuple(data.shape)}"
        )
    if noise.shape != data.shape:
        raise ValueError(
            f"noise must have the shape of data, got noise {tuple(noise.shape)} and data "
            f"{tuple(data.shape)}; pair row j of data with row j of noise"
        )
    if noise.dtype != data.dtype:
        raise ValueError(
            f"noise must have the dtype of data, got noise {noise.dtype} and data {data.dtype}"
        )
    if noise.device != data.device:
        raise ValueError(
            f"noise must be on the device of data, got noise on {noise.device} and data on "
            f"{data.device}"
        )


def check_process(process: str) -> None:
    if process not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def check_times(t: Tensor | float, batch: int, like: Tensor, process: str, name: str) -> Tensor:
    """Per-sample times as a ``(batch,)`` tensor in the arithmetic dtype of ``like``.

    A Python number or 0-d tensor is broadcast. Checks the type and shape only; the values are
    checked by ``check_time_values``.
    """
    check_process(process)
    if torch.is_tensor(t):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}; use {name}.float()")
    elif isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ValueError(f"{name} must be a tensor of shape ({batch},) or a number, got {t!r}")
    tt = torch.as_tensor(t, dtype=compute_dtype(like.dtype), device=like.device)
    if tt.dim() == 0:
        tt = tt.expand(batch)
    if tt.shape != (batch,):
        raise ValueError(
            f"{name} must be a number or have shape ({batch},) to match the batch, got "
            f"{tuple(tt.shape)}"
        )
    return tt


def check_time_values(times: dict[str, Tensor], process: str) -> None:
    """``ValueError`` naming the first of ``times`` (name -> ``(B,)`` tensor) that holds NaN, inf
    or a value outside the open domain of the process (``ve``: ``t > 0``; ``linear``:
    ``0 < t < 1``). One reduction and, on a GPU, one host synchronisation for all of them."""
    bounds = torch.stack([v for t in times.values() for v in torch.aminmax(t)]).tolist()
    upper = math.inf if process == "ve" else 1.0
    for k, name in enumerate(times):
        lo, hi = bounds[2 * k], bounds[2 * k + 1]
        # NaN propagates into min and max, so finite bounds mean finite values
        if not (math.isfinite(lo) and math.isfinite(hi) and lo > 0.0 and hi < upper):
            domain = "t > 0" if process == "ve" else "0 < t < 1"
            raise ValueError(
                f"{name} must be finite and satisfy {domain} for the {process} process, got "
                f"values in [{lo}, {hi}]"
            )


def check_points(x: Tensor, name: str) -> Tensor:
    """A point set ``(B, *dims)`` flattened to ``(B, D)``; ``ValueError`` when empty."""
    _check_float_tensor(x, name)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (B, *dims), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def _check_out(out, shapes, dtypes, device, inputs) -> tuple[Tensor, ...]:
    if not isinstance(out, (tuple, list)) or len(out) != len(shapes):
        raise ValueError(f"out must be a tuple of {len(shapes)} tensors, got {type(out).__name__}")
    storages = {x.untyped_storage().data_ptr() for x in inputs}
    for k, (o, shape, dtype) in enumerate(zip(out, shapes, dtypes, strict=True)):
        if not torch.is_tensor(o) or o.shape != shape or o.dtype != dtype or o.device != device:
            raise ValueError(
                f"out[{k}] must be a {dtype} tensor of shape {tuple(shape)} on {device}, got "
                + (f"{o.dtype} {tuple(o.shape)} on {o.device}" if torch.is_tensor(o) else repr(o))
            )
        if not o.is_contiguous():
            raise ValueError(f"out[{k}] must be contiguous; allocate it with torch.empty")
        if o.untyped_storage().data_ptr() in storages:
            raise ValueError(f"out[{k}] shares memory with an input; give it its own buffer")
    return tuple(out)


# --------------------------------------------------------------------------------------------
# allocation
# --------------------------------------------------------------------------------------------
_madvise = None


def _load_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                _madvise = False
    return _madvise


def empty_fast(shape, dtype: torch.dtype, device: torch.device, prefault: bool = False) -> Tensor:
    """``torch.empty`` that asks Linux for transparent huge pages on large CPU buffers.

    Fresh CPU memory is zeroed by the kernel page by page on first touch; with 2 MiB pages that
    costs several times less than with 4 KiB pages (2.5 against 11.7 ms to allocate and fill
    48 MiB, docs/performance.md). Applied from 4 MiB (``_HUGE_PAGE_MIN_BYTES``). The hint only
    covers whole pages inside the buffer and is ignored where unsupported. ``prefault``: touch
    (zero) the buffer at once when the hint was taken, so that its page faults happen in one
    parallel pass. The tensor is an ordinary torch tensor.
    """
    x = torch.empty(shape, dtype=dtype, device=device)
    nbytes = x.numel() * x.element_size()
    if x.device.type == "cpu" and nbytes >= _HUGE_PAGE_MIN_BYTES:
        fn = _load_madvise()
        if fn:
            page = 4096
            start = (x.data_ptr() + page - 1) & ~(page - 1)
            end = (x.data_ptr() + nbytes) & ~(page - 1)
            if end > start and fn(start, end - start, _MADV_HUGEPAGE) == 0 and prefault:
                x.zero_()
    return x


# --------------------------------------------------------------------------------------------
# interpolate_pair
# --------------------------------------------------------------------------------------------
def _interpolate_autograd(data2, noise2, t_lo, t_hi, process):
    """Plain differentiable expression of the specification (used when grad is required)."""
    acc = compute_dtype(data2.dtype)
    d, n = data2.to(acc), noise2.to(acc)
    if process == "ve":
        x_lo = d + t_lo[:, None] * n
        x_hi = d + t_hi[:, None] * n
    else:
        x_lo = (1.0 - t_lo[:, None]) * d + t_lo[:, None] * n
        x_hi = (1.0 - t_hi[:, None]) * d + t_hi[:, None] * n
    diff = d - n
    return x_lo.to(data2.dtype), x_hi.to(data2.dtype), (diff * diff).sum(1)


def _interpolate_blocked(data2, noise2, t_lo, t_hi, process, x_lo, x_hi, sqcost):
    """Row-blocked ``out=`` evaluation: data2, noise2, x_lo, x_hi ``(B, D)``; sqcost ``(B,)``."""
    B, D = data2.shape
    acc = compute_dtype(data2.dtype)
    # CPU: cache-sized row blocks; GPU: one block (every op is parallel already, and each block
    # costs kernel launches)
    block = _BLOCK_ELEMENTS if data2.device.type == "cpu" else B * max(D, 1)
    rows = max(1, min(B, block // max(D, 1)))
    scratch = torch.empty((rows, D), dtype=acc, device=data2.device)
    same = data2.dtype == acc
    if process == "ve":
        c_lo, c_hi = t_lo[:, None], t_hi[:, None]
    else:
        # linear: x = (1 - t) data + t noise = data - t (data - noise)
        c_lo, c_hi = (-t_lo)[:, None], (-t_hi)[:, None]
    for r0 in range(0, B, rows):
        r1 = min(B, r0 + rows)
        dc, nc, s = data2[r0:r1], noise2[r0:r1], scratch[: r1 - r0]
        if same:
            torch.sub(dc, nc, out=s)
        else:  # upcast first: the difference of two float16 values is not a float16
            s.copy_(dc)
            s.sub_(nc)
        torch.linalg.vector_norm(s, dim=1, out=sqcost[r0:r1])
        other = nc if process == "ve" else s
        # mixed-dtype addcmul computes in the common dtype (float32 for float16 inputs) and
        # rounds once into the output
        torch.addcmul(dc, c_lo[r0:r1], other, out=x_lo[r0:r1])
        torch.addcmul(dc, c_hi[r0:r1], other, out=x_hi[r0:r1])
    sqcost.square_()


def interpolate_pair(
    data: Tensor,
    noise: Tensor,
    t_lo: Tensor | float,
    t_hi: Tensor | float,
    process: str = "ve",
    *,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Noise one (data, noise) pair at two times and return its squared transport cost.

    PAPER.md section 1: ``x_t = a(t) data + b(t) noise`` with ``ve``: ``a = 1, b = t`` and
    ``linear``: ``a = 1 - t, b = t``.

    Args:
        data, noise: ``(B, *dims)``, same shape, dtype (float32 / float16 / bfloat16 / float64)
            and device.
        t_lo, t_hi: per-row times ``(B,)`` (or a number), inside the process domain.
        process: ``"ve"`` or ``"linear"``.
        out: optional preallocated contiguous ``(x_lo, x_hi, sqcost)`` to write into.
        validate: check the time values (domain, NaN); ``False`` skips that check (one host
            synchronisation on a GPU) when the caller guarantees it. Shapes are always checked.

    Returns:
        ``x_lo, x_hi``: ``(B, *dims)`` in the input dtype, computed in float32 (float64 for
        float64) and rounded once; ``sqcost``: ``(B,)``, ``||data_j - noise_j||^2`` over all
        non-batch dims, float32 (float64 for float64 inputs).
    """
    check_pair(data, noise)
    check_process(process)
    B = data.shape[0]
    t_lo = check_times(t_lo, B, data, process, "t_lo")
    t_hi = check_times(t_hi, B, data, process, "t_hi")
    if validate:
        check_time_values({"t_lo": t_lo, "t_hi": t_hi}, process)
    data2 = data.reshape(B, -1)
    noise2 = noise.reshape(B, -1)
    acc = compute_dtype(data.dtype)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (data, noise, t_lo, t_hi)):
        if out is not None:
            raise ValueError("out= cannot be used with inputs that require grad; drop out=")
        x_lo, x_hi, sqcost = _interpolate_autograd(data2, noise2, t_lo, t_hi, process)
        return x_lo.reshape(data.shape), x_hi.reshape(data.shape), sqcost
    if out is None:
        x_lo = empty_fast(data.shape, data.dtype, data.device, prefault=_PREFAULT)
        x_hi = empty_fast(data.shape, data.dtype, data.device, prefault=_PREFAULT)
        sqcost = torch.empty(B, dtype=acc, device=data.device)
    else:
        x_lo, x_hi, sqcost = _check_out(
            out,
            (data.shape, data.shape, (B,)),
            (data.dtype, data.dtype, acc),
            data.device,
            (data, noise),
        )
    _interpolate_blocked(
        data2, noise2, t_lo, t_hi, process, x_lo.view(data2.shape), x_hi.view(data2.shape), sqcost
    )
    return x_lo, x_hi, sqcost


# --------------------------------------------------------------------------------------------
# pairwise_sqdist
# --------------------------------------------------------------------------------------------
def recenter(a2: Tensor, b2: Tensor, same: bool) -> tuple[Tensor, Tensor]:
    """Translate both point sets by a common vector when an offset dominates their norms.

    ``||a_i - b_j||^2`` is invariant under a common translation, but the matmul form
    ``||a||^2 + ||b||^2 - 2 a.b`` loses ``~eps (||a_i||^2 + ||b_j||^2)`` to cancellation. When the
    mean of a sample of rows (the first 64 of each set) carries more than half of their mean
    squared norm (points far from the origin), both sets are shifted by that mean, which divides
    the error by the ratio of the mean squared norms before and after (at least 2). Inputs
    ``(Ba, D)``, ``(Bb, D)``; returns them unchanged, or shifted in the arithmetic dtype
    (``b`` is ``a`` again when ``same``). One host synchronisation on a GPU.
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


def prepare_points(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Validate two point sets and return ``(a2, b2, same)``: ``(Ba, D)``, ``(Bb, D)`` after
    ``recenter`` (input dtype, or the arithmetic dtype when shifted) and whether ``a is b``."""
    same = a is b
    a2 = check_points(a, "a")
    b2 = a2 if same else check_points(b, "b")
    if not same:
        if b2.shape[1] != a2.shape[1]:
            raise ValueError(
                f"b must have the feature size of a, got a {tuple(a.shape)} and b "
                f"{tuple(b.shape)}; both are (B, *dims) with the same dims"
            )
        if b.dtype != a.dtype or b.device != a.device:
            raise ValueError(
                f"b must have the dtype and device of a, got {b.dtype} on {b.device} and "
                f"{a.dtype} on {a.device}"
            )
    a2, b2 = recenter(a2, b2, same)
    return a2, b2, same


def sqnorms(x: Tensor) -> Tensor:
    """Row squared norms ``(B, D) -> (B,)`` in the arithmetic dtype (float32 for 16-bit input)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype)).square()


def pairwise_sqdist(
    a: Tensor, b: Tensor, precision: str = "ieee", *, out: Tensor | None = None
) -> Tensor:
    """Squared Euclidean distances ``C_ij = ||a_i - b_j||^2``: ``(Ba, *dims), (Bb, *dims)`` ->
    ``(Ba, Bb)``.

    Matmul form ``||a_i||^2 + ||b_j||^2 - 2 a_i . b_j`` (one ``addmm`` and a norm epilogue) after
    an optional common translation (``recenter``), clamped at 0 (rounding can make it negative),
    with exact zeros on the diagonal when ``a is b``. float32 arithmetic and output for float32 /
    float16 / bfloat16 inputs, float64 for float64.

    ``precision`` (``"ieee"``, ``"tf32"``, ``"tf32x3"``) selects the input precision of the Triton
    ``tl.dot``; this torch path always computes in the arithmetic dtype on CPU and follows torch's
    global matmul precision setting on CUDA (``torch.backends.cuda.matmul``).
    """
    check_precision(precision)
    a2, b2, same = prepare_points(a, b)
    acc = compute_dtype(a2.dtype)
    a2 = a2.to(acc)
    b2 = a2 if same else b2.to(acc)
    shape = (a2.shape[0], b2.shape[0])
    if torch.is_grad_enabled() and (a2.requires_grad or b2.requires_grad):
        if out is not None:
            raise ValueError("out= cannot be used with inputs that require grad; drop out=")
        d = sqnorms(a2)[:, None] + sqnorms(b2)[None, :] - 2.0 * (a2 @ b2.T)
        d = d.clamp(min=0.0)
        if same:
            d = d.masked_fill(torch.eye(shape[0], dtype=torch.bool, device=d.device), 0.0)
        return d
    if out is None:
        out = empty_fast(shape, a2.dtype, a2.device)
    else:
        (out,) = _check_out((out,), (shape,), (a2.dtype,), a2.device, (a, b))
    an = sqnorms(a2)
    bn = an if same else sqnorms(b2)
    torch.addmm(bn[None, :], a2, b2.T, alpha=-2.0, out=out)
    out.add_(an[:, None]).clamp_(min=0.0)
    if same:
        out.fill_diagonal_(0.0)
    return out
