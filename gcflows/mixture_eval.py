"""Exact-oracle evaluation of consistency models trained on a Gaussian mixture.

A model is passed as ``apply(x, t)``: ``x (S, B, d)``, ``t (S, B)`` -> ``(S, B, d)``, i.e. ``S``
models (seeds) evaluated at once, each on its own rows (``gcflows.ensemble.Ensemble.apply`` has
this form; a single network is ``S = 1``). Every metric is returned per model, ``(S,)``.

Metrics (the target's exact quantities; ``d`` the dimension, ``ve`` process):

- **consistency error** at time ``t``: ``E ||f(x_t, t) - Phi_t(x_t)||^2 / d`` over ``x_t = x_0 +
  t z`` (IC draws), ``Phi_t`` the exact PF-ODE flow map to ``t_min`` (RK4 on the exact velocity,
  ``GaussianMixture.flow_map(method="rk4")``, 48 steps); :func:`consistency_error` gives one
  column per time of the :class:`EvalSet`. It measures the PF-ODE flow only: batch-OT and GC learn
  the flows of their own couplings, so for them it is a secondary metric.
- **samples**: one step ``x = f(T z, T)`` (``T = 80``), two steps ``f(x + t_mid z', t_mid)``
  (``t_mid = 0.8``) (:func:`samples`).
- **mode-mass TV** ``1/2 sum_k |m_k - w_k|``, ``m_k`` the share of samples whose exact
  responsibility ``p(k | x)`` (at ``t_min``) is largest, ``w_k`` the mixture weights;
- **per-mode mean error** ``sum_k w_k ||mean_k(x) - mu_k||^2 / d`` and **covariance error**
  ``sum_k w_k ||Cov_k(x) - Sigma_k||_F / ||Sigma_k||_F`` over the samples assigned to mode ``k``
  (modes with fewer than 2 samples are skipped and the weights renormalised);
- **sliced W2** against fresh target samples (``gcflows.metrics.sliced_w2``, 128 projections).

:func:`evaluate` returns all of them for one- and two-step samples. On samples of the target
itself the TV, mean error and sliced W2 are pure sampling noise (``O(sqrt(K / n))``,
``O(tr Sigma / (n_k d))``, ``O(n^-1/2)``), the covariance error ``O(d / sqrt(n_k))`` relative;
the tests check these and the closed forms of a shifted or scaled mode and of a Gaussian's flow
map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gcflows.checks import bad, is_int, is_real
from gcflows.gmm import GaussianMixture
from gcflows.metrics import sliced_w2
from gcflows.processes import get_process

__all__ = [
    "EVAL_TIMES",
    "T_MAX",
    "TWO_STEP_T",
    "METRICS",
    "EvalSet",
    "make_eval_set",
    "eval_set_from_reference",
    "consistency_error",
    "samples",
    "sample_metrics",
    "evaluate",
]

Apply = Callable[[Tensor, Tensor], Tensor]

EVAL_TIMES = (0.05, 0.2, 1.0, 5.0, 20.0, 80.0)
T_MAX = 80.0
TWO_STEP_T = 0.8
SAMPLE_METRICS = ("mode_tv", "mean_err", "cov_err", "sw2")
#: every key of :func:`evaluate` (per model, ``(S,)``)
METRICS = ("cons_err",) + tuple(f"{m}_{k}step" for k in (1, 2) for m in SAMPLE_METRICS)


@dataclass
class EvalSet:
    """Fixed evaluation draws of one target.

    ``times (T,)``; ``x (T, n, d)`` IC draws ``x_0 + t z`` and ``flow (T, n, d)`` their exact
    flow maps to ``t_min`` (float32); ``ref (m, d)`` fresh target samples (float64) for the
    sliced W2."""

    times: tuple[float, ...]
    x: Tensor
    flow: Tensor
    ref: Tensor


def make_eval_set(
    target: GaussianMixture,
    n_flow: int = 256,
    n_ref: int = 1000,
    times: Sequence[float] = EVAL_TIMES,
    flow_steps: int = 48,
    seed: int = 12345,
) -> EvalSet:
    """Draw the :class:`EvalSet` (``n_flow`` points per time, ``n_ref`` reference samples) from
    ``torch.Generator().manual_seed(seed)``: the same draws for every method and seed."""
    for name, v in (("n_flow", n_flow), ("n_ref", n_ref), ("flow_steps", flow_steps)):
        if not is_int(v) or v < 2:
            raise bad(name, v, "use an integer >= 2")
    times = tuple(float(t) for t in times)
    if not times:
        raise bad("times", times, "use at least one time")
    get_process("ve").check_time(torch.tensor(times, dtype=torch.float64))
    g = torch.Generator().manual_seed(int(seed))
    xs, flows = [], []
    for t in times:
        data = target.sample(n_flow, generator=g)
        x = data + t * torch.randn(data.shape, generator=g, dtype=data.dtype)
        xs.append(x.float())
        flows.append(target.flow_map(x, t, "ve", method="rk4", steps=flow_steps).float())
    ref = target.sample(n_ref, generator=g).double()
    return EvalSet(times, torch.stack(xs), torch.stack(flows), ref)


def eval_set_from_reference(reference: dict[str, Tensor]) -> EvalSet:
    """An :class:`EvalSet` over the draws of ``gcflows.discrepancy.flow_map_reference`` (any
    process and times: rows grouped by time, ``n`` per time; float32 like
    :func:`make_eval_set`), for :func:`consistency_error`; ``ref`` is empty (no sample metrics)."""
    times = reference["times"]
    n_t = times.numel()
    x, flow = reference["x"], reference["target"]
    if n_t < 1 or x.dim() != 2 or x.shape[0] % n_t or flow.shape != x.shape:
        raise bad(
            "reference",
            {k: tuple(v.shape) for k, v in reference.items()},
            "use the dict of flow_map_reference",
        )
    shape = (n_t, x.shape[0] // n_t, x.shape[1])
    return EvalSet(
        tuple(float(t) for t in times),
        x.reshape(shape).float(),
        flow.reshape(shape).float(),
        torch.empty(0, x.shape[1], dtype=torch.float64),
    )


def consistency_error(apply: Apply, n_models: int, ev: EvalSet) -> Tensor:
    """``(S, T)``: ``mean_i ||f_s(x_i, t) - Phi_t(x_i)||^2 / d`` per model and time."""
    cols = []
    with torch.no_grad():
        for j, t in enumerate(ev.times):
            x, ref = ev.x[j], ev.flow[j]
            f = apply(x.expand(n_models, *x.shape), torch.full((n_models, x.shape[0]), t))
            cols.append(((f - ref) ** 2).sum(-1).mean(-1) / x.shape[1])
    return torch.stack(cols, 1)


def samples(
    apply: Apply,
    n_models: int,
    dim: int,
    n: int,
    n_steps: int,
    generator: torch.Generator,
    t_max: float = T_MAX,
    t_mid: float = TWO_STEP_T,
) -> Tensor:
    """``(S, n, d)`` samples of each model: one step ``f(t_max z, t_max)``, and with
    ``n_steps = 2`` a second ``f(x + t_mid z', t_mid)``. Draws ``z`` (and ``z'``) ``(S, n, d)``
    from ``generator``."""
    if n_steps not in (1, 2):
        raise bad("n_steps", n_steps, "use 1 or 2")
    z = torch.randn(n_models, n, dim, generator=generator)
    with torch.no_grad():
        x = apply(t_max * z, torch.full((n_models, n), float(t_max)))
        if n_steps == 2:
            z2 = torch.randn(n_models, n, dim, generator=generator)
            x = apply(x + t_mid * z2, torch.full((n_models, n), float(t_mid)))
    return x.detach()


def sample_metrics(
    target: GaussianMixture, x: Tensor, ref: Tensor, n_projections: int = 128, seed: int = 7
) -> dict[str, float]:
    """Mode-mass TV, per-mode mean and covariance errors and sliced W2 of samples ``x (n, d)``
    (module docstring). Non-finite samples give ``inf`` for every metric."""
    if x.dim() != 2 or x.shape[1] != target.dim:
        raise bad("x", tuple(x.shape), f"use shape (n, {target.dim})")
    if not bool(torch.isfinite(x).all()):
        return {k: float("inf") for k in SAMPLE_METRICS}
    x64 = x.double()
    d, k = target.dim, target.n_components
    comp = target.responsibilities(x64, get_process("ve").t_min, "ve").argmax(1)
    mass = torch.bincount(comp, minlength=k).double() / x.shape[0]
    tv = 0.5 * float((mass - target.weights.double()).abs().sum())
    means, covs, w = target.means.double(), target.covariances.double(), target.weights.double()
    mean_err, cov_err, wsum = 0.0, 0.0, 0.0
    for j in range(k):
        xj = x64[comp == j]
        if xj.shape[0] < 2:
            continue
        wj = float(w[j])
        mean_err += wj * float(((xj.mean(0) - means[j]) ** 2).sum()) / d
        cov_err += wj * float((torch.cov(xj.T) - covs[j]).norm() / covs[j].norm())
        wsum += wj
    if wsum == 0.0:
        mean_err = cov_err = float("inf")
        wsum = 1.0
    sw = sliced_w2(
        x64, ref, n_projections=n_projections, generator=torch.Generator().manual_seed(seed)
    )
    return dict(mode_tv=tv, mean_err=mean_err / wsum, cov_err=cov_err / wsum, sw2=float(sw))


def evaluate(
    target: GaussianMixture,
    apply: Apply,
    n_models: int,
    ev: EvalSet,
    n_samples: int = 1000,
    seed: int = 11,
    two_step: bool = True,
) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` per model (``(S,)`` float64 arrays): the consistency
    error averaged over ``ev.times``, and the sample metrics of ``n_samples`` one-step (and
    two-step) samples drawn from ``torch.Generator().manual_seed(seed)``."""
    if not is_int(n_samples) or n_samples < 2:
        raise bad("n_samples", n_samples, "use an integer >= 2")
    if not is_int(n_models) or n_models < 1:
        raise bad("n_models", n_models, "use an integer >= 1")
    if not is_real(seed):
        raise bad("seed", seed, "use an integer")
    out = {"cons_err": consistency_error(apply, n_models, ev).mean(1).double().numpy()}
    g = torch.Generator().manual_seed(int(seed))
    for n_steps in (1, 2) if two_step else (1,):
        x = samples(apply, n_models, target.dim, n_samples, n_steps, g)
        rows = [sample_metrics(target, x[i], ev.ref) for i in range(n_models)]
        for m in SAMPLE_METRICS:
            out[f"{m}_{n_steps}step"] = np.asarray([r[m] for r in rows], dtype=np.float64)
    return out
