"""Continuous-time consistency training with every coupling, and its gradient noise.

docs/paper.md sections 1-3; the derivations are in docs/theory.md ("Continuous-time consistency
training"). Shapes: a batch is ``(B, *dims)``, per-sample times ``(B,)``; a consistency function is
any callable ``model(x (B, *dims), t (B,)) -> (B, *dims)`` that keeps ``t`` differentiable (e.g. a
``gcflows.consistency.ConsistencyModel``).

The continuous objective
------------------------
The discrete loss ``lambda D(sg f(x_{t-h}, t-h), f(x_t, t))`` with ``lambda = 1 / h`` and
``D = C ||.||^2 + o(||.||^2)`` (alpha = 2) has the gradient
``2 C J_theta f(x_t, t)^T (f(x_t, t) - f(x_{t-h}, t-h)) / h``, and ``f(x_t, t) - f(x_{t-h}, t-h) =
h g + O(h^2)`` with the tangent along the path

    g = d f_{theta-}(x_t, t) / dt = d_t f + J_x f u,        u = a'(t) data + b'(t) noise,

so as ``h -> 0`` the gradient tends to ``E[w(t) 2 C J_theta f^T g]``. :class:`ContinuousObjective`
returns a loss with exactly that gradient::

    loss = mean_j w(t_j) C || f_theta(x_j, t_j) - sg f_theta(x_j, t_j) + sg g_j ||^2

(value ``C w ||g||^2``, the squared tangent; gradient ``2 C w J_theta^T g``). ``g`` is one
``torch.func.jvp`` of the model along ``(u, 1)`` under ``torch.no_grad`` (the stop-gradient
network ``f_{theta-}``, same parameters). The velocity ``u`` depends on the method, read from the
one registry ``gcflows.consistency.METHOD_REGISTRY`` (its ``couple`` re-pairs the batch at ``t``;
its ``target`` is the pair's ``xdot`` or the velocity estimator):

- ``ct``: the one-sample velocity ``xdot = a' data + b' noise`` of the independent pair;
- ``cd``: a ``gcflows.velocity`` estimator ``velocity(x_t, t, data=, noise=)`` (exact
  ``TrueVelocity`` or a ``DistilledVelocity`` teacher);
- ``ot``: ``xdot`` of the batch-OT re-paired noise (``couplings.ot_coupling``);
- ``gc``: ``xdot`` of the generator-induced pairs (``couplings.generator_induced_coupling`` at
  time ``t``, probability ``mu`` per row, any ``gc_model``).

Times: ``t`` is drawn from the continuous limit of the iCT index law, the lognormal over the
VE-equivalent noise level ``sigma(t) = b(t) / a(t)`` truncated to ``[sigma(t_min), sigma(t_max)]``
(``ContinuousConfig.time_sampling="lognormal"``), or uniformly on ``[t_min, t_max]``
(``"uniform"``). The weight ``w(t)`` (``ContinuousConfig.weight``) defaults to 1: iCT's
``lambda_i = 1 / (s_{i+1} - s_i)`` times the interval length.

Stabilizers (Lu & Song 2024, sCM), both options of ``gcflows.consistency.ContinuousConfig``:

- tangent normalization ``g <- g / (||g|| + c)`` per sample (``tangent_norm=c``; default 0.1 as in
  sCM; ``None`` switches it off and gives the exact continuous limit of CT that the tests check);
- tangent warm-up ``g_r = J_x f u + r d_t f`` with ``r = min(1, step / tangent_warmup)``
  (``tangent_warmup``; default 0: no warm-up, ``r = 1``; not the learning-rate warm-up).

Gradient noise
--------------
For the squared L2 distance (``C = 1``, ``w = 1``) the per-sample gradient at time ``t`` is
``gamma = 2 J_theta^T g``. With ``xdot`` replaced by the exact velocity ``v_t(x_t)`` it is the CD
gradient ``gamma_CD``. Given ``x_t`` (independent coupling) ``E[xdot | x_t] = v_t`` and ``g`` is
linear in ``xdot``, so ``E[gamma | x_t] = gamma_CD(x_t)``: CT is an unbiased estimate of CD. Its
extra covariance is exact from the mixture's posterior covariance
``Sigma_t(x) = Cov[xdot | x_t = x] = (a' - b' a / b)^2 Cov[data | x_t = x]``::

    tr Cov[gamma] = tr Cov[gamma_CD] + E_x 4 tr(J_theta^T J_x Sigma J_x^T J_theta)      (*)

:func:`exact_noise_terms` evaluates the last term per ``x`` (``d`` JVPs and the per-sample tangent
kernel);
:func:`gradient_noise` estimates everything per time and per coupling. Relation to Theorem 1:
``r_t(theta) = E tr(J_x Sigma J_x^T)`` is the integrand of ``R(theta)`` (the loss gap), and with
the neural-tangent kernel ``K = J_theta J_theta^T`` ``(d, d)`` per sample,

    4 lambda_min(K) tr(J_x Sigma J_x^T) <= 4 tr(J_theta^T J_x Sigma J_x^T J_theta)
                                        <= 4 lambda_max(K) tr(J_x Sigma J_x^T),

and ``tr(J_x Sigma J_x^T) <= ||J_x||^2 tr Sigma`` with ``E tr Sigma = R~_t`` (Eq. 17). So the
gradient noise CT pays is R(theta)'s integrand seen through the kernel, and a coupling that lowers
``R~_t`` lowers the bound.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from gcflows import checks, couplings
from gcflows.checks import batch_times, finite
from gcflows.consistency import (
    METHODS,
    TIME_SAMPLINGS,
    ContinuousConfig,
    LossOutput,
    ObjectiveConfig,
    check_method_arguments,
    get_distance,
    shared_dropout_passes,
)
from gcflows.gmm import GaussianMixture
from gcflows.processes import Process, TrigFlowProcess, get_process

__all__ = [
    "METHODS",
    "TIME_SAMPLINGS",
    "TrigFlowConsistencyModel",
    "sample_times",
    "tangent",
    "normalize_tangent",
    "ContinuousObjective",
    "per_sample_gradients",
    "per_sample_kernel",
    "NoiseTerms",
    "exact_noise_terms",
    "GradientNoise",
    "gradient_noise",
]

COUPLINGS = ("ic", "ot", "gc")
Model = Callable[[Tensor, Tensor], Tensor]


# ================================================================================================
# sCM's TrigFlow parametrization
# ================================================================================================
class TrigFlowConsistencyModel(nn.Module):
    """sCM parametrization on the TrigFlow process, shifted so that ``f(x, t_min) = x`` exactly::

        f(x, t) = cos(t - t_min) x - sin(t - t_min) sigma_d F(c_in(t) x, c_noise(t))

    with ``c_in = 1 / sqrt(cos(t)^2 sigma_d^2 + sin(t)^2)`` (1 / std of ``x_t`` for data of std
    ``sigma_d`` and standard noise) and ``c_noise = t`` (sCM feeds ``t`` itself, up to a scale).
    ``backbone(x_in (B, *dims), c_noise (B,)) -> (B, *dims)``. ``x (B, *dims)``, ``t (B,)``.
    """

    def __init__(
        self, backbone: nn.Module, process: Process | str = "trigflow", sigma_data: float = 0.5
    ) -> None:
        super().__init__()
        process = get_process(process)
        if not isinstance(process, TrigFlowProcess):
            raise checks.bad("process", process.name, "use the 'trigflow' process")
        self.backbone = backbone
        self.process = process
        self.sigma_data = checks.real(sigma_data, "sigma_data", lo_open=0.0)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = batch_times(t, x.shape[0], x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        sd = self.sigma_data
        c_in = torch.rsqrt(torch.cos(t) ** 2 * sd * sd + torch.sin(t) ** 2).reshape(shape)
        s = t - self.process.t_min
        out = self.backbone(x * c_in, t)
        return torch.cos(s).reshape(shape) * x - torch.sin(s).reshape(shape) * sd * out


# ================================================================================================
# Times
# ================================================================================================
def sample_times(
    process: Process,
    n: int,
    *,
    kind: str = "lognormal",
    p_mean: float = -1.1,
    p_std: float = 2.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` times ``(n,)`` float64 on the generator's device (CPU without one).

    ``"lognormal"``: ``log sigma(t) ~ N(p_mean, p_std^2)`` truncated to the process range (the
    continuous limit of ``consistency.lognormal_index_probs``), by inverting the normal CDF of
    a uniform on the truncated range; ``"uniform"``: ``t ~ U[t_min, t_max]``. Another ``kind``
    raises ``ValueError``.
    """
    checks.choice(kind, "kind", TIME_SAMPLINGS, "sample_times")
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    if kind == "uniform":
        return process.t_min + u * (process.t_max - process.t_min)
    normal = torch.distributions.Normal(
        torch.tensor(p_mean, dtype=torch.float64, device=device),
        torch.tensor(p_std, dtype=torch.float64, device=device),
    )
    ends = torch.tensor([process.t_min, process.t_max], dtype=torch.float64, device=device)
    lo, hi = normal.cdf(torch.log(process.b(ends) / process.a(ends)))
    q = (lo + u * (hi - lo)).clamp(1e-300, 1 - 1e-16)
    return process.time_of_sigma(torch.exp(normal.icdf(q)))


