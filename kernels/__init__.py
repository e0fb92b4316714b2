"""Public kernel ops with a backend switch (docs/design.md, "The kernels").

- ``interpolate_pair(data, noise, t_lo, t_hi, process="ve", backend="auto")`` ->
  ``(x_lo, x_hi, sqcost)``: the pair noised at two times, ``x_t = a(t) data + b(t) noise``
  (docs/paper.md section 1), and ``sqcost_j = ||data_j - noise_j||^2`` accumulated in float32.
- ``pairwise_sqdist(a, b, precision="ieee", backend="auto")`` -> ``(Ba, Bb)`` squared distances,
  clamped at 0, exact zeros on the diagonal when ``a is b`` (the batch-OT cost matrix).

Layout: ``reference.py`` is the mathematics of each op in plain torch (the specification the
tests hold every implementation to, and the differentiable path); ``cpu.py`` the tuned torch
implementation; ``interpolate.py`` and ``sqdist.py`` the Triton kernels; ``validation.py`` the
argument checks, run here, once, before dispatch.

``backend``:

- ``"torch"``: the tuned torch implementation (``cpu.py``), any device; inputs that require grad
  take the specification itself (``reference.py``), which is differentiable.
- ``"triton"``: the Triton kernels (``interpolate.py``, ``sqdist.py``) on CUDA tensors; on CPU
  tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernel modules are
  first imported; that is how the tests run them). ``ValueError`` when triton is missing, for
  float64 inputs, or for inputs that require grad (the kernels have no backward).
- ``"auto"`` (default): Triton for CUDA tensors of float32 / float16 / bfloat16 when triton imports
  and no input requires grad; ``"torch"`` otherwise.

Importing this package imports nothing from gcflows, does not import triton and never queries a
GPU driver: the kernel modules are imported on the first Triton call.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from . import cpu, reference, validation
from .reference import PRECISIONS, PROCESSES, compute_dtype

__all__ = [
    "interpolate_pair",
    "pairwise_sqdist",
    "triton_available",
    "BACKENDS",
    "PROCESSES",
    "PRECISIONS",
]

BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_ok: bool | None = None


def triton_available() -> bool:
    """Whether ``import triton`` works (cached; imports triton on the first call only)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            importlib.import_module("triton")
            _triton_ok = True
        except ImportError:
            _triton_ok = False
    return _triton_ok


def _kernel_module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(torch.is_tensor(x) and x.requires_grad for x in xs)


