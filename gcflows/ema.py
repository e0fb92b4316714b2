"""Exponential moving average of a network: the paper's authors' rule and a plain constant EMA.

The GC generator of the paper is an EMA of the online network (docs/paper.md section 5.3). The
authors build it with ema-pytorch 0.2.3 (``beta = 0.9999``, ``update_every = 5``, warm-up power
2/3, ``inv_gamma = 1``, ``min_value = 0``, ``update_after_step = 0``). Its rule, with ``k`` the
0-based training step (the library counts its calls, one per step):

- the average changes only at steps ``k`` with ``k % update_every == 0``;
- the first such update (``k = 0``) copies the online network, and so does the second
  (``k = update_every``: the library's ``initted`` flag re-copies at its first update after the
  copy branch);
- every later update is ``ema <- lerp(ema, theta_k, 1 - decay(k))`` with the warm-up decay::

      decay(k) = min(beta, 1 - (1 + k)^(-power))

  (0.99 at k = 1000, 0.99954 at k = 100k).

``warmup=False`` gives the plain EMA that training uses by default: the first update copies the
network, every later one lerps with the constant ``decay = beta`` (the arithmetic of
``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``, bit for bit, tested).

What the average still holds of the early networks (:func:`weight_on_first`): the authors' rule
gives weight 0 to the initial network and to the step-0 one (the re-copy replaces them); the
step-5 network keeps 7.4e-3 / 7.2e-6 / 7.1e-8 after K = 1k / 10k / 25k steps. A constant 0.9999
applied every step leaves 0.90 / 0.37 / 0.08 on the step-0 network.

Tensors: every floating-point parameter and buffer (e.g. batch-norm running statistics) follows
the rule, as in ema-pytorch, which lerps its float buffers; other buffers (integer counters) are
copied at each update. Two deliberate differences from ema-pytorch 0.2.3, neither of which touches
a float32 / float16 network's floating tensors: it averages only float32 and float16 tensors
(float64 and bfloat16 ones keep their initial copy there, averaged here) and never updates integer
buffers (copied here).

:class:`EMA` keeps the average as a module (``.module``, evaluated with ``ema(x, t)``) and owns its
fast path: the tensor lists of the averaged and the online network are looked up once per online
network and grouped by device and dtype, and each update is one ``torch._foreach_lerp_`` (or
``_foreach_copy_``) per group. :class:`EMARule` holds the settings and the rule, and
:func:`foreach_update_` is the update over tensor lists that both :class:`EMA` and the seed
ensemble (``gcflows.ensemble``) use. ``EMA.state_dict()`` holds the averaged weights and, under
``_extra_state``, the settings and the counters; loading a state whose settings differ from the
object's raises a ``ValueError`` that names the setting.
"""

from __future__ import annotations

import copy
import math
import struct
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gcflows.checks import bad, is_int, is_real

__all__ = ["EMA", "EMARule", "ema_decay", "foreach_update_", "weight_on_first"]


def ema_decay(step: int, beta: float = 0.9999, power: float = 2 / 3, warmup: bool = True) -> float:
    """Decay of an averaging update at training ``step``: ``min(beta, 1 - (1 + step)^(-power))``
    with the warm-up, else the constant ``beta`` (module doc)."""
    if not warmup:
        return float(beta)
    return min(float(beta), 1.0 - (1.0 + step) ** (-float(power)))


@dataclass(frozen=True)
class EMARule:
    """The EMA's settings and its update rule (module doc).

    ``beta``: the largest decay, in [0, 1) (0.9999 in the paper). ``update_every``: update at the
    steps ``k`` with ``k % update_every == 0`` (5 as the authors; 1 for every step). ``power``:
    the warm-up exponent (2/3). ``warmup``: True for the authors' rule (warm-up decay, and the
    re-copy at the second update), False for the plain EMA (constant ``beta``).
    """

    beta: float = 0.9999
    update_every: int = 5
    power: float = 2 / 3
    warmup: bool = True

    def __post_init__(self) -> None:
        beta, every, power, warmup = self.beta, self.update_every, self.power, self.warmup
        if not is_real(beta) or not 0.0 <= float(beta) < 1.0:
            raise bad("EMA.beta", beta, "use a float in [0, 1) (e.g. 0.9999)")
        if not is_int(every) or int(every) < 1:
            raise bad("EMA.update_every", every, "use an integer >= 1")
        if not is_real(power) or not (math.isfinite(float(power)) and float(power) > 0):
            raise bad("EMA.power", power, "use a positive float (2/3 as the authors)")
        if not isinstance(warmup, bool):
            raise bad("EMA.warmup", warmup, "use True (the authors' rule) or False (constant)")
        object.__setattr__(self, "beta", float(beta))
        object.__setattr__(self, "update_every", int(every))
        object.__setattr__(self, "power", float(power))

    def decay(self, step: int) -> float:
        """Decay of an averaging update at ``step`` (:func:`ema_decay`)."""
        return ema_decay(step, self.beta, self.power, self.warmup)

    def weight(self, step: int, updates_done: int) -> float | None:
        """The update at ``step`` after ``updates_done`` earlier ones: ``None`` (no update at this
        step), ``1.0`` (a copy of the online network) or the lerp weight ``1 - decay(step)``."""
        if step % self.update_every:
            return None
        if updates_done == 0 or (self.warmup and updates_done == 1):
            return 1.0
        return 1.0 - self.decay(step)

    def apply_(
        self, averaged: Sequence[Tensor], online: Sequence[Tensor], step: int, updates_done: int
    ) -> bool:
        """Update the tensors ``averaged`` from ``online`` (same devices, dtypes and shapes,
        floating point) at ``step`` after ``updates_done`` earlier updates; returns whether this
        step updated them (the caller counts the updates)."""
        w = self.weight(step, updates_done)
        if w is None:
            return False
        foreach_update_(averaged, online, w)
        return True


