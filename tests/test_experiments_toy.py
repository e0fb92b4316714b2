"""Smoke test of experiments/toy_discrepancy.py: ``--quick`` end to end in a subprocess.

Checks the run folder (config.json with seed / git SHA / versions / device, results.json,
results.csv, the figures), that every number is finite and the pieces are consistent with each
other, that the summary table is printed last, that a changed seed changes the numbers within
their intervals, the progress display (a bar on a terminal, log lines with ``--quiet``), and that
every bad argument fails at once, with one message and no run folder.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from _terminal import run_on_a_terminal
from conftest import assert_refused_at_once

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


def _run(out: Path, *extra: str) -> tuple[Path, str, str]:
    """The script in a subprocess whose stderr is a terminal (a pty): ``(run, stdout, stderr)``."""
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra]
    code, stdout, err = run_on_a_terminal(cmd, cwd=ROOT)
    assert code == 0, stdout[-2000:] + err[-4000:]
    runs = list(out.glob("toy_discrepancy_*"))
    assert len(runs) == 1, runs
    return runs[0], stdout, err


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("runs"), "--quiet")


def _load_script():
    spec = importlib.util.spec_from_file_location("toy_discrepancy_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
    run_dir, stdout, stderr = quick_run
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
    # --quiet on a terminal: one line per job (20 computations and 4 figure jobs at the quick
    # sizes), no bar redrawn
    assert "\r" not in stderr.replace("\r\n", "\n")
    done = [line for line in stderr.splitlines() if " done: " in line]
    assert len(done) == 24 and done[-1].split()[2] == "24/24"
    assert sum(": figures: " in line for line in done) == 4
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["figures"]) == FIGURES
    # what the scheduler guarantees (parent clock): every job starts after the jobs it needs
    # ended; the first job to start is the first seed's CT training, which has the longest path
    # to the end (its Theorem 1 follow-up and that figure wait for it)
    schedule = results["timing_s"]["schedule"]
    assert len(schedule) == 24 and next(iter(schedule)) == "train ct seed 0", list(schedule)
    needs = {
        "theorem 1, trained (ct, seed 0)": ["train ct seed 0"],
        "proxy gc_trained": ["train gc_mu0.5 seed 0"],
        "figures: theorem1": ["theorem 1, random init", "theorem 1, trained (ct, seed 0)"],
        "figures: proxy": ["proxy ic_exact/ic_knn/ot/gc_ideal", "proxy gc_trained"],
        "figures: training": [f"train {m} seed {s}" for m in METHODS for s in (0, 1)],
        "figures: samples": [f"train {m} seed {s}" for m in METHODS for s in (0, 1)],
    }
    for job, deps in needs.items():
        for dep in deps:
            assert schedule[job][0] >= schedule[dep][1], (job, dep, schedule[job], schedule[dep])
    assert "Traceback" not in stderr


def test_results_are_finite_and_consistent(quick_run):
    run_dir, _, _ = quick_run
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
        assert ratio["lo"] <= ratio["mean"] <= ratio["hi"] and ratio["method"] == "paired-ratio"
        gaps = {(g["distance"], g["N"]): g for g in t["gaps"]}
        assert {n for (_, n) in gaps} >= {10, 1280}
        for g in t["grads"]:
            assert g["grad_cd"] > 0 and g["relative"] >= 0 and g["noise"] >= 0
    proxy = res["proxy"]["summary"]
    assert set(proxy["by_coupling"]) == {"ic_exact", "ic_knn", "ot", "gc_ideal", "gc_trained"}
    for vals in proxy["by_coupling"].values():
        assert len(vals) == len(proxy["times"])
        assert all(v["mean"] > 0 and v["lo"] <= v["mean"] <= v["hi"] for v in vals)
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
    run_dir, _, _ = quick_run
    other, _, stderr = _run(tmp_path, "--seeds", "5", "--skip-training", "--workers", "1")
    # on a terminal without --quiet: a tqdm bar, jobs done of total, redrawn in place
    assert "\r" in stderr and "4/4" in stderr and "job" in stderr  # 2 computations, 2 figures
    a = json.loads((run_dir / "results.json").read_text())
    b = json.loads((other / "results.json").read_text())
    assert a["proxy"]["summary"]["times"] == b["proxy"]["summary"]["times"]
    pa, pb = a["proxy"]["summary"]["by_coupling"], b["proxy"]["summary"]["by_coupling"]
    changed = 0
    for coupling in ("ic_exact", "ot", "gc_ideal"):
        for ea, eb in zip(pa[coupling], pb[coupling], strict=True):
            ma, sa, mb, sb = ea["mean"], ea["se"], eb["mean"], eb["se"]
            changed += ma != mb
            # the same quantity: within 5 combined standard errors (false alarm ~6e-7 each);
            # 1e-9 relative slack where the value is deterministic (se ~ 0, e.g. IC at small t)
            assert abs(ma - mb) < 5 * math.hypot(sa, sb) + 1e-9 * abs(ma), (coupling, ma, mb)
    assert changed >= len(pa["ot"])  # new draws: the Monte-Carlo values moved
    ra = a["theorem1"]["by_model"]["random init"]["r_theta_alpha2"]["mean"]
    rb = b["theorem1"]["by_model"]["random init"]["r_theta_alpha2"]["mean"]
    assert ra != rb  # another initialisation of the network
    assert b["training"] == {}


BAD_ARGUMENTS = [
    (["--steps", "0"], "--steps=0 is invalid"),
    (["--batch-size", "0"], "--batch-size=0 is invalid"),
    (["--lr", "-1"], "--lr=-1.0 is invalid"),
    (["--ema-decay", "1.5"], "--ema-decay=1.5 is invalid"),
    (["--hidden", "0"], "--hidden=0 is invalid"),
    (["--s1", "0"], "--s1=0 is invalid"),
    (["--n-eval", "1"], "--n-eval=1 is invalid"),
    (["--workers", "0"], "--workers=0 is invalid"),
    (["--ideal-mu", "1.5"], "--ideal-mu=1.5 is invalid"),
    (["--t-min", "-1"], "t_min"),
    (["--seeds", "1", "1"], "--seeds"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=lambda a: " ".join(a))
def test_bad_arguments_fail_at_once_without_a_run_folder(argv, message, tmp_path, capsys):
    assert_refused_at_once(_load_script().main, argv, message, tmp_path, capsys)


def test_bad_argument_in_a_subprocess_is_one_message_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--steps", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1].endswith("--steps=0 is invalid: use an integer >= 1")
    )
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        _load_script().main(["--quick", "--out", str(blocker / "runs")])
    assert exc.value.code == 2
    assert "cannot hold a run folder" in capsys.readouterr().err


def test_explicit_values_win_over_quick_and_unused_ones_are_named(tmp_path, capsys):
    module = _load_script()
    args = module.parse_args(["--quick", "--steps", "7", "--n-eval", "30", "--out", str(tmp_path)])
    assert (args.steps, args.n_eval, args.seeds) == (7, 30, [0, 1])
    setup = module.build_setup(args)
    assert setup.steps == 7 and setup.sizes.n_eval == 30
    assert setup.record()["steps"] == 7 and setup.record()["n_eval"] == 30  # config.json
    args = module.parse_args(["--quick", "--out", str(tmp_path)])
    assert (args.steps, args.n_eval) == (24, 200)
    module.parse_args(["--quick", "--skip-training", "--lr", "0.1", "--out", str(tmp_path)])
    assert capsys.readouterr().err.strip() == "warning: --skip-training ignores --lr"
