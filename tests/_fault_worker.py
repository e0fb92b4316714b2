"""Worker of tests/test_faults.py: a tiny toy training run that the test kills and resumes.

    python tests/_fault_worker.py OUT_DIR [SLEEP_S]

Trains a ToyMLP consistency model with GC on two_gaussians_1to2 (``CONFIG``), resuming from
OUT_DIR when it holds a checkpoint; writes ``step k`` after every step (the test reads these to
choose when to kill) and sleeps SLEEP_S per step so that a signal lands mid-run. On SIGINT /
SIGTERM it writes the interrupt message and exits with the code of
:class:`gcflows.training.TrainingInterrupted` (130 / 143). The test runs :func:`child` in a forked
process (no interpreter start-up per kill); the command line above does the same by hand.
"""

from __future__ import annotations

import sys
import time

import torch
from conftest import toy_model  # tests/ is on sys.path: pytest's, or the script's folder

from gcflows.gmm import two_gaussians_1to2
from gcflows.training import TrainConfig, TrainingInterrupted, train

CONFIG = dict(
    method="gc",
    mu=0.5,
    total_steps=30,
    batch_size=32,
    lr=1e-3,
    s0=2,
    s1=16,
    log_every=1,
    checkpoint_every=4,
    ema_decay=0.9,
    progress=False,
)


def run(out_dir: str, sleep_s: float = 0.0, report_to=None):
    def report(info) -> None:
        if report_to is not None:
            print(f"step {info.step}", file=report_to, flush=True)
        if sleep_s:
            time.sleep(sleep_s)

    gmm = two_gaussians_1to2(dtype=torch.float32)
    config = TrainConfig(**CONFIG, out_dir=out_dir)
    return train(config, toy_model(dropout=0.1), gmm.sample, resume="auto", callbacks=[report])


def child(out_dir: str, sleep_s: float, report_to) -> int:
    """The worker's whole life: train, report, and return the exit code."""
    torch.set_num_threads(1)
    try:
        run(out_dir, sleep_s, report_to)
    except TrainingInterrupted as stop:
        print(f"interrupted: {stop}", file=report_to, flush=True)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(child(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0, sys.stdout))