# ================================================================================================
# Tangents
# ================================================================================================
def tangent(model: Model, x: Tensor, t: Tensor, u: Tensor, r: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(f, g)``: ``f = model(x, t)`` and ``g = J_x f u + r d_t f`` ``(B, *dims)`` by one JVP.

    ``r = 1`` gives the total derivative of ``f`` along the path with velocity ``u``. Gradients
    flow as the caller's grad mode allows (call under ``torch.no_grad`` for ``f_{theta-}``).
    """
    t = t.contiguous()
    return jvp(model, (x.contiguous(), t), (u.contiguous(), torch.full(t.shape, float(r)).to(t)))


def normalize_tangent(g: Tensor, c: float) -> Tensor:
    """``g / (||g|| + c)`` per sample (sCM's tangent normalization); ``||.||`` over all dims."""
    norm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
    return g / (norm + c).reshape((-1,) + (1,) * (g.dim() - 1))


# ================================================================================================
# The objective
# ================================================================================================
class ContinuousObjective:
    """Continuous-time CT / CD / batch-OT / GC loss (module doc); built and called like
    ``consistency.ConsistencyObjective``: ``objective(model, data, step, generator=, noise=,
    gc_model=, validate=) -> LossOutput``.

    Args:
        process: a ``Process`` or its name.
        config: the one :class:`gcflows.consistency.ObjectiveConfig` of the discrete objective
            (used as given: it validated itself), with its ``continuous`` sub-config
            (:class:`gcflows.consistency.ContinuousConfig`; its defaults when None); or a method
            name with the fields of both as keyword arguments
            (``ContinuousObjective("ve", "ct", distance="squared_l2", tangent_norm=None)``).
            Read here: ``method`` (a registered :class:`gcflows.consistency.Method`), ``mu``,
            ``distance``, ``p_mean`` / ``p_std`` (the lognormal of the times) and the sub-config's
            ``tangent_norm``, ``tangent_warmup``, ``time_sampling``, ``weight``; the grid fields
            (``s0``, ``s1``, ``rho``, ``total_steps``, ...) have no meaning in continuous time.
        velocity: a ``gcflows.velocity`` estimator (``cd`` only, required there).
        ot_coupling_fn: ``(data, noise) -> CouplingResult`` for ``ot`` (default
            ``couplings.ot_coupling`` without its checks; the trainer passes a distributed version).

    The distance is the ``ObjectiveConfig``'s, pseudo-Huber by default as in discrete time: only
    its small-distance constant ``C`` enters (``D = C ||.||^2 + o(||.||^2)``), so the continuous
    loss of a config is the ``h -> 0`` limit of its discrete loss, ``C = 1 / (2c)`` for
    pseudo-Huber, ``C = 1`` for ``squared_l2`` (the form of the gradient-noise analysis);
    ``l2_norm`` (alpha 1) has no such limit and is refused.

    Random draws, in order, from ``generator``: the noise (unless given), the times (unless
    ``times=`` is given), then the method's coupling (the GC mask). ``data`` must be in the dtype
    of an ``nn.Module`` model's parameters (no silent cast; ``ValueError`` naming the cast
    otherwise), except under autocast.
    """

    def __init__(
        self,
        process: Process | str,
        config: ObjectiveConfig | str,
        *,
        velocity=None,
        ot_coupling_fn: Callable | None = None,
        **settings,
    ) -> None:
        if not isinstance(config, ObjectiveConfig):
            unknown = sorted(set(settings) - set(_CONTINUOUS_FIELDS) - set(_OBJECTIVE_FIELDS))
            if unknown:
                fix = f"use fields of ObjectiveConfig or ContinuousConfig ({_FIELD_HINT})"
                raise checks.bad("settings", unknown, fix, "ContinuousObjective")
            sub = {k: settings.pop(k) for k in _CONTINUOUS_FIELDS if k in settings}
            owner = "ContinuousObjective"
            sub = ContinuousConfig(**sub, owner=owner)
            config = ObjectiveConfig(method=config, continuous=sub, owner=owner, **settings)
        elif settings:
            raise ValueError(
                f"pass the settings {sorted(settings)} inside the ObjectiveConfig, not beside it"
            )
        if config.continuous is None:
            config = dataclasses.replace(config, continuous=ContinuousConfig(owner=config.owner))
        self.process = get_process(process)
        self.config = config
        self.method_spec = check_method_arguments(config.method, velocity, ot_coupling_fn)
        self.velocity = velocity
        self.ot_coupling_fn = ot_coupling_fn or _ot_coupling_checked_here
        self._constants: dict[int, float] = {}

    # the settings, read from the one config
    @property
    def method(self) -> str:
        return self.config.method

    @property
    def continuous(self) -> ContinuousConfig:
        return self.config.continuous

    def constant(self, dim: int) -> float:
        """``C`` of the distance for ``dim`` elements per sample (``D ~ C ||.||^2``)."""
        if dim not in self._constants:
            dist = get_distance(self.config.distance, dim)
            if dist.alpha != 2.0:
                raise checks.bad(
                    "distance",
                    dist.name,
                    "use a distance with alpha = 2 (squared_l2, pseudo_huber)",
                )
            self._constants[dim] = float(dist.C)
        return self._constants[dim]

    def warmup(self, step: int) -> float:
        """Tangent warm-up factor ``r = min(1, step / tangent_warmup)`` in ``[0, 1]``."""
        n = self.continuous.tangent_warmup
        return 1.0 if n == 0 else min(1.0, step / n)

    def __call__(
        self,
        model: Model,
        data: Tensor,
        step: int = 0,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        gc_model: Model | None = None,
        times: Tensor | None = None,
        validate: bool = True,
    ) -> LossOutput:
        """Loss of ``model`` on ``data`` ``(B, *dims)`` at ``step``; ``times`` ``(B,)`` fixes
        ``t`` instead of drawing it. Diagnostics: ``t`` (also as ``t_lo`` and ``t_hi``),
        ``weight``, ``distance`` (``C ||g||^2`` before normalization), ``tangent_norm``,
        ``pair_cost``, ``gc_mask``; ``num_intervals`` is 0 (continuous time).

        ``validate=False`` skips the argument checks, for a caller that checked the batch at its
        own entry point (the training step); the couplings are called unchecked either way
        (docs/design.md section 3, checks once)."""
        if validate:
            self._check_call(model, data, step, noise, gc_model)
        bsz, device, dtype = data.shape[0], data.device, data.dtype
        if noise is None:
            noise_device = generator.device if generator is not None else device
            noise = torch.randn(data.shape, generator=generator, device=noise_device, dtype=dtype)
        noise = noise.to(device=device, dtype=dtype)
        cont = self.continuous
        if times is None:
            times = sample_times(
                self.process,
                bsz,
                kind=cont.time_sampling,
                p_mean=self.config.p_mean,
                p_std=self.config.p_std,
                generator=generator,
            )
        elif validate:
            times = batch_times(times, bsz, data, "times")
            self.process.check_time(times.detach(), "times")
        t = batch_times(times, bsz, data, "times").to(device=device, dtype=dtype)

        coupling, data_used, noise_used = None, data, noise
        if self.method_spec.couple is not None:
            coupling = self.method_spec.couple(self, data, noise, t, gc_model, generator)
            data_used, noise_used = coupling.data, coupling.noise
        x_t = self.process.interpolate(data_used, noise_used, t)
        if self.method_spec.target == "velocity":
            with torch.no_grad():
                u = self.velocity(x_t, t, data=data, noise=noise)
        else:
            u = self.process.xdot(data_used, noise_used, t)
        r = self.warmup(step)

        f, (_, g) = shared_dropout_passes(
            lambda: model(x_t, t), lambda: tangent(model, x_t, t, u, r), x_t.device
        )
        c_dist = self.constant(data[0].numel())
        g_norm = torch.linalg.vector_norm(g.reshape(bsz, -1), dim=1)
        if cont.tangent_norm is not None:
            g = normalize_tangent(g, cont.tangent_norm)
        w = torch.ones_like(t) if cont.weight is None else cont.weight(t).to(t)
        resid = (f - f.detach() + g).reshape(bsz, -1)
        loss = (w * c_dist * (resid * resid).sum(1)).mean()

        gc_mask = coupling.gc_mask if coupling is not None else None
        if gc_mask is None:
            gc_mask = torch.zeros(bsz, dtype=torch.bool, device=device)
        diagnostics = {
            "t": t.detach(),
            "t_lo": t.detach(),
            "t_hi": t.detach(),
            "weight": w.detach(),
            "distance": c_dist * g_norm.detach() ** 2,
            "tangent_norm": g_norm.detach(),
            "pair_cost": _row_cost(data_used, noise_used),
            "gc_mask": gc_mask,
        }
        return LossOutput(loss, diagnostics, 0, coupling)

    def _check_call(self, model, data, step, noise, gc_model) -> None:
        """The checks of ``__call__``'s arguments (each ``ValueError`` names the argument)."""
        if not torch.is_tensor(data) or not data.is_floating_point() or data.dim() < 2:
            raise checks.bad("data", type(data).__name__, "pass a float tensor (B, *dims)")
        finite(data, "data")
        want = _parameter_dtype(model)
        if want is not None and want != data.dtype and not _autocast_on(data.device):
            raise checks.bad(
                "data.dtype", data.dtype, f"pass data in the model's dtype: data.to({want})"
            )
        if ("gc_model" in self.method_spec.needs) != (gc_model is not None):
            raise checks.bad("gc_model", gc_model, "pass gc_model(x_t, t) for method='gc' only")
        checks.integer(step, "step", lo=0)
        if noise is not None:
            if not torch.is_tensor(noise):
                raise checks.bad("noise", type(noise).__name__, "pass a tensor shaped like data")
            checks.same_shape(data, noise)
            finite(noise, "noise")


def _row_cost(data: Tensor, noise: Tensor) -> Tensor:
    """``||data_j - noise_j||^2`` ``(B,)``, detached, as ``couplings.squared_cost`` computes it
    (float64 for float64 input, else float32) without its checks: the objective checked."""
    acc = torch.float64 if data.dtype == torch.float64 else torch.float32
    diff = (data.detach().to(acc) - noise.detach().to(acc)).reshape(data.shape[0], -1)
    return (diff * diff).sum(1)


def _ot_coupling_checked_here(data: Tensor, noise: Tensor) -> couplings.CouplingResult:
    """``couplings.ot_coupling`` without its argument checks: the objective checked the batch."""
    return couplings.ot_coupling(data, noise, validate=False)


_CONTINUOUS_FIELDS = tuple(
    f.name for f in dataclasses.fields(ContinuousConfig) if f.name != "owner"
)
_OBJECTIVE_FIELDS = tuple(
    f.name for f in dataclasses.fields(ObjectiveConfig) if f.name not in ("owner", "continuous")
)
_FIELD_HINT = "the tangent warm-up is tangent_warmup"


def _parameter_dtype(model: Model) -> torch.dtype | None:
    """The dtype of an ``nn.Module``'s first floating parameter (None for other callables)."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _autocast_on(device: torch.device) -> bool:
    """Autocast casts inputs itself: a dtype difference is then intended."""
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # older torch: no device argument (CUDA autocast only)
        return torch.is_autocast_enabled()


# ================================================================================================
# Gradient noise
# ================================================================================================
@contextmanager
def _unchecked(model: Model) -> Iterator[None]:
    """Switch off a ``ConsistencyModel``'s host-side input checks (not traceable by vmap)."""
    old = getattr(model, "check_inputs", None)
    if old is not None:
        model.check_inputs = False
    try:
        yield
    finally:
        if old is not None:
            model.check_inputs = old


def per_sample_gradients(model: nn.Module, x: Tensor, t: Tensor, w: Tensor) -> Tensor:
    """Row ``j``: ``J_theta f(x_j, t_j)^T w_j``, the gradient of ``<f_theta(x_j, t_j), w_j>``.

    ``x, w (B, *dims)``, ``t (B,)`` -> ``(B, P)`` over the trainable parameters in
    ``model.parameters()`` order (``torch.func.vmap`` of ``grad``; model in eval mode).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def inner(p: dict, x1: Tensor, t1: Tensor, w1: Tensor) -> Tensor:
        out = functional_call(model, p, (x1[None], t1[None]))[0]
        return (out * w1).sum()

    with _unchecked(model):
        grads = vmap(grad(inner), in_dims=(None, 0, 0, 0))(params, x, t, w)
    return torch.cat([grads[n].reshape(x.shape[0], -1) for n in names], dim=1)


def per_sample_kernel(
    model: nn.Module, x: Tensor, t: Tensor, max_elements: int = 1 << 24
) -> Tensor:
    """The tangent kernel ``K_j = J_theta f(x_j, t_j) J_theta f(x_j, t_j)^T`` ``(B, d, d)``.

    ``x (B, d)``, ``t (B,)``; per-sample Jacobians ``(chunk, d, P)`` by ``vmap(jacrev)``, with
    ``chunk * d * P <= max_elements``.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, max_elements // (x.shape[1] * n_params))

    def inner(p: dict, x1: Tensor, t1: Tensor) -> Tensor:
        return functional_call(model, p, (x1[None], t1[None]))[0]

    out = []
    with _unchecked(model), torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            jac = vmap(jacrev(inner), in_dims=(None, 0, 0))(
                params, x[s : s + chunk], t[s : s + chunk]
            )
            flat = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2)
            out.append(flat @ flat.transpose(1, 2))
    return torch.cat(out)


def _posterior_root(target: GaussianMixture, process: Process, x: Tensor, t: Tensor) -> Tensor:
    """``L (B, d, d)`` with ``L L^T = Sigma = Cov[xdot | x_t = x]`` (``eigh``; PSD-safe)."""
    coef = process.da(t) - process.db(t) * process.a(t) / process.b(t)
    cov = target.posterior_cov(x, t, process) * (coef**2)[:, None, None]
    lam, vecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(1, 2)))
    return vecs * lam.clamp_min(0.0).sqrt()[:, None, :]


