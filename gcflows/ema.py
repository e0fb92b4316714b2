"""Exponential moving average of a network, with the warm-up the paper's authors run.

The GC generator of the paper is an EMA of the online network (docs/paper.md section 5). The
authors build it with ema-pytorch 0.2.3: ``beta = 0.9999``, an update every 5 training steps,
and a warm-up decay (power 2/3)::

    decay(k) = min(beta, 1 - (1 + k)^(-power))          (k the training step)

so ``decay(0) = 0`` (the first update copies the network) and the decay reaches 0.99 at step
1000 and 0.99954 at step 100k. After an update at step ``k`` the average is
``ema <- decay(k) ema + (1 - decay(k)) theta_k``. The weight the average still gives to the
network of its first update after ``K`` steps is ``prod_{0 < k <= K, k % every == 0} decay(k)``
(:func:`weight_on_first`): about 5e-3 / 5e-6 / 5e-8 at K = 1k / 10k / 25k with the warm-up,
against 0.90 / 0.37 / 0.08 for a constant 0.9999 applied every step.

:class:`EMA` keeps the average as a module (``.module``, evaluated with ``ema(x, t)``); buffers
(e.g. batch-norm statistics) are copied, not averaged. ``state_dict()`` holds the averaged
weights and the step of the last update, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from gcflows.checks import bad, is_int, is_real

__all__ = ["EMA", "ema_decay", "weight_on_first"]


def _check(beta, update_every, power, warmup) -> None:
    if not is_real(beta) or not 0.0 <= float(beta) < 1.0:
        raise bad("EMA.beta", beta, "use a float in [0, 1) (e.g. 0.9999)")
    if not is_int(update_every) or int(update_every) < 1:
        raise bad("EMA.update_every", update_every, "use an integer >= 1")
    if not is_real(power) or not (math.isfinite(float(power)) and float(power) > 0):
        raise bad("EMA.power", power, "use a positive float (2/3 as the authors)")
    if not isinstance(warmup, bool):
        raise bad("EMA.warmup", warmup, "use True (warm-up) or False (constant)")


def ema_decay(step: int, beta: float = 0.9999, power: float = 2 / 3, warmup: bool = True) -> float:
    """Decay of the update at training ``step``: ``min(beta, 1 - (1 + step)^(-power))`` with the
    warm-up, else the constant ``beta``."""
    if not warmup:
        return float(beta)
    return min(float(beta), 1.0 - (1.0 + step) ** (-float(power)))


def weight_on_first(
    step: int,
    beta: float = 0.9999,
    update_every: int = 5,
    power: float = 2 / 3,
    warmup: bool = True,
) -> float:
    """Weight of the network of the first update (step 0) in the average after ``step`` steps:
    ``prod_{0 < k <= step, k % update_every == 0} decay(k)`` (closed form, in log space)."""
    total = 0.0
    for k in range(update_every, int(step) + 1, update_every):
        d = ema_decay(k, beta, power, warmup)
        if d <= 0.0:
            return 0.0
        total += math.log(d)
    return math.exp(total)


class EMA(nn.Module):
    """Moving average of ``model``'s parameters (module doc).

    Args:
        model: the online network; a deep copy (eval mode, no gradients) becomes ``.module``.
        beta: the largest decay (0.9999 in the paper).
        update_every: average only at steps ``k`` with ``k % update_every == 0`` (5 as the
            authors; 1 for every step).
        power: warm-up exponent (2/3).
        warmup: True for ``min(beta, 1 - (1 + k)^(-power))``, False for the constant ``beta``
            (what a plain EMA does).

    Call :meth:`update` after each optimizer step with that step's index ``k = 0, 1, ...``.
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
        _check(beta, update_every, power, warmup)
        self.beta, self.update_every = float(beta), int(update_every)
        self.power, self.warmup = float(power), bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("last_step", torch.tensor(-1, dtype=torch.long))

    def decay(self, step: int) -> float:
        """Decay used by an update at ``step`` (:func:`ema_decay`)."""
        return ema_decay(step, self.beta, self.power, self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Average ``model`` in if ``step % update_every == 0``; returns whether it did.

        ``step`` must be larger than the step of the previous call (a repeated or older step is
        a bug in the caller's loop, e.g. after a resume that lost the counter).
        """
        if not is_int(step) or int(step) < 0:
            raise bad("EMA.update step", step, "use the integer training step >= 0")
        step = int(step)
        if step <= int(self.last_step):
            last = int(self.last_step)
            raise bad("EMA.update step", step, f"use a step after the last one ({last})")
        self.last_step.fill_(step)
        if step % self.update_every:
            return False
        d = self.decay(step)
        online = dict(model.named_parameters())
        for name, p in self.module.named_parameters():
            p.lerp_(online[name].detach().to(p.dtype), 1.0 - d)
        src = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(src[name])
        return True

    def forward(self, *args, **kwargs) -> Tensor:
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        kind = f"warm-up power {self.power:.4g}" if self.warmup else "constant"
        return f"beta={self.beta}, update_every={self.update_every}, {kind}"
