"""Smoke test of experiments/bench_gpu_step.py on CPU (the GPU run is scripts/gpu_check_kernels.sh).

Runs the CIFAR-10 U-Net presets for two tiny steps per method in a subprocess and checks the
results it writes: one row per method with a positive finite rate and a finite loss, the curriculum
size of the preset, and the GC / CT and OT / CT ratios equal to the ratios of the rows' rates.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.fast
def test_bench_gpu_step_smoke_cpu(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_gpu_step.py")]
    cmd += ["--device", "cpu", "--steps", "2", "--batch", "4", "--warmup", "0", "--out", str(out)]
    r = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in res["rows"]}
    assert set(rows) == {"ct", "ot", "gc"}
    for row in rows.values():
        assert math.isfinite(row["steps_per_s"]) and row["steps_per_s"] > 0
        assert math.isclose(row["ms_per_step"] * row["steps_per_s"], 1e3, rel_tol=1e-9)
        assert math.isfinite(row["last_loss"]) and row["last_loss"] >= 0
        assert row["peak_mem_MiB"] is None  # CPU: no device memory counter
        assert row["num_intervals"] >= 10  # mid-curriculum of s0 = 10 .. s1 = 1280
    ratios = res["step_time_ratios"]
    for m in ("gc", "ot"):
        expect = rows["ct"]["steps_per_s"] / rows[m]["steps_per_s"]
        assert math.isclose(ratios[f"{m}/ct"], expect, rel_tol=1e-12)
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["batch"] == 4 and config["args"]["device"] == "cpu"
    assert "gc/ct" in r.stdout and r.stdout.count("\n") >= 5


def test_bench_gpu_step_rejects_bad_arguments(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_gpu_step.py"), "--steps", "0"]
    r = subprocess.run(cmd + ["--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--steps >= 1" in r.stderr