@dataclass
class NoiseTerms:
    """Exact per-sample terms of Eq. (*) given ``x_t`` (each ``(B,)``): ``noise = 4 tr(M^T K M)``
    (``tr Cov[gamma_CT | x_t]``), ``r = tr(M^T M) = tr(J_x Sigma J_x^T)`` (R(theta)'s integrand),
    and the kernel's extreme eigenvalues ``lam_min``, ``lam_max``; ``M = J_x L``."""

    noise: Tensor
    r: Tensor
    lam_min: Tensor
    lam_max: Tensor


def exact_noise_terms(
    model: nn.Module, x: Tensor, t: Tensor, process: Process | str, target: GaussianMixture
) -> NoiseTerms:
    """Eq. (*)'s conditional term and its relation to ``R(theta)``, exactly, per ``x_t = x``.

    ``x (B, d)``, ``t (B,)``. ``M = J_x L`` by ``d`` JVPs (``L L^T = Sigma``), ``K`` by
    :func:`per_sample_kernel`; then ``tr Cov[gamma | x_t] = 4 tr(J_theta^T M M^T J_theta) =
    4 tr(M^T K M)``.
    """
    process = get_process(process)
    root = _posterior_root(target, process, x, t)
    with _unchecked(model), torch.no_grad():
        cols = [
            jvp(lambda xx: model(xx, t), (x,), (root[:, :, k].contiguous(),))[1]
            for k in range(x.shape[1])
        ]
    m = torch.stack(cols, dim=2)  # (B, d, d): column k = J_x L e_k
    kern = per_sample_kernel(model, x, t)
    lam = torch.linalg.eigvalsh(kern)
    noise = 4.0 * torch.einsum("bik,bij,bjk->b", m, kern, m)
    return NoiseTerms(noise, (m * m).sum((1, 2)), lam[:, 0], lam[:, -1])


