"""experiments/digits_comparison.py: every argument checked before any work, explicit values
win over --quick, and SIGTERM stops the pool's workers (no orphan keeps training)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_refused_at_once

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "digits_comparison.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("digits_comparison_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps=0 is invalid"),
        (["--n-eval", "1"], "--n-eval=1 is invalid"),
        (["--eval-every", "0"], "--eval-every=0 is invalid"),
        (["--workers", "0"], "--workers=0 is invalid"),
        (["--seeds", "2", "2"], "--seeds"),
        (["no_such_key=1"], "no_such_key"),
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_arguments_fail_at_once_without_a_run_folder(script, argv, message, tmp_path, capsys):
    assert_refused_at_once(script.main, argv, message, tmp_path, capsys)


def test_steps_zero_is_not_the_default_and_explicit_values_win(script, tmp_path):
    args = script.parse_args(["--quick", "--n-eval", "1000", "--out", str(tmp_path)])
    assert (args.n_eval, args.steps, args.eval_every, args.seeds) == (1000, 40, 20, [0, 1])
    args = script.parse_args(
        ["--quick", "batch_size=16", "--seeds", "3", "4", "5", "--out", str(tmp_path)]
    )
    assert args.seeds == [3, 4, 5]
    # the user's override comes after --quick's, so it wins
    assert args.run_overrides.index("batch_size=16") > args.run_overrides.index("batch_size=32")
    run = script.resolve_run("digits_base", overrides=args.run_overrides, seed=3)
    assert run.config.batch_size == 16 and run.config.total_steps == 40
    args = script.parse_args(["--steps", "7", "--out", str(tmp_path)])
    assert args.run_overrides[-1] == "total_steps=7"


def test_unwritable_output_folder_is_refused(script, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        script.main(["--quick", "--out", str(blocker)])
    assert "cannot hold a run folder" in capsys.readouterr().err


def _workers(pid: int) -> list[int]:
    """Pool workers among the children of ``pid`` (spawned processes)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmd:
                out.append(int(child))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _long_study(tmp_path, tmp_path_factory) -> subprocess.Popen:
    cache = tmp_path_factory.getbasetemp() / "gcflows_classifier_cache"
    return subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--seeds",
            "0",
            "--steps",
            "100000",
            "--eval-every",
            "100000",
            "--n-eval",
            "16",
            "--workers",
            "2",
            "--quiet",
            "--out",
            str(tmp_path),
            "--classifier-cache",
            str(cache),
            "batch_size=8",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _two_training_workers(proc: subprocess.Popen) -> list[int]:
    """The pids of the study's two workers once both exist (10 min at most), after they have had
    3 s to start training."""
    deadline = time.monotonic() + 600
    workers: list[int] = []
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        workers = _workers(proc.pid)
    assert len(workers) == 2, proc.communicate(timeout=10)
    time.sleep(3.0)  # let them start training
    return workers


def test_sigterm_stops_the_workers(tmp_path, tmp_path_factory):
    proc = _long_study(tmp_path, tmp_path_factory)
    try:
        workers = _two_training_workers(proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    time.sleep(0.5)
    assert not [w for w in workers if _alive(w)], "orphaned workers keep training"


def test_a_worker_killed_mid_job_ends_the_study_with_an_error_naming_the_job(
    tmp_path, tmp_path_factory
):
    """The out-of-memory killer's SIGKILL to a worker that trains a run: the study stops with one
    error line naming that run and the signal (it waited forever for the lost result), and the
    other worker is stopped too."""
    proc = _long_study(tmp_path, tmp_path_factory)
    try:
        workers = _two_training_workers(proc)
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert re.search(r"error: job '(gc|ot|ic) seed 0' failed: .*killed by SIGKILL", line), line
    assert "Traceback" not in err
    time.sleep(0.5)
    assert not [w for w in workers if _alive(w)], "orphaned workers keep training"
