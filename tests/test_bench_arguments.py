"""Every benchmark script checks its arguments before any work: a bad value of each kind is one
``error:`` line (argparse's) with exit status 2 and no output written; explicit values win over
``--quick``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


SCRIPTS = {
    name: _script(name)
    for name in ("bench_couplings", "bench_ensemble", "bench_gpu_step", "bench_kernels")
}
bench_training = _script("bench_training")


def _entry(name: str):
    module = SCRIPTS[name] if name in SCRIPTS else bench_training
    return getattr(module, "parse_args", None) or module.main


@pytest.fixture
def blocker(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("")
    return path


CASES = [
    ("bench_couplings", ["--repeats", "2"], "--repeats 2 is invalid"),
    ("bench_couplings", ["--batches", "0"], "--batches [0] is invalid"),
    ("bench_couplings", ["--methods", "sinkhorn_x"], "--methods ['sinkhorn_x'] is invalid"),
    ("bench_couplings", ["--out", "{blocker}"], "is a file"),
    ("bench_ensemble", ["--seeds", "0"], "must be >= 1"),
    ("bench_ensemble", ["--threads", "0"], "must be >= 1"),
    ("bench_gpu_step", ["--steps", "0"], "--steps >= 1"),
    ("bench_gpu_step", ["--at-step", "-2"], "--at-step >= 0"),
    ("bench_gpu_step", ["--out", "{blocker}/x"], "cannot hold a run folder"),
    ("bench_kernels", ["--threads", "-1"], "must be >= 0"),
    ("bench_kernels", ["--contended-seconds", "nan"], "--contended-seconds > 0"),
    ("bench_kernels", ["--out", "{blocker}/x"], "cannot hold a run folder"),
    ("bench_training", ["--repeats", "0"], "--repeats must be >= 1"),
    ("bench_training", ["--device", "gpu"], "--device='gpu' is invalid"),
    ("bench_training", ["--out", "{tmp}"], "is a folder"),
    ("bench_training", ["--out", "{blocker}/x.json"], "cannot be written"),
    ("bench_training", ["--quick", "--repeats", "0"], "--repeats must be >= 1"),
]


@pytest.mark.parametrize("name, argv, message", CASES)
def test_a_bad_value_is_one_error_line_before_any_work(
    name, argv, message, tmp_path, blocker, capsys
):
    argv = [a.format(blocker=blocker, tmp=tmp_path) for a in argv]
    if "--out" not in argv and name != "bench_ensemble":  # it writes no file
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        _entry(name)(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    assert err.count("error:") == 1 and message in err.split("error: ", 1)[1], err
    assert not (tmp_path / "out").exists()


def test_bench_training_explicit_values_win_over_quick(tmp_path):
    args = bench_training.parse_args(
        ["--quick", "--repeats", "3", "--toy", "40", "--out", str(tmp_path / "r.json")]
    )
    assert (args.repeats, args.toy_steps) == (3, 40)  # given (--toy: an abbreviation)
    assert (args.digits_steps, args.warmup) == (4, 2)  # not given: --quick's
