"""Tests of gcflows.progress: the progress display and the worker pool of the studies."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from _terminal import run_on_a_terminal

from gcflows.progress import (
    Interrupted,
    Job,
    JobFailed,
    JobPool,
    Progress,
    run_schedule,
    signals_interrupt,
)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _square(x: int) -> int:
    return x * x


def _fail(x: int) -> int:
    raise ValueError(f"bad job {x}")


def _pid_then_sleep(x: int) -> int:
    time.sleep(x)
    return os.getpid()


def test_bar_on_a_terminal_and_log_lines_otherwise():
    term = FakeTerminal()
    with Progress(3, "study", file=term) as p:
        for k in range(3):
            p.done(f"job {k}", 0.5)
    out = term.getvalue()
    assert "\r" in out and "3/3" in out and "job" in out  # tqdm: done of total, redrawn in place
    for quiet, file in ((True, FakeTerminal()), (False, io.StringIO())):
        with Progress(2, "study", quiet=quiet, file=file) as p:
            p.done("train ct seed 0", 1.25)
            p.done("proxy", None)
        lines = file.getvalue().splitlines()
        assert "\r" not in file.getvalue() and len(lines) == 2
        assert lines[0].startswith("[study ") and lines[0].endswith(
            "1/2 done: train ct seed 0 (1.2 s)"
        )
        assert lines[1].endswith("2/2 done: proxy")


@pytest.mark.parametrize("workers", [1, 2])
def test_job_pool_yields_every_result_and_accepts_follow_up_jobs(workers):
    log = io.StringIO()
    progress = Progress(4, "pool", file=log)
    seen = {}
    with JobPool(_square, workers, progress) as pool:
        for x in (2, 3, 4):
            pool.submit(x, f"square {x}")
        for label, res in pool.results():
            seen[label] = res
            if label == "square 3":
                pool.submit(5, "square 5")  # a job that needs another's result
    assert seen == {"square 2": 4, "square 3": 9, "square 4": 16, "square 5": 25}
    assert log.getvalue().count(" done: ") == 4


def test_a_failed_job_raises_in_the_parent_with_its_label():
    with pytest.raises(RuntimeError, match="job 'j1' failed: bad job 1"):
        with JobPool(_fail, 2) as pool:
            pool.submit(1, "j1")
            list(pool.results())


def test_sigterm_stops_the_pool_and_its_workers():
    """SIGTERM to the parent under signals_interrupt: Interrupted, and no worker survives."""
    pool = JobPool(_pid_then_sleep, 2)
    workers = pool.worker_pids()
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(Interrupted) as info:
        with signals_interrupt(), pool:
            pool.submit(60, "sleep a")
            pool.submit(60, "sleep b")
            list(pool.results())
    assert info.value.signum == signal.SIGTERM
    time.sleep(0.2)
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone (terminated and reaped), not orphaned
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_bar_on_a_new_pseudo_terminal():
    """A fresh pty reports a 0 x 0 window: the bar must still be drawn (80 x 24 assumed)."""
    code = (
        "from gcflows.progress import Progress\n"
        "with Progress(2, 'x') as p:\n p.done('a')\n p.done('b')"
    )
    rc, _, text = run_on_a_terminal([sys.executable, "-c", code], timeout=120)
    assert rc == 0
    assert "\r" in text and "2/2" in text and "last: b" in text


def _square_or_kill_own_worker(job: tuple[str, int]) -> int:
    what, x = job
    if what == "kill":
        os.kill(os.getpid(), x)
        time.sleep(30)  # not reached: the signal ends the worker
    return x * x


def _pid_file_then_sleep(path: str) -> str:
    with open(path + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(1.5)
    return "slept"


class _Hung(Exception):
    pass


@contextmanager
def _deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block takes longer than ``seconds``."""

    def hung(signum, frame):
        raise _Hung(f"still waiting after {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(
    "sig, cause", [(signal.SIGKILL, "killed by SIGKILL"), (signal.SIGTERM, "killed by SIGTERM")]
)
def test_a_job_whose_worker_dies_is_reported_with_its_label_and_the_cause(sig, cause):
    """The out-of-memory killer's SIGKILL (or a SIGTERM) to the worker running a job: the pool
    raises JobFailed naming that job and the signal, instead of waiting forever; the other job's
    result came first and no worker is left behind."""
    seen = []
    with _deadline(90), pytest.raises(JobFailed, match=f"job 'doomed' failed: .*{cause}") as info:
        with JobPool(_square_or_kill_own_worker, 2) as pool:
            pool.submit(("square", 3), "square 3")
            seen.append(next(pool.results()))
            pool.submit(("kill", int(sig)), "doomed")
            seen += list(pool.results())
    assert info.value.label == "doomed"
    assert seen == [("square 3", 9)]
    for pid in pool.worker_pids():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_workers_ignore_sigint_the_parent_handles_it(tmp_path):
    """Ctrl-C reaches the whole process group: a worker must not die of it (its job's result
    would never come), the job finishes and its result arrives."""
    path = str(tmp_path / "pid")
    with _deadline(90), JobPool(_pid_file_then_sleep, 2) as pool:
        pool.submit(path, "sleep")
        while not os.path.exists(path):
            time.sleep(0.05)
        os.kill(int(open(path).read()), signal.SIGINT)
        assert list(pool.results()) == [("sleep", "slept")]


