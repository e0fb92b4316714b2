"""The proxy ``R~_t`` of a coupling, estimated by a learned regressor (docs/paper.md Eq. 17).

For a coupling of data and noise, the path ``x_t = a(t) data + b(t) noise`` has velocity
``xdot_t = a'(t) data + b'(t) noise`` and the proxy is

    R~_t = E || xdot_t - E[xdot_t | x_t] ||^2                      (docs/paper.md Eq. 17)

the part of the one-sample velocity that the position does not determine. For the independent
coupling (IC) under ``ve`` (``xdot = noise``) it is exact: ``R~_t = E tr Cov[data | x_t] / t^2``
(:func:`exact_ic_proxy`, ``GaussianMixture.posterior_cov_trace``). Batch-OT and GC have no
closed form: :func:`estimate_proxy` fits ``E[noise | x_t]`` by mean squared error on pairs of the
coupling and returns the held-out mean squared residual at each time.

Regressor. One network conditioned on ``t`` (a ``gcflows.networks.ToyMLP`` backbone), in the
parametrization that is exact for Gaussian data ``N(m, s^2 I)`` with ``F = 0``::

    E[noise | x_t] ~ t c^2 (x_t - m) + s c F(c (x_t - m), log(t) / 4),     c = 1 / sqrt(s^2 + t^2)

``m`` and ``s`` (the data's mean and per-coordinate standard deviation) are measured on the pairs.
``F`` is trained on ``r = (noise - t c^2 (x - m)) / (s c)`` with unit-scale loss at every ``t``.

Bias. The held-out residual is ``R~_t + E||m_hat - m||^2``: an upper estimate, too high by the
regressor's excess error (finite network, finite pairs). Its size is measured on IC against the
exact value (docs/highdim.md). The interval returned is the sampling interval of the held-out
mean (rows independent given the fitted network), not the bias.

Also here, the fixed-step flow map used to make ideal GC pairs cheaply in high dimension
(:func:`rk4_flow_map`: RK4 in log-time; 48 steps: relative error about 1e-4 from t = 80, against the
closed form of a Gaussian; fourth order in the step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gcflows.checks import bad, is_int
from gcflows.gmm import GaussianMixture
from gcflows.networks import ToyMLP
from gcflows.processes import Process, get_process

__all__ = [
    "ProxyEstimate",
    "exact_ic_proxy",
    "rk4_flow_map",
    "estimate_proxy",
    "PairSampler",
]

# (t, n, generator) -> (x_t (n, d), noise (n, d)): n pairs of a coupling at time t (ve)
PairSampler = Callable[[float, int, torch.Generator], tuple[Tensor, Tensor]]


@dataclass
class ProxyEstimate:
    """Held-out residual at each time: ``times``, ``value``, ``half_width`` (95 %), per-dim too."""

    times: list[float]
    value: list[float]
    half_width: list[float]
    dim: int
    train_loss: float

    def as_dict(self) -> dict:
        return {
            "times": self.times,
            "value": self.value,
            "half_width": self.half_width,
            "dim": self.dim,
            "train_loss": self.train_loss,
        }


def _check_ve(process: Process | str) -> Process:
    process = get_process(process)
    if process.name != "ve":
        raise bad("process", process.name, "use 've' (xdot = noise; the proxy is written for ve)")
    return process


@torch.no_grad()
def exact_ic_proxy(
    mixture: GaussianMixture,
    t: float,
    n: int,
    generator: torch.Generator | None = None,
    process: Process | str = "ve",
) -> tuple[float, float]:
    """Monte Carlo of the exact ``R~_IC(t) = E tr Cov[data | x_t] / t^2`` (ve): mean and 95 %
    half-width over ``n`` draws of ``x_t`` (the integrand is exact; only ``x_t`` is sampled)."""
    _check_ve(process)
    data = mixture.sample(n, generator=generator)
    x = data + t * torch.randn(data.shape, generator=generator, dtype=data.dtype)
    v = mixture.posterior_cov_trace(x, t, "ve") / (t * t)
    return float(v.mean()), 1.96 * float(v.std()) / math.sqrt(n)


@torch.no_grad()
def rk4_flow_map(
    mixture: GaussianMixture,
    x: Tensor,
    t: Tensor | float,
    process: Process | str = "ve",
    steps: int = 48,
) -> Tensor:
    """Exact-oracle PF-ODE flow map ``x_t -> x_{t_min}`` by classical RK4, ``(B, d)``.

    Integrates ``dx/du = v_{t(u)}(x) t(u) log(t_min / t)`` with ``t(u) = t^(1-u) t_min^u``,
    ``u in [0, 1]``, in ``steps`` equal steps (uniform in log-time, where the trajectories of a
    Gaussian mixture are smooth), in float64; per-row start times allowed. A fixed-step,
    vectorised alternative to ``GaussianMixture.flow_map`` (adaptive dopri5), much faster for
    large batches; the tests bound their difference.
    """
    process = get_process(process)
    if not is_int(steps) or steps < 1:
        raise bad("steps", steps, "use an integer >= 1")
    y = x.detach().to(torch.float64)
    t0 = torch.as_tensor(t, dtype=torch.float64).expand(y.shape[0]).clone()
    process.check_time(t0)
    span = math.log(process.t_min) - torch.log(t0)  # (B,), <= 0
    gm = mixture.to(dtype=torch.float64, device=y.device)

    def field(u: float, state: Tensor) -> Tensor:
        tt = torch.exp(torch.log(t0) + u * span).clamp_min(process.t_min)
        return gm.velocity(state, tt, process) * (tt * span)[:, None]

    h = 1.0 / steps
    for i in range(steps):
        u = i * h
        k1 = field(u, y)
        k2 = field(u + h / 2, y + (h / 2) * k1)
        k3 = field(u + h / 2, y + (h / 2) * k2)
        k4 = field(u + h, y + h * k3)
        y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return y.to(x.dtype)


def _backbone(dim: int, hidden: int, depth: int) -> ToyMLP:
    return ToyMLP(dim, hidden=hidden, depth=depth, time_embed_dim=32, time_scale=100.0)


def _features(x: Tensor, t: Tensor, m: Tensor, s: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = 1.0 / torch.sqrt(s * s + t * t)  # (B,)
    xc = x - m
    base = (t * c * c)[:, None] * xc
    return c[:, None] * xc, torch.log(t) / 4.0, base, (s * c)[:, None]


def estimate_proxy(
    sampler: PairSampler,
    times: Sequence[float],
    *,
    n_train: int = 8192,
    n_test: int = 4096,
    steps: int = 1500,
    batch: int = 512,
    hidden: int = 256,
    depth: int = 2,
    lr: float = 2e-3,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> ProxyEstimate:
    """Fit ``E[noise | x_t]`` on pairs of ``sampler`` at ``times``; held-out ``R~_t`` per time.

    ``sampler(t, n, generator) -> (x_t, noise)`` draws ``n`` fresh pairs of the coupling at time
    ``t`` (ve). ``n_train`` pairs per time train one network (``steps`` Adam steps of
    ``batch`` rows drawn across all times, cosine learning rate from ``lr``); ``n_test`` fresh
    pairs per time give the estimate and its 95 % sampling half-width. Module doc: the
    parametrization and the bias. ``progress(k)`` is called every 100 steps.
    """
    times = [float(t) for t in times]
    if not times or any(not (t > 0 and math.isfinite(t)) for t in times):
        raise bad("times", times, "use a non-empty list of positive times")
    for name, v in (("n_train", n_train), ("n_test", n_test), ("steps", steps), ("batch", batch)):
        if not is_int(v) or v < 1:
            raise bad(name, v, "use an integer >= 1")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    xs, zs, ts = [], [], []
    for t in times:
        x, z = sampler(t, n_train, gen)
        xs.append(x.float())
        zs.append(z.float())
        ts.append(torch.full((n_train,), t))
    x_tr, z_tr, t_tr = torch.cat(xs), torch.cat(zs), torch.cat(ts)
    dim = x_tr.shape[1]
    # data statistics: x_t - t noise is the data side of each pair
    data_side = x_tr - t_tr[:, None] * z_tr
    m = data_side.mean(0)
    s = float(data_side.var(0).mean().sqrt().clamp_min(1e-6))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = _backbone(dim, hidden, depth)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    total = x_tr.shape[0]
    loss_ema = float("nan")
    for k in range(steps):
        idx = torch.randint(0, total, (batch,), generator=gen)
        x, z, t = x_tr[idx], z_tr[idx], t_tr[idx]
        inp, cn, base, scale = _features(x, t, m, s)
        target = (z - base) / scale
        loss = ((net(inp, cn) - target) ** 2).sum(1).mean() / dim
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        lv = float(loss.detach())
        loss_ema = lv if k == 0 else 0.98 * loss_ema + 0.02 * lv
        if progress is not None and (k + 1) % 100 == 0:
            progress(k + 1)

    values, halves = [], []
    with torch.no_grad():
        for t in times:
            x, z = sampler(t, n_test, gen)
            x, z = x.float(), z.float()
            tv = torch.full((n_test,), t)
            inp, cn, base, scale = _features(x, tv, m, s)
            pred = base + scale * net(inp, cn)
            r = ((z - pred) ** 2).sum(1).double()
            values.append(float(r.mean()))
            halves.append(1.96 * float(r.std()) / math.sqrt(n_test))
    return ProxyEstimate(times, values, halves, dim, loss_ema)
