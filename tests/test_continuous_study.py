"""experiments/continuous_study.py --quick runs end to end as a subprocess (< 60 s)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_continuous_study_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "continuous_study.py"), "--quick"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[0].startswith("Gradient noise")
    assert "Training at equal CPU time" in proc.stdout  # the summary table comes last
    (run_dir,) = list(tmp_path.glob("continuous_study_*"))
    for name in ("config.json", "results.json", "results.csv"):
        assert (run_dir / name).is_file()
    res = json.loads((run_dir / "results.json").read_text())
    methods = {r["method"] for r in res["summary"]}
    assert methods == {"ct_discrete", "ct_cont", "gc_cont", "ct_cont_nostab"}
    for row in res["noise"]:
        assert row["noise"] >= 0 and row["trace_ct"] >= 0
        if row["coupling"] == "ic":
            assert row["exact_noise"] is not None and row["exact_noise"] >= 0
    assert all(math.isfinite(r["w2"]) for r in res["training"] if not r["diverged"])


def _script():
    spec = importlib.util.spec_from_file_location(
        "continuous_study", REPO / "experiments" / "continuous_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


continuous_study = _script()

READ_ONLY = "/sys/gcflows_test_out" if os.geteuid() == 0 else None  # root ignores mode bits


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "-1"], "--budget=-1.0 is invalid"),
        (["--budget", "nan"], "--budget=nan is invalid"),
        (["--noise-budget", "inf"], "--noise-budget=inf is invalid"),
        (["--seeds", "0"], "--seeds=0 is invalid"),
        (["--n-times", "-1"], "--n-times=-1 is invalid"),
        (["--n-noise", "1"], "--n-noise=1 is invalid"),
        (["--n-eval", "0"], "--n-eval=0 is invalid"),
        (["--hidden", "0"], "--hidden=0 is invalid"),
        (["--batch", "1"], "--batch=1 is invalid"),
        (["--threads", "0"], "--threads=0 is invalid"),
        (["--mu", "1.5"], "--mu=1.5 is invalid: use a probability"),
        (["--lr", "-1"], "--lr=-1.0 is invalid"),
        (["--time-scale", "0"], "--time-scale=0.0 is invalid"),
        (["--methods", "ct_cont", "ct_cont"], "name each one once"),
        (["--methods", "ct_cont", "--mu", "0.3"], "applies to gc_cont"),
        (["--quick", "--budget", "-1"], "--budget=-1.0 is invalid"),  # explicit, also with quick
    ],
)
def test_every_bad_argument_is_one_error_line_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        continuous_study.main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.count("error:") == 1 and message in err.split("error: ", 1)[1], err
    assert not (tmp_path / "out").exists()  # not even the parent of the run folder


def test_an_unwritable_out_is_one_error_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    outs = [blocker / "sub"] + ([READ_ONLY] if READ_ONLY else [])
    for out in outs:
        with pytest.raises(SystemExit) as info:
            continuous_study.main(["--quick", "--out", str(out)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "cannot hold a run folder" in err, err


def test_explicit_values_win_over_quick():
    parser = continuous_study.build_parser()
    args = parser.parse_args(["--quick", "--seeds", "3", "--budget", "0.7", "--n-noise", "40"])
    continuous_study.check_args(args)
    assert (args.seeds, args.budget, args.n_noise) == (3, 0.7, 40)  # given: kept
    assert (args.noise_budget, args.n_times, args.hidden) == (0.5, 2, 32)  # not given: quick
    args = parser.parse_args(["--seeds", "3"])
    continuous_study.check_args(args)
    assert (args.seeds, args.budget, args.hidden, args.mu) == (3, 6.0, 64, 0.5)  # defaults


def test_training_runs_through_the_library_with_each_methods_config():
    """Each method is a TrainConfig (iCT discrete; continuous squared L2 with or without sCM's
    stabilizers; GC's generator the online weights: EMA decay 0) trained by
    gcflows.training.train for exactly the given number of steps."""
    args = continuous_study.build_parser().parse_args(["--quick", "--mu", "0.3"])
    continuous_study.check_args(args)
    disc = continuous_study.train_config("ct_discrete", args, 50)
    assert (disc.method, disc.continuous, disc.distance) == ("ct", False, "pseudo_huber")
    gc = continuous_study.train_config("gc_cont", args, 50, seed=2)
    assert (gc.method, gc.continuous, gc.distance, gc.mu) == ("gc", True, "squared_l2", 0.3)
    assert (gc.tangent_norm, gc.tangent_warmup, gc.ema_decay, gc.seed) == (0.1, 5, 0.0, 10_002)
    assert (gc.t_min, gc.t_max, gc.batch_size, gc.lr) == (1e-3, 5.0, args.batch, args.lr)
    nostab = continuous_study.train_config("ct_cont_nostab", args, 50)
    assert (nostab.tangent_norm, nostab.tangent_warmup) == (None, 0)
    target = continuous_study.make_target("2d")
    model, stats = continuous_study.train("gc_cont", target, args, 0, steps=3)
    assert stats["steps"] == 3 and not stats["diverged"]
    first = continuous_study.make_model(2, args.hidden, 0, args.time_scale)
    pairs = zip(first.parameters(), model.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)  # trained: the weights moved
