"""Train an ensemble of seeds of a small consistency model in one vectorized step.

S seeds of ``ConsistencyModel(ToyMLP)`` on a Gaussian-mixture target are trained at once: the
parameters are stacked along a leading seed axis (``torch.func.stack_module_state``) and the two
forward passes of the consistency loss run under ``torch.func.vmap`` of ``functional_call``; the
loss is the sum of the per-seed losses, so each seed's slice of the gradient is its own gradient,
and Adam (elementwise) updates every slice as it would update that seed alone.

Per-seed RNG streams: seed ``s`` owns ``torch.Generator().manual_seed(s)`` and draws, at every
step and in this order, exactly what :class:`gcflows.consistency.ConsistencyObjective` draws for a
single run: the data (``target.sample``), the noise, the interval indices, then the GC mask. Its
initial weights come from ``torch.manual_seed(s)``. So seed ``s`` of an ensemble equals a plain
run of the library objective with that seed (:func:`train_sequential`), to float tolerance (the
test asserts it); only the arithmetic is batched.

Methods (docs/paper.md section 2): ``cd`` (one Euler step of the exact velocity of the target),
``ct`` (IC), ``ot`` (exact batch-OT, per seed, on the CPU), ``gc`` with probability ``mu`` per
row and a ``gc_model`` of:

- ``"ema"``: the warm-up EMA of the authors (``gcflows.ema``: beta 0.9999, every 5 steps),
- ``"const_ema"``: a constant-decay EMA updated every step (beta 0.9999 unless set),
- ``"online"``: the online network (under stop-gradient),
- ``"ideal"``: the exact flow map of the target (``gcflows.regression.rk4_flow_map``).

For the vectorized step the GC model runs on every row and the GC rows are selected afterwards
(the library runs it on the GC rows only): the same numbers, row by row.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from gcflows import couplings
from gcflows.checks import bad, is_int, is_real
from gcflows.consistency import (
    ConsistencyModel,
    ConsistencyObjective,
    default_huber_c,
    pseudo_huber,
)
from gcflows.ema import EMA, ema_decay
from gcflows.gmm import GaussianMixture
from gcflows.kernels import interpolate_pair
from gcflows.networks import ToyMLP
from gcflows.regression import rk4_flow_map
from gcflows.velocity import TrueVelocity

__all__ = [
    "EnsembleSpec",
    "Ensemble",
    "make_model",
    "train_ensemble",
    "train_sequential",
    "METHODS",
    "GC_MODELS",
]

METHODS = ("cd", "ct", "ot", "gc")
GC_MODELS = ("ema", "const_ema", "online", "ideal")


@dataclass
class EnsembleSpec:
    """One training recipe, shared by every seed of an ensemble.

    ``sigma_data``: the preconditioning's data standard deviation (per coordinate).
    ``ema_beta`` / ``ema_every``: the EMA used by ``gc_model="ema"`` (warm-up) and
    ``"const_ema"`` (constant, ``const_ema_every``). ``ideal_steps``: RK4 steps of the ideal
    generator. ``s0``, ``s1``: the iCT curriculum over ``steps``.
    """

    method: str = "ct"
    mu: float = 0.5
    gc_model: str = "ema"
    steps: int = 1000
    batch: int = 512
    hidden: int = 256
    depth: int = 3
    lr: float = 5e-4
    sigma_data: float = 0.5
    s0: int = 10
    s1: int = 1280
    ema_beta: float = 0.9999
    ema_every: int = 5
    const_ema_every: int = 1
    ideal_steps: int = 16

    def validate(self) -> EnsembleSpec:
        if self.method not in METHODS:
            raise bad("EnsembleSpec.method", self.method, f"use one of {list(METHODS)}")
        if self.gc_model not in GC_MODELS:
            raise bad("EnsembleSpec.gc_model", self.gc_model, f"use one of {list(GC_MODELS)}")
        if not is_real(self.mu) or not 0.0 <= float(self.mu) <= 1.0:
            raise bad("EnsembleSpec.mu", self.mu, "use a probability in [0, 1]")
        for name in ("steps", "batch", "hidden", "depth", "s0", "s1", "ema_every", "ideal_steps"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise bad(f"EnsembleSpec.{name}", v, "use an integer >= 1")
        if self.method == "ot" and self.batch < 2:
            raise bad("EnsembleSpec.batch", self.batch, "use >= 2 rows for batch-OT")
        for name in ("lr", "sigma_data"):
            v = getattr(self, name)
            if not is_real(v) or not float(v) > 0:
                raise bad(f"EnsembleSpec.{name}", v, "use a positive float")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def make_model(dim: int, spec: EnsembleSpec, seed: int, check_inputs: bool = True) -> nn.Module:
    """``ConsistencyModel(ToyMLP(dim))`` with the initial weights of ``torch.manual_seed(seed)``
    (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        backbone = ToyMLP(dim, hidden=spec.hidden, depth=spec.depth)
    return ConsistencyModel(backbone, "ve", spec.sigma_data, check_inputs=check_inputs)


def _objective(spec: EnsembleSpec, target: GaussianMixture) -> ConsistencyObjective:
    velocity = TrueVelocity(target, "ve") if spec.method == "cd" else None
    return ConsistencyObjective(
        "ve",
        spec.method,
        distance="pseudo_huber",
        mu=float(spec.mu),
        s0=spec.s0,
        s1=spec.s1,
        total_steps=spec.steps,
        velocity=velocity,
    )


def _ema_settings(spec: EnsembleSpec) -> tuple[int, bool]:
    """``(update_every, warmup)`` of the EMA that ``spec.gc_model`` uses."""
    if spec.gc_model == "ema":
        return spec.ema_every, True
    return spec.const_ema_every, False


def _ideal(target: GaussianMixture, steps: int) -> Callable[[Tensor, Tensor], Tensor]:
    def gc_model(x: Tensor, t: Tensor) -> Tensor:
        return rk4_flow_map(target, x, t.to(torch.float64), "ve", steps=steps).to(x.dtype)

    return gc_model


@dataclass
class Ensemble:
    """Stacked weights of S seeds: ``params`` / ``ema`` map names to ``(S, ...)`` tensors."""

    seeds: list[int]
    spec: EnsembleSpec
    dim: int
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    ema: dict[str, Tensor] | None = None
    losses: list[Tensor] = field(default_factory=list)  # (S,) per step
    pair_costs: list[Tensor] = field(default_factory=list)  # (S,) mean ||data - noise||^2
    base: nn.Module | None = None

    def _base(self) -> nn.Module:
        if self.base is None:
            self.base = make_model(self.dim, self.spec, 0, check_inputs=False).to("meta")
        return self.base

    def apply(self, x: Tensor, t: Tensor, weights: dict[str, Tensor] | None = None) -> Tensor:
        """``f_s(x_s, t_s)`` for every seed: ``x (S, B, d)``, ``t (S, B)`` -> ``(S, B, d)``."""
        base = self._base()
        weights = self.params if weights is None else weights

        def one(p: dict, b: dict, xx: Tensor, tt: Tensor) -> Tensor:
            return functional_call(base, (p, b), (xx, tt))

        return vmap(one)(weights, self.buffers, x, t)

    def seed_model(self, i: int, use_ema: bool = False) -> nn.Module:
        """Seed ``i`` as an ordinary ``ConsistencyModel`` (a copy of its weights)."""
        model = make_model(self.dim, self.spec, self.seeds[i])
        src = self.ema if use_ema else self.params
        state = {k: v[i].detach().clone() for k, v in src.items()}
        state.update({k: v[i].clone() for k, v in self.buffers.items()})
        model.load_state_dict(state)
        return model


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(not is_int(s) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise bad("seeds", seeds, "use a non-empty list of distinct integers >= 0")
    return [int(s) for s in seeds]


def _draw(
    target: GaussianMixture,
    spec: EnsembleSpec,
    probs: Tensor,
    gens: list[torch.Generator],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each seed's data, noise, indices and GC mask, drawn in the library's order: ``(S, B, ...)``.

    batch-OT re-pairs the noise per seed (exact assignment, ``couplings.ot_coupling``)."""
    datas, noises, idxs, masks = [], [], [], []
    b = spec.batch
    for g in gens:
        data = target.sample(b, generator=g).float()
        noise = torch.randn(data.shape, generator=g, dtype=data.dtype)
        idx = torch.multinomial(probs, b, replacement=True, generator=g)
        if spec.method == "gc":
            masks.append(torch.rand(b, generator=g) < float(spec.mu))
        elif spec.method == "ot":
            noise = couplings.ot_coupling(data, noise).noise
        datas.append(data)
        noises.append(noise)
        idxs.append(idx)
    mask = torch.stack(masks) if masks else torch.zeros(len(gens), b, dtype=torch.bool)
    return torch.stack(datas), torch.stack(noises), torch.stack(idxs), mask


def train_ensemble(
    target: GaussianMixture,
    spec: EnsembleSpec,
    seeds: Sequence[int],
    *,
    callback: Callable[[int, Ensemble], None] | None = None,
    callback_steps: Sequence[int] = (),
) -> Ensemble:
    """Train ``len(seeds)`` runs of ``spec`` on ``target`` at once (module doc).

    ``callback(step, ensemble)`` runs after the steps listed in ``callback_steps`` (``step`` =
    number of optimizer steps done; 0 = before training), e.g. for metric curves.
    """
    spec = copy.copy(spec).validate()
    seeds = _check_seeds(seeds)
    dim = target.dim
    models = [make_model(dim, spec, s, check_inputs=False) for s in seeds]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    ens = Ensemble(seeds, spec, dim, params, buffers)
    uses_ema = spec.method == "gc" and spec.gc_model in ("ema", "const_ema")
    if uses_ema:
        ens.ema = {k: v.detach().clone() for k, v in params.items()}
        ema_every, warmup = _ema_settings(spec)
    opt = torch.optim.Adam(list(params.values()), lr=spec.lr)
    objective = _objective(spec, target)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ideal = _ideal(target, spec.ideal_steps) if spec.gc_model == "ideal" else None
    c = default_huber_c(dim)
    s_count, b = len(seeds), spec.batch
    checkpoints = set(int(k) for k in callback_steps)
    if callback is not None and 0 in checkpoints:
        callback(0, ens)
    for step in range(spec.steps):
        sched = objective.schedule(step)
        data, noise, idx, mask = _draw(target, spec, sched.probs, gens)
        t_lo = sched.grid[idx].float()
        t_hi = sched.grid[idx + 1].float()
        weight = sched.weights[idx].float()
        if spec.method == "gc" and bool(mask.any()):
            data = _gc_data(ens, spec, data, noise, t_lo, mask, ideal)
        ens.pair_costs.append(((data - noise) ** 2).sum(-1).mean(1))
        flat = (s_count * b, dim)
        x_lo, x_hi, _ = interpolate_pair(
            data.reshape(flat), noise.reshape(flat), t_lo.reshape(-1), t_hi.reshape(-1), "ve"
        )
        if spec.method == "cd":
            with torch.no_grad():
                v = target.velocity(x_hi, t_hi.reshape(-1), "ve")
                x_lo = x_hi + (t_lo - t_hi).reshape(-1, 1) * v
        x_lo, x_hi = x_lo.reshape(s_count, b, dim), x_hi.reshape(s_count, b, dim)
        with torch.no_grad():
            f_lo = ens.apply(x_lo, t_lo)
        f_hi = ens.apply(x_hi, t_hi)
        dist = pseudo_huber(f_lo.reshape(flat), f_hi.reshape(flat), c).reshape(s_count, b)
        per_seed = (weight * dist).mean(1)
        opt.zero_grad(set_to_none=True)
        per_seed.sum().backward()
        opt.step()
        ens.losses.append(per_seed.detach())
        if uses_ema and step % ema_every == 0:
            d = ema_decay(step, spec.ema_beta, warmup=warmup)
            with torch.no_grad():
                for k, v in ens.ema.items():
                    v.lerp_(params[k].detach(), 1.0 - d)
        if callback is not None and step + 1 in checkpoints:
            callback(step + 1, ens)
    return ens


def _gc_data(
    ens: Ensemble,
    spec: EnsembleSpec,
    data: Tensor,
    noise: Tensor,
    t_lo: Tensor,
    mask: Tensor,
    ideal: Callable | None,
) -> Tensor:
    """``where(mask, gc_model(data + t_lo noise, t_lo), data)`` per seed (Eq. 13-15)."""
    x_t = data + t_lo[..., None] * noise
    with torch.no_grad():
        if ideal is not None:
            xhat = data.clone()
            xhat[mask] = ideal(x_t[mask], t_lo[mask])
        else:
            weights = ens.params if spec.gc_model == "online" else ens.ema
            weights = {k: v.detach() for k, v in weights.items()}
            xhat = ens.apply(x_t, t_lo, weights)
    return torch.where(mask[..., None], xhat, data)


def train_sequential(
    target: GaussianMixture, spec: EnsembleSpec, seed: int
) -> tuple[nn.Module, nn.Module | None, list[float]]:
    """One seed with the library objective and an ordinary module: the reference of
    :func:`train_ensemble` (same draws, same numbers). Returns the model, its EMA (or None) and
    the losses."""
    spec = copy.copy(spec).validate()
    model = make_model(target.dim, spec, seed)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    objective = _objective(spec, target)
    g = torch.Generator().manual_seed(int(seed))
    ema = None
    if spec.method == "gc" and spec.gc_model in ("ema", "const_ema"):
        every, warmup = _ema_settings(spec)
        ema = EMA(model, beta=spec.ema_beta, update_every=every, warmup=warmup)
    gc_model = None
    if spec.method == "gc":
        gc_model = {"online": model, "ideal": _ideal(target, spec.ideal_steps)}.get(
            spec.gc_model, ema
        )
    losses = []
    for step in range(spec.steps):
        data = target.sample(spec.batch, generator=g).float()
        out = objective(model, data, step, generator=g, gc_model=gc_model)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        if ema is not None:
            ema.update(model, step)
    return model, ema, losses


def seed_steps_per_second(
    target: GaussianMixture,
    spec: EnsembleSpec,
    seeds: Sequence[int],
    vectorized: bool,
    clock: str = "wall",
) -> float:
    """Seed-steps per second of ``spec.steps`` steps for ``seeds`` (vectorized or one by one).

    ``clock``: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``, this
    process's CPU time: less disturbed than wall time when other processes share the cores).
    """
    if clock not in ("wall", "cpu"):
        raise bad("clock", clock, "use 'wall' or 'cpu'")
    now = time.perf_counter if clock == "wall" else time.process_time
    start = now()
    if vectorized:
        train_ensemble(target, spec, seeds)
    else:
        for s in seeds:
            train_sequential(target, spec, s)
    return len(seeds) * spec.steps / (now() - start)
