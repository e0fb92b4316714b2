"""experiments/highdim_study.py: the --quick run end to end, and its exact metrics."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _terminal import run_on_a_terminal

from gcflows.gmm import get_preset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "highdim_study.py"
_SPEC = importlib.util.spec_from_file_location("highdim_study", SCRIPT)
hs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(hs)


def _run_on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """The script with stderr on a new pseudo-terminal: ``(returncode, stdout, stderr)``."""
    cmd = [sys.executable, str(SCRIPT), *args]
    return run_on_a_terminal(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)


def test_quick_run_writes_the_run_folder_with_a_bar_on_a_terminal(tmp_path):
    code, stdout, stderr = _run_on_a_terminal(["--quick", "--out", str(tmp_path)])
    assert code == 0, stderr[-2000:]
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
    assert "paired difference vs CT" in "\n".join(stdout.splitlines()[-8:])
    # a tqdm bar redrawn in place (carriage returns) that reaches every job, no log lines
    n_jobs = 3 * 2 + 4 + 2  # 3 couplings x 2 proxy targets, 4 methods, 2 trained-GC proxies
    assert "highdim_study" in stderr and "\r" in stderr
    assert f"{n_jobs}/{n_jobs}" in stderr and "done:" not in stderr


def test_quiet_logs_one_line_per_job_and_draws_no_bar(tmp_path):
    args = ["--quick", "--skip-train", "--proxy-targets", "random_16", "--couplings", "ic"]
    code, _, stderr = _run_on_a_terminal([*args, "--quiet", "--out", str(tmp_path)])
    assert code == 0, stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if "done:" in ln]
    assert len(lines) == 1 and "1/1 done: proxy random_16 ic" in lines[0]
    assert "\r" not in stderr.replace("\r\n", "\n")  # a pty turns \n into \r\n


@pytest.mark.parametrize(
    "bad",
    [
        ["--seeds", "1"],
        ["--steps", "2"],
        ["--skip-proxy", "--skip-train"],
        ["--quick", "--full"],
        ["--proxy-targets", "random_7"],
        ["--pairs", "8", "8"],  # neither one number nor one per time
        ["--pairs", "8"],
        ["--test-pairs", "4"],
        ["--reg-steps", "0"],
        ["--regressor", "[1, 2]"],
        ["--regressor", '{"hidden": 0}'],
        ["--regressor", '{"no_such_field": 1}'],
        ["--couplings", "ot64"],
        ["--threads", "0"],
        ["--estimator", "knn"],
    ],
)
def test_arguments_validated_before_the_run_folder(tmp_path, bad, capsys):
    with pytest.raises(SystemExit):
        hs.parse_args(["--out", str(tmp_path / "x"), *bad])
    assert not (tmp_path / "x").exists()
    flag = bad[0] if bad[0] not in ("--skip-proxy", "--quick") else bad[1]
    assert flag in capsys.readouterr().err  # the message names the argument


def test_new_flags_reach_the_settings(tmp_path, monkeypatch):
    """--pairs (one per time), --test-pairs, --reg-steps, --regressor and --couplings change the
    recorded settings (checked through the config the run writes, with the run itself stubbed)."""
    seen = {}

    def stop(cfg, bar):
        seen.update(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(hs, "proxy_part", stop)
    argv = [
        "--skip-train",
        "--quiet",
        "--out",
        str(tmp_path),
        "--pairs",
        *map(str, [64, 128, 256, 512, 64, 64]),
        "--test-pairs",
        "32",
        "--reg-steps",
        "77",
        "--regressor",
        '{"hidden": 16}',
        "--couplings",
        "ic",
        "ot512",
        "--reg-seed",
        "5",
        "--estimator",
        "held-out",
    ]
    with pytest.raises(KeyboardInterrupt):
        hs.main(argv)
    assert seen["n_train"] == [64, 128, 256, 512, 64, 64] and seen["n_test"] == 32
    assert seen["regressor"]["max_steps"] == 77 and seen["regressor"]["hidden"] == 16
    assert seen["couplings"] == ["ic", "ot512"] and seen["reg_seed"] == 5
    assert seen["estimator"] == "held-out" and hs.settings(False)["estimator"] == "product"
    (run,) = list(tmp_path.iterdir())
    recorded = json.loads((run / "config.json").read_text())["settings"]
    assert recorded["n_train"] == seen["n_train"] and recorded["couplings"] == ["ic", "ot512"]


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
