"""Smoke test of the ensemble workload of experiments/bench_training.py (tiny settings).

The JSON record must hold one row per (target, width, S) with positive rates, ratios that are the
medians of the per-repeat ratios (one repeat: the rates' ratio) and the goal marked from the wall
ratio; bad ensemble arguments are refused before any work.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_training", ROOT / "experiments" / "bench_training.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ensemble_workload_tiny(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--workloads", "ensemble", "--threads", "1", "--ens-targets", "random_64"]
    argv += ["--ens-widths", "8", "--ens-seeds", "2", "3", "--ens-steps", "2"]
    argv += ["--ens-seq-seeds", "1", "--repeats", "1", "--out", str(out)]
    bench.main(argv)
    rec = json.loads(out.read_text())
    info = rec["results"]["ensemble"]
    assert len(info["load_before"]) == 3 and len(info["load_after"]) == 3
    rows = info["rows"]
    assert [(row["target"], row["width"], row["seeds"]) for row in rows] == [
        ("random_64", 8, 2),
        ("random_64", 8, 3),
    ]
    for row in rows:
        for clock in ("wall", "cpu"):
            seq, ens = row[f"sequential_{clock}"], row[f"ensemble_{clock}"]
            assert seq > 0 and ens > 0
            assert math.isclose(row[f"ratio_{clock}"], ens / seq, rel_tol=1e-9)
        assert row["goal_met"] == (row["ratio_wall"] >= 4.0)
    assert "| random_64 | 8 | 3 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        (["--ens-targets", "random_16"], "--ens-targets"),
        (["--ens-seeds", "0"], "--ens-seeds"),
        (["--ens-steps", "1"], "--ens-steps"),
    ],
)
def test_bad_ensemble_arguments_are_refused(bench, extra, word, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--workloads", "ensemble", *extra])
    assert exc.value.code == 2 and word in capsys.readouterr().err
