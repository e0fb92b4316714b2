"""Two CPU processes under torchrun (gloo): the batch-OT coupling over the global batch, DDP
training with identical weights on both ranks, rank-0-only run files, and exact resume under DDP.

One torchrun launch (tests/_ddp_worker.py) serves every test of this file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcflows.couplings import ot_coupling
from gcflows.training import load_checkpoint

WORKER = Path(__file__).parent / "_ddp_worker.py"


def _load_worker():
    """``tests/_ddp_worker.py`` as a module, loaded from its file path (it is run by torchrun as a
    script, so it is not importable as part of a package)."""
    spec = importlib.util.spec_from_file_location("_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_worker = _load_worker()
PER_RANK, global_batch = _worker.PER_RANK, _worker.global_batch
WORLD = 2

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(WORKER),
        str(out),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in 240 s: {err.stdout!r} {err.stderr!r}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def test_global_batch_ot_coupling_equals_the_single_process_coupling(ddp_out):
    data, noise = global_batch(WORLD)
    ref = ot_coupling(data, noise)
    ranks = [torch.load(ddp_out / f"ot_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, got in enumerate(ranks):
        rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
        assert torch.equal(got["data"], data[rows])  # each rank keeps its own data rows
        assert torch.equal(got["noise"], ref.noise[rows])
        assert torch.equal(got["permutation"], ref.permutation[rows])
        assert got["cost_before"] == ref.cost_before and got["cost_after"] == ref.cost_after
        assert got["status"] == ref.status
    # together the ranks use every global noise row exactly once
    perm = torch.cat([got["permutation"] for got in ranks])
    assert torch.equal(perm.sort().values, torch.arange(WORLD * PER_RANK))
    # and the global solve is better than solving each rank alone (it would be equal only if the
    # optimum happened to pair within ranks, which this seed does not)
    local = (
        sum(
            ot_coupling(
                data[r * PER_RANK : (r + 1) * PER_RANK], noise[r * PER_RANK : (r + 1) * PER_RANK]
            ).cost_after
            for r in range(WORLD)
        )
        / WORLD
    )
    assert ref.cost_after < local


def test_unequal_batches_raise_on_every_rank(ddp_out):
    for r in range(WORLD):
        err = json.loads((ddp_out / f"errors_rank{r}.json").read_text())["shape_error"]
        assert "same batch shape on every rank" in err


@pytest.mark.parametrize("method", ["ot", "gc"])
def test_ddp_training_keeps_the_ranks_identical(ddp_out, method):
    ranks = [torch.load(ddp_out / f"train_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key in ("model", "ema"):
        a, b = ranks[0][method][key], ranks[1][method][key]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (method, key, k)
    # training moved the weights away from rank 0's initialisation (which DDP broadcast)
    moved = [not torch.equal(ranks[0][method]["model"][k], v) for k, v in ranks[0]["init"].items()]
    assert all(moved)


def test_only_rank_zero_writes_and_the_checkpoint_holds_every_ranks_rng(ddp_out):
    run = ddp_out / "ot"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.prev.pt",  # the checkpoint of step 3, kept when step 6 was written
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
    ]
    assert load_checkpoint(run / "checkpoint.prev.pt")["step"] == 3
    rec = json.loads((run / "config.json").read_text())
    assert rec["world_size"] == WORLD
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # one line per logged step, not one per rank
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["world_size"] == WORLD and len(ckpt["rng"]) == WORLD
    assert not torch.equal(ckpt["rng"][0]["data"], ckpt["rng"][1]["data"])  # per-rank streams


def test_ddp_resume_reproduces_the_uninterrupted_run(ddp_out):
    for r in range(WORLD):
        res = torch.load(ddp_out / f"train_rank{r}.pt", weights_only=True)
        for key in ("model", "ema"):
            a, b = res["ot"][key], res["ot_resumed"][key]
            for k in a:
                assert torch.equal(a[k], b[k]), (r, key, k)
