"""The tuned torch implementation of the kernel ops (the ``"torch"`` backend), written for CPU.

It computes the functions of ``reference.py`` (the specification) with the same arithmetic, but
arranged for a CPU's caches and threads; the ops it calls are ordinary torch ops, so it also runs
on any other device (one block, no worker threads). It trusts its inputs: the public ops in
``gcflows.kernels`` check them. Measurements: docs/performance.md (kernels section).

``interpolate_pair``:

- float32 / float64 on CPU from ``_FUSED_MIN_ELEMENTS`` elements: one fused pass per block of rows
  (``_fused_rows``, compiled by numba): each element of ``data`` and ``noise`` is read once and
  each output written once, the traffic of two ``copy_`` calls, with the squared cost summed in
  float64 on the way. Other dtypes, devices or sizes, or numba missing: the four ``out=`` passes
  below.
- Rows are processed in blocks of about ``_BLOCK_ELEMENTS`` (4 MiB of float32 per operand), so
  that a block of ``data``, ``noise`` and their difference stays in L3 across the four ``out=``
  passes over it (difference, ``vector_norm``, two ``addcmul``): ``data`` and ``noise`` come from
  DRAM once for the three outputs, and there are no temporaries.
- The blocks are shared out dynamically among ``torch.get_num_threads()`` worker threads, each of
  which runs torch with one intra-op thread. A block is then one serial pass, not an OpenMP
  parallel region whose barrier waits for its slowest thread: when another process takes a core,
  the worker that still runs simply takes more blocks, instead of every region stalling until the
  descheduled thread returns (which made the row-blocked op 1.5x slower than naive eager with one
  competing process).
- Large outputs come from a small pool of buffers that are handed out again once no tensor
  refers to them (``empty_reused``): in a loop that drops the previous call's outputs, a call
  takes no page faults. New buffers ask for transparent huge pages, and the workers take their
  page faults in parallel, block by block.

``pairwise_sqdist``: one ``addmm`` into the output with the norm epilogue in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .reference import compute_dtype, recenter, sqnorms
from .validation import check_norms

__all__ = ["interpolate_pair", "pairwise_sqdist", "empty_fast", "empty_reused", "release_buffers"]

# Elements per operand in a block of rows: a block of data, noise and their float32 difference
# (12 MiB) stays in the 32 MiB L3 of the machine of docs/performance.md between passes.
_BLOCK_ELEMENTS = 1 << 20
# Below this many elements per worker, a thread hand-off costs more than it saves: one block,
# run in the calling thread.
_MIN_PARALLEL_ELEMENTS = 1 << 16
# The fused numba pass from this many elements: below it the op is short next to importing numba
# (about 1 s, once per process), so small calls (a training step on 2D data) never import it.
_FUSED_MIN_ELEMENTS = 1 << 16
# Huge pages from 4 MiB (two pages of 2 MiB); below that the hint has nothing to cover. Outputs
# from this size come from the pool of reused buffers (``empty_reused``).
_HUGE_PAGE_MIN_BYTES = 4 << 20
# Buffers the pool keeps (idle or in use); a request beyond them gets a buffer outside the pool.
_POOL_MAX_BUFFERS = 8
_MADV_HUGEPAGE = 14  # Linux <asm-generic/mman-common.h>


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
                fn = ctypes.CDLL(None, use_errno=True).madvise
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


_buffers: list[mmap.mmap] = []  # the pool, least recently handed out first
_buffers_lock = threading.Lock()


def _idle(buf: mmap.mmap) -> bool:
    """Whether no tensor refers to ``buf``, called on the loop variable of a plain ``for`` over
    the pool (the references then are the pool's list, the loop variable and the arguments)."""
    return sys.getrefcount(buf) <= _IDLE_REFS


def _refs(buf: mmap.mmap) -> int:  # called as ``_idle`` is: the same references
    return sys.getrefcount(buf)


def _count_idle_refs() -> int:
    probe = [mmap.mmap(-1, 1)]
    for buf in probe:  # the same form as the loops of ``empty_reused``
        return _refs(buf)
    raise AssertionError


_IDLE_REFS = _count_idle_refs()


def empty_reused(shape, dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor, in a buffer reused from earlier calls when one is idle.

    Fresh memory costs a page fault and a kernel-zeroed page per page on first touch: for the two
    48 MiB outputs of ``interpolate_pair`` at 4096 x 3072 that is as long as the op itself
    (docs/performance.md). Buffers of at least ``_HUGE_PAGE_MIN_BYTES`` therefore come from a
    small pool of anonymous memory maps (transparent huge pages where the kernel offers them),
    each wrapped by ``torch.frombuffer``: the tensor holds a reference to its buffer, so a buffer
    is handed out again only once no tensor (nor view of one) refers to it any more. The pool keeps
    at most ``_POOL_MAX_BUFFERS`` buffers (``release_buffers`` empties it); the memory of an idle
    buffer stays with the process meanwhile. The tensor is an ordinary tensor whose storage
    cannot be resized. Smaller requests are plain ``torch.empty``.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _HUGE_PAGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    with _buffers_lock:
        chosen = None
        for buf in _buffers:
            if len(buf) == nbytes and _idle(buf):
                chosen = buf
                break
        if chosen is None:
            chosen = _new_buffer(nbytes)
        else:
            _buffers.remove(chosen)
        if len(_buffers) < _POOL_MAX_BUFFERS:
            _buffers.append(chosen)  # most recently handed out last
        return torch.frombuffer(chosen, dtype=dtype).view(shape)


def _new_buffer(nbytes: int) -> mmap.mmap:
    """A fresh anonymous map (page-aligned, zero-filled on first touch, huge pages asked for);
    makes room in a full pool by dropping its least recently used idle buffer."""
    buf = mmap.mmap(-1, nbytes)
    with contextlib.suppress(AttributeError, OSError):
        buf.madvise(mmap.MADV_HUGEPAGE)
    if len(_buffers) >= _POOL_MAX_BUFFERS:
        for old in _buffers:
            if _idle(old):
                _buffers.remove(old)
                break
    return buf


def release_buffers() -> None:
    """Drop the pool of ``empty_reused``: idle buffers return to the system at once, buffers in
    use when their last tensor goes."""
    with _buffers_lock:
        _buffers.clear()


# --------------------------------------------------------------------------------------------
# worker threads with one intra-op thread each
# --------------------------------------------------------------------------------------------
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, size) -> executor
_pools_lock = threading.Lock()


def _serial_workers(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``n`` threads whose torch ops run serially.

    ``torch.set_num_threads`` sets the calling thread's OpenMP thread count and a process-wide
    default that threads started later inherit. Each worker sets 1 for itself as it starts; the
    caller then restores its own count, which restores the default. Keyed by process id, so a
    forked child (which has no threads) builds its own.
    """
    key = (os.getpid(), n)
    with _pools_lock:
        if key in _pools:
            return _pools[key]
        own = torch.get_num_threads()
        started = threading.Barrier(n + 1)
        executor = ThreadPoolExecutor(
            n, "gcflows-kernels", initializer=torch.set_num_threads, initargs=(1,)
        )
        futures = [executor.submit(started.wait) for _ in range(n)]  # start all n threads now
        started.wait()
        for f in futures:
            f.result()
        torch.set_num_threads(own)
        _pools[key] = executor
        return executor


def _run_blocks(work, n_blocks: int, n_threads: int) -> None:
    """Call ``work(k)`` for ``k < n_blocks``: in this thread, or handed out one block at a time
    to ``n_threads`` serial workers (whoever is free takes the next block)."""
    if n_threads <= 1 or n_blocks <= 1:
        for k in range(n_blocks):
            work(k)
        return
    counter, lock = itertools.count(), threading.Lock()

    def next_block() -> int:
        with lock:  # atomic without relying on the GIL
            return next(counter)

    # grad and inference mode are thread-local: the workers take the caller's (writing into an
    # inference tensor outside inference mode is an error)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def loop() -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for k in iter(next_block, None):
                if k >= n_blocks:
                    return
                work(k)

    executor = _serial_workers(n_threads)
    futures = [executor.submit(loop) for _ in range(min(n_threads, n_blocks))]
    for f in futures:
        f.result()


# --------------------------------------------------------------------------------------------
# interpolate_pair
# --------------------------------------------------------------------------------------------
def _plan(B: int, D: int, device: torch.device) -> tuple[int, int, int]:
    """``(rows per block, number of blocks, worker threads)`` for a ``(B, D)`` pair."""
    total = B * max(D, 1)
    if device.type != "cpu":
        return B, 1, 1  # every op is parallel on the device already; a block costs launches
    threads = torch.get_num_threads()
    n_blocks = max(
        math.ceil(total / _BLOCK_ELEMENTS), min(threads, total // _MIN_PARALLEL_ELEMENTS), 1
    )
    rows = math.ceil(B / min(n_blocks, B))
    return rows, math.ceil(B / rows), threads


def _pair_rows(d, n, c_lo, c_hi, linear: bool, x_lo, x_hi, norm, s) -> None:
    """One block of rows, every result written ``out=``: ``s = d - n`` (arithmetic dtype),
    ``norm = ||s||`` per row, ``x = d + c n`` (ve, ``c = t``) or ``x = d + c s`` (linear,
    ``c = -t``)."""
    if d.dtype == s.dtype:
        torch.sub(d, n, out=s)
    else:  # upcast first: the difference of two float16 values is not a float16
        s.copy_(d)
        s.sub_(n)
    torch.linalg.vector_norm(s, dim=1, out=norm)
    other = s if linear else n
    # mixed-dtype addcmul computes in the common dtype (float32 for 16-bit inputs) and rounds
    # once into the output
    torch.addcmul(d, c_lo, other, out=x_lo)
    torch.addcmul(d, c_hi, other, out=x_hi)


_numba_kernel = None


def _fused_kernel():
    """The compiled row kernel, or ``None`` when numba is not installed (compiled on first use,
    cached on disk beside this file where it is writable)."""
    global _numba_kernel
    if _numba_kernel is None:
        try:
            import numba
        except ImportError:
            _numba_kernel = False
        else:
            _numba_kernel = numba.njit(nogil=True, cache=True)(_fused_rows)
    return _numba_kernel or None


def _fused_rows(d, n, c_lo, c_hi, linear, x_lo, x_hi, sqcost, r0, r1):  # pragma: no cover
    """Rows ``r0:r1`` in one pass (plain Python; run compiled by numba): with ``s = d - n``,
    ``sqcost = ||s||^2`` summed in float64, ``x = d + c n`` (ve, ``c = t``) or ``x = d + c s``
    (linear, ``c = -t``). d, n, x_lo, x_hi: ``(B, D)`` arrays of one float dtype; c_lo, c_hi:
    ``(B,)`` of the same dtype; sqcost: ``(B,)``."""
    D = d.shape[1]
    for i in range(r0, r1):
        a = c_lo[i]
        b = c_hi[i]
        acc = 0.0
        for j in range(D):
            x = d[i, j]
            s = x - n[i, j]
            acc += s * s
            y = s if linear else n[i, j]
            x_lo[i, j] = x + a * y
            x_hi[i, j] = x + b * y
        sqcost[i] = acc


def _fusable(*xs: Tensor) -> bool:
    """Whether the fused pass applies: CPU tensors, all float32 or all float64, contiguous, the
    first of at least ``_FUSED_MIN_ELEMENTS`` elements."""
    dtype = xs[0].dtype
    return (
        xs[0].device.type == "cpu"
        and xs[0].numel() >= _FUSED_MIN_ELEMENTS
        and dtype in (torch.float32, torch.float64)
        and all(x.dtype == dtype and x.is_contiguous() for x in xs)
        and _fused_kernel() is not None
    )


def interpolate_pair(
    data: Tensor,
    noise: Tensor,
    t_lo: Tensor,
    t_hi: Tensor,
    process: str = "ve",
    *,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.interpolate_pair`` in row blocks (module docstring).

    data, noise: ``(B, *dims)``; t_lo, t_hi: ``(B,)`` in the arithmetic dtype; ``out``: checked
    contiguous ``(x_lo, x_hi, sqcost)`` to write into, or ``None`` to allocate them.
    """
    B = data.shape[0]
    data2, noise2 = data.reshape(B, -1), noise.reshape(B, -1)
    D = data2.shape[1]
    acc = compute_dtype(data.dtype)
    if out is None and data.device.type == "cpu":
        x_lo = empty_reused(data.shape, data.dtype)
        x_hi = empty_reused(data.shape, data.dtype)
        sqcost = torch.empty(B, dtype=acc)
    elif out is None:
        x_lo = torch.empty_like(data, memory_format=torch.contiguous_format)
        x_hi = torch.empty_like(data, memory_format=torch.contiguous_format)
        sqcost = torch.empty(B, dtype=acc, device=data.device)
    else:
        x_lo, x_hi, sqcost = out
    lo2, hi2 = x_lo.view(B, D), x_hi.view(B, D)
    # ve: x = data + t noise; linear: x = (1 - t) data + t noise = data - t (data - noise)
    c_lo, c_hi = (t_lo, t_hi) if process == "ve" else (-t_lo, -t_hi)
    c_lo, c_hi = c_lo[:, None], c_hi[:, None]
    rows, n_blocks, threads = _plan(B, D, data.device)
    linear = process == "linear"
    if _fusable(data2, noise2, lo2, hi2, sqcost):
        kernel = _fused_kernel()
        coef = (c_lo[:, 0].contiguous(), c_hi[:, 0].contiguous())
        arrays = [x.numpy() for x in (data2, noise2, *coef)]
        outs = [x.numpy() for x in (lo2, hi2, sqcost)]

        def fused(k: int) -> None:
            kernel(*arrays, linear, *outs, k * rows, min(B, (k + 1) * rows))

        _run_blocks(fused, n_blocks, threads)
        return x_lo, x_hi, sqcost
    if n_blocks == 1:  # the whole batch in this thread, no slicing
        scratch = torch.empty((B, D), dtype=acc, device=data.device)
        _pair_rows(data2, noise2, c_lo, c_hi, linear, lo2, hi2, sqcost, scratch)
        return x_lo, x_hi, sqcost.square_()
    local = threading.local()  # one scratch block per worker thread

    def block(k: int) -> None:
        r0, r1 = k * rows, min(B, (k + 1) * rows)
        if getattr(local, "scratch", None) is None:
            local.scratch = torch.empty((rows, D), dtype=acc, device=data.device)
        rs = slice(r0, r1)
        _pair_rows(
            data2[rs], noise2[rs], c_lo[rs], c_hi[rs], linear, lo2[rs], hi2[rs], sqcost[rs],
            local.scratch[: r1 - r0],
        )  # fmt: skip

    _run_blocks(block, n_blocks, threads)
    sqcost.square_()
    return x_lo, x_hi, sqcost


# --------------------------------------------------------------------------------------------
# pairwise_sqdist
# --------------------------------------------------------------------------------------------
def pairwise_sqdist(
    a: Tensor,
    b: Tensor,
    precision: str = "ieee",
    *,
    out: Tensor | None = None,
    validate: bool = True,
) -> Tensor:
    """``reference.pairwise_sqdist`` as one ``addmm`` into ``out`` and an in-place epilogue.

    a, b: ``(Ba, *dims)``, ``(Bb, *dims)`` (``b is a`` for the self matrix); ``precision`` is
    accepted for the Triton backend's sake: this path computes in the arithmetic dtype on CPU and
    follows torch's matmul precision setting on CUDA. ``out``: checked ``(Ba, Bb)`` tensor or
    ``None``. ``validate``: the finiteness check of ``validation.check_norms``.
    """
    same = a is b
    a2, b2 = recenter(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), same)
    acc = compute_dtype(a2.dtype)
    a2 = a2.to(acc)
    b2 = a2 if same else b2.to(acc)
    an = sqnorms(a2)
    bn = an if same else sqnorms(b2)
    if validate:
        check_norms(an, bn, a, b)
    if out is None:
        out = empty_fast((a2.shape[0], b2.shape[0]), acc, a2.device)
    torch.addmm(bn[None, :], a2, b2.T, alpha=-2.0, out=out)
    out.add_(an[:, None]).clamp_(min=0.0)
    if same:
        out.fill_diagonal_(0.0)
    return out
