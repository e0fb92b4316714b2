"""Checkpoint integrity and safe resume in the library (gcflows.training): real byte flips in a
real checkpoint file are refused by every load, the previous checkpoint is kept, a fresh start or
a resume from elsewhere never writes into a folder that holds another run, a finished run is
left untouched, and SIGINT stops a run after a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from conftest import snapshot, toy_model
from conftest import toy_config as shared_toy_config

from gcflows.gmm import two_gaussians_1to2
from gcflows.training import (
    CorruptCheckpointError,
    TrainConfig,
    TrainingInterrupted,
    find_checkpoint,
    load_checkpoint,
    load_payload,
    load_weights,
    save_checkpoint,
    train,
)

GMM = two_gaussians_1to2(dtype=torch.float32)


# This file's runs: 8 steps, a checkpoint every 3 (so the last one is not on the grid), a log
# line every step; the rest is the shared toy_config.
SHORT = dict(total_steps=8, log_every=1, checkpoint_every=3)


def toy_config(out: Path | None, **kw) -> TrainConfig:
    return shared_toy_config(out, **{**SHORT, **kw})


def flip(path: Path, offset: int, n: int = 1) -> None:
    blob = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 8-step run: checkpoints at 3, 6 and 8 (latest 8, previous 6)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(toy_config(out), toy_model(), GMM.sample)
    return out


def test_the_previous_checkpoint_is_kept(finished):
    assert load_checkpoint(finished / "checkpoint.pt")["step"] == 8
    assert load_checkpoint(finished / "checkpoint.prev.pt")["step"] == 6


@pytest.mark.parametrize("where", ["header", "digest", "tensor bytes", "last byte"])
def test_a_flipped_byte_anywhere_is_refused_by_every_load(tmp_path, finished, where):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((finished / "checkpoint.pt").read_bytes())
    size = path.stat().st_size
    offset = {"header": 3, "digest": 40, "tensor bytes": size // 2, "last byte": size - 1}[where]
    flip(path, offset)
    for load in (load_checkpoint, load_payload, lambda p: load_weights(toy_model(), p)):
        with pytest.raises(CorruptCheckpointError, match=f"checkpoint '{re.escape(str(path))}'"):
            load(path)
    config = toy_config(tmp_path / "resumed")
    with pytest.raises(ValueError, match="is corrupt"):
        train(config, toy_model(), GMM.sample, resume=path)
    assert not (tmp_path / "resumed").exists()


def test_the_digest_covers_what_torch_load_would_accept(tmp_path):
    # a flipped byte inside a stored tensor leaves the zip readable (torch.load accepts it):
    # only the digest catches it
    path = tmp_path / "w.pt"
    save_checkpoint(path, {"w": torch.zeros(4096)})
    data = bytearray(path.read_bytes())
    at = data.rfind(b"\x00" * 4096)  # inside the tensor's storage
    data[at + 100] = 0x7F
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="do not match the SHA-256 digest"):
        load_payload(path)


def test_resume_auto_falls_back_to_the_previous_checkpoint_and_says_so(tmp_path, finished):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "config.json"):
        (run / name).write_bytes((finished / name).read_bytes())
    flip(run / "checkpoint.pt", 5000, 64)
    with pytest.warns(UserWarning, match=r"checkpoint.prev.pt' \(step 6\)"):
        path, ckpt = find_checkpoint(run)
    assert path == run / "checkpoint.prev.pt" and ckpt["step"] == 6
    flip(run / "checkpoint.prev.pt", 5000, 64)
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint"):
        find_checkpoint(run)


def test_fresh_start_or_resume_from_elsewhere_never_writes_into_another_run(tmp_path, finished):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl", "config.json"):
        (other / name).write_bytes((finished / name).read_bytes())
    before = snapshot(other)
    with pytest.raises(
        ValueError, match="TrainConfig.out_dir=.* is invalid: it already holds a run"
    ):
        train(toy_config(other), toy_model(), GMM.sample, resume=None)
    with pytest.raises(
        ValueError, match="resume=.* is invalid: it would continue another run into"
    ):
        train(toy_config(other), toy_model(), GMM.sample, resume=finished / "checkpoint.prev.pt")
    assert snapshot(other) == before
    # said explicitly: the run in the folder is replaced
    res = train(
        toy_config(other),
        toy_model(),
        GMM.sample,
        resume=finished / "checkpoint.prev.pt",
        overwrite=True,
    )
    assert res.step == 8 and res.resumed_from == finished / "checkpoint.prev.pt"
    assert [m["step"] for m in res.history] == [7, 8]
    assert load_checkpoint(other / "checkpoint.pt")["step"] == 8


def test_resuming_a_finished_run_changes_nothing(tmp_path, finished):
    run = tmp_path / "run"
    run.mkdir()
    for p in finished.iterdir():
        (run / p.name).write_bytes(p.read_bytes())
    (run / "results.json").write_text('{"final_loss": 0.5}\n')
    before = snapshot(run)
    res = train(toy_config(run), toy_model(seed=3), GMM.sample)
    assert res.already_done and res.step == 8 and res.history == []
    assert snapshot(run) == before
    reference = load_checkpoint(finished / "checkpoint.pt")
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, reference["model"][k])  # the finished weights are loaded


def test_sigint_finishes_the_step_writes_a_checkpoint_and_raises(tmp_path):
    out = tmp_path / "run"

    def interrupt(info):
        if info.step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 4 is being finished

    cfg = toy_config(out, checkpoint_every=100)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="SIGINT after step 4") as info:
        train(cfg, toy_model(), GMM.sample, callbacks=[interrupt])
    assert info.value.exit_code == 130 and info.value.step == 4
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert "resume='auto'" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is put back
    full = train(toy_config(None), toy_model(), GMM.sample)
    rest = train(cfg, toy_model(), GMM.sample)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, rest.model.state_dict()[k])


def test_a_checkpoint_larger_than_the_read_buffer_is_hashed_whole(tmp_path):
    """The digest covers every byte of a file above the 4 MiB read chunk: an intact 6 MiB
    checkpoint loads, and a byte flipped past the first 4 MiB (and past 8 MiB's worth of chunks
    would not exist here) is refused. A digest over the first chunk only fails both ways."""
    path = tmp_path / "big.pt"
    weights = torch.arange(1_500_000, dtype=torch.float32)  # 6 MB of storage
    save_checkpoint(path, {"w": weights})
    size = path.stat().st_size
    assert size > 1.4 * (1 << 22)
    assert torch.equal(load_payload(path)["w"], weights)
    data = bytearray(path.read_bytes())
    at = (1 << 22) + (size - (1 << 22)) // 2  # inside the second read chunk, inside the tensor
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="do not match the SHA-256 digest"):
        load_payload(path)


def _copy_run(src: Path, dst: Path, names=("checkpoint.prev.pt", "metrics.jsonl", "config.json")):
    dst.mkdir()
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())


def test_a_missing_latest_checkpoint_falls_back_to_the_intact_previous_one(tmp_path, finished):
    run = tmp_path / "run"
    _copy_run(finished, run)  # no checkpoint.pt: a crash between rotation and write, a rm
    with pytest.warns(UserWarning, match=r"checkpoint.pt' is missing.*\(step 6\)"):
        path, ckpt = find_checkpoint(run)
    assert path == run / "checkpoint.prev.pt" and ckpt["step"] == 6
    with pytest.warns(UserWarning, match="previous checkpoint"):
        res = train(toy_config(run), toy_model(), GMM.sample)
    assert res.resumed_from == run / "checkpoint.prev.pt"
    assert [m["step"] for m in res.history] == [7, 8]  # resumed at 6, not restarted at 0
    record = json.loads((run / "config.json").read_text())
    assert [r["step"] for r in record["resumes"]] == [6]
    reference = load_checkpoint(finished / "checkpoint.pt")
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, reference["model"][k])  # the same end as the uninterrupted run


@pytest.mark.parametrize("kind", ["folder", "dangling link", "link to a corrupt file"])
def test_a_latest_checkpoint_that_is_no_regular_file_falls_back_to_the_previous(
    tmp_path, finished, kind
):
    run = tmp_path / "run"
    _copy_run(finished, run)
    latest = run / "checkpoint.pt"
    if kind == "folder":
        latest.mkdir()
    elif kind == "dangling link":
        latest.symlink_to(tmp_path / "nowhere.pt")
    else:
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"GCFLOWS-CHECKPOINT sha256=" + b"0" * 64 + b"\nPK")
        latest.symlink_to(bad)
    with pytest.warns(UserWarning, match=r"resuming from the previous checkpoint.*\(step 6\)"):
        path, ckpt = find_checkpoint(run)
    assert path == run / "checkpoint.prev.pt" and ckpt["step"] == 6
    (run / "checkpoint.prev.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(latest))):
        find_checkpoint(run)


def test_resume_over_a_folder_in_place_of_the_latest_checkpoint_ends_as_uninterrupted(
    tmp_path, finished
):
    run = tmp_path / "run"
    _copy_run(finished, run)
    (run / "checkpoint.pt").mkdir()
    with pytest.warns(UserWarning, match="it is a folder"):
        res = train(toy_config(run), toy_model(), GMM.sample)
    assert res.resumed_from == run / "checkpoint.prev.pt" and res.step == 8
    assert (run / "checkpoint.corrupt.pt").is_dir()  # set aside, not rotated into prev
    assert load_checkpoint(run / "checkpoint.prev.pt")["step"] == 6
    reference = load_checkpoint(finished / "checkpoint.pt")
    for k, v in load_checkpoint(run / "checkpoint.pt")["model"].items():
        assert torch.equal(v, reference["model"][k])


def test_an_unreadable_latest_checkpoint_is_corrupt_and_falls_back(tmp_path, finished, monkeypatch):
    """No read permission (faked: the tests may run as root, who reads through mode bits): the
    load is a CorruptCheckpointError saying why, not a raw PermissionError, and resume falls back
    to the previous checkpoint."""
    run = tmp_path / "run"
    _copy_run(finished, run, ("checkpoint.pt", "checkpoint.prev.pt"))
    real_open = open

    def no_permission(path, *args, **kwargs):
        if Path(path) == run / "checkpoint.pt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_permission)
    with pytest.raises(CorruptCheckpointError, match="cannot be read: Permission denied"):
        load_checkpoint(run / "checkpoint.pt")
    with pytest.warns(UserWarning, match=r"Permission denied.*\(step 6\)"):
        path, ckpt = find_checkpoint(run)
    assert path == run / "checkpoint.prev.pt" and ckpt["step"] == 6
