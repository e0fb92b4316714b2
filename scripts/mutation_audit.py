#!/usr/bin/env python
"""Mutation audit: does the test suite catch realistic one-line slips?

A developer tool (not part of the library). It holds a table of one-line mutants: a file, the
exact original text, its replacement, and the pytest node ids expected to catch it. For each
mutant it

1. copies the repository (git-tracked files plus untracked, not-ignored ones; no ``.git``, no
   caches) to a temporary folder, once per run: the working tree is never written;
2. replaces the original text (which must occur exactly once in the file) in the copy;
3. runs ``python -m pytest -x`` on the mutant's node ids in the copy (``PYTHONPATH`` = the copy,
   no bytecode written, so no stale ``.pyc`` can mask a same-length edit);
4. puts the original file back in the copy and checks it byte for byte before the next mutant.

Before any mutant runs, every original text is checked (exactly one occurrence) and the named
tests are run once on the unmutated copy: they must pass, else "caught" would mean nothing.

Result per mutant: ``caught`` (a named test fails, or the run exceeds ``--timeout``, default
600 s: a hang is what some slips cause; pytest's process group is then killed), ``survived``
(every named test passes) or ``error`` (pytest could not run them: a collection error, no tests
collected, ...). Exit status: 0 when every mutant is caught, 1 when one survives, 2 with an
``error: ...`` line on stderr when an original text is missing or ambiguous, a name given to
``--only`` is unknown, the unmutated tests fail, or pytest errors.

Usage (from the repository root)::

    python scripts/mutation_audit.py --list
    python scripts/mutation_audit.py                      # every mutant with tests
    python scripts/mutation_audit.py --only stats-paired-ratio-se continuous-weight-dropped

A mutant with no test ids (a TODO of the table) is listed, and reported as ``no tests`` without
being run. ``gcflows.kernels`` is imported from the copy's ``kernels/`` (a link in the copy), so
mutants of ``kernels/`` work too. Node ids are relative to the repository root. The table is the
list ``MUTANTS`` below; ``why`` says which slip each entry stands for.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """One slip: in ``path`` (relative to the repository root) ``original`` becomes
    ``replacement``; ``tests`` are the pytest node ids that must fail on it."""

    name: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str = ""


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # caught | survived | error | no tests
    seconds: float = 0.0
    detail: str = ""


_C = "tests/test_continuous.py::"
_S = "tests/test_stats.py::"
_T = "tests/test_training.py::"

MUTANTS: tuple[Mutant, ...] = (
    # ---------------------------------------------------------------- gcflows/continuous.py
    Mutant(
        "continuous-weight-dropped",
        "gcflows/continuous.py",
        "loss = (w * c_dist * (resid * resid).sum(1)).mean()",
        "loss = (c_dist * (resid * resid).sum(1)).mean()",
        (_C + "test_weighted_loss_is_the_mean_of_w_times_the_squared_tangent",),
        "the time weight w(t) dropped from the continuous loss",
    ),
    Mutant(
        "continuous-huber-constant-batch",
        "gcflows/continuous.py",
        "c_dist = self.constant(data[0].numel())",
        "c_dist = self.constant(data.numel())",
        (_C + "test_pseudo_huber_loss_is_its_quadratic_constant_times_squared_l2",),
        "the pseudo-Huber C computed for B*d elements instead of d per sample",
    ),
    Mutant(
        "continuous-huber-constant-channels",
        "gcflows/continuous.py",
        "c_dist = self.constant(data[0].numel())",
        "c_dist = self.constant(data.shape[1])",
        (_C + "test_pseudo_huber_loss_is_its_quadratic_constant_times_squared_l2",),
        "the pseudo-Huber C computed for the channels only (data.shape[1]), not C*H*W",
    ),
    Mutant(
        "continuous-times-truncated-at-log-b",
        "gcflows/continuous.py",
        "lo, hi = normal.cdf(torch.log(process.b(ends) / process.a(ends)))",
        "lo, hi = normal.cdf(torch.log(process.b(ends)))",
        (_C + "test_lognormal_time_law_on_every_process",),
        "sample_times truncates log sigma at log b instead of log(b / a) (same on ve only)",
    ),
    Mutant(
        "continuous-bias-null-not-over-n",
        "gcflows/continuous.py",
        "bias_null=_trace_cov(delta) / n,",
        "bias_null=_trace_cov(delta),",
        (_C + "test_gradient_noise_summaries_are_the_written_out_statistics",),
        "gradient_noise's null bias tr Cov[delta] not divided by n",
    ),
    Mutant(
        "continuous-trigflow-c-in-swapped",
        "gcflows/continuous.py",
        "torch.rsqrt(torch.cos(t) ** 2 * sd * sd + torch.sin(t) ** 2)",
        "torch.rsqrt(torch.sin(t) ** 2 * sd * sd + torch.cos(t) ** 2)",
        (_C + "test_trigflow_c_in_gives_the_backbone_unit_variance_inputs",),
        "TrigFlow's c_in with cos and sin swapped",
    ),
    Mutant(
        "continuous-cholesky-rows",
        "gcflows/continuous.py",
        "(root[:, :, k].contiguous(),)",
        "(root[:, k, :].contiguous(),)",
        (_C + "test_exact_noise_terms_on_a_non_axis_aligned_posterior",),
        "exact_noise_terms uses rows of the root of Sigma instead of columns",
    ),
    # ---------------------------------------------------------------- gcflows/training
    Mutant(
        "training-lr-warmup-off-by-one",
        "gcflows/training/step.py",
        "return config.lr * min(1.0, (k + 1) / config.warmup_steps)",
        "return config.lr * min(1.0, k / config.warmup_steps)",
        (_T + "test_lr_at_warms_up_linearly_from_the_first_step",),
        "learning-rate warm-up off by one: the first step at lr 0",
    ),
    Mutant(
        "training-continuous-ignores-mu",
        "gcflows/training/config.py",
        "            mu=self.mu,\n            distance=self.distance,",
        "            distance=self.distance,",
        (_T + "test_continuous_gc_run_follows_mu",),
        "the objective built from a TrainConfig drops mu (the default 0.5 is used); "
        "make_objective hands that config whole to the continuous objective",
    ),
    # ---------------------------------------------------------------- gcflows/stats.py
    Mutant(
        "stats-delta-t-normal-quantile",
        "gcflows/stats.py",
        '"delta-t": True,',
        '"delta-t": False,',
        (_S + "test_t_intervals_use_student_quantiles_at_small_n",),
        "delta-t intervals with the normal quantile (n = 5: 1.96 instead of 2.776)",
    ),
    Mutant(
        "stats-student-t-normal-quantile",
        "gcflows/stats.py",
        '"student-t": True,',
        '"student-t": False,',
        (_S + "test_t_intervals_use_student_quantiles_at_small_n",),
        "student-t intervals with the normal quantile",
    ),
    Mutant(
        "stats-paired-ratio-se",
        "gcflows/stats.py",
        'return Interval(r, se / abs(mden), num.numel(), "paired-ratio", level)',
        'return Interval(r, se, num.numel(), "paired-ratio", level)',
        (_S + "test_paired_ratio_standard_error_is_the_written_out_delta_method",),
        "paired_ratio's standard error not divided by mean(den)",
    ),
    # ---------------------------------------------------------------- other modules
    # The test ids of the next three are those of branch h2-reliability (present once merged).
    Mutant(
        "checkpoint-digest-first-4mib",
        "gcflows/training/checkpoint.py",
        "while chunk := f.read(1 << 22):",
        "if chunk := f.read(1 << 22):",
        (
            "tests/test_checkpoint.py::test_a_checkpoint_larger_than_the_read_buffer_is_hashed_whole",
        ),
        "the checkpoint digest checked over the first 4 MiB only (big checkpoints refused)",
    ),
    Mutant(
        "checkpoint-no-fallback-when-missing",
        "gcflows/training/checkpoint.py",
        'first = f"{str(latest)!r} is missing"',
        "return None",
        (
            "tests/test_checkpoint.py::"
            "test_a_missing_latest_checkpoint_falls_back_to_the_intact_previous_one",
        ),
        "find_checkpoint returns None (a fresh start) when checkpoint.pt is missing, ignoring an "
        "intact checkpoint.prev.pt",
    ),
    Mutant(
        "flowmap-multistep-steps-minus-one",
        "gcflows/flowmap.py",
        "[:, None] / steps",
        "[:, None] / (steps - 1)",
        ("tests/test_flowmap.py::test_multistep_schedule_is_equal_steps_in_log_sigma",),
        "the multistep flow map divides its schedule by steps - 1",
    ),
    Mutant(
        "progress-workers-take-sigint",
        "gcflows/progress.py",
        "signal.signal(signal.SIGINT, signal.SIG_IGN)",
        "signal.signal(signal.SIGINT, signal.SIG_DFL)",
        ("tests/test_progress.py::test_the_workers_ignore_sigint_the_parent_handles_it",),
        "JobPool workers no longer ignore SIGINT (results() can wait forever)",
    ),
    Mutant(
        "regression-cross-fit-own-half",
        "gcflows/regression.py",
        "train, test = _half(pairs, first=fold == 1), _half(pairs, first=fold == 0)",
        "train, test = _half(pairs, first=fold == 1), _half(pairs, first=fold == 1)",
        ("tests/test_regression.py::test_cross_fit_scores_each_fit_on_the_other_half",),
        "cross-fit scores each fit on its own training half",
    ),
    Mutant(
        "regression-early-stopping-live-weights",
        "gcflows/regression.py",
        "best_state = {key: v.detach().clone() for key, v in net.state_dict().items()}",
        "best_state = {key: v.detach() for key, v in net.state_dict().items()}",
        ("tests/test_regression.py::test_early_stopping_keeps_the_best_weights_not_the_last",),
        "early stopping keeps live references: the last weights come back, not the best",
    ),
    Mutant(
        "regression-data-stats-x-minus-z",
        "gcflows/regression.py",
        "data_side = x_tr - t_tr[:, None] * z_tr",
        "data_side = x_tr - z_tr",
        ("tests/test_regression.py::test_data_statistics_come_from_the_data_side_of_the_pairs",),
        "data statistics from x - z instead of x - t z",
    ),
    Mutant(
        "regression-time-weights-proportional",
        "gcflows/regression.py",
        "weight = (inv / inv.mean()).float()",
        "weight = (val / val.mean()).float()",
        ("tests/test_regression.py::test_shared_fit_weights_each_time_by_one_over_its_loss",),
        "time weights proportional to L_t instead of 1 / L_t",
    ),
)


class AuditError(Exception):
    """A problem with the table or the unmutated tests (exit 2)."""


# ------------------------------------------------------------------------------------------------
# the temporary copy
# ------------------------------------------------------------------------------------------------
def _files(repo: Path) -> list[str]:
    """Tracked plus untracked, not-ignored files (relative paths); every file outside ``.git``
    and caches when ``repo`` is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo,
            capture_output=True,
            check=True,
        ).stdout
        return [p for p in out.decode().split("\0") if p and (repo / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}
        return [
            str(p.relative_to(repo))
            for p in repo.rglob("*")
            if p.is_file() and not skip.intersection(p.relative_to(repo).parts)
        ]


def copy_tree(repo: Path, dest: Path) -> None:
    """Copy ``repo``'s files into ``dest`` and link ``gcflows/kernels`` to the copy's kernels."""
    for rel in _files(repo):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)
    kernels, link = dest / "kernels", dest / "gcflows" / "kernels"
    if kernels.is_dir() and (dest / "gcflows").is_dir() and not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)


