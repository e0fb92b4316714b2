"""Tests of the image experiments: experiments/train_images.py (each coupling trains, exact resume,
torchrun, bad input before any work, the CIFAR-10 presets), experiments/eval_images.py (runs on
a checkpoint and writes its protocol) with the library it stands on (gcflows.training.images:
run resolution; gcflows.evaluation: sampling and metric details) and a tiny
experiments/digits_comparison.py run.

Everything trains the ``digits_tiny`` preset (a U-Net of 8 base channels on the 8x8 digits) for a
handful of steps.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, snapshot

from gcflows import evaluation
from gcflows.data import load_digits
from gcflows.sampling import multistep_sample
from gcflows.training import derive_seed, load_checkpoint
from gcflows.training.images import model_from_checkpoint, resolve_run

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """Load ``experiments/<name>.py`` as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


digits_comparison = _script("digits_comparison")
eval_images = _script("eval_images")
train_images = _script("train_images")


def usage_error(capsys, main, argv, match: str) -> str:
    """``main(argv)`` exits with status 2 and one ``error:`` message (argparse's) matching
    ``match``, without a traceback; returns the message."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    assert ": error: " in err, err  # argparse's error after the usage line
    message = err.split(": error: ", 1)[1]
    assert re.search(match, message), (match, message)
    return message


TINY = ["--preset", "digits_tiny", "--no-progress", "log_every=1", "checkpoint_every=3"]


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory) -> Path:
    """Session-wide classifier cache (shared with tests/test_classifier.py: trained once)."""
    return tmp_path_factory.getbasetemp() / "gcflows_classifier_cache"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 4-step digits_tiny IC run."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    n = torch.get_num_threads()
    try:
        train_images.main([*TINY, "--steps", "4", "--out", str(out)])
    finally:
        torch.set_num_threads(n)
    return out


def _losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(rec["step"], rec["loss"]) for rec in map(json.loads, lines)]


# ------------------------------------------------------------------------------------------------
# train_images.py
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coupling", ["ic", "ot", "gc"])
def test_each_coupling_trains_and_resumes_bit_for_bit(tmp_path, coupling):
    common = [*TINY, "--coupling", coupling, "--steps", "6", "sample_every=3"]
    full, split = tmp_path / "full", tmp_path / "split"
    res = train_images.main([*common, "--out", str(full)])
    assert res["step"] == 6 and res["coupling"] == coupling and np.isfinite(res["final_loss"])
    assert (full / "config.json").is_file() and (full / "results.csv").is_file()
    assert json.loads((full / "results.json").read_text())["step"] == 6
    grids = sorted(p.name for p in (full / "samples").glob("grid_*.png"))
    assert grids == ["grid_00000003.png", "grid_00000006.png"]

    train_images.main([*common, "--out", str(split), "--stop-after", "3"])
    assert load_checkpoint(split / "checkpoint.pt")["step"] == 3
    res2 = train_images.main([*common, "--out", str(split), "--resume"])
    assert res2["resumed_from"] == str(split / "checkpoint.pt") and res2["step"] == 6

    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for sa, sb in zip(opt_a.values(), opt_b.values(), strict=True):
        for name in sa:
            assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), name
    assert _losses(full) == _losses(split)  # every logged loss, steps 1..6, identical
    if coupling == "gc":
        fractions = [json.loads(x)["gc_fraction"] for x in open(full / "metrics.jsonl")]
        assert max(fractions) > 0  # mu = 0.5 on 16 samples: some generator-induced pairs


def test_overrides_and_presets_resolve():
    run = resolve_run(
        "digits_tiny", coupling="gc", mu=0.3, overrides=["lr=2e-4", "net.base_channels=16"]
    )
    assert run.config.method == "gc" and run.config.mu == 0.3 and run.config.lr == 2e-4
    assert run.network["base_channels"] == 16 and run.config.model["unet"]["base_channels"] == 16
    assert run.config.preset == "digits_tiny" and run.config.data_shape == (1, 8, 8)
    for bad, match in [
        (["colour=1"], "override='colour=1' is invalid: unknown key"),
        (["net.colour=1"], "override='net.colour=1' is invalid: unknown U-Net field"),
        (["preset=x"], "override='preset=x' is invalid: .* cannot be overridden"),
        (["lr"], "override='lr' is invalid: write it as key=value"),
        (["lr=-1"], "TrainConfig.lr"),
        (["net.image_size=16"], r"image_size\)=\(1, 16, 16\) is invalid: .* wrong image size"),
        (["net.in_channels=3"], r"image_size\)=\(3, 8, 8\) is invalid: .* wrong image size"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve_run("digits_tiny", overrides=bad)
    with pytest.raises(
        ValueError, match="batch_size=16 is invalid: the global batch is not divisible by the 3"
    ):
        resolve_run("digits_tiny", world_size=3)  # global batch 16
    with pytest.raises(ValueError, match="preset='cifar100' is invalid: use one of"):
        resolve_run("cifar100")
    with pytest.raises(ValueError, match="coupling='cd' is invalid: use one of"):
        resolve_run("digits_tiny", coupling="cd")


@pytest.mark.parametrize(
    "name, method, dropout",
    [("cifar10_base", "ct", 0.3), ("cifar10_ot", "ot", 0.3), ("cifar10_gc_mix50", "gc", 0.0)],
)
def test_cifar10_presets_follow_paper_section_5(name, method, dropout):
    run = resolve_run(name, world_size=8)
    c, net = run.config, run.network
    assert run.data == "cifar10" and run.global_batch == 512 and c.batch_size == 64
    assert (c.method, c.total_steps, c.optimizer, c.lr, c.ema_decay) == (
        method,
        100_000,
        "lion",
        1e-4,
        0.9999,
    )
    assert (c.process, c.t_min, c.t_max, c.s0, c.s1) == ("ve", 0.002, 80.0, 10, 1280)
    assert (c.p_mean, c.p_std, c.distance) == (-1.1, 2.0, "pseudo_huber")
    assert (net["base_channels"], net["channel_mults"], net["num_blocks"]) == (128, [1, 2, 2], 3)
    assert net["dropout"] == dropout and c.dropout == dropout and net["attn_resolutions"] == [16]
    if method == "gc":
        assert c.mu == 0.5


def test_missing_data_folder_raises_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "cifar10_base", "--data-root", str(tmp_path / "no"), "--out", str(out)]
    usage_error(capsys, train_images.main, argv, "never downloads")
    usage_error(
        capsys, train_images.main, ["--preset", "cifar10_base", "--out", str(out)], "--data-root"
    )
    assert not out.exists()


def test_wrong_image_size_for_the_preset_raises_before_any_work(tmp_path, capsys):
    root = tmp_path / "cifar"
    root.mkdir()
    # MNIST-sized images where the CIFAR-10 preset expects 3 x 32 x 32
    np.savez(
        root / "cifar10_train.npz",
        images=np.zeros((4, 28, 28), np.uint8),
        labels=np.zeros(4, np.int64),
    )
    out = tmp_path / "run"
    argv = ["--preset", "cifar10_base", "--data-root", str(root), "--out", str(out)]
    usage_error(capsys, train_images.main, argv, r"expects images of shape \(N, 3, 32, 32\)")
    assert not out.exists()


def test_checkpoint_from_another_preset_or_coupling_raises_before_any_work(
    tmp_path, tiny_run, capsys
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    main = train_images.main
    argv = ["--preset", "digits_base", "--out", str(run), "--resume"]
    usage_error(capsys, main, argv, "written by preset 'digits_tiny'")
    usage_error(
        capsys, main, [*TINY, "--coupling", "gc", "--out", str(run), "--resume"], "coupling 'ic'"
    )
    argv = [*TINY, "net.base_channels=16", "--out", str(run), "--resume"]
    usage_error(capsys, main, argv, "another network")
    usage_error(capsys, main, [*TINY, "--out", str(run)], "already holds a run")
    new = tmp_path / "new"
    argv = [
        "--preset",
        "digits_base",
        "--out",
        str(new),
        "--resume-from",
        str(run / "checkpoint.pt"),
    ]
    usage_error(capsys, main, argv, "preset")
    assert snapshot(run) == before and not new.exists()


@pytest.mark.distributed
def test_train_images_under_torchrun_with_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(ROOT / "experiments" / "train_images.py"),
        *TINY,
        "--coupling",
        "ot",
        "--steps",
        "2",
        "batch_size=8",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in 240 s: {err.stdout!r} {err.stderr!r}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("train_images summary") == 1  # rank 0 reports, rank 1 does not
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["global_batch"] == 8 and res["step"] == 2
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and ckpt["config"]["batch_size"] == 4  # 8 = 2 ranks x 4
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


# ------------------------------------------------------------------------------------------------
# eval_images.py
# ------------------------------------------------------------------------------------------------
def test_eval_images_writes_results_and_protocol(tmp_path, tiny_run, classifier_cache):
    out = tmp_path / "eval"
    res = eval_images.main(
        [
            str(tiny_run / "checkpoint.pt"),
            "--seeds",
            "0",
            "1",
            "--n-samples",
            "64",
            "--out",
            str(out),
            "--classifier-cache",
            str(classifier_cache),
        ]
    )
    for name in (
        "config.json",
        "results.json",
        "results.csv",
        "samples_one_step.png",
        "samples_two_step.png",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    proto = saved["protocol"]
    assert proto["reference"] == "digits test split, 359 images" and proto["step"] == 4
    assert proto["samplers"] == {"one_step": [80.0], "two_step": [80.0, 0.821]}
    assert proto["n_samples"] == 64 and proto["seeds"] == [0, 1]
    assert "clip" in proto["post_processing"] and "no rescaling" in proto["post_processing"]
    # 2 seeds x (2 samplers + the real-data floor)
    assert len(saved["per_seed"]) == 6
    fd = saved["summary"]["model/one_step"]["fd_classifier"]
    assert fd["n"] == 2 and fd["lo"] <= fd["mean"] <= fd["hi"]
    floor = saved["summary"]["train_data/data"]["fd_classifier"]["mean"]
    assert floor < fd["mean"]  # 4 training steps are far from real digits
    assert res["per_class_first_seed"]["one_step"][0]["class"] == 0


def test_generate_is_batch_invariant_and_is_multistep_sample(tiny_run):
    model = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt"))
    sig = [80.0, 0.5]
    whole = evaluation.generate(model, 10, (1, 8, 8), sig, seed=3, batch_size=10)
    parts = evaluation.generate(model, 10, (1, 8, 8), sig, seed=3, batch_size=3)
    # the draws do not depend on batching; float32 convolutions may block a batch of 3 and of 10
    # differently, so allow round-off (values are O(1), float32 eps 1.2e-7)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    z = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(derive_seed(3, 101)))
    g = torch.Generator().manual_seed(derive_seed(3, 102))
    assert torch.equal(whole, multistep_sample(model, z, sig, model.process, generator=g))
    other = evaluation.generate(model, 10, (1, 8, 8), sig, seed=4, batch_size=10)
    assert not torch.equal(whole, other)


def test_metrics_clip_and_never_rescale():
    ref, _ = load_digits("test")
    m = evaluation.ImageMetrics("digits", ref)
    assert m(ref)["sw2_pixels"] == 0.0 and m(ref)["clipped_fraction"] == 0.0
    x = ref.clone()
    x[:, :, 0, 0] = 5.0  # one pixel of 64 out of range in every image
    out = m(x)
    assert out["clipped_fraction"] == pytest.approx(1 / 64, abs=1e-12)
    assert out["sw2_pixels"] == m(x.clamp(-1, 1))["sw2_pixels"]
    # a per-batch min / max rescaling would map ref / 2 (range [-0.5, 0.5]) back onto ref (SW2 0)
    assert m(ref / 2)["sw2_pixels"] > 0.1


def test_seed_interval_is_the_student_t_interval():
    s = evaluation.seed_interval([1.0, 2.0, 3.0])
    # mean 2, std 1, t_{0.975, 2} = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.484138
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert s["hi"] - 2.0 == pytest.approx(2.484138, abs=1e-6)
    assert evaluation.seed_interval([5.0])["lo"] is None


def test_inception_metrics_explain_why_they_are_skipped(monkeypatch, tmp_path):
    x = torch.zeros(4, 3, 32, 32)
    monkeypatch.setattr(evaluation.importlib.util, "find_spec", lambda name: None)
    assert "torchmetrics is not installed" in evaluation.inception_metrics(x, x)["skipped"]
    monkeypatch.setattr(evaluation.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    msg = evaluation.inception_metrics(x, x)["skipped"]
    assert "Inception weights not found" in msg and "never downloads" in msg


def test_eval_rejects_bad_input(tmp_path, tiny_run):
    bogus = tmp_path / "x.pt"
    torch.save({"a": 1}, bogus)
    with pytest.raises(ValueError, match="not a gcflows training checkpoint"):
        evaluation.evaluate_checkpoint(bogus)
    with pytest.raises(
        ValueError, match="two_step_sigma=100.0 is invalid: the two-step sigma must lie in"
    ):
        evaluation.evaluate_checkpoint(tiny_run / "checkpoint.pt", mid_sigma=100.0)
    with pytest.raises(ValueError, match="reference='val' is invalid: use one of"):
        evaluation.evaluate_checkpoint(tiny_run / "checkpoint.pt", reference="val")


# ------------------------------------------------------------------------------------------------
# runs are never lost or silently corrupted (one test per case of the reliability checks)
# ------------------------------------------------------------------------------------------------
def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip(path: Path, offset: int, n: int = 64) -> None:
    blob = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_corrupted_checkpoint_bytes_are_refused_and_resume_uses_the_previous_one(
    tmp_path, tiny_run, capsys, classifier_cache
):
    run = _copy_run(tiny_run, tmp_path / "run")  # checkpoints at steps 3 (previous) and 4
    latest = run / "checkpoint.pt"
    _flip(latest, latest.stat().st_size // 2)  # 64 real flipped bytes inside the tensors
    argv = [
        str(latest),
        "--n-samples",
        "8",
        "--seeds",
        "0",
        "--classifier-cache",
        str(classifier_cache),
    ]
    usage_error(capsys, eval_images.main, argv, "checkpoint.pt' is corrupt.*digest")
    assert not list(run.glob("eval_*"))
    # --resume: the latest checkpoint is refused, the previous one (step 3) is used, said plainly
    with pytest.warns(UserWarning, match=r"resuming from the previous checkpoint .*\(step 3\)"):
        res = train_images.main([*TINY, "--steps", "4", "--out", str(run), "--resume"])
    assert res["resumed_from"] == str(run / "checkpoint.prev.pt") and res["step"] == 4
    a, b = load_checkpoint(tiny_run / "checkpoint.pt"), load_checkpoint(latest)
    for name in a["ema"]:
        assert torch.equal(a["ema"][name], b["ema"][name]), name  # step 4 trained again, exactly
    assert (run / "checkpoint.corrupt.pt").is_file()  # kept aside for inspection
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        _flip(run / name, 3000)
    argv = [*TINY, "--steps", "4", "--out", str(run), "--resume"]
    usage_error(capsys, train_images.main, argv, "no intact checkpoint")


def test_resume_from_into_another_run_is_refused_unless_overwrite(tmp_path, tiny_run, capsys):
    a = _copy_run(tiny_run, tmp_path / "a")
    b = _copy_run(tiny_run, tmp_path / "b")
    (b / "results.json").write_text('{"mine": true}\n')
    before = snapshot(b)
    argv = [*TINY, "--steps", "5", "--resume-from", str(a / "checkpoint.pt"), "--out", str(b)]
    usage_error(capsys, train_images.main, argv, "already holds another run.*--overwrite")
    assert snapshot(b) == before
    res = train_images.main([*argv, "--overwrite"])  # said explicitly: B is replaced
    assert res["step"] == 5 and res["resumed_from"] == str(a / "checkpoint.pt")
    assert [s for s, _ in _losses(b)] == [5]  # B's old lines are gone, not continued
    assert "mine" not in json.loads((b / "results.json").read_text())


def test_resume_of_a_finished_run_reports_it_and_changes_nothing(tmp_path, tiny_run, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    before = snapshot(run)
    res = train_images.main([*TINY, "--steps", "4", "--out", str(run), "--resume"])
    assert "already at step 4" in capsys.readouterr().out
    assert snapshot(run) == before  # results.json untouched
    assert res["step"] == 4 and res["final_loss"] is not None


def test_resume_with_nothing_to_resume_says_where_it_looked(tmp_path, capsys):
    typo = tmp_path / "runz"
    message = usage_error(
        capsys, train_images.main, [*TINY, "--out", str(typo), "--resume"], "nothing to resume"
    )
    assert str(typo) in message and "checkpoint.pt" in message
    assert not typo.exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143)])
def test_sigterm_checkpoints_the_current_step_and_prints_how_to_resume(tmp_path, sig, code):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "train_images.py"),
        *TINY,
        "checkpoint_every=1000",
        "--steps",
        "400",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 2 <= step < 400 and json.loads(metrics.read_text().splitlines()[-1])["step"] == step
    assert f"after step {step}" in err and "Traceback" not in err
    assert "resume with: python experiments/train_images.py" in err
    assert f"--out {out} --resume" in err


def test_script_arguments_are_checked_before_any_work(tmp_path, tiny_run, capsys, monkeypatch):
    out = tmp_path / "run"
    main = train_images.main
    usage_error(
        capsys, main, [*TINY, "--threads", "0", "--out", str(out)], "--threads must be >= 1"
    )
    usage_error(capsys, main, [*TINY, "--steps", "0", "--out", str(out)], "--steps must be >= 1")
    usage_error(
        capsys, main, [*TINY, "total_steps=0", "--out", str(out)], r"TrainConfig\.total_steps=0"
    )
    argv = [*TINY, "--coupling", "ic", "--mu", "0.3", "--out", str(out)]
    usage_error(capsys, main, argv, "--mu applies to the GC coupling only")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    usage_error(capsys, main, [*TINY, "--out", str(blocker / "run")], "is a file")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only file system
    usage_error(capsys, main, [*TINY, "--out", str(out)], "not writable")
    argv = [str(tiny_run / "checkpoint.pt"), "--out", str(tmp_path / "ev")]
    usage_error(capsys, eval_images.main, argv, "cannot be written")
    monkeypatch.undo()
    argv = [str(tiny_run / "checkpoint.pt"), "--batch-size", "0", "--out", str(tmp_path / "ev")]
    usage_error(capsys, eval_images.main, argv, "--batch-size must be >= 1")
    assert not out.exists() and not (tmp_path / "ev").exists()
    # an argument that does not apply: one line of warning, and the run goes on
    res = main([*TINY, "--steps", "1", "--data-root", str(tmp_path), "--out", str(out)])
    assert res["step"] == 1
    assert "warning: --data-root is ignored" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# digits_comparison.py
# ------------------------------------------------------------------------------------------------
def test_digits_comparison_tiny_run_writes_curves_grids_and_summary(
    tmp_path, classifier_cache, capsys
):
    figs = tmp_path / "figs"
    res = digits_comparison.main(
        [
            "--out",
            str(tmp_path),
            "--seeds",
            "0",
            "1",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--n-eval",
            "32",
            "--workers",
            "1",
            "--figures",
            str(figs),
            "--classifier-cache",
            str(classifier_cache),
            "batch_size=8",
            "s1=20",
            "sample_every=4",
        ]
    )
    assert set(res["summary"]) == {"ic", "ot", "gc", "mid_step"} and res["steps"] == 4
    assert res["summary"]["ic"]["minus_ic_paired"] is None
    paired = res["summary"]["gc"]["minus_ic_paired"]["fd_one_step"]
    per_seed = res["summary"]["gc"]["per_seed"], res["summary"]["ic"]["per_seed"]
    diffs = [per_seed[0][s]["fd_one_step"] - per_seed[1][s]["fd_one_step"] for s in ("0", "1")]
    assert paired["mean"] == pytest.approx(sum(diffs) / 2, rel=1e-12)
    assert len(res["runs"]) == 6 and all(r["steps"] == 4 for r in res["runs"])
    for name in ("metrics_vs_step.png", "samples_final.png", "samples_along_training.png"):
        assert (figs / f"digits_comparison_{name}").is_file()
    run_dir = Path(res["figures"]["curves"]).parent
    rows = [r for r in json.loads((run_dir / "results.json").read_text())["final"]]
    assert {(r["coupling"], r["sampler"]) for r in rows} == {
        (c, s) for c in ("ic", "ot", "gc") for s in ("one_step", "two_step")
    }
    # the three couplings of a seed start from the same weights: identical step-0 evaluations
    with open(run_dir / "results.csv", newline="") as fh:
        step0 = [r for r in csv.DictReader(fh) if r["step"] == "0" and r["seed"] == "0"]
    assert len(step0) == 3 and len({r["fd_classifier"] for r in step0}) == 1
    # progress: stderr is not a terminal here, so one line per run (6 runs), no bar
    done = [ln for ln in capsys.readouterr().err.splitlines() if " done: " in ln]
    assert len(done) == 6 and done[-1].split()[2] == "6/6"


# ------------------------------------------------------------------------------------------------
# one owner per run folder; an evaluation never writes into a training run's record
# ------------------------------------------------------------------------------------------------
HOLD = (
    "import sys, time\n"
    "from gcflows.atomic import claim_folder\n"
    "claim = claim_folder(sys.argv[1], 'training')\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_folder_owned_by_a_live_process_is_refused_by_training_and_evaluation(
    tmp_path, tiny_run, capsys, classifier_cache
):
    """Another process owns the folder (as a training in progress does): a training or an
    evaluation started into it is refused with one error line naming that process, and writes
    nothing; once the owner is gone (even killed), the folder can be used."""
    out = tmp_path / "busy"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = [*TINY, "--steps", "2", "--out", str(out)]
        usage_error(capsys, train_images.main, argv, f"is in use by process {holder.pid}")
        argv = [str(tiny_run / "checkpoint.pt"), "--n-samples", "8", "--out", str(out)]
        usage_error(capsys, eval_images.main, argv, f"is in use by process {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == [".gcflows.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    res = train_images.main([*TINY, "--steps", "2", "--out", str(out)])  # a stale lock
    assert res["step"] == 2 and not (out / ".gcflows.lock").exists()


def test_eval_images_never_writes_into_a_training_run(tmp_path, tiny_run, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    before = snapshot(run)
    for folder in (run, tmp_path / "other_eval"):
        if folder != run:
            folder.mkdir()
            (folder / "results.json").write_text('{"an earlier evaluation": 1}\n')
        argv = [str(run / "checkpoint.pt"), "--n-samples", "8", "--out", str(folder)]
        usage_error(capsys, eval_images.main, argv, "already holds a run.*new --out")
    assert snapshot(run) == before  # config.json, results.json / .csv untouched
    assert (
        tmp_path / "other_eval" / "results.json"
    ).read_text() == '{"an earlier evaluation": 1}\n'


def test_eval_images_checks_the_two_step_time_device_and_seeds_first(tmp_path, tiny_run, capsys):
    ckpt = str(tiny_run / "checkpoint.pt")
    out = tmp_path / "ev"
    for extra, match in (
        (["--two-step-sigma", "100"], r"--two-step-sigma=100.0 is invalid.*\(0.002, 80.0\)"),
        (["--two-step-sigma", "nan"], "--two-step-sigma=nan is invalid"),
        (["--device", "gpu"], "--device='gpu' is invalid"),
        (["--seeds", "1", "1"], "distinct"),
        (["--inception-weights", str(tmp_path / "none.pt")], "no such file"),
    ):
        usage_error(capsys, eval_images.main, [ckpt, *extra, "--out", str(out)], match)
    assert not out.exists()


@pytest.mark.parametrize(
    "setting, said",
    [("optimizer=radam", 'optimizer="radam"'), ("continuous=true", "continuous=true")],
    ids=["radam", "continuous"],
)
def test_resume_without_a_setting_that_defines_the_run_is_one_error_line(
    tmp_path, capsys, setting, said
):
    out = tmp_path / "run"
    train_images.main([*TINY, "--steps", "2", setting, "--out", str(out)])
    before = snapshot(out)
    argv = [*TINY, "--steps", "3", "--out", str(out), "--resume"]
    message = usage_error(capsys, train_images.main, argv, re.escape(f"pass {said}"))
    assert "defines the run" in message
    assert snapshot(out) == before
    res = train_images.main([*argv, setting])  # with it, the run continues
    assert res["step"] == 3


def test_overrides_that_do_not_apply_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    for extra, match in (
        (["--coupling", "ic", "mu=0.3"], "'mu=0.3' does not apply.*GC coupling"),
        (["tangent_norm=0.2"], "'tangent_norm=0.2' does not apply.*continuous"),
        (["continuous=true", "s1=50"], "'s1=50' does not apply.*discrete time"),
        (["--coupling", "gc", "cd_step=heun"], "'cd_step=heun' does not apply"),
    ):
        usage_error(capsys, train_images.main, [*TINY, *extra, "--out", str(out)], match)
    assert not out.exists()


def test_results_after_a_resume_describe_the_whole_run(tmp_path):
    out = tmp_path / "run"
    first = train_images.main([*TINY, "--steps", "5", "--stop-after", "2", "--out", str(out)])
    assert [(s["from_step"], s["to_step"]) for s in first["segments"]] == [(0, 2)]
    res = train_images.main([*TINY, "--steps", "5", "--out", str(out), "--resume"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["step"] == 5 and saved["resumed_from"] == str(out / "checkpoint.pt")
    assert [(s["from_step"], s["to_step"]) for s in saved["segments"]] == [(0, 2), (2, 5)]
    assert saved["segments"][0]["wall_time_s"] == first["wall_time_s"]
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["time"]
    assert saved["train_time_s"] == pytest.approx(logged)  # since step 0, not since the resume
    assert res["segments"] == saved["segments"]


def test_a_symlinked_checkpoint_works_and_a_broken_one_is_one_error_line(
    tmp_path, tiny_run, capsys
):
    link = tmp_path / "link.pt"
    link.symlink_to(tiny_run / "checkpoint.pt")
    argv = [*TINY, "--steps", "5", "--resume-from", str(link), "--out", str(tmp_path / "b")]
    assert train_images.main(argv)["step"] == 5  # a link to an intact checkpoint is read
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(tmp_path / "nowhere.pt")
    argv = [*TINY, "--steps", "5", "--resume-from", str(dangling), "--out", str(tmp_path / "c")]
    usage_error(capsys, train_images.main, argv, "link to .*nowhere.pt.*does not exist")
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    usage_error(capsys, eval_images.main, [str(folder), "--out", str(tmp_path / "e")], "a folder")
