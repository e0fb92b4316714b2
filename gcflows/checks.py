"""Argument validators: the one place where gcflows checks what a caller passes in.

Checks run once, at the public entry points (constructors, top-level functions, script argument
parsers); internal functions trust their callers. Every failure is a ``ValueError`` whose message
names the argument, shows the value and says how to fix it::

    ValueError: batch_size=0 is invalid: use an integer >= 1

``where`` prefixes the argument's name with its owner (``"TrainConfig.batch_size=0 ..."``).
This module imports only numpy, torch and the standard library (layer 0 of docs/design.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "bad",
    "bad_tensor",
    "is_int",
    "is_real",
    "integer",
    "real",
    "probability",
    "choice",
    "finite",
    "batch",
    "shape",
    "same_shape",
    "pair",
    "batch_times",
]


def _label(name: str, where: str | None) -> str:
    return f"{where}.{name}" if where else name


def bad(name: str, value: Any, fix: str, where: str | None = None) -> ValueError:
    """The error every validator raises: ``"<where.>name=value is invalid: fix"``."""
    return ValueError(f"{_label(name, where)}={value!r} is invalid: {fix}")


def bad_tensor(x: Any, name: str, fix: str, where: str | None = None) -> ValueError:
    """:func:`bad` for a tensor argument of the wrong kind or shape: names ``name.shape`` with the
    shape for a tensor, ``type(name)`` with the type's name otherwise (never a tensor's values)."""
    if torch.is_tensor(x):
        return bad(f"{name}.shape", tuple(x.shape), fix, where)
    return bad(f"type({name})", type(x).__name__, fix, where)


def is_int(x: Any) -> bool:
    """True for Python / numpy integers (bool excluded)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    """True for Python / numpy real numbers (bool excluded); finiteness not checked."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def integer(
    value: Any,
    name: str,
    *,
    lo: int | None = None,
    hi: int | None = None,
    fix: str | None = None,
    where: str | None = None,
) -> int:
    """``value`` as an ``int`` in ``[lo, hi]`` (either bound optional), else ``ValueError``."""
    ok = is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        if fix is None:
            fix = "use an integer" + (f" >= {lo}" if lo is not None else "")
            fix += f" and <= {hi}" if hi is not None else ""
        raise bad(name, value, fix, where)
    return int(value)


def real(
    value: Any,
    name: str,
    *,
    lo: float | None = None,
    lo_open: float | None = None,
    hi: float | None = None,
    hi_open: float | None = None,
    fix: str | None = None,
    where: str | None = None,
) -> float:
    """``value`` as a finite ``float`` within the given closed / open bounds, else ValueError."""
    ok = is_real(value) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (
            (lo is None or v >= lo)
            and (lo_open is None or v > lo_open)
            and (hi is None or v <= hi)
            and (hi_open is None or v < hi_open)
        )
    if not ok:
        if fix is None:
            parts = []
            if lo is not None:
                parts.append(f">= {lo}")
            if lo_open is not None:
                parts.append(f"> {lo_open}")
            if hi is not None:
                parts.append(f"<= {hi}")
            if hi_open is not None:
                parts.append(f"< {hi_open}")
            fix = "use a finite number" + (" " + " and ".join(parts) if parts else "")
        raise bad(name, value, fix, where)
    return float(value)


def probability(value: Any, name: str, what: str = "", where: str | None = None) -> float:
    """A float in ``[0, 1]``; ``what`` says what the probability is of (for the message)."""
    fix = "use a probability in [0, 1]" + (f" ({what})" if what else "")
    return real(value, name, lo=0.0, hi=1.0, fix=fix, where=where)


def choice(value: Any, name: str, choices: Iterable[Any], where: str | None = None) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    options = list(choices)
    if value not in options:
        raise bad(name, value, f"use one of {options}", where)
    return value


def finite(x: Any, name: str) -> Tensor:
    """``x`` if it is a tensor with no NaN / inf (integer tensors pass), else ``ValueError``.

    Cost: one sum over ``x`` (any NaN / inf makes it non-finite; only then, or on an overflow of
    the sum, an elementwise check follows) and one device synchronisation on a GPU.
    """
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() and not bool(torch.isfinite(x.detach().sum())):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf; clean the input before calling")
    return x


def batch(x: Any, name: str, *, min_dim: int = 1) -> Tensor:
    """``x`` if it is a non-empty floating-point batch ``(B, *dims)``, else ``ValueError``.

    ``B >= 1``, every sample holds at least one element and ``x`` has at least ``min_dim`` dims
    (2: at least one feature dim). Values are not inspected (see :func:`finite`).
    """
    if not torch.is_tensor(x):
        raise ValueError(
            f"{name} must be a torch.Tensor of shape (B, *dims), got {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert it with .float()"
        )
    if x.dim() < max(min_dim, 1) or x.numel() == 0:
        dims = " and at least one feature dim" if min_dim >= 2 else ""
        raise ValueError(
            f"{name} must have shape (B, *dims) with B >= 1{dims} and no empty dim, "
            f"got {tuple(x.shape)}"
        )
    return x


def shape(x: Tensor, expected: tuple[int, ...], name: str, why: str = "") -> Tensor:
    """``x`` if ``x.shape == expected``, else ``ValueError``; ``why`` e.g. "to match the batch"."""
    if tuple(x.shape) != tuple(expected):
        reason = f" {why}" if why else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{reason}, got {tuple(x.shape)}")
    return x


def same_shape(
    a: Tensor,
    b: Tensor,
    names: tuple[str, str] = ("data", "noise"),
    *,
    match_dtype: bool = True,
) -> None:
    """Raise unless ``a`` and ``b`` are tensors of one shape (and, if asked, dtype and device)."""
    na, nb = names
    for x, n in ((a, na), (b, nb)):
        if not torch.is_tensor(x):
            raise ValueError(f"{n} must be a torch.Tensor, got {type(x).__name__}")
    if a.shape != b.shape:
        fix = f"draw {nb} with torch.randn_like({na})" if nb == "noise" else "reshape one of them"
        raise ValueError(
            f"{na} and {nb} must have the same shape (B, *dims), got {tuple(a.shape)} and "
            f"{tuple(b.shape)}; {fix}"
        )
    if match_dtype and (a.dtype != b.dtype or a.device != b.device):
        raise ValueError(
            f"{na} and {nb} must share dtype and device, got {a.dtype}/{a.device} and "
            f"{b.dtype}/{b.device}; convert {nb} with {nb}.to({na})"
        )


def pair(a: Tensor, b: Tensor, names: tuple[str, str] = ("data", "noise")) -> None:
    """Raise unless ``a``, ``b`` are finite, non-empty float batches of one shape, dtype, device.

    The check of every coupling entry point (:func:`batch`, :func:`same_shape`, :func:`finite`).
    """
    batch(a, names[0])
    batch(b, names[1])
    same_shape(a, b, names)
    finite(a, names[0])
    finite(b, names[1])


def batch_times(t: Tensor | float, batch: int, like: Tensor, name: str = "t") -> Tensor:
    """Per-sample times ``(batch,)`` in the dtype / device of ``like``.

    A Python float or 0-d tensor is broadcast; a ``(batch,)`` tensor is converted; any other shape
    is a ``ValueError`` naming ``name``.
    """
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"{name} must be a scalar or have shape ({batch},) to match the batch, "
            f"got {tuple(t.shape)}"
        )
    return t
