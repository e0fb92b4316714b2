"""experiments/highdim_study.py: the --quick run end to end, and its exact metrics."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gcflows.gmm import get_preset

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "highdim_study", ROOT / "experiments/highdim_study.py"
)
hs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(hs)


def test_quick_run_writes_the_run_folder(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "highdim_study.py"),
        "--quick",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = list(tmp_path.iterdir())
    for name in ("config.json", "results.json", "results.csv", "proxy.png", "training_curves.png"):
        assert (run / name).is_file(), name
    res = json.loads((run / "results.json").read_text())
    assert {r["target"] for r in res["ic_validation"]} == {"random_16", "digits_mixture"}
    assert all(r["exact_per_d"] > 0 for r in res["ic_validation"])
    paired = res["paired_vs_ct"]["random_16"]["cons_err"]
    assert set(paired) == {"ot", "gc0.5", "gc0.5-online"}
    for mean, lo, hi in paired.values():
        assert lo <= mean <= hi
    # the summary table is printed last
    assert "paired difference vs CT" in "\n".join(out.stdout.splitlines()[-8:])


def test_arguments_validated_before_the_run_folder(tmp_path):
    for bad in (["--seeds", "1"], ["--steps", "2"], ["--skip-proxy", "--skip-train"]):
        with pytest.raises(SystemExit):
            hs.parse_args(["--out", str(tmp_path / "x"), *bad])
    assert not (tmp_path / "x").exists()


def test_sample_metrics_are_near_zero_on_exact_samples():
    target = get_preset("random_16")
    g = torch.Generator().manual_seed(0)
    x = target.sample(4000, generator=g).float()
    ref = target.sample(4000, generator=g).float()
    m = hs.sample_metrics(target, x, ref)
    assert m["mode_tv"] < 0.03  # multinomial spread of 8 masses with 4000 samples
    assert m["mean_err_per_d"] < 0.01 * float(target.stds[0]) ** 2 * 10
    assert m["cov_rel_err"] < 0.2
    # dropping a mode shows up as its weight in the total variation
    comp = target.responsibilities(x.double(), 0.002, "ve").argmax(1)
    m2 = hs.sample_metrics(target, x[comp != 0], ref)
    assert m2["mode_tv"] == pytest.approx(float(target.weights[0]), abs=0.03)


def test_paired_interval_and_verdicts():
    rng = np.random.default_rng(0)
    base = rng.normal(size=10)
    out = hs.paired({"ct": base, "gc": base - 1.0 + 0.01 * rng.normal(size=10)})
    mean, lo, hi = out["gc"]
    assert lo < -1.0 < hi and hi < 0
    curves = {
        "a": {
            "ic": {"value": [4.0, 2.0], "half_width": [0.1, 0.1]},
            "ot512": {"value": [3.0, 1.0], "half_width": [0.1, 0.1]},
            "gc1-ideal": {"value": [1.0, 1.5], "half_width": [0.1, 0.1]},
        }
    }
    order = hs.ordering_verdicts(curves, [0.1, 1.0])
    assert order[0]["gc<ot<ic"] and not order[1]["gc<ot<ic"]
    assert order[1]["order"] == "ot512 < gc1-ideal < ic"
    (v,) = hs.target_verdict(order)
    assert v["held"] == 1 and v["of"] == 2
