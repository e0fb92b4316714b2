"""Smoke test of experiments/toy_discrepancy.py: ``--quick`` end to end in a subprocess.

Checks the run folder (config.json with seed / git SHA / versions / device, results.json,
results.csv, the figures), that every number is finite and the pieces are consistent with each
other, that the summary table is printed last, and that a changed seed changes the numbers
within their intervals.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "toy_discrepancy.py"
METHODS = [
    "cd_exact",
    "cd_distilled",
    "ct",
    "ot",
    "gc_mu0.3",
    "gc_mu0.5",
    "gc_mu1.0",
    "gc_ideal",
]
FIGURES = [
    "scaled_gap.png",
    "gap_ratio.png",
    "gradient_gap.png",
    "proxy_rtilde.png",
    "training_curves.png",
    "consistency_vs_t.png",
    "samples.png",
    "trajectories.png",
]


def _run(out: Path, *extra: str) -> tuple[Path, str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    runs = list(out.glob("toy_discrepancy_*"))
    assert len(runs) == 1, runs
    return runs[0], proc.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("runs"))


def _finite(obj, path="results") -> None:
    """Every number in a JSON tree is finite (None marks an undefined value, e.g. one seed's se)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), path


def test_run_folder(quick_run):
    run_dir, stdout = quick_run
    for name in ["config.json", "results.json", "results.csv", *FIGURES]:
        assert (run_dir / name).is_file(), name
    for name in FIGURES:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    config = json.loads((run_dir / "config.json").read_text())
    for key in ("seed", "git_sha", "versions", "device", "command", "args", "setup"):
        assert key in config, key
    assert config["seed"] == [0, 1] and config["args"]["quick"] is True
    assert config["versions"]["torch"]
    # the summary table is the last thing printed: its header, then one line per method
    tail = stdout.strip().splitlines()
    header = next(i for i, line in enumerate(tail) if line.startswith("method"))
    assert [line.split()[0] for line in tail[header + 2 :]] == METHODS


def test_results_are_finite_and_consistent(quick_run):
    run_dir, _ = quick_run
    res = json.loads((run_dir / "results.json").read_text())
    _finite(res)
    theory = res["theorem1"]["by_model"]
    assert set(theory) == {"random init", "trained (ct, seed 0)"}
    for label, t in theory.items():
        lim = t["limits"]
        # the three limits come from the same R(theta) estimates: C T^(alpha-1) R
        c = 0.00054 * math.sqrt(2)
        assert lim["pseudo_huber"]["mean"] == pytest.approx(lim["squared_l2"]["mean"] / (2 * c))
        span = res["setting"]["t_max"] - res["setting"]["t_min"]
        assert lim["squared_l2"]["mean"] == pytest.approx(span * t["r_theta_alpha2"]["mean"])
        assert lim["l2_norm"]["mean"] == pytest.approx(t["r_theta_alpha1"]["mean"])
        assert t["r_theta_alpha2"]["mean"] > 0 and t["r_theta_alpha1"]["mean"] > 0
        check = res["theorem1"]["checks"][label]
        ratio = check["alpha2_ratio_at_1280_same_draws"]
        # even at the quick sizes (2000 draws) the alpha = 2 ratio at N = 1280 is within 5 %
        # of 1 up to its interval (Riemann-sum bias ~2 % here, see docs/experiments.md)
        assert abs(ratio["mean"] - 1) < 0.05 + 2 * ratio["se"], (label, ratio)
        assert ratio["ci95"][0] <= ratio["mean"] <= ratio["ci95"][1]
        gaps = {(g["distance"], g["N"]): g for g in t["gaps"]}
        assert {n for (_, n) in gaps} >= {10, 1280}
        for g in t["grads"]:
            assert g["grad_cd"] > 0 and g["relative"] >= 0 and g["noise"] >= 0
    proxy = res["proxy"]
    assert set(proxy["by_coupling"]) == {"ic_exact", "ic_knn", "ot", "gc_ideal", "gc_trained"}
    for vals in proxy["by_coupling"].values():
        assert len(vals["mean"]) == len(proxy["times"])
        assert all(m > 0 for m in vals["mean"])
    assert len(proxy["ordering_by_t"]) == len(proxy["times"])
    assert set(proxy["large_t_ordering"]) == {"gc_ideal", "gc_trained"}
    # the k-NN estimator agrees with the exact IC value within its noise (|z| < 5)
    assert proxy["knn_max_abs_z"] < 5
    training = res["training"]
    assert list(training) == METHODS
    for t in training.values():
        f = t["per_seed_final"]
        assert f["seeds"] == [0, 1]
        assert all(w >= 0 for w in f["w2"]) and all(e >= 0 for e in f["consistency_error"])
        assert all(0 <= b <= 1 for b in f["mode_balance_tv"])
        assert t["final"]["w2"]["mean"] == pytest.approx(sum(f["w2"]) / 2)
    with open(run_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"section", "subject", "quantity", "value"} <= set(rows[0])
    assert {r["section"] for r in rows} == {
        "theorem1_gap",
        "theorem1_grad",
        "theorem1_limit",
        "proxy",
        "training",
    }


def test_changed_seed_changes_the_numbers(quick_run, tmp_path):
    run_dir, _ = quick_run
    other, _ = _run(tmp_path, "--seeds", "5", "--skip-training", "--workers", "1")
    a = json.loads((run_dir / "results.json").read_text())
    b = json.loads((other / "results.json").read_text())
    assert a["proxy"]["times"] == b["proxy"]["times"]
    pa, pb = a["proxy"]["by_coupling"], b["proxy"]["by_coupling"]
    changed = 0
    for coupling in ("ic_exact", "ot", "gc_ideal"):
        for ma, sa, mb, sb in zip(
            pa[coupling]["mean"],
            pa[coupling]["se"],
            pb[coupling]["mean"],
            pb[coupling]["se"],
            strict=True,
        ):
            changed += ma != mb
            # the same quantity: within 5 combined standard errors (false alarm ~6e-7 each);
            # 1e-9 relative slack where the value is deterministic (se ~ 0, e.g. IC at small t)
            assert abs(ma - mb) < 5 * math.hypot(sa, sb) + 1e-9 * abs(ma), (coupling, ma, mb)
    assert changed >= len(pa["ot"]["mean"])  # new draws: the Monte-Carlo values moved
    ra = a["theorem1"]["by_model"]["random init"]["r_theta_alpha2"]["mean"]
    rb = b["theorem1"]["by_model"]["random init"]["r_theta_alpha2"]["mean"]
    assert ra != rb  # another initialisation of the network
    assert b["training"] == {}
