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

from gcflows import highdim_proxy as hp
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
    assert all(r["reference_per_d"] > 0 for r in res["ic_validation"])
    assert {r["coupling"] for r in res["ic_validation"]} >= {"ic", "gc1-ideal"}
    # every proxy point comes with its n/2-pairs estimate and convergence margin
    for curve in res["proxy_curves"]["random_16"].values():
        assert len(curve["value_half"]) == len(curve["value"]) == len(curve["converged"])
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
        ["--workers", "0"],
        ["--reg-seed", "-1"],
        ["--conv-tol", "0"],
        ["--conv-tol", "nan"],
        ["--train-256", "--skip-train"],
        ["--quick", "--pairs", "8", "8", "8", "8", "8", "8"],  # six numbers, quick has 3 times
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

    def stop(cfg, bar, *rest, **kw):
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
    order = hp.ordering_verdicts(curves, [0.1, 1.0])
    assert order[0]["gc<ot<ic"] and not order[1]["gc<ot<ic"]
    assert order[1]["order"] == "ot512 < gc1-ideal < ic"
    (v,) = hp.target_verdict(order)
    assert v["held"] == 1 and v["of"] == 2


def test_an_unusable_out_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as err:
        hs.parse_args(["--out", str(tmp_path / "file" / "sub")])
    assert err.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "--out" in lines[0]


def test_explicit_values_win_over_quick(tmp_path, monkeypatch):
    """--quick fills only what is not given: explicit sizes, seeds, steps and tolerances stay."""
    args = hs.parse_args(["--quick", "--seeds", "5", "--steps", "9", "--out", str(tmp_path)])
    assert args.seeds == 5 and args.steps == 9
    seen = {}

    def stop(cfg, bar, workers, threads, on_job=None):
        seen.update(cfg, workers=workers)
        raise KeyboardInterrupt

    monkeypatch.setattr(hs, "proxy_part", stop)
    argv = [
        "--quick",
        "--skip-train",
        "--quiet",
        "--out",
        str(tmp_path),
        "--pairs",
        "40",
        "41",
        "42",
        "--test-pairs",
        "33",
        "--reg-steps",
        "17",
        "--conv-tol",
        "0.2",
        "--workers",
        "3",
    ]
    with pytest.raises(KeyboardInterrupt):
        hs.main(argv)
    assert seen["n_train"] == [40, 41, 42] and seen["n_test"] == 33
    assert seen["regressor"]["max_steps"] == 17 and seen["conv_tol"] == 0.2
    assert seen["workers"] == 3 and seen["regressor"]["hidden"] == 32  # the rest from --quick


def test_gc_closed_forms_of_the_study_targets():
    """The closed form the study validates GC against (ideal generator, mu = 1, t = 0.05, modes
    not mixing): 6.556 (random_16) and 34.31 (random_64) in total over coordinates; no closed
    form for the digits mixture (full covariances) or for a coupling without the ideal generator;
    the non-mixing test passes at t = 0.05 and fails at t = 0.2 on random_16."""
    r16, r64 = get_preset("random_16"), get_preset("random_64")
    assert hp.closed_form(r16, "gc1-ideal", 0.05)[0] == pytest.approx(6.556, abs=1e-3)
    assert hp.closed_form(r64, "gc1-ideal", 0.05)[0] == pytest.approx(34.31, abs=1e-2)
    value, hw = hp.closed_form(r16, "gc0.5-ideal", 0.05)
    assert 6.556 < value < 16 * 0.00799 / (0.00799 + 0.0025) and hw < 1e-3 * value
    assert hp.closed_form(get_preset("digits_mixture"), "gc1-ideal", 0.05) is None
    assert hp.closed_form(r16, "ot512", 0.05) is None
    assert hp.non_mixing(r16, 0.05) and not hp.non_mixing(r16, 0.2)


def test_orderings_include_the_convergence_margin():
    """Two couplings whose sampling intervals separate but whose convergence margins overlap are
    not ordered ('~'), and the claim is not called there."""

    def est(v, margin):
        return {"value": [v], "half_width": [0.1], "margin": [margin]}

    sep = {"a": {"ic": est(4.0, 0.0), "ot512": est(3.0, 0.0), "gc1-ideal": est(1.0, 0.0)}}
    (row,) = hp.ordering_verdicts(sep, [0.1])
    assert row["gc<ot<ic"] and row["order"] == "gc1-ideal < ot512 < ic"
    wide = {"a": {"ic": est(4.0, 0.0), "ot512": est(3.0, 1.0), "gc1-ideal": est(1.0, 0.0)}}
    (row,) = hp.ordering_verdicts(wide, [0.1])
    assert not row["gc<ot<ic"] and row["order"] == "gc1-ideal < ot512 ~ ic"
