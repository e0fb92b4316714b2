"""Shared test settings: hypothesis profiles and markers.

Profiles: ``ci`` (default; few examples, no deadline, derandomized so CI is repeatable) and ``dev``
(more examples). Select with ``HYPOTHESIS_PROFILE=dev``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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
