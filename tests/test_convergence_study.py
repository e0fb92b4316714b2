"""experiments/convergence_study.py: a tiny run end to end, and every argument checked before
any work (one ``error:`` line, exit 2, no run folder)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_refused_at_once

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "convergence_study.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("convergence_study_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "1"], "--seeds=1 is invalid"),
        (["--steps", "5"], "--steps=5 is invalid"),
        (["--lr", "inf"], "--lr=inf is invalid"),
        (["--lr=-1e-3"], "--lr=-0.001 is invalid"),
        (["--lr", "0"], "--lr=0.0 is invalid"),
        (["--s1", "4"], "--s1=4 is invalid"),
        (["--hidden", "0"], "--hidden=0 is invalid"),
        (["--threads", "0"], "--threads=0 is invalid"),
        (["--workers", "0"], "--workers=0 is invalid"),
        (["--targets", "random_7"], "--targets='random_7' is invalid"),
        (["--methods", "gc9"], "--methods='gc9' is invalid"),
        (["--full"], "--quick and --full"),
        (["--report", "no_such_run"], "--report='no_such_run' is invalid"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) else a,
)
def test_bad_arguments_fail_at_once_without_a_run_folder(script, argv, message, tmp_path, capsys):
    assert_refused_at_once(script.main, argv, message, tmp_path, capsys)


def test_out_that_is_a_file_is_refused(script, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        script.main(["--quick", "--out", str(f)])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_checkpoints_include_three_quarters_and_the_end(script):
    steps = script.checkpoints(1200)
    assert len(steps) == script.N_CHECKPOINTS and steps[-1] == 1200 and 900 in steps


def test_quick_run_end_to_end(script, tmp_path):
    """Two methods, two seeds, the tiny quick recipe: every table and file is written, the
    positive control and CT's plateau are reported on the primary metric, the curves hold one
    value per seed and checkpoint."""
    res = script.main(
        [
            "--quick",
            "--seeds",
            "2",
            "--methods",
            "ct",
            "cd",
            "--steps",
            "24",
            "--out",
            str(tmp_path),
            "--quiet",
            "--workers",
            "1",
        ]
    )
    (run_dir,) = list(tmp_path.iterdir())
    for name in ("config.json", "results.json", "results.csv", "learning_curves.png", "tables.md"):
        assert (run_dir / name).exists(), name
    tables = (run_dir / "tables.md").read_text()
    assert "#### random_64: positive control" in tables and "**cov_err_1step** (primary)" in tables
    # the CT and CD columns hold each method's own seed mean (not each other's)
    import csv

    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    means = [
        np.mean([float(r["cons_err"]) for r in rows if r["method"] == m]) for m in ("ct", "cd")
    ]
    assert f"| cons_err | {means[0]:.4g} | {means[1]:.4g} |" in tables
    # the tables are remade from the files alone, identically
    (run_dir / "tables.md").unlink()
    assert script.main(["--report", str(run_dir)])["report"] == tables
    assert (run_dir / "tables.md").read_text() == tables
    a = res["analysis"]["random_64"]
    primary = res["design"]["primary"]
    assert list(primary) == ["mode_tv_1step", "cov_err_1step"]
    assert set(a["paired_vs_ct"]) == {"cd"}
    for m in primary:
        pc = a["paired_vs_ct"]["cd"][m]
        assert pc["n"] == 2 and pc["method"] == "student-t" and pc["lo"] <= pc["mean"] <= pc["hi"]
        assert m in a["ct_last_quarter"]
        sp = a["speedup"][m]["cd"]["ct_final"]
        assert sp["ratio"] > 0 or math.isinf(sp["ratio"]) or math.isnan(sp["ratio"])
        curve = res["curves"]["random_64"]["ct"][m]
        assert len(curve) == 2 and len(curve[0]) == len(res["design"]["checkpoints"])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["design"]["primary"] == list(primary)
    assert set(saved["timing"]) == {"random_64/ct", "random_64/cd"}


def test_jobs_in_worker_processes_give_the_in_process_results(script, tmp_path):
    """The script run as a user runs it (two spawned workers, jobs finishing in any order) writes
    the same per-seed metrics as one process running the jobs in turn: each job is seeded by its
    seeds alone and the rows are put in the design's order whatever order the jobs end in."""
    import csv
    import subprocess

    argv = ["--quick", "--seeds", "2", "--methods", "ot", "ct", "cd", "--steps", "24", "--quiet"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--workers", "2", "--out", str(tmp_path / "pool")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "workers 2" in proc.stdout
    script.main([*argv, "--workers", "1", "--out", str(tmp_path / "one")])

    def rows(sub):
        (run_dir,) = list((tmp_path / sub).iterdir())
        with open(run_dir / "results.csv") as f:
            return list(csv.DictReader(f))

    pool, one = rows("pool"), rows("one")
    assert [(r["method"], r["seed"]) for r in pool] == [
        (m, s) for m in ("ct", "cd", "ot") for s in ("0", "1")
    ]
    assert pool == one


def test_robustness_runs_scale_the_rate_and_are_compared_at_equal_rates(script):
    """``--robustness`` runs CT and GC at half and twice the rate (the factor on the recipe's
    rate, nothing else changed) and GC with a constant EMA; the analysis pairs GC with CT at
    the same rate and the constant EMA with the warm-up one, as ``run - baseline``."""
    args = script.parse_args(["--robustness", "--methods", "ct", "gc0.5"])
    recipe = script.design(args)["recipe"]
    specs = script.specs_of(args, recipe, 1.0)
    assert specs["ct@lr/2"].lr == recipe["lr"] / 2 and specs["gc0.5@lr*2"].lr == 2 * recipe["lr"]
    assert specs["gc0.5-constema"].gc_model == "const_ema" and specs["gc0.5"].gc_model == "ema"
    assert specs["gc0.5@lr/2"].method == "gc" and specs["gc0.5@lr/2"].mu == 0.5

    rng = np.random.default_rng(0)
    steps = script.checkpoints(240)
    metrics = script.METRICS

    def run(shift):
        curves = {m: rng.uniform(1, 2, (4, len(steps))) for m in script.CURVE_METRICS}
        return dict(curves=curves, final={m: 1.0 + shift + rng.normal(0, 1e-3, 4) for m in metrics})

    res = {
        name: run(shift)
        for name, shift in [
            ("ct", 0.0),
            ("gc0.5", 0.1),
            ("ct@lr/2", 0.5),
            ("gc0.5@lr/2", 0.2),
            ("ct@lr*2", 0.0),
            ("gc0.5@lr*2", 0.3),
            ("gc0.5-constema", 0.4),
        ]
    }
    for r in res.values():
        r["online"] = r["final"]
    rob = script.analyse(res, steps, script.PRIMARY)["robustness"]
    m = script.PRIMARY[0]
    assert rob["gc0.5 - ct @lr/2"][m]["mean"] == pytest.approx(-0.3, abs=5e-3)
    assert rob["gc0.5 - ct @lr*2"][m]["mean"] == pytest.approx(0.3, abs=5e-3)
    assert rob["gc0.5-constema - gc0.5"][m]["mean"] == pytest.approx(0.3, abs=5e-3)
