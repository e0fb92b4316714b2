"""Smoke test of experiments/transport_cost.py: the --quick run finishes, writes its run folder
(config, results, figures) with finite numbers, and prints the summary table last."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "transport_cost.py"
FIGURES = ("cost_vs_t_ve.png", "cost_vs_t_linear.png", "ot_vs_batch.png", "lemma1.png")


def _finite_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _finite_numbers(v)]
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        return []
    return [float(obj)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("transport")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    return run_dir, proc.stdout


def test_quick_run_writes_the_run_folder(quick_run):
    run_dir, _ = quick_run
    for name in ("config.json", "results.json", "results.csv", *FIGURES):
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_size > 0, name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["seed"] == 0
    assert "git_sha" in config and "versions" in config and config["device"] in ("cpu", "cuda")
    assert config["args"]["quick"] is True


def test_quick_run_numbers_are_finite_and_consistent(quick_run):
    run_dir, _ = quick_run
    res = json.loads((run_dir / "results.json").read_text(), parse_constant=float)
    for row in res["summary"]:
        values = [v for k, v in row.items() if "/IC" in k and v is not None] + [row["IC"]]
        assert values and all(math.isfinite(v) and v > 0 for v in values), row
    for name, entry in res["datasets"].items():
        for ot in entry["batch_ot"]:
            # the identity is one of the permutations: batch-OT never costs more than IC on
            # the same batches, so every paired gain is >= 0 and so is its mean
            assert ot["gain"]["mean"] >= -1e-9, name
            assert all(math.isfinite(c) for c in ot["per_batch"])
        for curve in entry["gc_ideal"].values():
            assert all(math.isfinite(p["mean"]) for p in curve["cost"])
    assert res["lemma1"], "Lemma 1 was not checked"
    for check in res["lemma1"]:
        nums = _finite_numbers({k: check[k] for k in ("fd", "lemma", "diff", "w2", "jww")})
        assert nums and all(math.isfinite(x) for x in nums)
    with open(run_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(math.isfinite(float(r["cost"])) for r in rows)
    assert {"ic", "ot", "sinkhorn", "gc_ideal", "gc_model_ct", "gc_model_gc"} <= {
        r["coupling"] for r in rows
    }


def test_quick_run_prints_the_summary_table_last(quick_run):
    _, stdout = quick_run
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    title = max(i for i, ln in enumerate(lines) if ln.startswith("Transport cost relative to IC"))
    header, rule, *body = lines[title + 1 :]
    assert header.split()[:3] == ["dataset", "d", "IC"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert [ln.split()[0] for ln in body] == ["two_gaussians_1to2", "mixture-16d", "digits"]


def test_unusable_checkpoint_fails_before_any_work(tmp_path, capsys):
    # in-process (argparse exits with status 2 and the message on stderr)
    spec = importlib.util.spec_from_file_location("transport_cost_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bad = tmp_path / "missing.pt"
    with pytest.raises(SystemExit) as exc:
        module.main(["--quick", "--out", str(tmp_path), "--checkpoint", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "does not exist" in err
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # no run folder was created