def _use_triton(backend: str, module: str, tensors: tuple, grad: bool) -> bool:
    """Decide the backend; ``ValueError`` when ``backend="triton"`` cannot be honoured."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    x = tensors[0]  # the public ops checked the tensors before
    dtype_ok = all(torch.is_tensor(t) and t.dtype in _TRITON_DTYPES for t in tensors)
    if backend == "auto":
        return x.is_cuda and dtype_ok and not grad and triton_available()
    # backend == "triton": explain every reason it cannot run
    if not triton_available():
        raise ValueError(
            "backend='triton' needs triton: pip install 'gcflows[triton]' (or use backend='auto')"
        )
    if grad:
        raise ValueError(
            "backend='triton' has no backward and an input requires grad; use backend='auto' "
            "or 'torch', or detach the inputs"
        )
    if not dtype_ok:
        raise ValueError(
            "backend='triton' supports float32, float16 and bfloat16 inputs, got "
            f"{[getattr(t, 'dtype', type(t).__name__) for t in tensors]}; use backend='torch'"
        )
    if not x.is_cuda:
        mod = _kernel_module(module)
        if not (mod.INTERPRETED and mod.interpreting()):
            raise ValueError(
                "backend='triton' needs CUDA tensors; on CPU it runs only in Triton's interpreter: "
                "set TRITON_INTERPRET=1 before gcflows.kernels." + module + " is first imported "
                "(tests do), or use backend='auto' / 'torch'"
            )
    return True


def interpolate_pair(
    data: Tensor,
    noise: Tensor,
    t_lo: Tensor | float,
    t_hi: Tensor | float,
    process: str = "ve",
    backend: str = "auto",
    *,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Noise a (data, noise) pair at two times and return its squared transport cost.

    Args:
        data, noise: ``(B, *dims)``, same shape, dtype (float32 / float16 / bfloat16 / float64)
            and device.
        t_lo, t_hi: per-row times ``(B,)`` or numbers; ``ve``: ``t > 0``, ``linear``:
            ``0 < t < 1``.
        process: ``"ve"`` (``x = data + t noise``) or ``"linear"``
            (``x = (1 - t) data + t noise``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (module docstring).
        out: optional preallocated contiguous ``(x_lo, x_hi, sqcost)``.
        validate: check the values: the times lie in the domain of the process and ``data``,
            ``noise`` hold no NaN or infinity (``ValueError`` naming the argument). It costs a
            reduction over ``(B,)`` tensors (the times and the computed ``sqcost``, which is
            non-finite exactly where an input row is) and, on a GPU, one host synchronisation;
            the inputs are scanned only to name the culprit once a check failed. The values are
            checked after the computation, so a failed check may leave ``out`` written.
            ``validate=False`` turns it off when the caller guarantees the values. Types,
            shapes and dtypes are always checked.

    Returns:
        ``x_lo, x_hi`` ``(B, *dims)`` in the input dtype, computed in float32 (float64 for
        float64) and rounded once; ``sqcost`` ``(B,)`` float32 (float64 for float64). On CPU,
        outputs of 4 MiB and more live in buffers reused once no tensor refers to them
        (``cpu.empty_reused``): ordinary tensors whose storage cannot be resized.
    """
    validation.check_pair(data, noise)
    validation.check_process(process)
    B = data.shape[0]
    t_lo = validation.check_times(t_lo, B, data, "t_lo")
    t_hi = validation.check_times(t_hi, B, data, "t_hi")
    grad = _needs_grad(data, noise, t_lo, t_hi)
    if out is not None:
        if grad:
            raise ValueError("out= cannot be used with inputs that require grad; drop out=")
        out = validation.check_out(
            out,
            (data.shape, data.shape, (B,)),
            (data.dtype, data.dtype, compute_dtype(data.dtype)),
            data.device,
            (data, noise),
        )
    if _use_triton(backend, "interpolate", (data, noise), grad):
        fn = _kernel_module("interpolate").interpolate_pair_triton
        result = fn(data, noise, t_lo, t_hi, process, out=out)
    elif grad:
        result = reference.interpolate_pair(data, noise, t_lo, t_hi, process)
    else:
        result = cpu.interpolate_pair(data, noise, t_lo, t_hi, process, out=out)
    if validate:
        validation.check_pair_values(t_lo, t_hi, process, result[2], data, noise)
    return result


def pairwise_sqdist(
    a: Tensor,
    b: Tensor,
    precision: str = "ieee",
    backend: str = "auto",
    *,
    out: Tensor | None = None,
    validate: bool = True,
) -> Tensor:
    """Squared Euclidean distances ``C_ij = ||a_i - b_j||^2``: ``(Ba, *dims), (Bb, *dims)`` ->
    ``(Ba, Bb)``.

    Clamped at 0, exact zeros on the diagonal when ``a is b``; float32 output (float64 for
    float64 inputs). ``precision`` in ``("ieee", "tf32", "tf32x3")`` is the ``tl.dot`` input
    precision of the Triton kernel ("ieee" by default: exact OT is sensitive to ties and
    cancellation); the torch backend computes in float32 on CPU and follows torch's matmul
    precision setting on CUDA. ``out``: optional preallocated contiguous ``(Ba, Bb)`` tensor.
    ``validate``: ``ValueError`` when ``a`` or ``b`` holds a NaN or an infinity. It costs a
    reduction over the ``(B,)`` squared row norms the op computes anyway and, on a GPU, one host
    synchronisation (inputs that require grad: a scan of the inputs); ``validate=False`` turns it
    off.
    """
    validation.check_precision(precision)
    Ba, Bb = validation.check_point_sets(a, b)
    grad = _needs_grad(a, b)
    if out is not None:
        if grad:
            raise ValueError("out= cannot be used with inputs that require grad; drop out=")
        (out,) = validation.check_out(
            (out,), ((Ba, Bb),), (compute_dtype(a.dtype),), a.device, (a, b)
        )
    if _use_triton(backend, "sqdist", (a, b), grad):
        fn = _kernel_module("sqdist").pairwise_sqdist_triton
        return fn(a, b, precision, out=out, validate=validate)
    if grad:
        if validate:  # the differentiable path computes no norms apart: scan the inputs
            validation.check_finite({"a": a.detach(), "b": b.detach()})
        return reference.pairwise_sqdist(a, b)
    return cpu.pairwise_sqdist(a, b, precision, out=out, validate=validate)
