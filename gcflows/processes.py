"""Affine noising processes ``x_t = a(t) data + b(t) noise`` (docs/paper.md section 1).

Time runs from data (``t_min``) to noise (``t_max``). Three processes:

- ``ve`` (the paper, EDM): ``a = 1``, ``b = t``, ``t in [t_min, t_max]``.
- ``linear`` (rectified-flow path): ``a = 1 - t``, ``b = t``, ``t in [t_min, t_max]``,
  ``t_max < 1``.
- ``trigflow`` (sCM): ``a = cos t``, ``b = sin t``, ``t_max < pi / 2``.

Each has a VE-equivalent noise level ``sigma(t) = b(t) / a(t)``, increasing in ``t``, and its
inverse ``Process.time_of_sigma`` (closed form: ``t = sigma`` for ``ve``,
``t = sigma / (1 + sigma)`` for ``linear``, ``t = atan(sigma)`` for ``trigflow``; bisection for
any other subclass).

Every conversion between the ideal denoiser ``D(x, t) = E[data | x_t = x]``, the expected noise
``E[noise | x_t = x]`` and the PF-ODE velocity ``v_t(x) = E[xdot_t | x_t = x]`` is derived from
``a, b`` and their time derivatives:

    E[noise | x] = (x - a D) / b
    v            = a' D + b' E[noise | x]                      (docs/paper.md, Eq. 1 text)

For ``ve`` and ``linear`` this reduces to ``v = (x - D) / t``.

Shapes: a batch is ``(B, *dims)``; per-sample times are ``(B,)`` (a scalar or 0-d tensor is
broadcast). All functions are differentiable and dtype-preserving. The public path functions
(``interpolate``, ``xdot``) reject times outside ``[t_min, t_max]`` (``check_time``); the
conversions accept any positive time (networks evaluate them below ``t_min`` on purpose).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from gcflows.checks import bad, batch_times, integer, real, same_shape

__all__ = [
    "Process",
    "VEProcess",
    "LinearProcess",
    "get_process",
    "expand_time",
    "karras_grid",
    "uniform_grid",
]


def expand_time(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample times ``(B,)`` to ``(B, 1, ..., 1)`` so they broadcast against ``x``."""
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


