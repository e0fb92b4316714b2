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
:class:`Interrupted` (no orphaned workers keep computing).

Imports tqdm only when a bar is drawn; no other gcflows module (layer 1).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Progress", "JobPool", "Interrupted", "signals_interrupt"]


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
    """Worker initializer: Ctrl-C goes to the whole process group; the parent handles it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class JobPool:
    """Run ``fn(job)`` for picklable jobs in ``workers`` spawned processes, results as they come.

    ``submit(job, label)`` queues a job (also while :meth:`results` runs); ``results()`` yields
    ``(label, result)`` in order of completion, updating ``progress`` (a :class:`Progress`), until
    no job is left. A job's exception is raised in the parent after the pool is terminated. Use as
    a context manager: leaving it (normally, by an exception or a signal under
    :func:`signals_interrupt`) terminates and joins every worker.
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int, progress: Progress | None = None):
        self.fn, self.progress = fn, progress
        self.pending = 0
        self.inline: deque = deque()
        self.done: queue.Queue = queue.Queue()
        self.pool = None
        if workers > 1:
            ctx = mp.get_context("spawn")
            self.pool = ctx.Pool(workers, initializer=_ignore_sigint)

    def submit(self, job: Any, label: str) -> None:
        self.pending += 1
        if self.pool is None:
            self.inline.append((job, label))
            return
        self.pool.apply_async(
            _timed_in_worker,
            (self.fn, job),
            callback=lambda out: self.done.put((label, out[0], None, out[1])),
            error_callback=lambda err: self.done.put((label, None, err, 0.0)),
        )

    def _next(self) -> tuple[str, Any, BaseException | None, float]:
        if self.pool is None:
            job, label = self.inline.popleft()
            res, seconds = _timed(self.fn, job)
            return label, res, None, seconds
        while True:  # a timeout keeps the main thread responsive to signals
            try:
                return self.done.get(timeout=0.2)
            except queue.Empty:
                continue

    def results(self) -> Iterator[tuple[str, Any]]:
        while self.pending:
            label, res, err, seconds = self._next()
            self.pending -= 1
            if err is not None:
                raise RuntimeError(f"job {label!r} failed: {err}") from err
            if self.progress is not None:
                self.progress.done(label, seconds)
            yield label, res

    def close(self, terminate: bool = True) -> None:
        """Stop the workers: ``terminate`` them (default; any job still running is lost) or let
        them finish what was submitted; then join them."""
        if self.pool is not None:
            if terminate:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(terminate=exc_type is not None or self.pending > 0)