@dataclass
class GradientNoise:
    """Per-sample continuous gradients at one time for one coupling (squared L2, ``w = 1``).

    ``gamma`` rows ``2 J_theta^T g`` (the coupling's ``xdot``), ``gamma_cd`` rows with the exact
    velocity at the same points. Summaries (floats): ``trace_ct = tr Cov[gamma]``,
    ``trace_cd = tr Cov[gamma_cd]``, ``noise = E||gamma - gamma_cd||^2`` with ``noise_se``,
    ``bias = ||E gamma - E gamma_cd||^2`` and ``bias_null = tr Cov[gamma - gamma_cd] / n`` (its
    expectation when unbiased), ``grad_norm2 = ||E gamma_cd||^2``, ``r_t = E tr(J_x Sigma
    J_x^T)`` (IC only, exact given ``x_t``), ``exact_noise`` with ``exact_noise_se`` (IC only:
    ``E 4 tr(J_theta^T J_x Sigma J_x^T J_theta)``), and ``proxy = E||xdot - v||^2`` (``R~_t``).
    """

    t: float
    coupling: str
    n: int
    trace_ct: float
    trace_cd: float
    noise: float
    noise_se: float
    bias: float
    bias_null: float
    grad_norm2: float
    proxy: float
    r_t: float | None = None
    exact_noise: float | None = None
    exact_noise_se: float | None = None
    gamma: Tensor | None = field(default=None, repr=False)
    gamma_cd: Tensor | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not torch.is_tensor(v)}


