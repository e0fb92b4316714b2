"""Smoke test of experiments/transport_cost.py: the --quick run finishes, writes its run folder
(config, results, figures) with finite numbers, shows its progress on a terminal and prints the
summary table last; bad arguments fail at once with one message and no run folder."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from _terminal import run_on_a_terminal
from conftest import assert_refused_at_once

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
    """The --quick run with stderr on a terminal (a pty): ``(run folder, stdout, stderr)``."""
    out = tmp_path_factory.mktemp("transport")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out)]
    code, stdout, err = run_on_a_terminal(cmd, cwd=ROOT)
    assert code == 0, err[-3000:]
    (run_dir,) = list(out.iterdir())
    return run_dir, stdout, err


def _load_script():
    spec = importlib.util.spec_from_file_location("transport_cost_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_the_run_folder(quick_run):
    run_dir, _, stderr = quick_run
    for name in ("config.json", "results.json", "results.csv", *FIGURES):
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_size > 0, name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["seed"] == 0
    assert "git_sha" in config and "versions" in config and config["device"] in ("cpu", "cuda")
    assert config["args"]["quick"] is True
    # progress on a terminal: a tqdm bar over the 7 sections, redrawn in place
    assert "\r" in stderr and "7/7" in stderr and "Traceback" not in stderr


def test_quick_run_numbers_are_finite_and_consistent(quick_run):
    run_dir, _, _ = quick_run
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
    _, stdout, _ = quick_run
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    title = max(i for i, ln in enumerate(lines) if ln.startswith("Transport cost relative to IC"))
    header, rule, *body = lines[title + 1 :]
    assert header.split()[:3] == ["dataset", "d", "IC"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert [ln.split()[0] for ln in body] == ["two_gaussians_1to2", "mixture-16d", "digits"]


def test_unusable_checkpoint_fails_before_any_work(tmp_path, capsys):
    # in-process (argparse exits with status 2 and the message on stderr)
    module = _load_script()
    bad = tmp_path / "missing.pt"
    with pytest.raises(SystemExit) as exc:
        module.main(["--quick", "--out", str(tmp_path), "--checkpoint", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "does not exist" in err
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # no run folder was created


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "0"], "--threads=0 is invalid"),
        (["--level", "1.5"], "--level=1.5 is invalid"),
        (["--mu", "2"], "--mu=2.0 is invalid"),
        (["--train-steps", "-1"], "--train-steps=-1 is invalid"),
        (["--checkpoint-n", "0", "--checkpoint", "x.pt"], "--checkpoint-n=0 is invalid"),
        (["--sinkhorn-reg", "0"], "--sinkhorn-reg=0.0 is invalid"),
        (["--digits-ideal", "-2"], "--digits-ideal=-2 is invalid"),
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_arguments_fail_at_once_without_a_run_folder(argv, message, tmp_path, capsys):
    assert_refused_at_once(_load_script().main, argv, message, tmp_path, capsys)


def test_arguments_that_do_not_apply_are_named(tmp_path, capsys):
    module = _load_script()
    args = module.build_parser().parse_args(
        ["--checkpoint-n", "5", "--train-steps", "0", "--mu", "0.3", "--out", str(tmp_path)]
    )
    module.check_args(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: --mu is not used when --train-steps is 0",
        "warning: --checkpoint-n is not used without --checkpoint",
    ]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        module.main(["--quick", "--out", str(blocker)])
    assert "cannot hold a run folder" in capsys.readouterr().err
