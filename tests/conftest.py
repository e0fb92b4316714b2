"""Shared test settings (hypothesis profiles and markers) and the shared test builders.

Builders: ``toy_model``, ``toy_config``, ``snapshot`` and ``free_port`` are plain functions (tests
import them with ``from conftest import toy_model, toy_config``; pytest puts tests/ on
``sys.path``), so that module-level fixtures and helpers can call them with their own arguments.

Profiles: ``ci`` (default; few examples, no deadline, derandomized so CI is repeatable) and ``dev``
(more examples). Select with ``HYPOTHESIS_PROFILE=dev``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from gcflows.consistency import ConsistencyModel
from gcflows.networks import ToyMLP
from gcflows.processes import VEProcess
from gcflows.training import TrainConfig

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The suite is made of small tensors: one intra-op thread is faster than two on a 2-core machine,
# and far faster when anything else runs (OpenMP barriers stall: a 256 x 2 softmax took 2.6 ms
# with 2 threads under load, against microseconds with 1). Child processes (experiment smoke runs,
# torchrun) inherit the variable. Override with GCFLOWS_TEST_THREADS.
_THREADS = int(os.environ.get("GCFLOWS_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
torch.set_num_threads(_THREADS)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _test_threads():
    """Every test starts with ``_THREADS`` intra-op threads and leaves them so (scripts called in
    process, e.g. ``train_images.main``, set their own thread count)."""
    torch.set_num_threads(_THREADS)
    yield
    torch.set_num_threads(_THREADS)


@pytest.fixture
def gen():
    """A seeded CPU generator; tests that draw randomness take it explicitly."""
    return torch.Generator().manual_seed(1234)


def toy_model(
    hidden: int = 16, dropout: float = 0.0, seed: int = 0, t_max: float = 80.0
) -> ConsistencyModel:
    """A 2-d ConsistencyModel(ToyMLP) on the VE process, initialised from ``seed`` without
    touching the global RNG (two calls with one seed give equal weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConsistencyModel(
            ToyMLP(2, hidden=hidden, depth=2, time_embed_dim=16, dropout=dropout),
            VEProcess(0.002, t_max),
        )


def toy_config(out: Path | str | None, **kw) -> TrainConfig:
    """A short TrainConfig (12 steps of 16, checkpoint every 4, log every 2, no progress bar)
    writing to ``out`` (None: no run folder); ``kw`` overrides any field."""
    base = dict(
        total_steps=12,
        batch_size=16,
        lr=1e-3,
        s0=2,
        s1=16,
        log_every=2,
        checkpoint_every=4,
        progress=False,
        out_dir=None if out is None else str(out),
    )
    return TrainConfig(**{**base, **kw})


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes); equal snapshots: nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for torchrun's --master_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_refused_at_once(main, argv: list[str], message: str, out: Path, capsys) -> None:
    """A script's ``main(["--quick", "--out", out, *argv])`` refuses ``argv`` before any work: exit
    2 within 2 s, exactly one ``error:`` line containing ``message``, no traceback, and nothing
    written under ``out`` (no run folder)."""
    import time

    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--out", str(out), *argv])
    assert time.perf_counter() - start < 2.0  # checked in the parent, before any work
    assert exc.value.code == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]  # one message
    assert message in line and "Traceback" not in err
    assert list(Path(out).iterdir()) == []  # no run folder
