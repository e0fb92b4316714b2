"""Progress of a study and the worker pool that runs its jobs (used by the experiment scripts).

:class:`Progress` shows what runs and how far it is, on ``stderr``:

- on a terminal: a tqdm bar ``<desc>: 3/25 jobs [00:41<02:10, ...] last: <label>`` (jobs done of
  total, elapsed, ETA);
- with ``quiet=True``, or when ``stderr`` is not a terminal (a log file, CI): one line per
  finished job instead, ``[<desc> 41.2s] 3/25 done: <label> (12.3 s)``.

:class:`JobPool` runs picklable jobs ``fn(job) -> result`` in ``workers`` spawned processes (one
job each at a time; ``workers=1`` runs them in this process), yields results as they finish, and
accepts new jobs while it runs (a job that needs another's result). SIGINT and SIGTERM stop it
cleanly: the workers ignore SIGINT and are terminated by the parent, which raises
:class:`Interrupted` (no orphaned workers keep computing). A job that fails, or whose worker
dies (killed by a signal or the out-of-memory killer), raises :class:`JobFailed` naming the job
and the cause: the study ends with that error instead of waiting for a result that never comes.

:func:`run_schedule` runs a list of :class:`Job` specs with dependencies on such a pool: a job
starts once every job it names in ``after`` has finished (its payload can be built then, in the
parent, from their results: ``Job.make``), and among the jobs ready to start the one with the
longest expected path to the end of the study (its own ``cost`` plus the costliest chain of its
dependants) starts first, so that the jobs others wait for start early and the workers end
together. A failed job fails its dependants, each naming it.

Imports tqdm only when a bar is drawn; of gcflows only ``checks`` (layer 1).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO

from gcflows.checks import bad

__all__ = [
    "Progress",
    "JobPool",
    "JobFailed",
    "Interrupted",
    "signals_interrupt",
    "death_cause",
    "Job",
    "ScheduleResult",
    "Scheduler",
    "run_schedule",
]


class Progress:
    """``total`` jobs: a tqdm bar on a terminal, else one log line per finished job (stderr)."""

    def __init__(
        self, total: int, desc: str, *, quiet: bool = False, file: TextIO | None = None
    ) -> None:
        self.file = file if file is not None else sys.stderr
        self.desc, self.total, self.count = desc, int(total), 0
        self.start = time.perf_counter()
        isatty = getattr(self.file, "isatty", None)
        self.bar = None
        if not quiet and callable(isatty) and isatty():
            from tqdm import tqdm

            cols, rows = _terminal_size(self.file)  # a new pseudo-terminal reports 0 x 0
            self.bar = tqdm(
                total=self.total,
                desc=desc,
                unit="job",
                file=self.file,
                ncols=cols or 80,
                nrows=rows or 24,  # tqdm draws nothing when it believes the screen has 0 rows
                dynamic_ncols=bool(cols),
            )

    def done(self, label: str, seconds: float | None = None) -> None:
        """One job finished (``seconds``: its own time, shown in the log line)."""
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"last: {label}", refresh=False)
            self.bar.update(1)
            return
        took = "" if seconds is None else f" ({seconds:.1f} s)"
        elapsed = time.perf_counter() - self.start
        print(
            f"[{self.desc} {elapsed:.1f}s] {self.count}/{self.total} done: {label}{took}",
            file=self.file,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _terminal_size(file: TextIO) -> tuple[int, int]:
    """``(columns, rows)`` of the terminal behind ``file`` (0 when unknown)."""
    try:
        size = os.get_terminal_size(file.fileno())
    except (AttributeError, OSError, ValueError):
        return 0, 0
    return size.columns, size.lines


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the study stopped (its workers were terminated)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (so
    ``with`` blocks and ``finally`` clauses clean up); the previous handlers come back after."""

    def handler(signum, frame):  # noqa: ARG001 - the signal API
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _timed(fn: Callable[[Any], Any], job: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(job), time.perf_counter() - start


def _timed_in_worker(fn: Callable[[Any], Any], job: Any) -> tuple[Any, float]:
    """:func:`_timed` in a pool worker. A stop signal there (``JobPool.close`` terminates the
    workers with SIGTERM; a training run answers it by writing its checkpoint and raising
    ``TrainingInterrupted``, a ``KeyboardInterrupt``) ends the worker process quietly, with exit
    status 128 + the signal number: no traceback, and no next job picked up by a worker that the
    pool is joining."""
    try:
        return _timed(fn, job)
    except KeyboardInterrupt as err:
        sys.exit(getattr(err, "exit_code", 128 + signal.SIGTERM))


def _ignore_sigint() -> None:
    """Worker start: Ctrl-C goes to the whole process group; the parent handles it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_main(conn: Connection) -> None:
    """A pool worker: run the jobs the parent sends, one at a time, until ``None`` or EOF."""
    _ignore_sigint()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        job_id, fn, job = msg
        try:
            res, seconds = _timed_in_worker(fn, job)
            out: tuple = (job_id, res, None, seconds)
        except Exception as err:  # the job's own error: sent back, the worker lives on
            out = (job_id, None, (err, traceback.format_exc()), 0.0)
        try:
            conn.send(out)
        except Exception as err:  # an unpicklable result or exception
            why = f"its result could not be sent back ({type(err).__name__}: {err})"
            if out[2] is not None:
                why = f"{type(out[2][0]).__name__}: {out[2][0]}"
            conn.send((job_id, None, (RuntimeError(why), out[2][1] if out[2] else ""), 0.0))


class JobFailed(RuntimeError):
    """A job of a :class:`JobPool` failed: its own exception (``__cause__``; the worker's
    traceback in ``remote_traceback``) or the death of its worker process (a signal, the
    out-of-memory killer); ``label`` names the job."""

    def __init__(self, label: str, why: str, remote_traceback: str = "") -> None:
        super().__init__(f"job {label!r} failed: {why}")
        self.label, self.remote_traceback = label, remote_traceback


def death_cause(exitcode: int | None) -> str:
    """What a worker's exit code says about how it died."""
    if exitcode is None:
        return "its worker process stopped answering"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (the out-of-memory killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"its worker process was killed by {name}{hint}"
    if exitcode > 128 and exitcode - 128 in signal.valid_signals():
        name = signal.Signals(exitcode - 128).name
        return f"its worker process exited with status {exitcode} (stopped by {name})"
    return f"its worker process exited with status {exitcode}"


class _Worker:
    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.job: tuple[int, str] | None = None  # (id, label) of the job it runs


class JobPool:
    """Run ``fn(job)`` for picklable jobs in ``workers`` spawned processes, results as they come.

    ``submit(job, label)`` queues a job (also while :meth:`results` runs); ``results()`` yields
    ``(label, result)`` in order of completion, updating ``progress`` (a :class:`Progress`), until
    no job is left. A job's exception is raised in the parent as :class:`JobFailed` naming the
    job; so is the death of the worker running it (SIGKILL, SIGTERM, the out-of-memory killer),
    with the cause, instead of waiting for a result that will never come; a worker that dies
    between jobs is replaced. Each worker runs one job at a time; a job is handed to a worker
    only when it is free. Use as a context manager: leaving it (normally, by an exception or a
    signal under :func:`signals_interrupt`) terminates and joins every worker.
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int, progress: Progress | None = None):
        self.fn, self.progress = fn, progress
        self.pending = 0  # submitted and not yet yielded
        self.queued: deque = deque()  # (id, job, label) waiting for a free worker
        self.finished: deque = deque()  # (label, result, error, seconds)
        self._ids = 0
        self._ctx = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        if workers > 1:
            self.workers = [_Worker(self._ctx) for _ in range(workers)]
        self.size = max(1, int(workers))  # jobs that can run at once

    def worker_pids(self) -> list[int]:
        """The process ids of the workers (empty when jobs run in this process)."""
        return [w.proc.pid for w in self.workers]

    def submit(self, job: Any, label: str) -> None:
        self.pending += 1
        self._ids += 1
        self.queued.append((self._ids, job, label))
        if self.workers:
            self._dispatch()

    def _dispatch(self) -> None:
        for w in self.workers:
            if not self.queued:
                return
            if w.job is None and w.proc.is_alive():
                job_id, job, label = self.queued.popleft()
                try:
                    w.conn.send((job_id, self.fn, job))
                except Exception as err:  # an unpicklable job
                    why = f"it cannot be sent to a worker ({type(err).__name__}: {err})"
                    self.finished.append((label, None, JobFailed(label, why), 0.0))
                    continue
                w.job = (job_id, label)

    def _collect(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for a result or a worker's death; record what came."""
        busy = [w for w in self.workers if w.job is not None]
        waitables = [w.conn for w in busy] + [w.proc.sentinel for w in self.workers]
        ready = set(wait(waitables, timeout=timeout))
        for i, w in enumerate(self.workers):
            if w.job is not None and w.conn in ready:
                try:
                    _, res, err, seconds = w.conn.recv()
                except (EOFError, OSError):
                    pass  # the worker died while answering: its sentinel says how
                except Exception as exc:  # a result that cannot be unpickled here
                    label, w.job = w.job[1], None
                    why = f"its result could not be read ({type(exc).__name__}: {exc})"
                    self.finished.append((label, None, JobFailed(label, why), 0.0))
                    continue
                else:
                    label, w.job = w.job[1], None
                    if err is not None:
                        exc, tb = err
                        failed = JobFailed(label, str(exc), tb)
                        failed.__cause__ = exc
                        err = failed
                    self.finished.append((label, res, err, seconds))
                    continue
            if w.proc.sentinel in ready or not w.proc.is_alive():
                w.proc.join(timeout=5)
                if w.job is not None:
                    label = w.job[1]
                    failed = JobFailed(label, death_cause(w.proc.exitcode))
                    self.finished.append((label, None, failed, 0.0))
                w.conn.close()
                self.workers[i] = _Worker(self._ctx)  # keep the pool's size for the next jobs
        self._dispatch()

    def _next(self) -> tuple[str, Any, BaseException | None, float]:
        if not self.workers:
            _, job, label = self.queued.popleft()
            try:
                res, seconds = _timed(self.fn, job)
            except Exception as exc:  # as from a worker: JobFailed naming the job
                failed = JobFailed(label, str(exc), traceback.format_exc())
                failed.__cause__ = exc
                return label, None, failed, 0.0
            return label, res, None, seconds
        while not self.finished:  # a timeout keeps the main thread responsive to signals
            self._collect(timeout=0.2)
        return self.finished.popleft()

    def results(self) -> Iterator[tuple[str, Any]]:
        while self.pending:
            label, res, err, seconds = self._next()
            self.pending -= 1
            if err is not None:
                raise err
            if self.progress is not None:
                self.progress.done(label, seconds)
            yield label, res

    def close(self, terminate: bool = True) -> None:
        """Stop the workers: ``terminate`` them (SIGTERM, then SIGKILL for one that does not
        stop within 10 s; default; any job still running is lost) or let them finish what was
        submitted; then join them."""
        workers, self.workers = self.workers, []
        if not terminate:
            while self.queued or any(w.job is not None for w in workers):
                self.workers = workers
                self._collect(timeout=0.2)
                workers = self.workers
            self.workers = []
        for w in workers:
            if terminate:
                if w.proc.is_alive():
                    w.proc.terminate()
            else:
                with contextlib.suppress(OSError):
                    w.conn.send(None)
        for w in workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(terminate=exc_type is not None or self.pending > 0)


# ------------------------------------------------------------------------------------------------
# jobs with dependencies
# ------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One job of a schedule (:func:`run_schedule`).

    ``label`` names it (unique; progress lines, errors, results); ``payload`` is what the pool's
    function receives, or, with ``make``, ``make(results)`` builds it in the parent once the jobs
    named in ``after`` have finished (``results``: their labels to their results); ``cost``: the
    expected seconds of the job, which orders the start of ready jobs (only the order matters)."""

    label: str
    payload: Any = None
    after: tuple[str, ...] = ()
    cost: float = 1.0
    make: Callable[[dict[str, Any]], Any] | None = None


@dataclass
class ScheduleResult:
    """What a schedule did: ``results`` by label in order of completion, ``started`` the labels
    in the order the jobs started, ``times`` each finished job's ``(start, end)`` in seconds since
    the schedule began (parent clock), ``failed`` the failed jobs' labels and reasons (with
    ``keep_going``; a dependant of a failed job names it)."""

    results: dict[str, Any] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    times: dict[str, tuple[float, float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _priorities(jobs: Sequence[Job]) -> dict[str, float]:
    """Each job's cost plus the costliest chain of jobs that wait for it (its path to the end)."""
    waiting: dict[str, list[str]] = {j.label: [] for j in jobs}
    for j in jobs:
        for dep in j.after:
            waiting[dep].append(j.label)
    prio: dict[str, float] = {}
    for j in reversed(jobs):  # dependants come after their dependencies in the list
        prio[j.label] = float(j.cost) + max((prio[w] for w in waiting[j.label]), default=0.0)
    return prio


def _check_jobs(jobs: Sequence[Job]) -> None:
    seen: set[str] = set()
    for j in jobs:
        if not isinstance(j, Job):
            raise bad("jobs", type(j).__name__, "use gcflows.progress.Job specs")
        if j.label in seen:
            raise bad("Job.label", j.label, "use a label once per schedule")
        for dep in j.after:
            if dep not in seen:
                raise bad(f"{j.label}: after", dep, "name a job listed before this one (no cycles)")
        if not (isinstance(j.cost, int | float) and j.cost >= 0):
            raise bad(f"{j.label}: cost", j.cost, "use a number >= 0 (expected seconds)")
        seen.add(j.label)


class Scheduler:
    """Runs :class:`Job` specs on a :class:`JobPool` (its dead-worker detection and signal
    handling included): at most ``pool.size`` jobs at once, each after its dependencies, the
    ready job with the longest path to the end first (ties: the order of ``jobs``).

    :meth:`fill` starts what can start (call it early to overlap other work in the parent with
    the first jobs); :meth:`run` runs to the end. A failed job raises :class:`JobFailed` at once,
    or with ``keep_going`` is recorded in ``ScheduleResult.failed`` with every job that depends
    on it (directly or not), which never starts."""

    def __init__(self, pool: JobPool, jobs: Sequence[Job], *, keep_going: bool = False) -> None:
        jobs = list(jobs)
        _check_jobs(jobs)
        self.pool, self.keep_going = pool, keep_going
        self.jobs = {j.label: j for j in jobs}
        self.order = {j.label: i for i, j in enumerate(jobs)}
        self.prio = _priorities(jobs)
        self.waiting = [j.label for j in jobs]  # not started, not failed
        self.out = ScheduleResult()
        self._t0 = time.perf_counter()
        self._start: dict[str, float] = {}

    def _ready(self) -> list[str]:
        done = self.out.results
        ready = [k for k in self.waiting if all(d in done for d in self.jobs[k].after)]
        return sorted(ready, key=lambda k: (-self.prio[k], self.order[k]))

    def fill(self) -> None:
        """Start ready jobs while the pool has a free worker."""
        while self.pool.pending < self.pool.size:
            ready = self._ready()
            if not ready:
                return
            label = ready[0]
            job = self.jobs[label]
            self.waiting.remove(label)
            payload = job.payload
            if job.make is not None:
                payload = job.make({d: self.out.results[d] for d in job.after})
            self._start[label] = time.perf_counter() - self._t0
            self.out.started.append(label)
            self.pool.submit(payload, label)

    def _fail(self, label: str, why: str) -> None:
        self.out.failed[label] = why
        for k in list(self.waiting):
            if label in self.jobs[k].after:
                self.waiting.remove(k)
                self._fail(k, f"its dependency {label!r} failed")

    def run(self, on_result: Callable[[str, Any], None] | None = None) -> ScheduleResult:
        """Run every job; ``on_result(label, result)`` is called in the parent as each ends."""
        self.fill()
        while self.pool.pending:
            try:
                for label, res in self.pool.results():
                    self.out.results[label] = res
                    self.out.times[label] = (self._start[label], time.perf_counter() - self._t0)
                    if on_result is not None:
                        on_result(label, res)
                    self.fill()
            except JobFailed as err:
                if not self.keep_going:
                    raise
                self._fail(err.label, str(err))
                self.fill()
        return self.out


def run_schedule(
    fn: Callable[[Any], Any],
    jobs: Sequence[Job],
    workers: int,
    *,
    progress: Progress | None = None,
    on_result: Callable[[str, Any], None] | None = None,
    keep_going: bool = False,
) -> ScheduleResult:
    """Run ``fn(payload)`` for every :class:`Job` in a :class:`JobPool` of ``workers`` processes
    (:class:`Scheduler`), with ``progress`` lines as jobs finish."""
    with JobPool(fn, workers, progress) as pool:
        return Scheduler(pool, jobs, keep_going=keep_going).run(on_result)
