"""Velocity estimators behind one signature, and Euler / Heun steps (docs/paper.md sections 1-2).

Every estimator is called as ``estimator(x_t, t, *, data=None, noise=None) -> v`` with ``x_t`` of
shape ``(B, *dims)``, ``t`` a float or ``(B,)``, and returns ``v`` of the shape of ``x_t``:

- ``TrueVelocity(gmm, process)``: the exact PF-ODE field ``v_t(x) = E[xdot_t | x_t = x]`` of a
  Gaussian mixture (what consistency distillation, CD, follows with an exact teacher; Eq. 4-5).
- ``DistilledVelocity(denoiser, process)``: ``v = a' D + b' (x - a D) / b`` from a denoiser network
  ``D(x, t)`` (CD with a pre-trained approximation); ``fit_denoiser`` trains one by denoising
  score matching.
- ``MonteCarloVelocity(process)``: the one-sample estimate ``xdot_t = a' data + b' noise`` of
  consistency training (CT, Eq. 6); needs ``data`` and ``noise``.
- ``GeneratorInducedVelocity(gc_model, process)``: the sample-path derivative of the
  generator-induced path (Eq. 13-15): ``a' xhat + b' noise`` with ``xhat = gc_model(x_t, t)``
  (run without gradient) and the same ``noise``; needs ``noise``.

``euler_step`` and ``heun_step`` advance ``x`` from ``t`` to ``t_next`` with any estimator, passing
their keyword arguments (``data``, ``noise``) on to it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gcflows.checks import bad, bad_tensor, batch, batch_times, finite, integer, real
from gcflows.gmm import GaussianMixture
from gcflows.processes import Process, expand_time, get_process

__all__ = [
    "VelocityEstimator",
    "TrueVelocity",
    "DistilledVelocity",
    "MonteCarloVelocity",
    "GeneratorInducedVelocity",
    "PreconditionedDenoiser",
    "fit_denoiser",
    "euler_step",
    "heun_step",
]


def _check_batch(x: Tensor, name: str = "x_t") -> Tensor:
    """A finite float batch ``(B, *dims)`` with at least one feature dim (entry-point check)."""
    return finite(batch(x, name, min_dim=2), name)


def _keyword(value: Tensor | None, name: str, like: Tensor, who: str) -> Tensor:
    """The keyword tensor ``name`` of an estimator call: present, shaped like x_t, finite."""
    if value is None:
        raise bad(name, value, f"{who} needs the keyword {name}=... (a tensor shaped like x_t)")
    if not torch.is_tensor(value) or value.shape != like.shape:
        raise bad_tensor(value, name, f"use the shape of x_t {tuple(like.shape)}")
    return finite(value, name)


class VelocityEstimator(ABC):
    """Base class: ``__call__(x_t, t, *, data=None, noise=None) -> v`` of the shape of ``x_t``."""

    process: Process

    def _time(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = batch_times(t, x.shape[0], x)
        self.process.check_time(t)
        return t

    @abstractmethod
    def __call__(
        self,
        x_t: Tensor,
        t: Tensor | float,
        *,
        data: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """The velocity at ``(x_t, t)``, shaped like ``x_t``."""


class TrueVelocity(VelocityEstimator):
    """Exact velocity ``v_t(x) = E[xdot_t | x_t = x]`` of a Gaussian mixture (``gmm.velocity``).

    ``x_t`` is ``(B, d)`` or ``(B, *dims)`` with ``prod(dims) = gmm.dim``; ``data`` and ``noise``
    are accepted and ignored.
    """

    def __init__(self, gmm: GaussianMixture, process: Process | str) -> None:
        if not isinstance(gmm, GaussianMixture):
            raise bad("type(gmm)", type(gmm).__name__, "pass a gcflows.gmm.GaussianMixture")
        self.gmm = gmm
        self.process = get_process(process)

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor | float,
        *,
        data: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        batch(x_t, "x_t", min_dim=2)  # the values and t are checked by gmm.velocity
        flat = x_t.reshape(x_t.shape[0], -1)
        return self.gmm.velocity(flat, t, self.process).reshape(x_t.shape)


class DistilledVelocity(VelocityEstimator):
    """Velocity of a denoiser ``D(x, t)``: ``v = a' D + b' (x - a D) / b`` (= ``(x - D) / t``).

    ``denoiser(x_t, t)`` receives ``t`` as a ``(B,)`` tensor and returns a tensor shaped like
    ``x_t``. It is called as is (wrap the call in ``torch.no_grad()`` for a frozen teacher).
    """

    def __init__(self, denoiser: Callable[[Tensor, Tensor], Tensor], process: Process | str):
        if not callable(denoiser):
            raise bad("denoiser", denoiser, "pass a callable denoiser(x_t, t) -> D(x_t, t)")
        self.denoiser = denoiser
        self.process = get_process(process)

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor | float,
        *,
        data: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        x_t = _check_batch(x_t)
        t = self._time(x_t, t)
        denoised = self.denoiser(x_t, t)
        if not torch.is_tensor(denoised) or denoised.shape != x_t.shape:
            fix = f"the denoiser must return a tensor shaped like x_t {tuple(x_t.shape)}"
            raise bad_tensor(denoised, "denoiser(x_t, t)", fix)
        return self.process.velocity_from_denoiser(x_t, denoised, t)


class MonteCarloVelocity(VelocityEstimator):
    """One-sample CT velocity ``xdot_t = a' data + b' noise`` (needs ``data`` and ``noise``)."""

    def __init__(self, process: Process | str) -> None:
        self.process = get_process(process)

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor | float,
        *,
        data: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        x_t = _check_batch(x_t)
        data = _keyword(data, "data", x_t, "MonteCarloVelocity")
        noise = _keyword(noise, "noise", x_t, "MonteCarloVelocity")
        return self.process.xdot(data, noise, t)  # xdot checks t


class GeneratorInducedVelocity(VelocityEstimator):
    """Generator-induced (GC) velocity ``a' gc_model(x_t, t) + b' noise`` (needs ``noise``).

    ``gc_model(x_t, t)`` predicts the data endpoint (``t`` as ``(B,)``); it runs under
    ``torch.no_grad()`` (stop-gradient of Eq. 13). ``data`` is accepted and ignored.
    """

    def __init__(self, gc_model: Callable[[Tensor, Tensor], Tensor], process: Process | str):
        if not callable(gc_model):
            raise bad("gc_model", gc_model, "pass a callable gc_model(x_t, t) -> data estimate")
        self.gc_model = gc_model
        self.process = get_process(process)

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor | float,
        *,
        data: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        x_t = _check_batch(x_t)
        noise = _keyword(noise, "noise", x_t, "GeneratorInducedVelocity")
        t = self._time(x_t, t)
        with torch.no_grad():
            xhat = self.gc_model(x_t, t)
        if not torch.is_tensor(xhat) or xhat.shape != x_t.shape:
            fix = f"the gc_model must return a tensor shaped like x_t {tuple(x_t.shape)}"
            raise bad_tensor(xhat, "gc_model(x_t, t)", fix)
        return self.process.xdot(xhat, noise, t)


# --- a small denoiser network ----------------------------------------------------------------
class PreconditionedDenoiser(nn.Module):
    """MLP denoiser with EDM-style preconditioning, for any affine process.

    With ``sigma = b / a`` the rescaled input ``y = x / a = data + sigma noise`` is a VE point, and
    (docs/paper.md Eq. 3 without the boundary shift)

        D(x, t) = c_skip y + c_out F(c_in y, c_noise),
        c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2),    c_noise = log(sigma) / 4,

    ``sd = sigma_data``. ``c_noise`` enters through the features ``c_noise``,
    ``sin(w_j c_noise)``, ``cos(w_j c_noise)`` with ``w_j = 2^j``, ``j < n_freq``. Input ``x``
    ``(B, dim)``, ``t`` float or ``(B,)``; output ``(B, dim)`` in the dtype of ``x``.
    """

    def __init__(
        self,
        dim: int,
        process: Process | str,
        sigma_data: float,
        hidden: int = 128,
        depth: int = 3,
        n_freq: int = 8,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            integer(value, name, lo=1, fix="use a positive integer")
        real(sigma_data, "sigma_data", lo_open=0.0)
        self.dim = int(dim)
        self.process = get_process(process)
        self.sigma_data = float(sigma_data)
        self.register_buffer("freqs", 2.0 ** torch.arange(n_freq, dtype=dtype))
        widths = [self.dim + 1 + 2 * n_freq] + [int(hidden)] * int(depth) + [self.dim]
        layers: list[nn.Module] = []
        gen_device = generator.device if generator is not None else None
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            lin = nn.Linear(n_in, n_out, dtype=dtype)
            bound = 1.0 / math.sqrt(n_in)  # the default nn.Linear range, drawn from `generator`
            with torch.no_grad():
                for param in (lin.weight, lin.bias):
                    u = torch.rand(param.shape, generator=generator, device=gen_device)
                    param.copy_((2 * u - 1) * bound)
            layers.append(lin)
            if i < len(widths) - 2:
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise bad_tensor(x, "x", f"use shape (B, {self.dim})")
        p = self.freqs.dtype
        tt = batch_times(t, x.shape[0], x).to(p)
        a, b = self.process.a(tt)[:, None], self.process.b(tt)[:, None]
        sigma = b / a
        sd2 = self.sigma_data**2
        y = x.to(p) / a
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / torch.sqrt(sigma**2 + sd2)
        c_in = 1.0 / torch.sqrt(sigma**2 + sd2)
        c_noise = torch.log(sigma) / 4
        angles = c_noise * self.freqs
        h = torch.cat([c_in * y, c_noise, torch.sin(angles), torch.cos(angles)], dim=1)
        return (c_skip * y + c_out * self.net(h)).to(x.dtype)


def fit_denoiser(
    samples: Tensor,
    process: Process | str,
    *,
    hidden: int = 128,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 3e-3,
    generator: torch.Generator | None = None,
    sigma_data: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreconditionedDenoiser:
    """Fit a denoiser ``D(x, t) ~ E[data | x_t = x]`` by denoising score matching.

    Each step draws ``batch_size`` rows of ``samples`` ``(N, d)``, times log-uniform on
    ``[t_min, t_max]`` of the process and fresh noise, and minimises the EDM-weighted error
    ``lambda(sigma) ||D(x_t, t) - data||^2`` with ``lambda = 1 / c_out^2`` (so the network's own
    target has unit scale at every ``sigma = b / a``); Adam with a learning rate cosine-decayed
    from ``lr`` to 0 (3e-3 by default: on ``two_gaussians_1to2`` it gave a third of the velocity
    error of 1e-3 for the same 2000 steps). ``sigma_data`` defaults to the RMS of ``samples``.
    Everything random (initialisation, batches, times, noise) is drawn from ``generator``: the
    result is deterministic given it. Returns the network in eval mode, with its parameters
    frozen, callable as ``denoiser(x, t)``.
    """
    if not torch.is_tensor(samples) or samples.dim() != 2:
        raise bad_tensor(samples, "samples", "pass a floating-point tensor of shape (N, d)")
    if not samples.is_floating_point():
        raise bad("samples.dtype", samples.dtype, "use a floating-point tensor of shape (N, d)")
    if samples.shape[0] < 2 or samples.shape[1] < 1:
        raise bad_tensor(samples, "samples", "use at least 2 points (N >= 2, d >= 1)")
    finite(samples, "samples")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("hidden", hidden)):
        integer(value, name, lo=1, fix="use a positive integer")
    real(lr, "lr", lo_open=0.0, fix="use a positive finite learning rate")
    process = get_process(process)
    device = samples.device
    data_all = samples.detach().to(dtype)
    if sigma_data is None:
        sigma_data = float(data_all.pow(2).mean().sqrt())
        if sigma_data == 0.0:
            raise bad("sigma_data", None, "the samples are all zero; pass sigma_data explicitly")
    model = PreconditionedDenoiser(
        samples.shape[1], process, sigma_data, hidden=hidden, generator=generator, dtype=dtype
    ).to(device)
    # foreach: one multi-tensor update per step instead of one per parameter (the same numbers,
    # bitwise; ~15 % of the fit's CPU time on the toy study's 64-wide network)
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(steps))
    log_lo, log_hi = math.log(process.t_min), math.log(process.t_max)
    n, d = data_all.shape
    bs = int(batch_size)
    # Draws happen on the generator's device (CPU without one) and move to the samples' device.
    draw = {"generator": generator, "device": generator.device if generator is not None else None}
    model.train()
    for _ in range(int(steps)):
        data = data_all[torch.randint(n, (bs,), **draw).to(device)]
        u = torch.rand(bs, dtype=dtype, **draw).to(device)
        t = torch.exp(log_lo + u * (log_hi - log_lo)).clamp(process.t_min, process.t_max)
        noise = torch.randn(bs, d, dtype=dtype, **draw).to(device)
        x_t = process.interpolate(data, noise, t)
        sigma = expand_time(process.b(t) / process.a(t), x_t)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # 1 / c_out^2
        loss = (weight * (model(x_t, t) - data) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


# --- ODE steps -------------------------------------------------------------------------------
def _step_size(x: Tensor, t: Tensor | float, t_next: Tensor | float) -> tuple[Tensor, Tensor]:
    t = batch_times(t, x.shape[0], x)
    t_next = batch_times(t_next, x.shape[0], x, name="t_next")
    return t, t_next


def euler_step(
    velocity: Callable[..., Tensor],
    x: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    **kw,
) -> Tensor:
    """``x + (t_next - t) v(x, t)``; ``kw`` (e.g. ``data``, ``noise``) go to ``velocity``."""
    x = _check_batch(x, "x")
    t, t_next = _step_size(x, t, t_next)
    return x + expand_time(t_next - t, x) * velocity(x, t, **kw)


def heun_step(
    velocity: Callable[..., Tensor],
    x: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    **kw,
) -> Tensor:
    """Heun (explicit trapezoid): ``x + h (v(x, t) + v(x_e, t_next)) / 2``, ``x_e`` the Euler point.

    ``h = t_next - t`` (negative when integrating towards the data); ``kw`` go to ``velocity`` at
    both evaluations.
    """
    x = _check_batch(x, "x")
    t, t_next = _step_size(x, t, t_next)
    h = expand_time(t_next - t, x)
    v0 = velocity(x, t, **kw)
    v1 = velocity(x + h * v0, t_next, **kw)
    return x + 0.5 * h * (v0 + v1)
