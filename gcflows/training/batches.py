"""Minibatches of a training run from a sampler function or a data tensor."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gcflows.checks import bad, bad_tensor
from gcflows.data import TensorSampler

__all__ = ["DataSource"]


class DataSource:
    """Minibatches from a sampler ``fn(batch_size, generator) -> (B, *dims)`` or from a tensor
    ``(N, *dims)``: ``"epoch"`` sampling (rows without replacement within an epoch,
    :class:`gcflows.data.TensorSampler`, its state checkpointed) or ``"replacement"`` (i.i.d.
    indices drawn with the data generator). ``shape`` is ``dims``; the constructor checks the
    source (a tensor must be finite; a sampler is probed once with batch size 2)."""

    def __init__(
        self,
        source: Any,
        device: torch.device,
        dtype: torch.dtype,
        mode: str,
        batch_size: int,
        sampler_seed: int,
    ) -> None:
        self.device, self.dtype = device, dtype
        self.sampler: TensorSampler | None = None
        self.tensor: Tensor | None = None
        self.fn = None
        if torch.is_tensor(source):
            self._from_tensor(source, mode, batch_size, sampler_seed)
        elif callable(source):
            self.fn = source
            probe = source(2, torch.Generator().manual_seed(0))
            if not torch.is_tensor(probe) or probe.dim() < 2 or probe.shape[0] != 2:
                fix = "data_source(batch_size, generator) must return a tensor (batch_size, *dims)"
                raise bad_tensor(probe, "data_source(2, generator)", fix)
            self.shape = tuple(probe.shape[1:])
        else:
            fix = (
                "pass a tensor (N, *dims) or a callable (batch_size, generator) -> "
                "(batch_size, *dims)"
            )
            raise bad("type(data_source)", type(source).__name__, fix)

    def _from_tensor(self, source: Tensor, mode: str, batch_size: int, sampler_seed: int) -> None:
        if not source.is_floating_point():
            raise bad("data_source.dtype", source.dtype, "use a floating-point tensor (N, *dims)")
        if source.dim() < 2 or source.shape[0] < 1:
            raise bad_tensor(source, "data_source", "use shape (N, *dims) with N >= 1")
        if not bool(torch.isfinite(source).all()):
            raise ValueError("data_source tensor contains NaN or inf; clean the data first")
        if mode == "epoch" and batch_size > source.shape[0]:
            fix = (
                f"it exceeds the {source.shape[0]} rows of the data tensor; lower batch_size or "
                "use data_sampling='replacement'"
            )
            raise bad("batch_size", batch_size, fix, "TrainConfig")
        self.tensor = source.to(device=self.device, dtype=self.dtype)
        self.shape = tuple(source.shape[1:])
        if mode == "epoch":
            gen = torch.Generator().manual_seed(sampler_seed)
            self.sampler = TensorSampler(self.tensor, generator=gen)

    def draw(self, batch: int, generator: torch.Generator) -> Tensor:
        """A batch ``(batch, *shape)`` on the training device, in the model's dtype."""
        if self.sampler is not None:
            return self.sampler.sample(batch)
        if self.tensor is not None:
            idx = torch.randint(self.tensor.shape[0], (batch,), generator=generator)
            return self.tensor[idx.to(self.device)]
        out = self.fn(batch, generator)
        if not torch.is_tensor(out) or tuple(out.shape) != (batch, *self.shape):
            fix = f"data_source must return shape {(batch, *self.shape)} for this batch"
            raise bad_tensor(out, "data_source(batch_size, generator)", fix)
        return out.to(device=self.device, dtype=self.dtype)

    def state_dict(self) -> dict[str, int] | None:
        return self.sampler.state_dict() if self.sampler is not None else None

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        if self.sampler is not None and state is not None:
            self.sampler.load_state_dict(state)