@dataclass(frozen=True)
class Process(ABC):
    """Base class of an affine process on ``[t_min, t_max]``; subclasses define ``a, b, da, db``."""

    t_min: float
    t_max: float
    name: str = "process"

    def __post_init__(self) -> None:
        where = type(self).__name__
        real(
            self.t_min,
            "t_min",
            lo_open=0.0,
            fix="use a finite time > 0 (data sits at t_min)",
            where=where,
        )
        real(
            self.t_max, "t_max", fix="use a finite time > t_min (noise sits at t_max)", where=where
        )
        if not self.t_max > self.t_min:
            raise bad("t_max", self.t_max, f"use a time > t_min={self.t_min}", where)

    # --- coefficients -------------------------------------------------------------------------
    @abstractmethod
    def a(self, t: Tensor) -> Tensor:
        """Coefficient a(t), elementwise."""

    @abstractmethod
    def b(self, t: Tensor) -> Tensor:
        """Coefficient b(t), elementwise."""

    @abstractmethod
    def da(self, t: Tensor) -> Tensor:
        """Coefficient da(t), elementwise."""

    @abstractmethod
    def db(self, t: Tensor) -> Tensor:
        """Coefficient db(t), elementwise."""

    # --- validation ---------------------------------------------------------------------------
    def check_time(self, t: Tensor | float, name: str = "t") -> Tensor | float:
        """Raise ``ValueError`` unless every time is finite and in ``[t_min, t_max]``; return ``t``.

        The bounds are widened by ``max(1e-9, 2 eps)`` relative (``eps`` of t's dtype), so that
        ``t_max`` rounded to float32 or float16 passes. Cost: one ``aminmax`` over a tensor ``t``
        (NaN propagates into it) and one host synchronisation; nothing for a Python number.
        """
        if isinstance(t, int | float) and not isinstance(t, bool):
            lo = hi = float(t)
            tol = 1e-9
        else:
            tt = torch.as_tensor(t).detach()
            if tt.numel() == 0:
                return t
            lo_t, hi_t = torch.aminmax(tt) if tt.dim() else (tt, tt)
            lo, hi = float(lo_t), float(hi_t)
            tol = max(1e-9, 2 * torch.finfo(tt.dtype).eps) if tt.is_floating_point() else 1e-9
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or inf; clean the input before calling")
        if lo < self.t_min * (1 - tol) or hi > self.t_max * (1 + tol):
            raise ValueError(
                f"{name} must lie in [{self.t_min}, {self.t_max}] for the {self.name} process, "
                f"got values in [{lo}, {hi}]; clamp the times to the process domain"
            )
        return t

    # --- the noise level ----------------------------------------------------------------------
    def sigma(self, t: Tensor) -> Tensor:
        """The VE-equivalent noise level ``sigma(t) = b(t) / a(t)``, elementwise (increasing)."""
        return self.b(t) / self.a(t)

    def time_of_sigma(self, sigma: Tensor | float) -> Tensor:
        """The time ``t`` with ``sigma(t) = b(t) / a(t) = sigma``, elementwise, float64.

        ``sigma`` outside ``[sigma(t_min), sigma(t_max)]`` gives the nearer end of the domain.
        A subclass with a closed-form inverse gives it in ``_closed_time_of_sigma`` (``ve``,
        ``linear``, ``trigflow``); otherwise ``[t_min, t_max]`` is bisected (100 halvings:
        float64 resolution).
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        closed = self._closed_time_of_sigma(sigma)
        if closed is not None:
            return closed.clamp(self.t_min, self.t_max)
        lo = torch.full_like(sigma, self.t_min)
        hi = torch.full_like(sigma, self.t_max)
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            above = self.sigma(mid) > sigma
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        return 0.5 * (lo + hi)

    def _closed_time_of_sigma(self, sigma: Tensor) -> Tensor | None:
        """The closed-form inverse of ``sigma(t)`` on float64 ``sigma``, or None (bisection)."""
        return None

    def _times(self, t: Tensor | float, like: Tensor) -> Tensor:
        """Checked per-sample times ``(B,)`` shaped to broadcast against ``like`` ``(B, *dims)``."""
        self.check_time(t)  # as given: its own dtype sets the rounding tolerance
        return expand_time(batch_times(t, like.shape[0], like), like)

    # --- the path -----------------------------------------------------------------------------
    def interpolate(self, data: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """``x_t = a(t) data + b(t) noise``: data, noise ``(B, *dims)``, t ``(B,)``; same shape out.

        docs/paper.md Eq. 1 for ``ve``. Times outside ``[t_min, t_max]`` raise ``ValueError``.
        """
        same_shape(data, noise, match_dtype=False)
        t = self._times(t, data)
        return self.a(t) * data + self.b(t) * noise

    def xdot(self, data: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """Sample-path derivative ``d/dt x_t = a'(t) data + b'(t) noise`` ``(B, *dims)``.

        This is the one-sample velocity estimate that consistency training follows (Eq. 6).
        Times outside ``[t_min, t_max]`` raise ``ValueError``.
        """
        same_shape(data, noise, match_dtype=False)
        t = self._times(t, data)
        return self.da(t) * data + self.db(t) * noise

    # --- conversions (all from a, b, a', b') --------------------------------------------------
    def noise_from_denoiser(self, x: Tensor, denoised: Tensor, t: Tensor | float) -> Tensor:
        """``E[noise | x] = (x - a D) / b``."""
        t = expand_time(batch_times(t, x.shape[0], x), x)
        return (x - self.a(t) * denoised) / self.b(t)

    def denoiser_from_noise(self, x: Tensor, noise_pred: Tensor, t: Tensor | float) -> Tensor:
        """``D = (x - b E[noise | x]) / a``."""
        t = expand_time(batch_times(t, x.shape[0], x), x)
        return (x - self.b(t) * noise_pred) / self.a(t)

    def velocity_from_denoiser(self, x: Tensor, denoised: Tensor, t: Tensor | float) -> Tensor:
        """``v = a' D + b' (x - a D) / b``; equals ``(x - D) / t`` for ``ve`` and ``linear``."""
        t = expand_time(batch_times(t, x.shape[0], x), x)
        a, b, da, db = self.a(t), self.b(t), self.da(t), self.db(t)
        return da * denoised + db * (x - a * denoised) / b

    def denoiser_from_velocity(self, x: Tensor, velocity: Tensor, t: Tensor | float) -> Tensor:
        """Invert ``velocity_from_denoiser``: ``D = (v - b' x / b) / (a' - b' a / b)``."""
        t = expand_time(batch_times(t, x.shape[0], x), x)
        a, b, da, db = self.a(t), self.b(t), self.da(t), self.db(t)
        return (velocity - db * x / b) / (da - db * a / b)

    def velocity_from_noise(self, x: Tensor, noise_pred: Tensor, t: Tensor | float) -> Tensor:
        """``v`` from ``E[noise | x]`` through the denoiser."""
        return self.velocity_from_denoiser(x, self.denoiser_from_noise(x, noise_pred, t), t)

    def noise_from_velocity(self, x: Tensor, velocity: Tensor, t: Tensor | float) -> Tensor:
        """``E[noise | x]`` from ``v`` through the denoiser."""
        return self.noise_from_denoiser(x, self.denoiser_from_velocity(x, velocity, t), t)

    def score_from_denoiser(self, x: Tensor, denoised: Tensor, t: Tensor | float) -> Tensor:
        """Tweedie: ``grad log p_t(x) = -(x - a D) / b^2``."""
        t = expand_time(batch_times(t, x.shape[0], x), x)
        return -(x - self.a(t) * denoised) / self.b(t) ** 2


@dataclass(frozen=True)
class VEProcess(Process):
    """Variance-exploding process of the paper: ``x_t = data + t noise`` (sigma_t = t)."""

    t_min: float = 0.002
    t_max: float = 80.0
    name: str = "ve"

    def a(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def b(self, t: Tensor) -> Tensor:
        return t

    def da(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def db(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _closed_time_of_sigma(self, sigma: Tensor) -> Tensor:
        return sigma  # sigma = t (the caller clamps into a new tensor)


@dataclass(frozen=True)
class LinearProcess(Process):
    """Linear (rectified-flow) path: ``x_t = (1 - t) data + t noise`` with ``t_max < 1``."""

    t_min: float = 1e-3
    t_max: float = 0.999
    name: str = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.t_max >= 1.0:
            raise bad(
                "t_max", self.t_max, "use t_max < 1 (a(1) = 0 loses the data)", "LinearProcess"
            )

    def a(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def b(self, t: Tensor) -> Tensor:
        return t

    def da(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def db(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _closed_time_of_sigma(self, sigma: Tensor) -> Tensor:
        return sigma / (1.0 + sigma)  # sigma = t / (1 - t)


PROCESSES = {"ve": VEProcess, "linear": LinearProcess}


def get_process(name: str | Process, **kwargs: float) -> Process:
    """Build a process by name (``"ve"`` or ``"linear"``); ``kwargs`` set ``t_min`` / ``t_max``."""
    if isinstance(name, Process):
        return name
    if name not in PROCESSES:
        raise ValueError(
            f"process must be one of {sorted(PROCESSES)} or a Process instance, got {name!r}"
        )
    return PROCESSES[name](**kwargs)


def karras_grid(
    n: int,
    t_min: float,
    t_max: float,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Karras et al. grid ``s_0 < ... < s_n`` (``n + 1`` points, increasing, data to noise).

    ``s_i = (t_min^(1/rho) + i/n (t_max^(1/rho) - t_min^(1/rho)))^rho`` (docs/paper.md section 2).
    """
    n = integer(n, "n", lo=1, fix="use a positive integer number of intervals")
    real(t_min, "t_min", lo_open=0.0)
    real(t_max, "t_max", lo_open=t_min, fix=f"use a finite time > t_min={t_min}")
    real(rho, "rho", lo_open=0.0)
    i = torch.arange(n + 1, dtype=torch.float64, device=device)
    lo, hi = t_min ** (1 / rho), t_max ** (1 / rho)
    s = (lo + i / n * (hi - lo)) ** rho
    s[0], s[-1] = t_min, t_max
    return s.to(dtype)


def uniform_grid(
    n: int,
    t_min: float,
    t_max: float,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Equally spaced grid ``t_i = t_min + i (t_max - t_min) / n``, ``n + 1`` points (Theorem 1)."""
    n = integer(n, "n", lo=1, fix="use a positive integer number of intervals")
    real(t_min, "t_min")
    real(t_max, "t_max", lo_open=t_min, fix=f"use a finite time > t_min={t_min}")
    return torch.linspace(t_min, t_max, n + 1, dtype=torch.float64, device=device).to(dtype)


@dataclass(frozen=True)
class TrigFlowProcess(Process):
    """TrigFlow path (Lu & Song 2024, sCM): ``x_t = cos(t) data + sin(t) noise``, ``t < pi/2``.

    ``a = cos t``, ``b = sin t``, ``a' = -sin t``, ``b' = cos t``; the VE-equivalent noise level
    is ``sigma(t) = tan t`` (so ``t = atan(sigma)``; the default ``t_max = atan(80)`` spans the
    same noise levels as ``ve``'s ``[0.002, 80]``). Every conversion follows from the base class;
    in closed form ``v = (cos(t) x - D) / sin(t) = cos(t) E[noise | x] - sin(t) D``. Unlike the
    sCM paper the noise is standard normal (not ``N(0, sigma_d^2 I)``): the process is variance
    preserving only for data of unit variance.
    """

    t_min: float = 0.002
    t_max: float = math.atan(80.0)
    name: str = "trigflow"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.t_max >= math.pi / 2:
            raise ValueError(
                "t_max must be < pi/2 for the trigflow process (a(pi/2) = 0 loses the data), "
                f"got {self.t_max}"
            )

    def a(self, t: Tensor) -> Tensor:
        return torch.cos(t)

    def b(self, t: Tensor) -> Tensor:
        return torch.sin(t)

    def da(self, t: Tensor) -> Tensor:
        return -torch.sin(t)

    def db(self, t: Tensor) -> Tensor:
        return torch.cos(t)

    def _closed_time_of_sigma(self, sigma: Tensor) -> Tensor:
        return torch.atan(sigma)  # sigma = tan t


# Registration in ``get_process`` (the registry is read at call time).
PROCESSES["trigflow"] = TrigFlowProcess
__all__.append("TrigFlowProcess")
