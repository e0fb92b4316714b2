"""Fault injection: a tiny training run (tests/_fault_worker.py, a toy MLP with GC, dropout, a
checkpoint every 4 of 30 steps; run in a forked child) is killed with SIGKILL at random steps,
interrupted once with SIGINT and resumed each time; it must end bit-identical to an
uninterrupted run. A run whose latest checkpoint is corrupted resumes from the previous one and
also ends identical.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from gcflows.training import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_fault_worker.py"
_spec = importlib.util.spec_from_file_location("_fault_worker", WORKER)
_fault_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fault_worker)

TOTAL = _fault_worker.CONFIG["total_steps"]


def _fork(out: Path, sleep_s: float) -> tuple[int, Any]:
    """Run the worker in a forked child (the test's interpreter, torch already imported: no
    start-up cost per kill); returns its pid and the read end of its report pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            os.close(r)
            with os.fdopen(w, "w", buffering=1) as pipe:
                code = _fault_worker.child(str(out), sleep_s, pipe)
        finally:
            os._exit(code)
    os.close(w)
    return pid, os.fdopen(r)


def _run_until(out: Path, step: int | None, sig: int = signal.SIGKILL) -> tuple[int, int, str]:
    """Run the worker, send ``sig`` once it reports ``step`` or more (``None``: never); return
    (exit code, last reported step, its other output)."""
    pid, reports = _fork(out, sleep_s=0.02)
    seen, other = 0, []
    with reports:
        for line in reports:
            if line.startswith("step "):
                seen = int(line.split()[1])
                if step is not None and seen == step:
                    os.kill(pid, sig)
            else:
                other.append(line)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), seen, "".join(other)


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == TOTAL
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for k in sa:
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name]))


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, open(run / "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (in this process: the worker's code, one thread)."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    _fault_worker.run(str(out))
    return out


def test_sigkill_at_random_steps_and_sigint_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    rng = random.Random(20240610)
    kills = sorted(rng.sample(range(2, TOTAL - 10), 5))
    for target in kills:
        code, seen, err = _run_until(out, target, signal.SIGKILL)
        assert code == -signal.SIGKILL, err
        assert seen >= target
    # SIGINT: the step finishes, a checkpoint of that step is written, exit 130, how to resume
    resume_at = load_checkpoint(out / "checkpoint.pt")["step"]
    code, seen, err = _run_until(out, resume_at + 3, signal.SIGINT)
    assert code == 130, err
    stopped = load_checkpoint(out / "checkpoint.pt")["step"]
    assert seen <= stopped < TOTAL
    assert f"after step {stopped}" in err and "resume" in err
    code, seen, err = _run_until(out, None)
    assert code == 0 and seen == TOTAL, err
    _assert_same_run(
        load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    )
    assert _losses(out) == _losses(reference)  # every logged loss, steps 1..30
    assert not list(out.glob(".*.tmp"))  # killed writes leave no temporary file behind


def test_corrupted_latest_checkpoint_resumes_from_the_previous_one(tmp_path, reference):
    out = tmp_path / "run"
    code, _, err = _run_until(out, 9, signal.SIGKILL)  # checkpoints at steps 4 and 8
    assert code == -signal.SIGKILL, err
    previous = load_checkpoint(out / "checkpoint.prev.pt")["step"]
    assert previous == load_checkpoint(out / "checkpoint.pt")["step"] - 4
    blob = bytearray((out / "checkpoint.pt").read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 16):
        blob[i] ^= 0xFF  # 16 flipped bytes in the middle of the file
    (out / "checkpoint.pt").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checkpoint.pt.*corrupt.*checkpoint.prev.pt"):
        load_checkpoint(out / "checkpoint.pt")
    with pytest.warns(
        UserWarning, match=rf"resuming from the previous checkpoint .* \(step {previous}\)"
    ):
        res = _fault_worker.run(str(out))
    assert res.resumed_from == out / "checkpoint.prev.pt"
    _assert_same_run(
        load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    )
    assert _losses(out) == _losses(reference)
    assert (out / "checkpoint.corrupt.pt").exists()  # kept aside, not rotated into .prev


def _fork_refusable(out: Path, sleep_s: float, start_at: float) -> tuple[int, Any]:
    """:func:`_fork` whose child reports a refusal (a ValueError) as ``refused: ...``, exit 2;
    the child waits until ``start_at`` (time.time()) so that two children start together."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            with os.fdopen(w, "w", buffering=1) as pipe:
                time.sleep(max(0.0, start_at - time.time()))
                try:
                    code = _fault_worker.child(str(out), sleep_s, pipe)
                except ValueError as err:
                    print(f"refused: {err}", file=pipe, flush=True)
                    code = 2
        finally:
            os._exit(code)
    os.close(w)
    return pid, os.fdopen(r)


def test_two_trainings_started_together_into_one_folder_exactly_one_proceeds(tmp_path, reference):
    """Both would resume-or-start in the same out_dir: the folder is claimed by one; the other is
    refused before it reads or writes anything, naming the owner; the run left behind is the one
    uninterrupted run, bit for bit."""
    out = tmp_path / "run"
    start_at = time.time() + 0.3
    children = [_fork_refusable(out, 0.03, start_at) for _ in range(2)]
    outcomes = []
    for pid, reports in children:
        with reports:
            text = reports.read()
        _, status = os.waitpid(pid, 0)
        outcomes.append((os.waitstatus_to_exitcode(status), pid, text))
    outcomes.sort()
    (ok, _, ran), (refused, _, why) = outcomes
    assert (ok, refused) == (0, 2), outcomes
    assert f"step {TOTAL}" in ran and "step 1\n" not in why
    owner = outcomes[0][1]
    assert f"is in use by process {owner}" in why and "nothing was written" in why
    _assert_same_run(
        load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    )
    assert _losses(out) == _losses(reference)
    assert not (out / ".gcflows.lock").exists()  # released when the owner finished


def test_a_lock_left_by_a_killed_training_does_not_block_the_resume(tmp_path, reference):
    out = tmp_path / "run"
    code, _, err = _run_until(out, 6, signal.SIGKILL)
    assert code == -signal.SIGKILL, err
    assert (out / ".gcflows.lock").exists()  # SIGKILL: nothing could remove it
    code, seen, err = _run_until(out, None)
    assert code == 0 and seen == TOTAL, err
    _assert_same_run(
        load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    )