def _trace_cov(rows: Tensor) -> float:
    return float(((rows - rows.mean(0)) ** 2).sum(1).sum() / (rows.shape[0] - 1))


def gradient_noise(
    model: nn.Module,
    target: GaussianMixture,
    process: Process | str,
    t: float,
    *,
    coupling: str = "ic",
    n: int = 512,
    gc_model: Model | None = None,
    mu: float = 1.0,
    ot_batch_size: int = 256,
    exact: bool | None = None,
    keep: bool = False,
    generator: torch.Generator | None = None,
) -> GradientNoise:
    """Mean and covariance trace of the continuous CT gradient of one coupling and of the CD
    gradient at time ``t`` (module doc, Eq. (*)).

    ``coupling``: ``"ic"`` (the pairs as drawn), ``"ot"`` (``couplings.ot_coupling`` within
    consecutive batches of ``ot_batch_size``) or ``"gc"`` (``couplings.generator_induced_coupling``
    at ``t`` with ``gc_model`` and ``mu``, the same noise). ``n`` pairs are drawn in the
    model's dtype; ``exact`` (default: IC only) adds the exact conditional noise of Eq. (*).
    ``keep`` stores the per-sample gradient rows.
    """
    process = get_process(process)
    n = checks.integer(n, "n", lo=2)
    dtype = next(model.parameters()).dtype
    gmm = target.to(dtype=dtype)
    data = gmm.sample(n, generator)
    noise = torch.randn(data.shape, generator=generator, dtype=dtype)
    checks.choice(coupling, "coupling", COUPLINGS)
    if coupling == "ot":
        ot_batch_size = checks.integer(ot_batch_size, "ot_batch_size", lo=1)
        parts = [
            couplings.ot_coupling(data[s : s + ot_batch_size], noise[s : s + ot_batch_size])
            for s in range(0, n, ot_batch_size)
        ]
        data, noise = torch.cat([p.data for p in parts]), torch.cat([p.noise for p in parts])
    elif coupling == "gc":
        if gc_model is None:
            raise checks.bad("gc_model", None, "pass gc_model(x_t, t) for coupling='gc'")
        res = couplings.generator_induced_coupling(
            data, noise, gc_model, t, process, mu=mu, generator=generator
        )
        data, noise = res.data, res.noise
    tt = batch_times(t, n, data).contiguous()
    x, xdot = process.interpolate(data, noise, tt), process.xdot(data, noise, tt)
    v = gmm.velocity(x, tt, process)
    with _unchecked(model), torch.no_grad():
        g_ct = tangent(model, x, tt, xdot)[1]
        g_cd = tangent(model, x, tt, v)[1]
    gamma = 2.0 * per_sample_gradients(model, x, tt, g_ct)
    gamma_cd = 2.0 * per_sample_gradients(model, x, tt, g_cd)
    delta = gamma - gamma_cd
    sq = (delta * delta).sum(1)
    out = GradientNoise(
        t=float(t),
        coupling=coupling,
        n=n,
        trace_ct=_trace_cov(gamma),
        trace_cd=_trace_cov(gamma_cd),
        noise=float(sq.mean()),
        noise_se=float(sq.std() / math.sqrt(n)),
        bias=float((delta.mean(0) ** 2).sum()),
        bias_null=_trace_cov(delta) / n,
        grad_norm2=float((gamma_cd.mean(0) ** 2).sum()),
        proxy=float(((xdot - v) ** 2).sum(1).mean()),
    )
    if exact if exact is not None else coupling == "ic":
        terms = exact_noise_terms(model, x, tt, process, gmm)
        out.exact_noise = float(terms.noise.mean())
        out.exact_noise_se = float(terms.noise.std() / math.sqrt(n))
        out.r_t = float(terms.r.mean())
    if keep:
        out.gamma, out.gamma_cd = gamma, gamma_cd
    return out
