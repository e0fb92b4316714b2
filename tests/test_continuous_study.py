"""experiments/continuous_study.py --quick runs end to end as a subprocess (< 60 s)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
