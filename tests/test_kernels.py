"""Kernel ops (docs/design.md, "The kernels"): the specification (``reference.py``) and the tuned
torch implementation (``cpu.py``) against float64 mathematics, the Triton kernels against the
same float64 mathematics, dispatch, value checks and bad input.

How the Triton kernels run without a GPU. ``triton.jit`` picks the interpreter when it decorates a
function, and triton decorates its own ``triton.language`` helpers when triton is imported; both
read ``TRITON_INTERPRET`` at that moment (checked with triton 3.9: setting it after ``import
triton`` leaves ``tl.zeros`` compiled and the interpreted kernel fails). In a pytest process the
variable cannot be relied on to come before every import of triton, and leaving it set would turn
the ``gpu`` tests into interpreter runs. So the ``test_interp_*`` tests run in a child pytest
process started with ``TRITON_INTERPRET=1`` (``test_triton_kernels_in_child_process``); in the
parent they are skipped with that reason. When the whole run already has ``TRITON_INTERPRET=1``,
they run in place and the child is not started. The ``gpu`` tests compile the real kernels.

Tolerances are bounds of floating-point error, stated where they are defined (``X_TOL``,
``SQCOST_RTOL``, ``_sqdist_bound``), not fitted to observed errors.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gcflows.kernels as K
from gcflows.kernels import cpu as C
from gcflows.kernels import reference as R

ROOT = Path(__file__).resolve().parents[1]
INTERP_HERE = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(
    not INTERP_HERE,
    reason="Triton interpreter test: run by test_triton_kernels_in_child_process "
    "under TRITON_INTERPRET=1",
)
LOW = (torch.float32, torch.float16, torch.bfloat16)
U32 = 2.0**-24  # unit roundoff of float32 arithmetic
U64 = 2.0**-53

# Output rounding of x_lo / x_hi after the float32 arithmetic: (relative, absolute floor, reason).
X_TOL = {
    torch.float32: (0.0, 0.0, "float32 results are the arithmetic itself (bounded separately)"),
    torch.float64: (0.0, 0.0, "float64 results are the arithmetic itself (bounded separately)"),
    torch.float16: (
        2.0**-11,
        2.0**-25,
        "one round-to-nearest into float16: half an ulp (2^-11 relative), 2^-25 absolute in the "
        "subnormal range",
    ),
    torch.bfloat16: (
        2.0**-7,
        0.0,
        "one rounding into bfloat16: a full ulp (2^-7 relative), because Triton's interpreter "
        "truncates float32 -> bfloat16 where torch and GPUs round to nearest (half an ulp)",
    ),
}
# Arithmetic of x = data + t noise (ve) or data - t (data - noise) (linear): a difference, a
# product and a sum, each rounded once (or fused): error <= 4 u (|data| + |t| (|data| + |noise|)).
X_ARITH = 4.0
# sqcost: a sum of D >= 0 terms, each a rounded difference squared (2 u relative); the reductions
# used (row blocks of <= 2^20 elements then vector_norm's vectorised tree; the Triton lane sums
# over <= 12 column tiles then a tree over <= 1024 lanes) add at most ~24 u relative for the
# D <= 12288 tested, so 2^-16 ~ 1.5e-5 bounds it with room; float64: 1e-12.
SQCOST_RTOL = {torch.float64: 1e-12}
SQCOST_RTOL_LOW = 2.0**-16


def _rand(shape, dtype, gen, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


def _times(B, process, gen, lo=0.05, hi=0.95):
    t = lo + (hi - lo) * torch.rand(B, generator=gen, dtype=torch.float64)
    if process == "ve":
        t = t * 80.0
    return t.float()


def _ref64(data, noise, t_lo, t_hi, process):
    """float64 mathematics of the spec from the exact input values; plus the error scales."""
    B = data.shape[0]
    d = data.double().reshape(B, -1)
    n = noise.double().reshape(B, -1)
    outs, scales = [], []
    for t in (t_lo, t_hi):
        t = torch.as_tensor(t, dtype=torch.float64).expand(B)[:, None]
        a = torch.ones_like(t) if process == "ve" else 1.0 - t
        outs.append((a * d + t * n).reshape(data.shape))
        scales.append((d.abs() + t.abs() * (d.abs() + n.abs())).reshape(data.shape))
    return outs[0], outs[1], ((d - n) ** 2).sum(1), scales


def _assert_within(x, ref, bound, what):
    err = (x.double() - ref).abs()
    ok = err <= bound  # NaN (an unwritten, poisoned element) fails
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} elements out of bound, first {bad}; "
            f"max err {float(err.nan_to_num(math.inf).max()):.3g}, "
            f"bound there {float(bound.flatten()[int(err.nan_to_num(math.inf).argmax())]):.3g}"
        )


def _check_pair(result, data, noise, t_lo, t_hi, process):
    x_lo, x_hi, sq = result
    r_lo, r_hi, r_sq, (s_lo, s_hi) = _ref64(data, noise, t_lo, t_hi, process)
    dtype = data.dtype
    u = U64 if dtype == torch.float64 else U32
    rel, floor, _ = X_TOL[dtype]
    assert x_lo.shape == data.shape and x_hi.shape == data.shape and sq.shape == (data.shape[0],)
    assert x_lo.dtype == dtype and x_hi.dtype == dtype
    assert sq.dtype == R.compute_dtype(dtype)
    _assert_within(x_lo, r_lo, X_ARITH * u * s_lo + rel * r_lo.abs() + floor, "x_lo")
    _assert_within(x_hi, r_hi, X_ARITH * u * s_hi + rel * r_hi.abs() + floor, "x_hi")
    rtol = SQCOST_RTOL.get(dtype, SQCOST_RTOL_LOW)
    _assert_within(sq, r_sq, rtol * r_sq + 1e-30, "sqcost")


def _sqdist64(a, b):
    """float64 squared distances from the differences themselves (no matmul form)."""
    a64 = a.double().reshape(a.shape[0], -1)
    b64 = b.double().reshape(b.shape[0], -1)
    return torch.cdist(a64, b64, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def _sqdist_bound(a, b, precision="ieee", centered=False, device_tf32=False):
    """Error bound of the matmul form: c(K) u (||a_i||^2 + ||b_j||^2).

    The dot products are accumulated over at most K/16 tiles plus a <= 64-term tile product
    (and BLAS blocks on CPU), so each has relative error <= (K/16 + 64) u against
    sum |a_k b_k| <= (||a||^2 + ||b||^2) / 2; the cross term is doubled and the norms and the
    epilogue add a few u: c(K) = 2 (K/16 + 64) + 8. ``centered``: norms about the common mean
    (what recentering achieves for far-offset points). tf32 on a GPU: inputs rounded to 10
    mantissa bits, 2^-10 (||a||^2 + ||b||^2) on the cross term.
    """
    a64 = a.double().reshape(a.shape[0], -1)
    b64 = b.double().reshape(b.shape[0], -1)
    if centered:
        mu = torch.cat([a64, b64]).mean(0)
        a64, b64 = a64 - mu, b64 - mu
    k = a64.shape[1]
    u = U64 if a.dtype == torch.float64 else U32
    c = 2.0 * (k / 16.0 + 64.0) + 8.0
    norms = (a64**2).sum(1)[:, None] + (b64**2).sum(1)[None, :]
    bound = c * u * norms
    if device_tf32 and precision == "tf32":
        bound = bound + 2.0**-10 * norms
    elif device_tf32 and precision == "tf32x3":
        bound = bound + 2.0**-20 * norms
    return bound + 1e-30


def _nan_out_pair(data):
    B = data.shape[0]
    acc = R.compute_dtype(data.dtype)
    return (
        torch.full(data.shape, math.nan, dtype=data.dtype, device=data.device),
        torch.full(data.shape, math.nan, dtype=data.dtype, device=data.device),
        torch.full((B,), math.nan, dtype=acc, device=data.device),
    )


def _spec_pair(data, noise, t_lo, t_hi, process="ve"):
    B = data.shape[0]
    t_lo, t_hi = (torch.as_tensor(t, dtype=torch.float64).expand(B) for t in (t_lo, t_hi))
    return R.interpolate_pair(data, noise, t_lo, t_hi, process)


def _torch_pair(data, noise, t_lo, t_hi, process="ve", **kw):
    return K.interpolate_pair(data, noise, t_lo, t_hi, process, backend="torch", **kw)


def _torch_sqdist(a, b, precision="ieee"):
    return K.pairwise_sqdist(a, b, precision, backend="torch")


# the specification and the tuned torch implementation are held to the same bounds
PAIR_IMPLS = {"spec": _spec_pair, "torch": _torch_pair}
SQDIST_IMPLS = {"spec": R.pairwise_sqdist, "torch": _torch_sqdist}


# =============================================================================================
# specification and torch backend: mathematics against float64
# =============================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("process", ["ve", "linear"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (33, 1000), (5, 3, 4, 4)])
@pytest.mark.parametrize("impl", list(PAIR_IMPLS))
def test_reference_interpolate_matches_float64(dtype, process, shape, impl, gen):
    data, noise = _rand(shape, dtype, gen), _rand(shape, dtype, gen)
    t_lo, t_hi = _times(shape[0], process, gen), _times(shape[0], process, gen)
    fn = PAIR_IMPLS[impl]
    _check_pair(fn(data, noise, t_lo, t_hi, process), data, noise, t_lo, t_hi, process)


@pytest.mark.parametrize("B,D", [(37, 1000), (5, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_interpolate_blocks_write_every_row(B, D, dtype, gen, monkeypatch):
    # Blocks of 4096 elements: 4 rows per block with a 1-row remainder, or rows longer than a
    # block (one row per block); poisoned outputs catch a block skipped or written elsewhere.
    monkeypatch.setattr(C, "_BLOCK_ELEMENTS", 4096)
    for process in ("ve", "linear"):
        data, noise = _rand((B, D), dtype, gen), _rand((B, D), dtype, gen)
        t_lo, t_hi = _times(B, process, gen), _times(B, process, gen)
        out = _nan_out_pair(data)
        res = _torch_pair(data, noise, t_lo, t_hi, process, out=out)
        assert all(r is o for r, o in zip(res, out, strict=True))
        _check_pair(res, data, noise, t_lo, t_hi, process)


def test_reference_interpolate_huge_page_outputs(gen, monkeypatch):
    # outputs above the threshold (lowered to 1 MiB here from 4 MiB) take the madvise
    # (MADV_HUGEPAGE) allocation and are prefaulted: still ordinary, correct, resizable tensors
    monkeypatch.setattr(C, "_HUGE_PAGE_MIN_BYTES", 1 << 20)
    B, D = 600, 2000
    data, noise = _rand((B, D), torch.float32, gen), _rand((B, D), torch.float32, gen)
    t_lo, t_hi = _times(B, "ve", gen), _times(B, "ve", gen)
    res = _torch_pair(data, noise, t_lo, t_hi, "ve")
    _check_pair(res, data, noise, t_lo, t_hi, "ve")
    x = C.empty_fast((B, D), torch.float32, torch.device("cpu"), prefault=True)
    x.fill_(2.0)
    assert float(x.sum()) == 2.0 * B * D
    x.resize_(B * D + 7)  # an ordinary storage: it can grow


def test_torch_backend_reuses_idle_output_buffers(gen, monkeypatch):
    # Large CPU outputs come from a pool of buffers: a buffer is handed out again only when no
    # tensor or view refers to it, the reused buffer is fully overwritten (it held the last
    # call's values), and the pool stays within its bound.
    monkeypatch.setattr(C, "_HUGE_PAGE_MIN_BYTES", 1 << 16)
    monkeypatch.setattr(C, "_POOL_MAX_BUFFERS", 3)
    C.release_buffers()
    B, D = 40, 500  # 80 kB per output
    data, noise = _rand((B, D), torch.float32, gen), _rand((B, D), torch.float32, gen)
    t_lo, t_hi = _times(B, "ve", gen), _times(B, "ve", gen)
    first = _torch_pair(data, noise, t_lo, t_hi)
    ptrs = {first[0].data_ptr(), first[1].data_ptr()}
    keep = first[1][3:]  # a view keeps x_hi's buffer in use
    del first
    other_t = _times(B, "ve", gen)
    second = _torch_pair(data, noise, other_t, other_t)
    assert second[0].data_ptr() in ptrs and second[1].data_ptr() not in ptrs
    _check_pair(second, data, noise, other_t, other_t, "ve")
    assert len(C._buffers) == 3
    live = [C.empty_reused((B, D), torch.float32) for _ in range(5)]  # more than the pool holds
    assert len(C._buffers) <= 3 and len({x.data_ptr() for x in live}) == 5
    del keep, second, live
    C.release_buffers()
    assert C._buffers == []
    small = C.empty_reused((4, 4), torch.float32)  # below the threshold: plain torch.empty
    assert small.untyped_storage().resizable() and C._buffers == []


@pytest.mark.parametrize("process", ["ve", "linear"])
@pytest.mark.parametrize("impl", list(PAIR_IMPLS))
def test_reference_identities_float64(process, impl, gen):
    # ve: x_hi - x_lo = (t_hi - t_lo) noise; linear: x_hi - x_lo = (t_hi - t_lo) (noise - data),
    # so ||x_hi - x_lo||^2 / (t_hi - t_lo)^2 is the squared cost; equal times give equal points.
    B, D = 9, 17
    data, noise = _rand((B, D), torch.float64, gen), _rand((B, D), torch.float64, gen)
    t_lo = _times(B, process, gen, 0.1, 0.4).double()
    t_hi = _times(B, process, gen, 0.6, 0.9).double()
    x_lo, x_hi, sq = PAIR_IMPLS[impl](data, noise, t_lo, t_hi, process)
    dt = (t_hi - t_lo)[:, None]
    direction = noise if process == "ve" else noise - data
    torch.testing.assert_close(x_hi - x_lo, dt * direction, rtol=1e-12, atol=1e-12)
    if process == "linear":  # |x_hi - x_lo| is O(1): 1e-11 relative is ~100 ulp of float64
        torch.testing.assert_close(
            ((x_hi - x_lo) ** 2).sum(1) / dt[:, 0] ** 2, sq, rtol=1e-11, atol=0
        )
    same = PAIR_IMPLS[impl](data, noise, t_lo, t_lo, process)
    assert torch.equal(same[0], same[1])


def test_reference_noncontiguous_and_scalar_times(gen):
    base = _rand((6, 40), torch.float32, gen)
    data = base[:, ::2]  # column stride 2
    noise = _rand((20, 6), torch.float32, gen).T  # transposed
    res = _torch_pair(data, noise, 0.5, 2.0)
    _check_pair(res, data, noise, torch.full((6,), 0.5), torch.full((6,), 2.0), "ve")
    img = _rand((4, 3, 5, 5), torch.float32, gen).to(memory_format=torch.channels_last)
    img_noise = _rand((4, 3, 5, 5), torch.float32, gen)
    t = _times(4, "linear", gen)
    _check_pair(_torch_pair(img, img_noise, t, t, "linear"), img, img_noise, t, t, "linear")
    _check_pair(_spec_pair(img, img_noise, t, t, "linear"), img, img_noise, t, t, "linear")


def test_reference_interpolate_gradients_float64(gen):
    # Inputs that require grad take the specification, which is differentiable; its gradients
    # are the closed forms
    # d sum(x_lo)/d noise = t_lo (ve), d sum(sqcost)/d data = 2 (data - noise).
    B, D = 4, 5
    data = _rand((B, D), torch.float64, gen).requires_grad_()
    noise = _rand((B, D), torch.float64, gen).requires_grad_()
    t_lo, t_hi = _times(B, "ve", gen).double(), _times(B, "ve", gen).double()
    x_lo, x_hi, sq = _torch_pair(data, noise, t_lo, t_hi, "ve")
    g_noise, g_data = torch.autograd.grad(x_lo.sum() + sq.sum(), (noise, data))
    torch.testing.assert_close(g_noise, t_lo[:, None].expand(B, D) - 2 * (data - noise).detach())
    torch.testing.assert_close(g_data, 1.0 + 2 * (data - noise).detach())
    with torch.no_grad():
        plain = _torch_pair(data, noise, t_lo, t_hi, "ve")
    for x, y in zip((x_lo, x_hi, sq), plain, strict=True):
        torch.testing.assert_close(x.detach(), y, rtol=1e-14, atol=1e-14)  # float64 rounding
    t = torch.rand(B, dtype=torch.float64, generator=gen).mul(0.8).add(0.1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda d, n, tt: _torch_pair(d, n, tt, tt, "linear")[0], (data, noise, t)
    )


@given(
    B=st.integers(1, 40),
    D=st.integers(1, 300),
    process=st.sampled_from(["ve", "linear"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_interpolate_property(B, D, process, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    data, noise = _rand((B, D), dtype, gen, scale=3.0), _rand((B, D), dtype, gen)
    t_lo, t_hi = _times(B, process, gen, 1e-3, 0.999), _times(B, process, gen, 1e-3, 0.999)
    for fn in PAIR_IMPLS.values():
        _check_pair(fn(data, noise, t_lo, t_hi, process), data, noise, t_lo, t_hi, process)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("sizes", [(1, 1, 1), (7, 33, 3), (33, 7, 1000)])
@pytest.mark.parametrize("impl", list(SQDIST_IMPLS))
def test_reference_sqdist_matches_float64(dtype, sizes, impl, gen):
    Ba, Bb, D = sizes
    a, b = _rand((Ba, D), dtype, gen), _rand((Bb, D), dtype, gen)
    c = SQDIST_IMPLS[impl](a, b)
    assert c.shape == (Ba, Bb) and c.dtype == R.compute_dtype(dtype)
    _assert_within(c, _sqdist64(a, b), _sqdist_bound(a, b), "pairwise_sqdist")
    for precision in ("tf32", "tf32x3"):  # accepted; the CPU torch path is always exact float32
        assert torch.equal(_torch_sqdist(a, b, precision), _torch_sqdist(a, b))


@pytest.mark.parametrize("impl", list(SQDIST_IMPLS))
def test_reference_sqdist_self_and_duplicates(impl, gen):
    # Rows 0..4 repeated twice: distances between equal rows are 0 in exact arithmetic; the matmul
    # form gives +-eps * norms, which must be clamped (>= 0); the self diagonal is exactly 0.
    base = _rand((5, 64), torch.float32, gen, scale=10.0)
    a = torch.cat([base, base])
    c = SQDIST_IMPLS[impl](a, a)
    assert bool((c >= 0).all())
    assert torch.equal(torch.diagonal(c), torch.zeros(10))
    _assert_within(c, _sqdist64(a, a), _sqdist_bound(a, a), "duplicates")
    c2 = SQDIST_IMPLS[impl](a, a.clone())  # not the same object: no forced zeros, still clamped
    assert bool((c2 >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", list(SQDIST_IMPLS))
def test_reference_sqdist_far_offset_recentered(dtype, impl, gen):
    # Points 1e3 away from the origin with unit spread: the plain matmul form loses
    # eps * 1e6 * D to cancellation (~1e2 in float32, as large as the distances); recentering
    # brings the error down to the bound of the centred norms.
    D = 50
    a = _rand((20, D), dtype, gen, offset=1e3)
    b = _rand((30, D), dtype, gen, offset=1e3)
    c = SQDIST_IMPLS[impl](a, b)
    _assert_within(c, _sqdist64(a, b), _sqdist_bound(a, b, centered=True), "far offset")
    # near-duplicates around the far offset: distances ~1e-6 * D, resolved to the centred bound
    near = a + 1e-3 * _rand((20, D), dtype, gen)
    c = SQDIST_IMPLS[impl](a, near)
    _assert_within(c, _sqdist64(a, near), _sqdist_bound(a, near, centered=True), "near duplicates")


def test_reference_sqdist_gradient_float64(gen):
    # d/da_i sum_j ||a_i - b_j||^2 = 2 (Bb a_i - sum_j b_j)
    a = _rand((4, 6), torch.float64, gen).requires_grad_()
    b = _rand((7, 6), torch.float64, gen)
    for fn in SQDIST_IMPLS.values():  # the torch backend takes the specification with grad
        (g,) = torch.autograd.grad(fn(a, b).sum(), a)
        torch.testing.assert_close(g, 2 * (7 * a.detach() - b.sum(0)), rtol=1e-12, atol=1e-12)


@given(
    Ba=st.integers(1, 30),
    Bb=st.integers(1, 30),
    D=st.integers(1, 200),
    offset=st.sampled_from([0.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_sqdist_property(Ba, Bb, D, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    a = _rand((Ba, D), torch.float32, gen, offset=offset)
    b = _rand((Bb, D), torch.float32, gen, offset=offset)
    for fn in SQDIST_IMPLS.values():
        c = fn(a, b)
        # offset 30 >> spread 1: recentering applies and the centred bound holds
        _assert_within(c, _sqdist64(a, b), _sqdist_bound(a, b, centered=offset > 0), "property")
        assert bool((c >= 0).all())


# =============================================================================================
# dispatch and bad input
# =============================================================================================
def test_public_ops_use_reference_on_cpu_and_import_no_triton():
    code = (
        "import sys, torch, gcflows.kernels as K\n"
        "x = torch.randn(3, 4); y = torch.randn(3, 4); t = torch.full((3,), 0.5)\n"
        "a, b, c = K.interpolate_pair(x, y, t, t)\n"
        "assert torch.equal(c, K.cpu.interpolate_pair(x, y, t, t)[2])\n"
        "assert torch.equal(K.pairwise_sqdist(x, y), K.cpu.pairwise_sqdist(x, y))\n"
        "assert 'triton' not in sys.modules, 'triton imported on the CPU path'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "assert 'numba' not in sys.modules, 'numba imported for a small call'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def _bad_interpolate_cases():
    x, y, t = torch.zeros(3, 4), torch.ones(3, 4), torch.full((3,), 0.5)
    nan_t = torch.tensor([0.5, math.nan, 0.5])
    return [
        ("noise", (x, torch.ones(3, 5), t, t), {}),
        ("noise", (x, y.double(), t, t), {}),
        ("data", (x.long(), y.long(), t, t), {}),
        ("data", (torch.zeros(0, 4), torch.zeros(0, 4), t[:0], t[:0]), {}),
        ("process", (x, y, t, t), {"process": "vp"}),
        ("t_lo", (x, y, torch.zeros(3), t), {}),  # ve needs t > 0
        ("t_hi", (x, y, t, -t), {}),
        ("t_lo", (x, y, nan_t, t), {}),
        ("t_hi", (x, y, t, torch.full((3,), math.inf)), {}),
        ("t_hi", (x, y, t, torch.ones(3)), {"process": "linear"}),  # linear needs t < 1
        ("t_lo", (x, y, torch.zeros(3), t), {"process": "linear"}),
        ("t_lo", (x, y, torch.full((4,), 0.5), t), {}),
        ("t_lo", (x, y, torch.ones(3, dtype=torch.long), t), {}),
        ("backend", (x, y, t, t), {"backend": "cuda"}),
        ("out", (x, y, t, t), {"out": (x.clone(), x.clone())}),
        ("out[1]", (x, y, t, t), {"out": (x.clone(), x[:2].clone(), t.clone())}),
        ("out[0]", (x, y, t, t), {"out": (x, x.clone(), t.clone())}),  # aliases data
    ]


@pytest.mark.parametrize("name,args,kw", _bad_interpolate_cases())
def test_interpolate_bad_input(name, args, kw):
    with pytest.raises(ValueError, match=re.escape(name)):
        K.interpolate_pair(*args, **kw)


@pytest.mark.parametrize(
    "name,args,kw",
    [
        ("b", (torch.zeros(3, 4), torch.zeros(2, 5)), {}),
        ("b", (torch.zeros(3, 4), torch.zeros(2, 4).double()), {}),
        ("a", (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(2, 4)), {}),
        ("a", (torch.zeros(0, 4), torch.zeros(2, 4)), {}),
        ("precision", (torch.zeros(3, 4), torch.zeros(2, 4)), {"precision": "bf16"}),
        ("backend", (torch.zeros(3, 4), torch.zeros(2, 4)), {"backend": "gpu"}),
        ("out", (torch.zeros(3, 4), torch.zeros(2, 4)), {"out": torch.zeros(2, 3)}),
    ],
)
def test_sqdist_bad_input(name, args, kw):
    with pytest.raises(ValueError, match=re.escape(name)):
        K.pairwise_sqdist(*args, **kw)


def test_validate_false_skips_only_the_time_values():
    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    _, _, sq = K.interpolate_pair(x, y, torch.zeros(2), torch.zeros(2), validate=False)
    assert torch.equal(sq, torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="t_lo"):  # shapes are still checked
        K.interpolate_pair(x, y, torch.zeros(3), torch.zeros(2), validate=False)


def _poison(x, row, value):
    x = x.clone()
    x.reshape(x.shape[0], -1)[row, -1] = value
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpolate_rejects_non_finite_inputs(dtype, gen):
    _non_finite_pair_case("torch", dtype, gen)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_interpolate_rejects_non_finite_inputs(dtype, gen):
    _non_finite_pair_case("triton", dtype, gen)


def _non_finite_pair_case(backend, dtype, gen):
    # NaN or inf in any row of data or noise: ValueError naming the argument and the row, on
    # every backend; validate=False computes without the check (the NaN propagates)
    B, D = 6, 33
    data, noise = _rand((B, D), dtype, gen), _rand((B, D), dtype, gen)
    t = _times(B, "ve", gen)
    for name, value, row in [("data", math.nan, 0), ("noise", math.inf, 4), ("data", -math.inf, 5)]:
        d = _poison(data, row, value) if name == "data" else data
        n = _poison(noise, row, value) if name == "noise" else noise
        with pytest.raises(ValueError, match=rf"{name} must be finite.*first \[{row}\]"):
            K.interpolate_pair(d, n, t, t, backend=backend)
        _, _, sq = K.interpolate_pair(d, n, t, t, backend=backend, validate=False)
        assert not bool(torch.isfinite(sq[row])) and bool(torch.isfinite(sq[:row]).all())
    both = _poison(_poison(data, 2, math.inf), 3, math.nan)  # inf - inf and NaN: still caught
    with pytest.raises(ValueError, match=r"data must be finite.*2 row"):
        K.interpolate_pair(both, _poison(noise, 2, math.inf), t, t, backend=backend)


def test_interpolate_rejects_overflowing_cost():
    # finite inputs whose squared difference overflows float32: named as an overflow
    x, y = torch.full((2, 3), 3e19), torch.full((2, 3), -3e19)
    with pytest.raises(ValueError, match=r"overflows torch.float32.*float64"):
        K.interpolate_pair(x, y, 0.5, 0.5)
    _, _, sq = K.interpolate_pair(x.double(), y.double(), 0.5, 0.5)  # fine in float64
    assert torch.allclose(sq, torch.full((2,), 3 * 3.6e39, dtype=torch.float64))


def test_interpolate_rejects_non_finite_with_grad(gen):
    data = _poison(_rand((3, 4), torch.float64, gen), 1, math.nan).requires_grad_()
    with pytest.raises(ValueError, match=r"data must be finite.*first \[1\]"):
        K.interpolate_pair(data, torch.zeros(3, 4, dtype=torch.float64), 0.5, 0.5)


def test_sqdist_rejects_non_finite_inputs(gen):
    _non_finite_sqdist_case("torch", gen)


@interp_only
def test_interp_sqdist_rejects_non_finite_inputs(gen):
    _non_finite_sqdist_case("triton", gen)


def _non_finite_sqdist_case(backend, gen):
    # NaN or inf in a row of a or b: ValueError naming the argument; validate=False skips it
    a, b = _rand((5, 20), torch.float32, gen), _rand((7, 20), torch.float32, gen)
    for name, args in [
        ("a", (_poison(a, 3, math.nan), b)),
        ("b", (a, _poison(b, 6, math.inf))),
        ("a", (_poison(a, 0, -math.inf),) * 2),  # a is b
    ]:
        with pytest.raises(ValueError, match=rf"{name} must be finite"):
            K.pairwise_sqdist(*args, backend=backend)
        c = K.pairwise_sqdist(*args, backend=backend, validate=False)  # computed, unchecked
        assert c.shape == (args[0].shape[0], args[1].shape[0])
    far = torch.full((2, 3), 1e20)  # finite, but its squared norm overflows float32
    with pytest.raises(ValueError, match="overflow"):
        K.pairwise_sqdist(far, -far, backend=backend)


def test_sqdist_rejects_non_finite_with_grad(gen):
    a = _rand((4, 6), torch.float64, gen).requires_grad_()
    with pytest.raises(ValueError, match="b must be finite"):
        K.pairwise_sqdist(a, _poison(_rand((3, 6), torch.float64, gen), 2, math.nan))


def test_torch_backend_worker_threads(gen, monkeypatch):
    # With 2 intra-op threads the CPU path hands its row blocks to serial worker threads: every
    # block is written once (poisoned outputs), results equal the one-thread path bit for bit
    # (same ops on the same blocks), the caller's thread count and the default of new threads
    # are unchanged, and the workers are reused.
    monkeypatch.setattr(C, "_BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(C, "_MIN_PARALLEL_ELEMENTS", 1024)
    B, D = 37, 1000
    for dtype, process in [(torch.float32, "ve"), (torch.bfloat16, "linear")]:
        data, noise = _rand((B, D), dtype, gen), _rand((B, D), dtype, gen)
        t_lo, t_hi = _times(B, process, gen), _times(B, process, gen)
        torch.set_num_threads(1)
        serial = _torch_pair(data, noise, t_lo, t_hi, process)
        torch.set_num_threads(2)
        assert C._plan(B, D, data.device)[1:] == (10, 2)  # 10 blocks of 4 rows, 2 workers
        out = _nan_out_pair(data)
        res = _torch_pair(data, noise, t_lo, t_hi, process, out=out)
        _check_pair(res, data, noise, t_lo, t_hi, process)
        for x, y in zip(res, serial, strict=True):
            assert torch.equal(x, y)
    assert torch.get_num_threads() == 2
    seen = []
    th = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert seen == [2]
    pools = dict(C._pools)
    _torch_pair(data, noise, t_lo, t_hi, process)
    assert C._pools == pools
    # the workers run in the caller's grad / inference mode: writing into inference tensors
    # (outputs allocated under inference_mode) from a worker outside it would raise
    with torch.inference_mode():
        res = _torch_pair(data, noise, t_lo, t_hi, process)
    assert res[0].is_inference()
    _check_pair(res, data, noise, t_lo, t_hi, process)


def test_fused_pass_matches_the_four_pass_path(gen, monkeypatch):
    # numba is a dependency, so float32 / float64 on CPU take the fused one-pass kernel; it must
    # meet the reference bounds of ``_check_pair`` and agree with the four ``out=`` passes to
    # 2 ulp of the terms' magnitude (one rounding either side: the passes' addcmul may fuse the
    # multiply-add, the kernel rounds the product first). Multi-block (2 workers) and one block.
    assert C._fused_kernel() is not None
    for B, D, block in [(37, 1000, 4096), (5, 7, C._BLOCK_ELEMENTS)]:
        monkeypatch.setattr(C, "_BLOCK_ELEMENTS", block)
        monkeypatch.setattr(C, "_MIN_PARALLEL_ELEMENTS", 1024)
        monkeypatch.setattr(C, "_FUSED_MIN_ELEMENTS", 1)
        for dtype, process in itertools.product((torch.float32, torch.float64), ("ve", "linear")):
            data, noise = _rand((B, D), dtype, gen), _rand((B, D), dtype, gen)
            t_lo, t_hi = _times(B, process, gen), _times(B, process, gen)
            fused = _torch_pair(data, noise, t_lo, t_hi, process, out=_nan_out_pair(data))
            with monkeypatch.context() as m:
                m.setattr(C, "_fused_kernel", lambda: None)
                passes = _torch_pair(data, noise, t_lo, t_hi, process)
            for res in (fused, passes):
                _check_pair(res, data, noise, t_lo, t_hi, process)
            scales = _ref64(data, noise, t_lo, t_hi, process)[3]  # |data| + |c other| per element
            ulp = torch.finfo(dtype).eps
            for x, y, scale in zip(fused[:2], passes[:2], scales, strict=True):
                _assert_within(x, y.double(), 2 * ulp * scale, "fused vs four passes")


def test_torch_backend_worker_threads_after_fork(gen, monkeypatch):
    # a forked child has no worker threads: it must build its own pool, not wait on the parent's
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(C, "_BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(C, "_MIN_PARALLEL_ELEMENTS", 1024)
    torch.set_num_threads(2)
    data, noise = _rand((37, 1000), torch.float32, gen), _rand((37, 1000), torch.float32, gen)
    t = _times(37, "ve", gen)
    expect = _torch_pair(data, noise, t, t)[2]
    proc = multiprocessing.get_context("fork").Process(
        target=_child_interpolate, args=(data, noise, t, expect)
    )
    proc.start()
    proc.join(timeout=120)
    if proc.exitcode is None:
        proc.kill()
    assert proc.exitcode == 0, f"the forked child hung or failed (exit code {proc.exitcode})"


def _child_interpolate(data, noise, t, expect):
    torch.set_num_threads(2)
    sys.exit(0 if torch.equal(_torch_pair(data, noise, t, t)[2], expect) else 3)


@pytest.mark.skipif(INTERP_HERE, reason="this process runs Triton's interpreter")
def test_triton_backend_refusals_on_cpu():
    pytest.importorskip("triton")
    x, y, t = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        K.interpolate_pair(x, y, t, t, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        K.pairwise_sqdist(x, y, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        K.interpolate_pair(x.double(), y.double(), t, t, backend="triton")
    with pytest.raises(ValueError, match="requires grad"):
        K.pairwise_sqdist(x.requires_grad_(), y, backend="triton")


def test_auto_backend_with_grad_is_differentiable(gen):
    data = _rand((3, 4), torch.float32, gen).requires_grad_()
    noise = _rand((3, 4), torch.float32, gen)
    x_lo, _, sq = K.interpolate_pair(data, noise, 0.3, 0.6, "linear")
    (g,) = torch.autograd.grad(x_lo.sum(), data)
    torch.testing.assert_close(g, torch.full((3, 4), 0.7))  # d x / d data = 1 - t


# =============================================================================================
# Triton kernels under the interpreter (child process; see the module docstring)
# =============================================================================================
def test_triton_kernels_in_child_process():
    if INTERP_HERE:
        pytest.skip("this process already runs Triton's interpreter: the tests ran in place")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(Path(__file__)),
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
    ]
    cmd += ["-k", "test_interp_"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (r.stdout[-8000:] + "\n" + r.stderr[-3000:]).strip()
    assert r.returncode == 0, tail
    summary = [ln for ln in r.stdout.splitlines() if " passed" in ln]
    assert summary and "skipped" not in summary[-1] and "failed" not in summary[-1], tail
    passed = int(re.search(r"(\d+) passed", summary[-1]).group(1))
    assert passed >= 60, f"only {passed} interpreter tests ran:\n{tail}"


@interp_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("process", ["ve", "linear"])
@pytest.mark.parametrize("B", [1, 7, 33])
@pytest.mark.parametrize("D", [1, 3, 1000])
def test_interp_interpolate_irregular_sizes(dtype, process, B, D, gen):
    data, noise = _rand((B, D), dtype, gen, scale=2.0), _rand((B, D), dtype, gen)
    t_lo, t_hi = _times(B, process, gen), _times(B, process, gen)
    out = _nan_out_pair(data)
    res = K.interpolate_pair(data, noise, t_lo, t_hi, process, backend="triton", out=out)
    assert all(r is o for r, o in zip(res, out, strict=True))
    _check_pair(res, data, noise, t_lo, t_hi, process)


@interp_only
@pytest.mark.parametrize("config", [(4, 16, 4), (2, 32, 4), (8, 8, 2)])
def test_interp_interpolate_row_blocks_and_masks(config, gen):
    # several rows per program with a partial last block (7 rows, 2 / 4 / 8 per block) and a
    # partial last column tile (37 columns)
    from gcflows.kernels.interpolate import interpolate_pair_triton

    B, D = 7, 37
    for process in ("ve", "linear"):
        data, noise = _rand((B, D), torch.float32, gen), _rand((B, D), torch.float32, gen)
        t_lo, t_hi = _times(B, process, gen), _times(B, process, gen)
        out = _nan_out_pair(data)
        res = interpolate_pair_triton(data, noise, t_lo, t_hi, process, out=out, config=config)
        _check_pair(res, data, noise, t_lo, t_hi, process)


@interp_only
def test_interp_interpolate_strided_inputs(gen):
    big = _rand((9, 50), torch.float32, gen)
    data = big[:, 5:45]  # row stride 50, unit columns: read in place
    noise = _rand((40, 9), torch.float32, gen).T  # column stride 9: copied
    t_lo, t_hi = _times(9, "ve", gen), _times(9, "ve", gen)
    _check_pair(
        K.interpolate_pair(data, noise, t_lo, t_hi, backend="triton"), data, noise, t_lo, t_hi, "ve"
    )
    img = _rand((3, 2, 5, 7), torch.bfloat16, gen).to(memory_format=torch.channels_last)
    img_n = _rand((3, 2, 5, 7), torch.bfloat16, gen)
    t = _times(3, "linear", gen)
    res = K.interpolate_pair(img, img_n, t, 0.5, "linear", backend="triton")
    _check_pair(res, img, img_n, t, torch.full((3,), 0.5), "linear")


@interp_only
def test_interp_interpolate_far_offset_cost(gen):
    # sqcost is accumulated from the exact difference, so a pair 1e4 from the origin keeps its
    # O(D) cost to float32 relative accuracy (an ||d||^2 + ||n||^2 - 2 d.n form would lose it)
    data = _rand((5, 300), torch.float32, gen, offset=1e4)
    noise = data + _rand((5, 300), torch.float32, gen, scale=1e-2)
    t = _times(5, "ve", gen)
    _check_pair(K.interpolate_pair(data, noise, t, t, backend="triton"), data, noise, t, t, "ve")


@interp_only
@given(
    B=st.integers(1, 24),
    D=st.integers(1, 80),
    process=st.sampled_from(["ve", "linear"]),
    dtype=st.sampled_from(LOW),
    seed=st.integers(0, 2**31 - 1),
)
def test_interp_interpolate_property(B, D, process, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    data, noise = _rand((B, D), dtype, gen, scale=3.0), _rand((B, D), dtype, gen)
    t_lo, t_hi = _times(B, process, gen, 1e-3, 0.999), _times(B, process, gen, 1e-3, 0.999)
    out = _nan_out_pair(data)
    res = K.interpolate_pair(data, noise, t_lo, t_hi, process, backend="triton", out=out)
    _check_pair(res, data, noise, t_lo, t_hi, process)


@interp_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("sizes", [(1, 1, 1), (7, 33, 3), (33, 7, 1000), (33, 33, 3)])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_interp_sqdist_irregular_sizes(dtype, sizes, precision, gen):
    Ba, Bb, D = sizes
    a, b = _rand((Ba, D), dtype, gen), _rand((Bb, D), dtype, gen)
    out = torch.full((Ba, Bb), math.nan)
    c = K.pairwise_sqdist(a, b, precision, backend="triton", out=out)
    assert c is out
    _assert_within(c, _sqdist64(a, b), _sqdist_bound(a, b), "pairwise_sqdist")


@interp_only
@pytest.mark.parametrize(
    "config", [(16, 16, 16, 2, 4, 1), (32, 16, 16, 1, 4, 2), (16, 32, 32, 3, 4, 2)]
)
def test_interp_sqdist_tiles_and_grouping(config, gen):
    # several tiles in both directions with partial edge tiles, several K slices, row groups
    # that do not divide the tile grid
    from gcflows.kernels.sqdist import pairwise_sqdist_triton

    a, b = _rand((50, 45), torch.float32, gen), _rand((37, 45), torch.float32, gen)
    out = torch.full((50, 37), math.nan)
    c = pairwise_sqdist_triton(a, b, out=out, config=config)
    _assert_within(c, _sqdist64(a, b), _sqdist_bound(a, b), "tiles")
    out = torch.full((50, 50), math.nan)
    c = pairwise_sqdist_triton(a, a, out=out, config=config)
    assert torch.equal(torch.diagonal(c), torch.zeros(50))
    _assert_within(c, _sqdist64(a, a), _sqdist_bound(a, a), "self tiles")


@interp_only
@pytest.mark.parametrize("dtype", LOW)
def test_interp_sqdist_cancellation(dtype, gen):
    # duplicates and near-duplicates far from the origin; exact zero self diagonal
    D = 40
    base = _rand((6, D), dtype, gen, offset=300.0)
    near = (base.double() + 1e-2 * _rand((6, D), torch.float64, gen)).to(dtype)
    a = torch.cat([base, base, near])
    c = K.pairwise_sqdist(a, a, backend="triton")
    assert torch.equal(torch.diagonal(c), torch.zeros(18))
    assert bool((c >= 0).all())
    _assert_within(c, _sqdist64(a, a), _sqdist_bound(a, a, centered=True), "self, far offset")
    far = _rand((5, D), dtype, gen, offset=-300.0)
    c = K.pairwise_sqdist(near, far, backend="triton")
    _assert_within(c, _sqdist64(near, far), _sqdist_bound(near, far, centered=True), "far")


@interp_only
@given(
    Ba=st.integers(1, 24),
    Bb=st.integers(1, 24),
    D=st.integers(1, 70),
    dtype=st.sampled_from(LOW),
    same=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_interp_sqdist_property(Ba, Bb, D, dtype, same, seed):
    gen = torch.Generator().manual_seed(seed)
    a = _rand((Ba, D), dtype, gen)
    b = a if same else _rand((Bb, D), dtype, gen)
    c = K.pairwise_sqdist(a, b, backend="triton")
    _assert_within(c, _sqdist64(a, b), _sqdist_bound(a, b), "prop")
    if same:
        assert torch.equal(torch.diagonal(c), torch.zeros(Ba))


@interp_only
def test_interp_launch_config_covers_problem():
    from gcflows.kernels.interpolate import launch_config as icfg
    from gcflows.kernels.sqdist import launch_config as scfg

    for B in (1, 7, 128, 8192):
        for D in (1, 2, 3, 1000, 3072, 12288):
            bb, bd, warps = icfg(B, D)
            assert bd == min(1 << max(D - 1, 0).bit_length(), 1024) and bb >= 1
            assert bb * bd <= 4096 and warps in (4, 8)
    for dtype in LOW:
        for precision in ("ieee", "tf32"):
            bm, bn, bk, _, _, _ = scfg(3, 1000, 1, dtype, precision)
            assert (bm, bk) == (16, 16) and bn >= 16


# =============================================================================================
# real GPU (skipped without CUDA by conftest)
# =============================================================================================
def _gpu_ready():
    if INTERP_HERE:
        pytest.skip("TRITON_INTERPRET=1: the GPU tests need compiled kernels")
    pytest.importorskip("triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("process", ["ve", "linear"])
@pytest.mark.parametrize("shape", [(1, 1), (33, 1000), (7, 3, 8, 8), (4096, 3072)])
def test_gpu_interpolate_matches_float64(dtype, process, shape, gen):
    _gpu_ready()
    data, noise = _rand(shape, dtype, gen, scale=2.0), _rand(shape, dtype, gen)
    t_lo, t_hi = _times(shape[0], process, gen), _times(shape[0], process, gen)
    dev = [x.cuda() for x in (data, noise, t_lo, t_hi)]
    out = tuple(o.cuda() for o in _nan_out_pair(data))
    res = K.interpolate_pair(*dev, process, backend="triton", out=out)
    _check_pair(tuple(r.cpu() for r in res), data, noise, t_lo, t_hi, process)
    auto = K.interpolate_pair(*dev, process)  # auto picks the kernel on CUDA: bitwise equal
    for x, y in zip(auto, res, strict=True):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("precision", ["ieee", "tf32", "tf32x3"])
@pytest.mark.parametrize("sizes", [(1, 1, 1), (33, 7, 1000), (512, 300, 3072)])
def test_gpu_sqdist_matches_float64(dtype, precision, sizes, gen):
    _gpu_ready()
    Ba, Bb, D = sizes
    a, b = _rand((Ba, D), dtype, gen), _rand((Bb, D), dtype, gen)
    out = torch.full((Ba, Bb), math.nan, device="cuda")
    c = K.pairwise_sqdist(a.cuda(), b.cuda(), precision, backend="triton", out=out).cpu()
    bound = _sqdist_bound(a, b, precision, device_tf32=dtype == torch.float32)
    _assert_within(c, _sqdist64(a, b), bound, f"gpu {precision}")
    ac = a.cuda()
    s = K.pairwise_sqdist(ac, ac, precision)
    assert torch.equal(torch.diagonal(s).cpu(), torch.zeros(Ba)) and bool((s >= 0).all())


@pytest.mark.gpu
def test_gpu_sqdist_far_offset(gen):
    _gpu_ready()
    a = _rand((300, 256), torch.float32, gen, offset=1e3)
    near = a + 1e-3 * _rand((300, 256), torch.float32, gen)
    c = K.pairwise_sqdist(a.cuda(), near.cuda(), backend="triton").cpu()
    _assert_within(c, _sqdist64(a, near), _sqdist_bound(a, near, centered=True), "gpu far")
