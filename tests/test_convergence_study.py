"""experiments/convergence_study.py: a tiny run end to end, and every argument checked before
any work (one ``error:`` line, exit 2, no run folder)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

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
        (["--targets", "random_7"], "--targets='random_7' is invalid"),
        (["--methods", "gc9"], "--methods='gc9' is invalid"),
        (["--full"], "--quick and --full"),
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
        ]
    )
    (run_dir,) = list(tmp_path.iterdir())
    for name in ("config.json", "results.json", "results.csv", "learning_curves.png"):
        assert (run_dir / name).exists(), name
    a = res["analysis"]["random_64"]
    primary = res["design"]["primary"]
    assert set(a["paired_vs_ct"]) == {"cd"}
    pc = a["paired_vs_ct"]["cd"][primary]
    assert pc["n"] == 2 and pc["method"] == "student-t" and pc["lo"] <= pc["mean"] <= pc["hi"]
    assert primary in a["ct_last_quarter"]
    sp = a["speedup"]["cd"]["ct_final"]
    assert sp["ratio"] > 0 or math.isinf(sp["ratio"]) or math.isnan(sp["ratio"])
    curve = res["curves"]["random_64"]["ct"][primary]
    assert len(curve) == 2 and len(curve[0]) == len(res["design"]["checkpoints"])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["design"]["primary"] == primary
    assert set(saved["timing"]) == {"random_64/ct", "random_64/cd"}
