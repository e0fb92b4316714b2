"""Consistency models: parametrization, the method registry and the CT / CD / OT / GC loss.

docs/paper.md sections 1-2. Time runs from data (``t_min``) to noise (``t_max``); a batch is
``(B, *dims)``, per-sample times ``(B,)``.

Parametrization (docs/paper.md Eq. 3), :class:`ConsistencyModel`::

    f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t))

For ``ve`` (``x_t = data + t noise``), with ``sd = sigma_data`` and ``s_min = t_min``::

    c_skip = sd^2 / ((t - s_min)^2 + sd^2)      c_out   = sd (t - s_min) / sqrt(sd^2 + t^2)
    c_in   = 1 / sqrt(sd^2 + t^2)               c_noise = log(t) / 4

For any affine process ``x_t = a(t) data + b(t) noise`` (``linear``: ``a = 1 - t``, ``b = t``) the
same formulas are applied in VE coordinates. ``y = x / a(t)`` satisfies ``y = data + sigma noise``
with ``sigma(t) = b(t) / a(t)``, and the PF-ODE of ``x`` maps to the PF-ODE of this VE process
(``dy/dt = sigma'(t) E[noise | y]``), so the consistency function of ``x`` (which ends at
``x_{t_min} = a(t_min) y_{sigma_min}``) is ``f(x, t) = a(t_min) f_VE(x / a(t), sigma(t))`` with
``sigma_min = sigma(t_min)``::

    c_skip = (a(t_min) / a(t)) sd^2 / ((sigma - sigma_min)^2 + sd^2)
    c_out  = a(t_min) sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2)
    c_in   = 1 / sqrt(a(t)^2 sd^2 + b(t)^2)     (1 / std of x_t when the data has std sd)
    c_noise = log(sigma) / 4                    (logit(t) / 4 for ``linear``)

For ``ve`` (``a = 1``, ``sigma = t``) this is exactly Eq. 3. At ``t = t_min``: ``c_skip = 1`` and
``c_out = 0`` exactly in floating point, so ``f(x, t_min) = x`` holds bit for bit.

The iCT schedules live in ``gcflows.schedules`` and the distances in ``gcflows.distances``;
both are re-exported here (``from gcflows.consistency import pseudo_huber`` keeps working).

Loss: :class:`ConsistencyObjective` (CT, CD, batch-OT, GC; docs/paper.md Eq. 4-6, 13-15, 21).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gcflows import couplings, velocity
from gcflows.checks import bad as bad_value
from gcflows.checks import bad_tensor, batch_times, choice, finite, integer, probability, real
from gcflows.distances import (
    DISTANCES,
    Distance,
    default_huber_c,
    get_distance,
    l2_norm,
    pseudo_huber,
    pseudo_huber_elementwise,
    squared_l2,
)
from gcflows.kernels import interpolate_pair
from gcflows.processes import LinearProcess, Process, VEProcess, get_process, karras_grid
from gcflows.schedules import (
    check_grid,
    ict_curriculum,
    ict_weights,
    lognormal_index_probs,
    sample_indices,
)

__all__ = [
    "ConsistencyModel",
    "ict_curriculum",
    "lognormal_index_probs",
    "sample_indices",
    "ict_weights",
    "Distance",
    "DISTANCES",
    "squared_l2",
    "pseudo_huber",
    "pseudo_huber_elementwise",
    "l2_norm",
    "get_distance",
    "default_huber_c",
    "LossOutput",
    "Schedule",
    "Method",
    "METHOD_REGISTRY",
    "register_method",
    "get_method",
    "check_method_arguments",
    "check_gc_model",
    "METHODS",
    "CD_STEPS",
    "TIME_SAMPLINGS",
    "ContinuousConfig",
    "INDEX_PROBS",
    "ObjectiveConfig",
    "ConsistencyObjective",
    "shared_dropout_passes",
]


# ================================================================================================
# Parametrization
# ================================================================================================
class ConsistencyModel(nn.Module):
    """``f(x, t) = c_skip(t) x + c_out(t) backbone(c_in(t) x, c_noise(t))`` (docs/paper.md Eq. 3).

    Args:
        backbone: module called as ``backbone(x_in (B, *dims), c_noise (B,)) -> (B, *dims)``.
        process: a ``Process`` or its name (``"ve"``, ``"linear"``); its ``t_min`` is the
            boundary where ``f(x, t_min) = x`` exactly.
        sigma_data: standard deviation of the data assumed by the preconditioning (0.5).
        check_inputs: validate shapes and that times lie in ``[t_min, t_max]``; the domain check
            reads the times on the host (a device sync on GPU), which a training loop that draws
            its times from the grid may switch off.

    The coefficients are computed in float64 (the dtype of ``t`` on devices without float64)
    from ``t`` as given and from ``t_min`` rounded to the dtype of ``t``, so a time equal to
    ``t_min`` in its own dtype gives ``c_skip = 1``, ``c_out = 0`` exactly. They are
    differentiable in ``t`` (``df/dt`` by autograd or JVP through the preconditioning and the
    backbone's ``c_noise`` input).
    """

    def __init__(
        self,
        backbone: nn.Module,
        process: Process | str = "ve",
        sigma_data: float = 0.5,
        *,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        if not callable(backbone):
            raise bad_value("backbone", backbone, "pass a callable backbone(x_in, c_noise)")
        if not (math.isfinite(float(sigma_data)) and float(sigma_data) > 0):
            raise bad_value("sigma_data", sigma_data, "use a positive float")
        self.backbone = backbone
        self.process = get_process(process)
        self.sigma_data = float(sigma_data)
        self.check_inputs = bool(check_inputs)
        self._boundary_cache: dict[tuple[torch.dtype, torch.dtype], tuple[float, float]] = {}

    def _times(self, x: Tensor, t: Tensor | float) -> Tensor:
        like = t.to(x.device) if torch.is_tensor(t) and t.is_floating_point() else x
        t = batch_times(t, x.shape[0], like, "t")
        if self.check_inputs:
            self.process.check_time(t.detach(), "t")
        return t

    def _boundary(self, dtype: torch.dtype, work: torch.dtype) -> tuple[float, float]:
        """``a(t_min)`` and ``sigma(t_min)`` with ``t_min`` rounded to ``dtype``, evaluated in
        ``work`` on the host (Python floats holding ``work`` values exactly: no device copy)."""
        key = (dtype, work)
        if key not in self._boundary_cache:
            t0 = torch.tensor(self.process.t_min, dtype=dtype).to(work)
            a0, b0 = self.process.a(t0), self.process.b(t0)
            self._boundary_cache[key] = (a0.item(), (b0 / a0).item())
        return self._boundary_cache[key]

    def preconditioning(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for times ``t (B,)``, each ``(B,)`` (module doc)."""
        work = torch.float32 if t.device.type == "mps" else torch.float64
        tt = t.to(work)
        p, sd = self.process, self.sigma_data
        a0, sigma0 = self._boundary(t.dtype, work)
        a, b = p.a(tt), p.b(tt)
        sigma = b / a
        ds = sigma - sigma0
        c_skip = (a0 / a) * (sd * sd) / (ds * ds + sd * sd)
        c_out = a0 * sd * ds / torch.sqrt(sd * sd + sigma * sigma)
        c_in = 1.0 / torch.sqrt(a * a * (sd * sd) + b * b)
        c_noise = torch.log(sigma) / 4.0
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``x (B, *dims)``, ``t (B,)`` or a float -> ``f(x, t)`` ``(B, *dims)``."""
        if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 1:
            raise bad_tensor(x, "x", "pass a tensor of shape (B, *dims) with B >= 1")
        t = self._times(x, t)
        c_skip, c_out, c_in, c_noise = self.preconditioning(t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        out = self.backbone(x * c_in.to(x.dtype).reshape(shape), c_noise.to(x.dtype))
        if out.shape != x.shape:
            raise ValueError(
                f"backbone returned shape {tuple(out.shape)}, expected the input's {tuple(x.shape)}"
            )
        return c_skip.to(x.dtype).reshape(shape) * x + c_out.to(out.dtype).reshape(shape) * out


# ================================================================================================
# Shared dropout between the two forward passes
# ================================================================================================
def _device_rng(device: torch.device):
    """The RNG module (with get/set_rng_state) of a non-CPU device type, or None."""
    mod = getattr(torch, device.type, None)
    if mod is None or not hasattr(mod, "get_rng_state") or not hasattr(mod, "set_rng_state"):
        return None
    return mod


def shared_dropout_passes(
    student: Callable[[], Tensor], teacher: Callable[[], Tensor], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Run ``student()`` then ``teacher()`` with identical random streams; return both outputs.

    The RNG states of the CPU and of ``device`` (the device of the input, hence of the dropout
    draws) are captured before the student pass; the teacher pass runs inside
    ``torch.random.fork_rng`` on that device with the captured state restored, so every random
    draw (dropout masks included) repeats exactly. On exit the RNG is where the student pass left
    it: the global stream advances as for one pass. The teacher runs under ``torch.no_grad``.
    """
    device = torch.device(device)
    mod = _device_rng(device) if device.type != "cpu" else None
    idx = device.index
    if mod is not None and idx is None and hasattr(mod, "current_device"):
        idx = mod.current_device()
    cpu_state = torch.get_rng_state()
    dev_state = None
    if mod is not None:
        dev_state = (
            mod.get_rng_state(idx) if device.type in ("cuda", "xpu") else mod.get_rng_state()
        )
    out_student = student()
    fork_devices = [idx] if (mod is not None and idx is not None) else []
    fork_type = device.type if mod is not None else None
    with torch.random.fork_rng(devices=fork_devices, device_type=fork_type or "cuda"):
        torch.set_rng_state(cpu_state)
        if dev_state is not None:
            if device.type in ("cuda", "xpu"):
                mod.set_rng_state(dev_state, idx)
            else:
                mod.set_rng_state(dev_state)
        with torch.no_grad():
            out_teacher = teacher()
    return out_student, out_teacher


# ================================================================================================
# The loss
# ================================================================================================
@dataclass
class LossOutput:
    """Result of :class:`ConsistencyObjective`.

    Attributes:
        loss: scalar ``mean_j lambda_{i_j} D(sg f(x_lo_j, t_lo_j), f(x_hi_j, t_hi_j))``.
        diagnostics: detached ``(B,)`` tensors: ``t_lo``, ``t_hi``, ``index`` (long, interval
            ``i``), ``weight`` (``lambda_i``), ``distance`` (``D`` before weighting),
            ``pair_cost`` (``||data_used - noise||^2`` of the pairs trained on), ``gc_mask``
            (bool, True for generator-induced rows).
        num_intervals: number of grid intervals ``N`` used at this step.
        coupling: the ``CouplingResult`` of OT / GC (None for CT / CD).
    """

    loss: Tensor
    diagnostics: dict[str, Tensor]
    num_intervals: int = 0
    coupling: couplings.CouplingResult | None = None


class Schedule(NamedTuple):
    """A step's grid ``(N+1,)``, index probabilities and weights ``(N,)`` (float64, CPU)."""

    grid: Tensor
    probs: Tensor
    weights: Tensor


# ================================================================================================
# The method registry: every method declared once, for every objective
# ================================================================================================
@dataclass(frozen=True)
class Method:
    """A training method, declared once; the discrete objective (:class:`ConsistencyObjective`),
    the continuous one (``gcflows.continuous.ContinuousObjective``) and the trainer
    (``gcflows.training``) dispatch on it (docs/design.md section 5).

    Fields:
        name: the ``method`` string of the configs.
        coupling: which pairs it trains on, in words (``"ic"``: the pairs as drawn; ``"batch-ot"``;
            ``"gc"``; a new method's own name).
        couple: ``None`` (the pairs as drawn) or
            ``couple(objective, data, noise, t, gc_model, generator) -> CouplingResult``: re-pairs
            the batch ``data, noise (B, *dims)`` at the lower time ``t (B,)`` of each row (the
            discrete ``t_lo``, the continuous ``t``). The objective checked the batch; ``couple``
            calls the couplings unchecked and reads ``objective.process``, ``objective.config``
            (``mu``) and ``objective.ot_coupling_fn`` (the trainer's distributed batch-OT).
        target: ``"pair"``: the velocity of the (coupled) pair, ``xdot = a'(t) data + b'(t) noise``
            (CT: the discrete target is the pair noised at ``t_lo``); ``"velocity"``: the
            objective's velocity estimator ``velocity(x_t, t, data=, noise=)`` (CD: one Euler / Heun
            step of it, or the continuous tangent along it).
        needs: the call arguments it requires (``"velocity"``, ``"gc_model"``); an objective
            refuses them for a method that does not need them.
    """

    name: str
    coupling: str = "ic"
    couple: Callable[..., couplings.CouplingResult] | None = field(default=None, compare=False)
    target: str = "pair"
    needs: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise bad_value("Method.name", self.name, "use a non-empty string")
        choice(self.target, "target", METHOD_TARGETS, "Method")
        object.__setattr__(self, "needs", frozenset(self.needs))
        unknown = sorted(self.needs - set(METHOD_NEEDS))
        if unknown:
            raise bad_value("Method.needs", unknown, f"use a subset of {list(METHOD_NEEDS)}")
        if (self.target == "velocity") != ("velocity" in self.needs):
            fix = "a method needs velocity= exactly when its target is 'velocity'"
            raise bad_value("Method.needs", sorted(self.needs), fix)
        if self.couple is not None and not callable(self.couple):
            raise bad_value("Method.couple", self.couple, "use None or a callable")


METHOD_TARGETS = ("pair", "velocity")
METHOD_NEEDS = ("velocity", "gc_model")


def _couple_ot(objective, data, noise, t, gc_model, generator) -> couplings.CouplingResult:
    """Exact batch-OT (or the trainer's distributed version), the objective's ``ot_coupling_fn``."""
    return objective.ot_coupling_fn(data, noise)


def _couple_gc(objective, data, noise, t, gc_model, generator) -> couplings.CouplingResult:
    """The generator-induced coupling at ``t`` with probability ``mu`` per row (Eq. 13-15, 21)."""
    return couplings.generator_induced_coupling(
        data,
        noise,
        gc_model,
        t,
        objective.process,
        mu=objective.config.mu,
        generator=generator,
        validate=False,
    )


METHOD_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry: every objective and ``TrainConfig(method=...)`` accept it
    from then on (the one place a method is added, docs/design.md section 5). ``replace=False``
    refuses a name already registered."""
    if not isinstance(method, Method):
        raise bad_value("method", method, "pass a gcflows.consistency.Method")
    if method.name in METHOD_REGISTRY and not replace:
        raise bad_value("method", method.name, "that name is registered (pass replace=True)")
    METHOD_REGISTRY[method.name] = method
    return method


def get_method(name: str, where: str | None = None) -> Method:
    """The registered :class:`Method` called ``name`` (``ValueError`` naming the choices)."""
    choice(name, "method", tuple(METHOD_REGISTRY), where)
    return METHOD_REGISTRY[name]


for _method in (
    Method("ct"),
    Method("cd", target="velocity", needs={"velocity"}),
    Method("ot", coupling="batch-ot", couple=_couple_ot),
    Method("gc", coupling="gc", couple=_couple_gc, needs={"gc_model"}),
):
    register_method(_method)
METHODS = tuple(METHOD_REGISTRY)  # the built-in methods; get_method reads the live registry
CD_STEPS = ("euler", "heun")
INDEX_PROBS = ("lognormal", "uniform")
TIME_SAMPLINGS = ("lognormal", "uniform")


@dataclass(frozen=True)
class ContinuousConfig:
    """The settings only the continuous-time objective has (``gcflows.continuous``, docs/theory.md
    section 6), validated once at construction; the rest is the :class:`ObjectiveConfig`.

    Fields:
        tangent_norm: ``c`` of sCM's tangent normalisation ``g <- g / (||g|| + c)`` (0.1 as in
            sCM); None: off (the exact continuous limit of CT).
        tangent_warmup: steps of sCM's tangent warm-up: ``g_r = J_x f u + r d_t f`` with
            ``r = min(1, step / tangent_warmup)``; 0: none (``r = 1``). Not the learning-rate
            warm-up (``TrainConfig.warmup_steps``).
        time_sampling: ``"lognormal"`` (the continuous limit of the iCT index law, over the
            ``ObjectiveConfig``'s ``p_mean`` / ``p_std``) or ``"uniform"`` on ``[t_min, t_max]``.
        weight: ``w(t) (B,) -> (B,)``; None for ``w = 1`` (iCT's ``lambda_i`` times the interval
            length). Not compared.
        owner: the name error messages give the fields; not compared.
    """

    tangent_norm: float | None = 0.1
    tangent_warmup: int = 0
    time_sampling: str = "lognormal"
    weight: Callable[[Tensor], Tensor] | None = field(default=None, compare=False)
    owner: str = field(default="ContinuousConfig", repr=False, compare=False)

    def __post_init__(self) -> None:
        w = self.owner
        if self.tangent_norm is not None:
            fix = "use a positive number, or None for no normalization"
            value = real(self.tangent_norm, "tangent_norm", lo_open=0.0, fix=fix, where=w)
            object.__setattr__(self, "tangent_norm", value)
        fix = "use tangent_warmup >= 0 (0 = no warm-up)"
        value = integer(self.tangent_warmup, "tangent_warmup", lo=0, fix=fix, where=w)
        object.__setattr__(self, "tangent_warmup", value)
        choice(self.time_sampling, "time_sampling", TIME_SAMPLINGS, w)
        if self.weight is not None and not callable(self.weight):
            raise bad_value("weight", self.weight, "pass a callable w(t) -> (B,) or None", w)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The settings of an objective, validated once at construction: a
    :class:`ConsistencyObjective` (discrete time), or with ``continuous`` set a
    ``gcflows.continuous.ContinuousObjective`` (continuous time, which reads ``method``, ``mu``,
    ``distance``, ``p_mean``, ``p_std`` and ``continuous``; the grid fields have no meaning
    there).

    Fields (docs/paper.md section 2):
        method: a registered :class:`Method` (``"ct"``, ``"cd"``, ``"ot"``, ``"gc"`` built in;
            :func:`register_method` adds one).
        mu: probability that a sample is generator-induced (``gc``), in ``[0, 1]``.
        distance: a name in ``DISTANCES`` or a :class:`Distance` (pseudo-Huber's ``c`` defaults to
            ``0.00054 sqrt(d)`` with ``d`` the elements per sample).
        s0, s1, total_steps: the iCT curriculum (:func:`ict_curriculum`), ``s0 <= s1``;
            ``total_steps`` is required unless ``fixed_grid`` or ``continuous`` is given.
        p_mean, p_std: the lognormal over the VE-equivalent noise level ``sigma = b(t) / a(t)``
            (``t`` itself for ``ve``).
        rho: Karras grid exponent.
        cd_step: ``"euler"`` or ``"heun"`` (``cd``).
        index_probs: ``"lognormal"`` (iCT) or ``"uniform"`` (every interval equally likely, the
            discrete sum of Theorem 1).
        fixed_grid: a strictly increasing 1-D tensor of times that replaces the curriculum (e.g.
            ``processes.uniform_grid`` for Theorem 1 checks); stored as float64 on the CPU. That
            it lies in the process domain is checked by the objective (which knows the process).
        continuous: a :class:`ContinuousConfig` for the continuous-time objective; None (the
            default) for the discrete one.
        owner: the name error messages give the fields (``"TrainConfig"`` when a training
            config builds it: ``TrainConfig.mu=1.5 is invalid: ...``); not compared.
    """

    method: str = "ct"
    mu: float = 0.5
    distance: str | Distance = "pseudo_huber"
    s0: int = 10
    s1: int = 1280
    total_steps: int | None = None
    p_mean: float = -1.1
    p_std: float = 2.0
    rho: float = 7.0
    cd_step: str = "euler"
    index_probs: str = "lognormal"
    fixed_grid: Tensor | None = field(default=None, compare=False)
    continuous: ContinuousConfig | None = None
    owner: str = field(default="ObjectiveConfig", repr=False, compare=False)

    def __post_init__(self) -> None:
        w, put = self.owner, self._put
        get_method(self.method, w)
        put("mu", probability(self.mu, "mu", "that a sample is generator-induced", w))
        if not isinstance(self.distance, Distance):
            choice(self.distance, "distance", DISTANCES, w)
        put(
            "s0",
            integer(self.s0, "s0", lo=1, fix="use a positive number of grid intervals", where=w),
        )
        put(
            "s1",
            integer(self.s1, "s1", lo=1, fix="use a positive number of grid intervals", where=w),
        )
        if self.s0 > self.s1:
            raise bad_value("s0", self.s0, f"need s0 <= s1 (s1={self.s1}): s0 is the initial N", w)
        put("p_mean", real(self.p_mean, "p_mean", fix="use a finite p_mean", where=w))
        put("p_std", real(self.p_std, "p_std", lo_open=0.0, fix="use a positive p_std", where=w))
        put(
            "rho",
            real(self.rho, "rho", lo_open=0.0, fix="use a positive rho (7 in the paper)", where=w),
        )
        choice(self.cd_step, "cd_step", CD_STEPS, w)
        choice(self.index_probs, "index_probs", INDEX_PROBS, w)
        if self.fixed_grid is not None:
            grid = check_grid(torch.as_tensor(self.fixed_grid), "fixed_grid")
            put("fixed_grid", grid.detach().to("cpu", torch.float64))
        elif self.total_steps is None and self.continuous is None:
            raise bad_value(
                "total_steps",
                None,
                "total_steps is required for the curriculum (or pass fixed_grid)",
                w,
            )
        if self.total_steps is not None:
            fix = "use total_steps >= 1"
            put("total_steps", integer(self.total_steps, "total_steps", lo=1, fix=fix, where=w))
        if self.continuous is not None and not isinstance(self.continuous, ContinuousConfig):
            raise bad_value("continuous", self.continuous, "use a ContinuousConfig or None", w)

    def _put(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: only __post_init__ normalises fields


def check_method_arguments(name: str, velocity: Any, ot_coupling_fn: Any) -> Method:
    """The registered method ``name``, after checking the constructor arguments it needs (an
    objective's, discrete or continuous): ``velocity`` exactly when its target is the velocity
    estimator (CD), ``ot_coupling_fn`` a callable or None."""
    method = get_method(name)
    if "velocity" in method.needs and velocity is None:
        fix = f"method={name!r} needs a gcflows.velocity estimator (e.g. TrueVelocity)"
        raise bad_value("velocity", velocity, fix)
    if "velocity" not in method.needs and velocity is not None:
        fix = f"velocity= is used by method='cd' only, not method={name!r}: pass None"
        raise bad_value("type(velocity)", type(velocity).__name__, fix)
    if velocity is not None and not callable(velocity):
        raise bad_value("velocity", velocity, "pass a callable velocity(x_t, t, data=, noise=)")
    if ot_coupling_fn is not None and not callable(ot_coupling_fn):
        fix = "pass a callable ot_coupling_fn(data, noise) or None"
        raise bad_value("ot_coupling_fn", ot_coupling_fn, fix)
    return method


def check_gc_model(method: Method, gc_model: Any) -> None:
    """``gc_model`` given exactly when ``method`` needs it (a call argument of an objective)."""
    if "gc_model" in method.needs and gc_model is None:
        fix = (
            f"method={method.name!r} needs the network gc_model(x_t, t) that predicts data "
            "(EMA or frozen model)"
        )
        raise bad_value("gc_model", gc_model, fix)
    if "gc_model" not in method.needs and gc_model is not None:
        fix = f"gc_model= is used by method='gc' only, not method={method.name!r}: pass None"
        raise bad_value("type(gc_model)", type(gc_model).__name__, fix)


def _ot_coupling_checked_here(data: Tensor, noise: Tensor) -> couplings.CouplingResult:
    """``couplings.ot_coupling`` without its argument checks: the objective checked the batch."""
    return couplings.ot_coupling(data, noise, validate=False)


class ConsistencyObjective:
    """One entry point for the consistency losses (docs/paper.md section 2).

    For a batch of data, noise ``z`` and interval indices ``i ~ p`` on the step's grid ``s``
    (``t_lo = s_i``, ``t_hi = s_{i+1}``)::

        loss = mean_j lambda_i D(sg f(x_lo, t_lo), f(x_hi, t_hi)),   lambda_i = 1 / (s_{i+1} - s_i)

    - ``ct`` (Eq. 6): ``x_lo, x_hi`` = the pair noised at both times
      (``gcflows.kernels.interpolate_pair``).
    - ``cd`` (Eq. 4-5): ``x_hi`` as in CT; ``x_lo`` = one Euler (or Heun) step of ``velocity``
      from ``(x_hi, t_hi)`` to ``t_lo``; the estimator is called with ``data=`` and ``noise=`` of
      the pair (``MonteCarloVelocity`` then gives CT exactly).
    - ``ot``: ``ot_coupling_fn(data, noise)`` re-pairs the noise (exact batch-OT), then CT.
    - ``gc`` (Eq. 13-15, 21): ``couplings.generator_induced_coupling`` at ``t_lo`` with
      probability ``mu`` per sample and the same noise, then CT on the returned pairs.

    Each is a :class:`Method` of ``METHOD_REGISTRY`` (its ``couple`` re-pairs the batch at
    ``t_lo``, its ``target`` picks CT's noised pair or CD's step), the record this class dispatches
    on; :func:`register_method` adds another. The two forward passes share their dropout masks
    (:func:`shared_dropout_passes`).

    Args:
        process: a ``Process`` or its name.
        config: an :class:`ObjectiveConfig` (used as given: it validated itself), or a method
            name with the config's other fields as keyword arguments
            (``ConsistencyObjective("ve", "ct", total_steps=100)`` builds the config).
        velocity: a ``gcflows.velocity`` estimator (``cd`` only, required there).
        ot_coupling_fn: ``(data, noise) -> CouplingResult`` for ``ot`` (default
            ``couplings.ot_coupling`` without its checks; the trainer passes a distributed version).

    Random draws, in order, from ``generator`` (the global RNG if None): the noise (unless
    given), the interval indices (unless given), then the GC mask. Dropout draws come from the
    global RNG of the input's device and advance it as one forward pass would.
    """

    def __init__(
        self,
        process: Process | str,
        config: ObjectiveConfig | str,
        *,
        velocity=None,
        ot_coupling_fn: Callable | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(config, ObjectiveConfig):
            config = ObjectiveConfig(method=config, **settings)
        elif settings:
            fix = "pass these settings inside the ObjectiveConfig, not beside it"
            raise bad_value("settings", sorted(settings), fix)
        if config.continuous is not None:
            fix = "pass a config with continuous= to gcflows.continuous.ContinuousObjective"
            raise bad_value("continuous", config.continuous, fix, config.owner)
        self.process = get_process(process)
        self.config = config
        if config.fixed_grid is not None:
            self.process.check_time(config.fixed_grid, "fixed_grid")
        self.method_spec = check_method_arguments(config.method, velocity, ot_coupling_fn)
        self.velocity = velocity
        self.ot_coupling_fn = ot_coupling_fn or _ot_coupling_checked_here
        self._schedules: dict[int, Schedule] = {}
        self._device_schedules: dict[tuple[int, str], Schedule] = {}
        self._distances: dict[int, Distance] = {}

    @property
    def method(self) -> str:
        return self.config.method

    # --- schedule -------------------------------------------------------------------------------
    def num_intervals(self, step: int) -> int:
        """Intervals of the grid at ``step``: ``N(k) - 1`` (or those of ``fixed_grid``)."""
        c = self.config
        if c.fixed_grid is not None:
            return c.fixed_grid.numel() - 1
        return ict_curriculum(step, c.total_steps, c.s0, c.s1) - 1

    def schedule(self, step: int) -> Schedule:
        """Grid, index probabilities and weights at ``step`` (cached per number of intervals)."""
        n = self.num_intervals(step)
        if n not in self._schedules:
            p, c = self.process, self.config
            grid = (
                c.fixed_grid
                if c.fixed_grid is not None
                else karras_grid(n, p.t_min, p.t_max, c.rho)
            )
            if c.index_probs == "uniform":
                probs = torch.full((n,), 1.0 / n, dtype=torch.float64)
            else:
                sigma = p.b(grid) / p.a(grid)  # VE-equivalent noise level; = grid for ve
                probs = lognormal_index_probs(sigma, c.p_mean, c.p_std)
            self._schedules[n] = Schedule(grid, probs, ict_weights(grid))
        return self._schedules[n]

    def _on_device(self, sched: Schedule, device: torch.device) -> Schedule:
        """``sched`` moved to ``device`` (cached per grid size and device)."""
        device = torch.device(device)
        if device.type == "cpu":
            return sched
        key = (sched.grid.numel() - 1, str(device))
        if key not in self._device_schedules:
            work = torch.float32 if device.type == "mps" else torch.float64
            self._device_schedules[key] = Schedule(
                *(v.to(device=device, dtype=work) for v in sched)
            )
        return self._device_schedules[key]

    def get_distance(self, dim: int) -> Distance:
        if dim not in self._distances:
            self._distances[dim] = get_distance(self.config.distance, dim)
        return self._distances[dim]

    # --- the loss -------------------------------------------------------------------------------
    def __call__(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        data: Tensor,
        step: int = 0,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        gc_model: Callable[[Tensor, Tensor], Tensor] | None = None,
        indices: Tensor | None = None,
        validate: bool = True,
    ) -> LossOutput:
        """Loss of ``model`` on ``data`` ``(B, *dims)`` at training ``step`` (class doc).

        ``model(x, t)`` is the consistency function (e.g. a :class:`ConsistencyModel`);
        ``noise`` ``(B, *dims)`` is drawn with ``generator`` when None; ``gc_model(x_t, t)``
        (required for ``gc``) predicts data, run under ``torch.no_grad`` by the coupling.
        ``indices`` ``(B,)`` long fixes the interval of each sample instead of drawing it (theory
        checks: an exact average over the grid's intervals). ``validate=False`` skips the
        argument checks, for a caller that checked the batch at its own entry point (the training
        step). The couplings are called unchecked either way: the batch was checked here once and
        the times come from the grid (docs/design.md section 3, checks once).
        """
        if validate:
            self._check_call(data, step, noise, gc_model)
        if noise is None:
            noise_device = generator.device if generator is not None else data.device
            noise = torch.randn(
                data.shape, generator=generator, device=noise_device, dtype=data.dtype
            )
        noise = noise.to(device=data.device, dtype=data.dtype)
        sched = self.schedule(step)
        idx = self._indices(sched, data.shape[0], generator, indices)
        on_dev = self._on_device(sched, data.device)
        idx = idx.to(data.device)
        t_lo = on_dev.grid[idx].to(data.dtype)
        t_hi = on_dev.grid[idx + 1].to(data.dtype)
        weight = on_dev.weights[idx].to(data.dtype)

        coupling = None
        data_used, noise_used = data, noise
        if self.method_spec.couple is not None:
            coupling = self.method_spec.couple(self, data, noise, t_lo, gc_model, generator)
            data_used, noise_used = coupling.data, coupling.noise

        x_lo, x_hi, pair_cost = self._noised(data_used, noise_used, t_lo, t_hi)
        if self.method_spec.target == "velocity":
            step_fn = velocity.euler_step if self.config.cd_step == "euler" else velocity.heun_step
            with torch.no_grad():
                x_lo = step_fn(self.velocity, x_hi, t_hi, t_lo, data=data, noise=noise)

        f_hi, f_lo = shared_dropout_passes(
            lambda: model(x_hi, t_hi), lambda: model(x_lo, t_lo), x_hi.device
        )
        dist = self.get_distance(data[0].numel())(f_lo.detach(), f_hi)
        loss = (weight.to(dist.dtype) * dist).mean()

        gc_mask = coupling.gc_mask if coupling is not None else None
        if gc_mask is None:
            gc_mask = torch.zeros(data.shape[0], dtype=torch.bool, device=data.device)
        diagnostics = {
            "t_lo": t_lo,
            "t_hi": t_hi,
            "index": idx,
            "weight": weight,
            "distance": dist.detach(),
            "pair_cost": pair_cost.detach(),
            "gc_mask": gc_mask,
        }
        return LossOutput(loss, diagnostics, sched.grid.numel() - 1, coupling)

    def _check_call(self, data: Tensor, step: int, noise: Tensor | None, gc_model: Any) -> None:
        """The checks of ``__call__``'s arguments (each ``ValueError`` names the argument)."""
        if not torch.is_tensor(data):
            raise bad_tensor(data, "data", "pass a floating-point tensor of shape (B, *dims)")
        if not data.is_floating_point():
            raise bad_value("data.dtype", data.dtype, "use a floating-point tensor (B, *dims)")
        if data.dim() < 2 or data.shape[0] < 1:
            raise bad_tensor(data, "data", "use shape (B, *dims) with B >= 1")
        finite(data, "data")
        check_gc_model(self.method_spec, gc_model)
        if self.config.fixed_grid is None:
            integer(step, "step", lo=0)
        if noise is not None:
            if not torch.is_tensor(noise) or noise.shape != data.shape:
                fix = f"use a tensor of the data's shape {tuple(data.shape)}"
                raise bad_tensor(noise, "noise", fix)
            finite(noise, "noise")

    def _indices(
        self, sched: Schedule, bsz: int, generator: torch.Generator | None, indices: Tensor | None
    ) -> Tensor:
        """Interval index of each sample: drawn ``~ sched.probs`` or the given ``indices``."""
        n = sched.probs.numel()
        if indices is None:
            # Drawn on the generator's device from the cached probabilities (no host sync).
            draw_device = generator.device if generator is not None else torch.device("cpu")
            probs = self._on_device(sched, draw_device).probs
            return torch.multinomial(probs, bsz, replacement=True, generator=generator)
        if not torch.is_tensor(indices) or indices.shape != (bsz,) or indices.is_floating_point():
            raise bad_tensor(indices, "indices", f"use an integer tensor of shape ({bsz},)")
        idx = indices.detach().long()
        if bool((idx < 0).any()) or bool((idx >= n).any()):
            fix = f"use indices in [0, {n}) (the grid's intervals at this step)"
            raise bad_value("(indices.min(), indices.max())", (int(idx.min()), int(idx.max())), fix)
        return idx

    def _noised(self, data: Tensor, noise: Tensor, t_lo: Tensor, t_hi: Tensor):
        if isinstance(self.process, (VEProcess, LinearProcess)):
            # the objective checked data, noise and times at its entry: no second check here
            return interpolate_pair(
                data, noise, t_lo, t_hi, process=self.process.name, validate=False
            )
        x_lo = self.process.interpolate(data, noise, t_lo)
        x_hi = self.process.interpolate(data, noise, t_hi)
        return x_lo, x_hi, couplings.squared_cost(data, noise)