def foreach_update_(averaged: Sequence[Tensor], online: Sequence[Tensor], weight: float) -> None:
    """``averaged <- online`` when ``weight == 1``, else ``averaged <- lerp(averaged, online,
    weight)``: one multi-tensor call for lists of floating tensors on one device and dtype."""
    if not averaged:
        return
    with torch.no_grad():
        if weight == 1.0:
            torch._foreach_copy_(list(averaged), list(online))
        else:
            torch._foreach_lerp_(list(averaged), list(online), weight)


def weight_on_first(
    step: int,
    beta: float = 0.9999,
    update_every: int = 5,
    power: float = 2 / 3,
    warmup: bool = True,
) -> float:
    """Weight that the average after ``step`` steps still gives to the earliest network in it:
    the network of its last copy, the step-``update_every`` one for the authors' rule (which
    re-copies there: the initial and step-0 networks have weight 0), the step-0 one for the
    constant rule. The product of the decays of the later updates (in log space)."""
    rule = EMARule(beta, update_every, power, warmup)
    first = rule.update_every if warmup else 0
    total = 0.0
    for k in range(first + rule.update_every, int(step) + 1, rule.update_every):
        d = rule.decay(k)
        if d <= 0.0:
            return 0.0
        total += math.log(d)
    return math.exp(total)


# the settings and counters in EMA.state_dict()["_extra_state"]: one int64 tensor (any device can
# hold it, and torch.equal compares two states); beta and power as the bits of their float64 value
_STATE_FIELDS = ("beta", "update_every", "power", "warmup", "updates", "last_step")


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(n: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(n)))[0]


