"""experiments/image_target_study.py: a quick run end to end, the FD computed on the very samples
of the exact metrics, the rank statistic, and every argument checked before any work (one
``error:`` line, exit 2, no run folder)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_refused_at_once

from gcflows.classifier import load_classifier
from gcflows.data import load_digits
from gcflows.evaluation import ImageMetrics
from gcflows.gmm import digits_mixture
from gcflows.mixture_eval import METRICS, evaluate, make_eval_set

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "image_target_study.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("image_target_study_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The session's classifier cache (the folder tests/test_images.py and the digits comparison
    test use, so a session trains the classifier once)."""
    return tmp_path_factory.getbasetemp() / "gcflows_classifier_cache"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "1"], "--seeds=1 is invalid"),
        (["--steps", "5"], "--steps=5 is invalid"),
        (["--lr", "nan"], "--lr=nan is invalid"),
        (["--lr", "0"], "--lr=0.0 is invalid"),
        (["--threads", "0"], "--threads=0 is invalid"),
        (["--methods", "gc9"], "--methods='gc9' is invalid"),
        (["--methods", "cd", "gc0.5"], "include ct"),
        (["--methods", "ct", "ct"], "include ct"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) else a,
)
def test_bad_arguments_fail_at_once_without_a_run_folder(script, argv, message, tmp_path, capsys):
    assert_refused_at_once(script.main, argv, message, tmp_path, capsys)


def test_unwritable_classifier_cache_is_refused_at_once(script, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--classifier-cache", str(blocker / "sub")]
    assert_refused_at_once(script.main, argv, str(blocker), out, capsys)


def test_kendall_tau_known_values(script):
    assert script.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert script.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one adjacent swap out of 6 pairs: (5 - 1) / 6
    assert script.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def test_fd_is_taken_on_the_samples_of_the_exact_metrics(script, cache):
    """``final_metrics`` reproduces ``mixture_eval.evaluate`` (its draws, one then two steps) for
    every exact metric, and its FD is the FD of those one-step samples."""
    target = digits_mixture()
    ev = make_eval_set(target, n_flow=8, n_ref=100)
    clf, _ = load_classifier(cache_dir=cache)
    metrics = ImageMetrics("digits", load_digits("test")[0], classifier=clf, n_projections=64)
    shift = torch.tensor([0.0, 0.3]).reshape(2, 1, 1)  # two "seeds" that differ

    def apply(x, t):
        return 0.4 * x / (1.0 + t[..., None]) + shift

    got = script.final_metrics(target, apply, 2, ev, metrics, 60)
    ref = evaluate(target, apply, 2, ev, n_samples=60, seed=script.SAMPLE_SEED)
    for m in METRICS:
        np.testing.assert_allclose(got[m], ref[m], rtol=1e-12, err_msg=m)
    g = torch.Generator().manual_seed(script.SAMPLE_SEED)
    x1 = apply(80.0 * torch.randn(2, 60, 64, generator=g), torch.full((2, 60), 80.0))
    for i in range(2):
        fd = metrics(x1[i].reshape(60, 1, 8, 8))["fd_classifier"]
        assert got["fd_1step"][i] == pytest.approx(fd, rel=1e-12)
    assert got["fd_1step"][0] != got["fd_1step"][1]


def test_quick_run_end_to_end(script, cache, tmp_path):
    """All four methods, two seeds, the tiny U-Net: every file and table, the paired intervals
    against CT on the exact metrics and the FD, the rank agreement, the curves."""
    res = script.main(
        ["--quick", "--out", str(tmp_path), "--classifier-cache", str(cache), "--quiet"]
    )
    (run_dir,) = list(tmp_path.iterdir())
    for name in ("config.json", "results.json", "results.csv", "curves.png"):
        assert (run_dir / name).exists(), name
    saved = json.loads((run_dir / "results.json").read_text())
    assert not saved.get("partial") and saved["design"]["recipe"]["backbone"] == "unet"
    a = res["analysis"]
    assert set(a["paired_vs_ct"]) == {"cd", "ot", "gc0.5"}
    for name in ("cd", "gc0.5"):
        for m in ("mode_tv_1step", "sw2_2step", "fd_1step", "fd_2step"):
            iv = a["paired_vs_ct"][name][m]
            assert iv["n"] == 2 and iv["lo"] <= iv["mean"] <= iv["hi"]
    assert set(a["ranks"]["fd_1step"].values()) == {1, 2, 3, 4}
    assert all(-1.0 <= v <= 1.0 for v in a["rank_agreement"].values())
    assert len(a["rank_agreement"]) == 8
    steps = res["design"]["checkpoints"]
    for m in script.CURVE_METRICS:
        assert np.asarray(res["curves"]["gc0.5"][m]).shape == (2, len(steps))
    assert len(res["floors"]["mixture"]["fd"]) == 2
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2 and "fd_1step" in rows[0]
