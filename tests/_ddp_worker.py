"""Worker for tests/test_distributed.py, launched as

    python -m torch.distributed.run --nproc_per_node=2 --master_port=PORT tests/_ddp_worker.py OUT

Each rank (gloo on CPU) writes what it saw under OUT; the test compares the ranks with each other
and with single-process references. Steps:

1. ``distributed_ot_coupling`` on this rank's rows of a global batch known to the test;
2. batches of different shapes on the two ranks -> ValueError on both;
3. DDP training (batch-OT and GC) for a few steps; parameters and EMA saved per rank;
4. the OT run again, stopped half-way and resumed (exact resume under DDP).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gcflows.consistency import ConsistencyModel
from gcflows.gmm import two_gaussians_1to2
from gcflows.networks import ToyMLP
from gcflows.processes import VEProcess
from gcflows.training import TrainConfig, distributed_ot_coupling, train

PER_RANK = 7  # odd on purpose: rows must not be split evenly by accident


def global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch the test re-creates: (world * PER_RANK, 3, 2) data and noise from seed 0."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(world * PER_RANK, 3, 2, generator=g)
    noise = torch.randn(world * PER_RANK, 3, 2, generator=g)
    return data, noise


def model_for(rank: int) -> ConsistencyModel:
    # a different initialisation per rank: DDP must broadcast rank 0's weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100 + rank)
        backbone = ToyMLP(2, hidden=16, depth=2, time_embed_dim=16, dropout=0.1)
        return ConsistencyModel(backbone, VEProcess())


def config(out: Path, name: str, method: str) -> TrainConfig:
    return TrainConfig(
        method=method,
        total_steps=6,
        batch_size=8,
        s0=2,
        s1=16,
        lr=1e-3,
        ema_decay=0.9,
        log_every=2,
        checkpoint_every=3,
        progress=False,
        seed=1,
        out_dir=str(out / name),
    )


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)

    data, noise = global_batch(world)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    res = distributed_ot_coupling(data[mine], noise[mine])
    torch.save(
        {
            "data": res.data,
            "noise": res.noise,
            "permutation": res.permutation,
            "cost_before": res.cost_before,
            "cost_after": res.cost_after,
            "status": res.status,
        },
        out / f"ot_rank{rank}.pt",
    )

    try:
        distributed_ot_coupling(torch.randn(5 + rank, 2), torch.randn(5 + rank, 2))
        shape_error = ""
    except ValueError as err:
        shape_error = str(err)

    gmm = two_gaussians_1to2(dtype=torch.float32)
    results = {}
    for method in ("ot", "gc"):
        r = train(config(out, method, method), model_for(rank), gmm.sample)
        results[method] = {"model": r.model.state_dict(), "ema": r.ema.state_dict()}
    cfg = config(out, "ot_split", "ot")
    train(cfg, model_for(rank), gmm.sample, stop_after=3)
    r = train(cfg, model_for(rank + 7), gmm.sample)
    results["ot_resumed"] = {"model": r.model.state_dict(), "ema": r.ema.state_dict()}
    results["init"] = model_for(rank).state_dict()
    torch.save(results, out / f"train_rank{rank}.pt")
    (out / f"errors_rank{rank}.json").write_text(json.dumps({"shape_error": shape_error}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
