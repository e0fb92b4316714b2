"""Smoke test of experiments/bench_kernels.py on CPU: ``--quick --contended`` end to end.

The contended mode must start its own competing process, time the same table while it runs, and
leave no process behind; the table's ratios must be those of its rows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_contended_quick(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_kernels.py"), "--device", "cpu"]
    cmd += ["--quick", "--contended", "--repeats", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["contended"] is True and config["competitor_ran_throughout"] is True
    try:  # the competitor was killed and reaped
        os.kill(config["competitor_pid"], 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"competitor {config['competitor_pid']} still runs")
    res = json.loads((out / "results.json").read_text())
    rows = {(row["op"], row["method"]): row for row in res["rows"]}
    ours = rows[("interpolate_pair", "torch backend")]["median_ms"]
    for (op, _), row in rows.items():
        if op == "interpolate_pair":
            assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
            assert math.isclose(row["vs"], row["median_ms"] / ours, rel_tol=1e-9)
    assert any("ran throughout" in n for n in res["notes"])
    assert r.stdout.rstrip().splitlines()[-1].startswith("pairwise_sqdist")  # the table is last