def check_table(mutants: Sequence[Mutant], repo: Path) -> None:
    """Every original text occurs exactly once in its file, and differs from its replacement."""
    for m in mutants:
        path = repo / m.path
        if not path.is_file():
            raise AuditError(f"mutant {m.name}: file {m.path} not found")
        count = path.read_text().count(m.original)
        if count != 1:
            what = "not found" if count == 0 else f"found {count} times (make it unique)"
            raise AuditError(f"mutant {m.name}: original text {what} in {m.path}: {m.original!r}")
        if m.original == m.replacement:
            raise AuditError(f"mutant {m.name}: the replacement equals the original")


def _pytest(root: Path, tests: Sequence[str], timeout: float) -> tuple[int | None, str]:
    """``(returncode, output)`` of pytest on ``tests`` in ``root``; None on a timeout, after which
    pytest's whole process group (its worker processes too) is killed."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output
    except BaseException:  # Ctrl-C of the audit: take pytest and its children down with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, output


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    return ""


def run_mutant(m: Mutant, root: Path, timeout: float) -> Outcome:
    """Apply ``m`` in the copy ``root``, run its tests, restore the file (checked)."""
    if not m.tests:
        return Outcome(m, "no tests", detail="TODO: no test ids in the table")
    path = root / m.path
    pristine = path.read_bytes()
    text = pristine.decode()
    start = time.perf_counter()
    try:
        path.write_text(text.replace(m.original, m.replacement, 1))
        rc, output = _pytest(root, m.tests, timeout)
    finally:
        path.write_bytes(pristine)
    if path.read_bytes() != pristine:
        raise AuditError(f"mutant {m.name}: {m.path} was not restored in the copy")
    seconds = time.perf_counter() - start
    if rc is None:
        return Outcome(m, "caught", seconds, f"timeout after {timeout:.0f} s")
    if rc == 1:
        return Outcome(m, "caught", seconds, _first_failure(output))
    if rc == 0:
        return Outcome(m, "survived", seconds, "every named test passed")
    tail = " | ".join(output.strip().splitlines()[-3:])
    return Outcome(m, "error", seconds, f"pytest exit {rc}: {tail}")


def audit(
    mutants: Sequence[Mutant],
    repo: Path = REPO,
    timeout: float = 600.0,
    baseline: bool = True,
    log=print,
) -> list[Outcome]:
    """Run ``mutants`` on a temporary copy of ``repo`` (module doc); the working tree is only
    read. Raises :class:`AuditError` on a bad table or failing unmutated tests."""
    check_table(mutants, repo)
    with tempfile.TemporaryDirectory(prefix="mutation-audit-") as tmp:
        root = Path(tmp) / "repo"
        root.mkdir()
        copy_tree(repo, root)
        tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
        if baseline and tests:
            log(f"baseline: {len(tests)} test ids on the unmutated copy ...")
            rc, output = _pytest(root, tests, timeout)
            if rc != 0:
                what = "timed out" if rc is None else f"exit {rc}"
                tail = " | ".join(output.strip().splitlines()[-5:])
                raise AuditError(f"the tests fail without any mutant ({what}): {tail}")
        outcomes = []
        for m in mutants:
            out = run_mutant(m, root, timeout)
            log(f"{m.name}: {out.status} ({out.seconds:.1f} s) {out.detail}")
            outcomes.append(out)
        return outcomes


def table(outcomes: Sequence[Outcome]) -> str:
    """A Markdown table: mutant, file, result, failing test or detail."""
    rows = ["| mutant | file | result | test that fails / detail |", "|---|---|---|---|"]
    for o in outcomes:
        rows.append(f"| {o.mutant.name} | {o.mutant.path} | {o.status} | {o.detail} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None, mutants: Sequence[Mutant] = MUTANTS) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    parser.add_argument("--repo", type=Path, default=REPO, help="repository root (read only)")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the run of the unmutated tests"
    )
    args = parser.parse_args(argv)
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        print("error: the mutant table repeats a name", file=sys.stderr)
        return 2
    chosen = list(mutants)
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            print(f"error: unknown mutant(s) {unknown}; see --list", file=sys.stderr)
            return 2
        chosen = [m for m in mutants if m.name in args.only]
    if not (args.timeout > 0):
        print(f"error: --timeout={args.timeout} is invalid: use seconds > 0", file=sys.stderr)
        return 2
    if args.list:
        with contextlib.suppress(BrokenPipeError):  # e.g. piped into head
            for m in chosen:
                tests = ", ".join(m.tests) if m.tests else "TODO (no test ids)"
                print(f"{m.name}\n    {m.path}: {m.why}\n    tests: {tests}")
        return 0
    try:
        outcomes = audit(chosen, args.repo.resolve(), args.timeout, not args.no_baseline)
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(outcomes))
    if any(o.status == "error" for o in outcomes):
        print("error: pytest could not run the tests of some mutants", file=sys.stderr)
        return 2
    return 1 if any(o.status == "survived" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
