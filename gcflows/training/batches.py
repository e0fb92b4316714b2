"""Minibatches of a training run from a sampler function or a data tensor."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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
                got = getattr(probe, "shape", type(probe).__name__)
                raise ValueError(
                    "data_source(batch_size, generator) must return a tensor (batch_size, *dims); "
                    f"for batch_size=2 it returned {got}"
                )
            self.shape = tuple(probe.shape[1:])
        else:
            raise ValueError(
                "data_source must be a tensor (N, *dims) or a callable (batch_size, generator) -> "
                f"(batch_size, *dims), got {type(source).__name__}"
            )

    def _from_tensor(self, source: Tensor, mode: str, batch_size: int, sampler_seed: int) -> None:
        if source.dim() < 2 or source.shape[0] < 1 or not source.is_floating_point():
            raise ValueError(
                "data_source tensor must be floating point with shape (N, *dims), N >= 1, got "
                f"{tuple(source.shape)} {source.dtype}"
            )
        if not bool(torch.isfinite(source).all()):
            raise ValueError("data_source tensor contains NaN or inf; clean the data first")
        if mode == "epoch" and batch_size > source.shape[0]:
            raise ValueError(
                f"TrainConfig.batch_size={batch_size} exceeds the {source.shape[0]} rows of "
                "the data tensor; lower batch_size or use data_sampling='replacement'"
            )
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
            raise ValueError(
                f"data_source returned shape {tuple(getattr(out, 'shape', ()))}, expected "
                f"{(batch, *self.shape)}"
            )
        return out.to(device=self.device, dtype=self.dtype)

    def state_dict(self) -> dict[str, int] | None:
        return self.sampler.state_dict() if self.sampler is not None else None

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        if self.sampler is not None and state is not None:
            self.sampler.load_state_dict(state)
