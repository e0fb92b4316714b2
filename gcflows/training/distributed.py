"""Distributed set-up of a training run (DDP under ``torchrun``) and the global-batch OT coupling.

Under ``torchrun`` (gloo on CPU, nccl on CUDA) every rank draws its own data and noise from
streams seeded by ``(seed, rank)``; the batch-OT coupling is solved over the *global* batch
(:func:`distributed_ot_coupling`). Metrics, samples and checkpoints are written by rank 0 only;
the checkpoint holds the RNG states of every rank. The run folder must be visible to every rank
(one node: always).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gcflows.couplings import CouplingResult, ot_coupling

__all__ = [
    "DistInfo",
    "dist_on",
    "resolve_device",
    "setup_distributed",
    "all_sum",
    "all_max_flag",
    "distributed_ot_coupling",
]

_STATUS_BYTES = 1024  # the solver status travels from rank 0 as a fixed-size byte tensor


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size``; ``initialized_here``: the
    process group was created by ``train`` (and is destroyed when it returns)."""

    rank: int
    world_size: int
    local_rank: int
    initialized_here: bool


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_device(name: str) -> torch.device:
    """``TrainConfig.device`` as a ``torch.device`` (``auto``: CUDA when available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"TrainConfig.device={name!r} but CUDA is not available; use device='cpu' or 'auto'"
        )
    return torch.device(name)


def setup_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group that torchrun describes (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if world > 1 and not dist_on():
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        here = True
    if dist_on():
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, here), device
    return DistInfo(0, 1, 0, False), device


def all_sum(x: Tensor, world: int) -> Tensor:
    """``x`` summed over the ranks (``x`` itself with one process)."""
    if world > 1:
        dist.all_reduce(x)
    return x


def all_max_flag(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def distributed_ot_coupling(
    data: Tensor, noise: Tensor, *, solver: str = "auto", group: Any = None
) -> CouplingResult:
    """Batch-OT coupling of the global batch under DDP (docs/paper.md section 2, batch-OT).

    Each rank passes its local ``data``, ``noise`` of the same shape ``(B, *dims)``. The batches of
    all ranks are all-gathered in rank order into ``(W B, *dims)``; rank 0 of ``group`` solves the
    exact assignment with :func:`gcflows.couplings.ot_coupling` and broadcasts the permutation, so
    every rank uses one and the same solution; rank r keeps rows ``r B .. (r + 1) B``: its own data
    and the global noise rows assigned to them. The result equals rows ``r B .. (r + 1) B`` of the
    single-process ``ot_coupling`` of the concatenated batch.

    Returns a :class:`~gcflows.couplings.CouplingResult` whose ``permutation`` ``(B,)`` indexes the
    *global* (all-gathered) noise, ``cost_before`` / ``cost_after`` are means over the global batch
    and ``status`` is rank 0's solver status. Without an initialised process group (or with one
    process) it is ``ot_coupling(data, noise, solver=solver)``.
    """
    if not dist_on() or dist.get_world_size(group) == 1:
        return ot_coupling(data, noise, solver=solver)
    if data.shape != noise.shape:
        raise ValueError(
            f"data and noise must have the same shape, got {tuple(data.shape)} and "
            f"{tuple(noise.shape)}"
        )
    if data.dim() > 8:
        raise ValueError(f"data may have at most 8 dims, got {data.dim()}")
    _check_same_shape_everywhere(data, group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    global_data, global_noise = _gather(data, world, group), _gather(noise, world, group)
    dev = data.device
    perm = torch.empty(global_data.shape[0], dtype=torch.int64, device=dev)
    stats = torch.zeros(3, dtype=torch.float64, device=dev)
    status = torch.zeros(_STATUS_BYTES, dtype=torch.uint8, device=dev)
    if rank == 0:
        res = ot_coupling(global_data, global_noise, solver=solver)
        if res.permutation is None:
            raise RuntimeError("ot_coupling returned no permutation; cannot split it by rank")
        perm.copy_(res.permutation.to(dev, torch.int64))
        values = [res.cost_before, res.cost_after, float(res.fell_back)]
        stats.copy_(torch.tensor(values, dtype=torch.float64))
        code = res.status.encode()[:_STATUS_BYTES]
        status[: len(code)] = torch.tensor(list(code), dtype=torch.uint8)
    for t in (perm, stats, status):
        dist.broadcast(t, src=src, group=group)
    b = data.shape[0]
    mine = perm[rank * b : (rank + 1) * b]
    cost_before, cost_after, fell_back = stats.tolist()
    return CouplingResult(
        data=data,
        noise=global_noise[mine],
        permutation=mine,
        plan=None,
        costs=(cost_before, cost_after),
        status=bytes(status.cpu().tolist()).rstrip(b"\0").decode(errors="replace"),
        fell_back=bool(fell_back),
        gc_mask=None,
    )


def _check_same_shape_everywhere(data: Tensor, group: Any) -> None:
    """Every rank must contribute the same shape, otherwise all_gather hangs or garbles rows."""
    world = dist.get_world_size(group)
    shape = torch.full((8,), -1, dtype=torch.int64, device=data.device)
    shape[: data.dim()] = torch.tensor(data.shape, dtype=torch.int64)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if not all(torch.equal(s, shape) for s in shapes):
        raise ValueError(
            "distributed_ot_coupling needs the same batch shape on every rank, got "
            f"{[s[s >= 0].tolist() for s in shapes]}; use equal per-rank batch sizes"
        )


def _gather(x: Tensor, world: int, group: Any) -> Tensor:
    """The ranks' ``x`` concatenated in rank order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts)