# ------------------------------------------------------------------------------------------------
# jobs with dependencies (Scheduler)
# ------------------------------------------------------------------------------------------------
def _echo(payload):
    """A job: fails on ``("fail", ...)``, else returns its payload."""
    if isinstance(payload, tuple) and payload and payload[0] == "fail":
        raise ValueError(f"bad payload {payload[1]}")
    return payload


def test_schedule_starts_ready_jobs_by_their_path_to_the_end():
    """One worker: every start is a choice among the ready jobs. 'short' costs little but 'tail'
    (cost 9) waits for it, so its path (1 + 9) beats 'long' (6); 'cheap' (0.5) comes last;
    equal paths keep the list's order ('tie a' before 'tie b')."""
    jobs = [
        Job("cheap", 1, cost=0.5),
        Job("long", 2, cost=6.0),
        Job("short", 3, cost=1.0),
        Job("tie a", 4, cost=2.0),
        Job("tie b", 5, cost=2.0),
        Job("tail", None, after=("short",), cost=9.0, make=lambda r: r["short"] * 10),
    ]
    out = run_schedule(_echo, jobs, 1)
    assert out.started == ["short", "tail", "long", "tie a", "tie b", "cheap"]
    assert out.results["tail"] == 30  # built from its dependency's result, in the parent
    assert set(out.results) == {j.label for j in jobs} and not out.failed


@pytest.mark.parametrize("workers", [1, 2])
def test_schedule_starts_each_job_after_its_dependencies(workers):
    """A diamond and a chain; each job's payload is made from its dependencies' results, and it
    starts only after they ended (parent clock)."""
    jobs = [
        Job("a", 1, cost=1.0),
        Job("b", None, after=("a",), cost=1.0, make=lambda r: r["a"] + 1),
        Job("c", None, after=("a",), cost=3.0, make=lambda r: r["a"] * 5),
        Job("d", None, after=("b", "c"), cost=1.0, make=lambda r: r["b"] * r["c"]),
        Job("e", 7, cost=0.1),
    ]
    out = run_schedule(_echo, jobs, workers)
    assert out.results == {"a": 1, "b": 2, "c": 5, "d": 10, "e": 7}
    for job in jobs:
        for dep in job.after:
            assert out.times[job.label][0] >= out.times[dep][1], (job.label, dep)
            assert out.started.index(job.label) > out.started.index(dep)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_job_fails_its_dependants_with_its_name(workers):
    jobs = [
        Job("root", ("fail", 1)),
        Job("child", None, after=("root",), make=lambda r: r["root"]),
        Job("grandchild", 3, after=("child",)),
        Job("free", 4),
    ]
    out = run_schedule(_echo, jobs, workers, keep_going=True)
    assert out.results == {"free": 4}
    assert "job 'root' failed: bad payload 1" in out.failed["root"]
    assert out.failed["child"] == "its dependency 'root' failed"
    assert out.failed["grandchild"] == "its dependency 'child' failed"
    assert "child" not in out.started and "grandchild" not in out.started
    # without keep_going the first failure ends the schedule, naming the job
    with pytest.raises(JobFailed, match="job 'root' failed: bad payload 1"):
        run_schedule(_echo, jobs, workers)


def test_a_killed_worker_fails_the_job_and_its_dependants():
    """The pool's dead-worker detection under the scheduler: SIGKILL to the worker running
    'doomed' fails it with the cause, and its dependant names it."""
    jobs = [
        Job("doomed", ("kill", int(signal.SIGKILL))),
        Job("after doomed", ("square", 2), after=("doomed",)),
        Job("square 3", ("square", 3)),
    ]
    with _deadline(90):
        out = run_schedule(_square_or_kill_own_worker, jobs, 2, keep_going=True)
    assert "killed by SIGKILL" in out.failed["doomed"]
    assert out.failed["after doomed"] == "its dependency 'doomed' failed"
    assert out.results == {"square 3": 9}


def test_schedule_rejects_bad_specs():
    with pytest.raises(ValueError, match="after='x' is invalid: name a job listed before"):
        run_schedule(_echo, [Job("a", 1, after=("x",))], 1)
    with pytest.raises(ValueError, match="Job.label='a' is invalid"):
        run_schedule(_echo, [Job("a", 1), Job("a", 2)], 1)
    with pytest.raises(ValueError, match="cost=-1.0 is invalid"):
        run_schedule(_echo, [Job("a", 1, cost=-1.0)], 1)