class EMA(nn.Module):
    """Moving average of ``model``'s parameters and buffers (module doc).

    Args:
        model: the online network; a deep copy (eval mode, no gradients) becomes ``.module``.
        beta, update_every, power, warmup: the :class:`EMARule` (defaults: the authors').

    Call :meth:`update` after each optimizer step with that step's index ``k = 0, 1, ...``.
    ``updates`` counts the updates done, ``last_step`` is the step of the last call (-1 before).
    """

    def __init__(
        self,
        model: nn.Module,
        beta: float = 0.9999,
        update_every: int = 5,
        power: float = 2 / 3,
        warmup: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise bad("EMA.model", type(model).__name__, "pass a torch.nn.Module")
        self.rule = EMARule(beta, update_every, power, warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates, self.last_step = 0, -1
        self._plan: tuple | None = None  # the fast path's tensor lists (see _plan_for)

    beta = property(lambda self: self.rule.beta)
    update_every = property(lambda self: self.rule.update_every)
    power = property(lambda self: self.rule.power)
    warmup = property(lambda self: self.rule.warmup)

    def decay(self, step: int) -> float:
        """Decay of an averaging update at ``step`` (:func:`ema_decay`)."""
        return self.rule.decay(step)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Fold ``model`` in at training ``step`` by the rule; returns whether this step updated.

        ``step`` must be larger than the step of the previous call (a repeated or older step is
        a bug in the caller's loop, e.g. after a resume that lost the counter). ``model`` must
        have the parameter and buffer names of ``.module``.
        """
        if not is_int(step) or int(step) < 0:
            raise bad("EMA.update step", step, "use the integer training step >= 0")
        step = int(step)
        if step <= self.last_step:
            raise bad("EMA.update step", step, f"use a step after the last one ({self.last_step})")
        self.last_step = step
        w = self.rule.weight(step, self.updates)
        if w is None:
            return False
        groups, others = self._plan_for(model)
        for averaged, online in groups:
            foreach_update_(averaged, online, w)
        for mine, theirs in others:
            if mine.is_floating_point() and w != 1.0:
                mine.lerp_(theirs.to(mine.device, mine.dtype), w)
            else:
                mine.copy_(theirs)
        self.updates += 1
        return True

    def _plan_for(self, model: nn.Module) -> tuple[list, list]:
        """The tensor lists of :meth:`update` for ``model``, built on the first update from it and
        kept (with a weak reference to it) until another model is passed or the EMA is moved:
        ``groups`` of floating tensors that share a device and a dtype with their online
        counterparts, one ``(averaged, online)`` pair of lists per device and dtype, and the
        ``others`` (pairs across devices or dtypes, non-floating buffers), updated one by one.
        The online tensors are the model's Parameter / buffer objects, which ``.to()`` and
        ``load_state_dict`` keep; a model whose tensors are replaced
        (``load_state_dict(assign=True)``) must be passed as a new object."""
        if self._plan is not None and self._plan[0]() is model:
            return self._plan[1], self._plan[2]
        if not isinstance(model, nn.Module):
            raise bad("EMA.update model", type(model).__name__, "pass the online nn.Module")
        mine = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        theirs = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        if mine.keys() != theirs.keys():
            diff = sorted(mine.keys() ^ theirs.keys())[:3]
            raise bad("EMA.update model", type(model).__name__, f"names differ: {diff}")
        grouped: dict[tuple, tuple[list, list]] = {}
        others = []
        for name, a in mine.items():
            b = theirs[name].detach()
            if a.is_floating_point() and (a.device, a.dtype) == (b.device, b.dtype):
                pair = grouped.setdefault((a.device, a.dtype), ([], []))
                pair[0].append(a)
                pair[1].append(b)
            else:
                others.append((a, b))
        groups = list(grouped.values())
        self._plan = (weakref.ref(model), groups, others)
        return groups, others

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .double(): regroup at next update
        self._plan = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:  # a deepcopy or pickle never carries another model's tensors
        state = super().__getstate__()
        state["_plan"] = None
        return state

    def get_extra_state(self) -> Tensor:
        r = self.rule
        values = (
            _float_bits(r.beta),
            r.update_every,
            _float_bits(r.power),
            int(r.warmup),
            self.updates,
            self.last_step,
        )
        return torch.tensor(values, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        if not torch.is_tensor(state) or state.shape != (len(_STATE_FIELDS),):
            raise bad("EMA state _extra_state", type(state).__name__, "load a state of EMA")
        v = dict(zip(_STATE_FIELDS, (int(x) for x in state.tolist()), strict=True))
        saved = {
            "beta": _bits_float(v["beta"]),
            "update_every": v["update_every"],
            "power": _bits_float(v["power"]),
            "warmup": bool(v["warmup"]),
        }
        for name, value in saved.items():
            mine = getattr(self.rule, name)
            if value != mine:
                raise bad(
                    f"EMA.load_state_dict {name}",
                    value,
                    f"this EMA has {name}={mine}; build it with the state's settings",
                )
        self.updates, self.last_step = v["updates"], v["last_step"]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign=False):
        """``nn.Module.load_state_dict``, refusing (``ValueError``) a state whose beta,
        update_every, power or warmup differ from this EMA's. States written before the settings
        were saved are read too: an ``AveragedModel`` state (``n_averaged``: a plain EMA updated
        at every step) and an older ``EMA`` state (``last_step`` only: its settings taken to be
        this EMA's, with a warning)."""
        state = dict(state_dict)
        if "_extra_state" not in state:
            state = self._from_older_state(state)
        return super().load_state_dict(state, strict=strict, assign=assign)

    def _from_older_state(self, state: dict) -> dict:
        r = self.rule
        if "n_averaged" in state:
            if r.warmup or r.update_every != 1:
                raise bad(
                    "EMA.load_state_dict n_averaged",
                    int(state["n_averaged"]),
                    "a plain EMA updated every step wrote this state: use warmup=False, "
                    "update_every=1",
                )
            n = int(state.pop("n_averaged"))
            last = n - 1
        elif "last_step" in state:
            last = int(state.pop("last_step"))
            n = last // r.update_every + 1 if last >= 0 else 0
            warnings.warn(
                f"an EMA state without its settings (an older gcflows): taken to be this EMA's "
                f"(beta={r.beta}, update_every={r.update_every}, warmup={r.warmup})",
                stacklevel=3,
            )
        else:
            return state
        values = (_float_bits(r.beta), r.update_every, _float_bits(r.power), int(r.warmup), n, last)
        state["_extra_state"] = torch.tensor(values, dtype=torch.int64)
        return state

    def forward(self, *args, **kwargs) -> Tensor:
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        r = self.rule
        kind = f"authors' warm-up, power {r.power:.4g}" if r.warmup else "constant"
        return f"beta={r.beta}, update_every={r.update_every}, {kind}"
