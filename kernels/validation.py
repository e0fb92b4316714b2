"""Argument checks of the kernel ops, run once at the public entry points (``gcflows.kernels``).

Every failure is a ``ValueError`` that names the argument, the value and the fix. The
implementations (``cpu.py``, the Triton wrappers) trust their callers.

Value checks (``validate=True`` of the public ops) cost no extra pass over the inputs: they
reduce the ``(B,)`` per-row results the op computes anyway (the squared cost of each pair, the
squared norm of each point), in which a NaN or an infinity of any input row shows up; on a GPU
that is one host synchronisation. The inputs themselves are scanned only after a check failed,
to name the culprit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reference import PRECISIONS, PROCESSES, compute_dtype

__all__ = [
    "FLOAT_DTYPES",
    "check_float_tensor",
    "check_pair",
    "check_process",
    "check_precision",
    "check_times",
    "check_points",
    "check_point_sets",
    "check_out",
    "check_pair_values",
    "check_norms",
    "check_finite",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(x, name: str) -> Tensor:
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}; "
            f"convert it with {name}.float()"
        )
    return x


def check_pair(data: Tensor, noise: Tensor) -> None:
    """Shape / dtype / device checks of a pair ``(B, *dims)``."""
    check_float_tensor(data, "data")
    check_float_tensor(noise, "noise")
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


def check_times(t: Tensor | float, batch: int, like: Tensor, name: str) -> Tensor:
    """Per-row times as a ``(batch,)`` tensor in the arithmetic dtype of ``like``.

    A Python number or 0-d tensor is broadcast. Checks the type and shape; the values are checked
    with the results (``check_pair_values``).
    """
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


def check_points(x: Tensor, name: str) -> Tensor:
    """A point set ``(B, *dims)`` flattened to ``(B, D)``."""
    check_float_tensor(x, name)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (B, *dims), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def check_point_sets(a: Tensor, b: Tensor) -> tuple[int, int]:
    """Two point sets with the same feature size, dtype and device; returns ``(Ba, Bb)``."""
    a2 = check_points(a, "a")
    if b is a:
        return a2.shape[0], a2.shape[0]
    b2 = check_points(b, "b")
    if b2.shape[1] != a2.shape[1]:
        raise ValueError(
            f"b must have the feature size of a, got a {tuple(a.shape)} and b {tuple(b.shape)}; "
            "both are (B, *dims) with the same dims"
        )
    if b.dtype != a.dtype or b.device != a.device:
        raise ValueError(
            f"b must have the dtype and device of a, got {b.dtype} on {b.device} and {a.dtype} "
            f"on {a.device}"
        )
    return a2.shape[0], b2.shape[0]


def check_out(out, shapes, dtypes, device, inputs) -> tuple[Tensor, ...]:
    """Preallocated outputs: a tuple of contiguous tensors of the given shapes and dtypes on
    ``device``, none sharing memory with ``inputs``."""
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


def check_pair_values(
    t_lo: Tensor, t_hi: Tensor, process: str, sqcost: Tensor, data: Tensor, noise: Tensor
) -> None:
    """Value checks of ``interpolate_pair`` from its inputs' times and its result ``sqcost``.

    The times must be finite and inside the open domain of the process (``ve``: ``t > 0``;
    ``linear``: ``0 < t < 1``). ``sqcost_j`` is finite exactly when rows ``j`` of ``data`` and
    ``noise`` are finite and their difference does not overflow the arithmetic dtype, so it
    stands for a scan of the inputs. One reduction of ``(B,)`` tensors and, on a GPU, one host
    synchronisation for all of it.
    """
    # NaN propagates into min, max and amax; sqcost >= 0, so a finite maximum means all finite
    stats = [v for t in (t_lo, t_hi) for v in torch.aminmax(t)]
    stats.append(sqcost.detach().amax().to(t_lo.dtype))
    bounds = torch.stack(stats).tolist()
    upper = math.inf if process == "ve" else 1.0
    for k, name in enumerate(("t_lo", "t_hi")):
        lo, hi = bounds[2 * k], bounds[2 * k + 1]
        if not (math.isfinite(lo) and math.isfinite(hi) and lo > 0.0 and hi < upper):
            domain = "t > 0" if process == "ve" else "0 < t < 1"
            raise ValueError(
                f"{name} must be finite and satisfy {domain} for the {process} process, got "
                f"values in [{lo}, {hi}]"
            )
    if not math.isfinite(bounds[4]):
        _name_non_finite(
            {"data": data, "noise": noise},
            f"||data - noise||^2 overflows {sqcost.dtype} although data and noise are finite; "
            "scale them down or use float64",
        )


def check_norms(an: Tensor, bn: Tensor, a: Tensor, b: Tensor) -> None:
    """Value check of ``pairwise_sqdist`` from the squared row norms ``an``, ``bn`` ``(B,)`` it
    computes anyway: a NaN or infinity in a row of ``a`` or ``b`` makes its norm non-finite. One
    reduction and, on a GPU, one host synchronisation."""
    ok = torch.isfinite(an).all()
    if bn is not an:
        ok = ok & torch.isfinite(bn).all()
    if not bool(ok):
        _name_non_finite(
            {"a": a, "b": b},
            f"the squared norms of a and b overflow {an.dtype} although a and b are finite; "
            "scale them down or use float64",
        )


def _name_non_finite(tensors: dict[str, Tensor], overflow_message: str) -> None:
    """Raise naming the first tensor with a NaN or infinity, or ``overflow_message`` when all
    are finite."""
    check_finite(tensors)
    raise ValueError(overflow_message)


def check_finite(tensors: dict[str, Tensor]) -> None:
    """``ValueError`` naming the first of ``tensors`` (name -> ``(B, *dims)``) that holds a NaN or
    an infinity, and its first such rows; one scan of each."""
    for name, x in tensors.items():
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero()[:5, 0].tolist()
            raise ValueError(
                f"{name} must be finite, got NaN or inf in {int(bad.sum())} row(s), first "
                f"{rows}; fix the input (validate=False skips this check)"
            )
