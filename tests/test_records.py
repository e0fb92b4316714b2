"""Tests of gcflows.records: the JSON encoder of every result type, run folders."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gcflows import records
from gcflows.stats import Interval
from gcflows.transport import BatchCost


@dataclasses.dataclass
class Plain:
    name: str
    values: torch.Tensor
    inner: Interval


def test_jsonable_knows_every_result_type():
    iv = Interval(1.0, 0.5, 4, "student-t")
    obj = {
        "interval": iv,
        "plain": Plain("a", torch.tensor([1.0, float("inf")]), iv),
        "array": np.arange(3),
        "np_scalar": np.float32(0.5),
        "np_bool": np.bool_(True),
        "path": Path("/tmp/x"),
        "nan": float("nan"),
        "tuple": (1, 2.5, None),
        1: "int key",
    }
    out = records.jsonable(obj)
    text = json.dumps(out, allow_nan=False)  # strict JSON: no NaN / inf left
    back = json.loads(text)
    assert back["interval"] == {
        "mean": 1.0, "se": 0.5, "lo": iv.lo, "hi": iv.hi, "n": 4, "method": "student-t",
        "level": 0.95,
    }  # fmt: skip
    assert back["plain"]["values"] == [1.0, None] and back["plain"]["inner"]["n"] == 4
    assert back["array"] == [0, 1, 2] and back["np_scalar"] == 0.5 and back["np_bool"] is True
    assert back["path"] == "/tmp/x" and back["nan"] is None and back["1"] == "int key"


def test_jsonable_writes_transport_results_as_numbers_not_reprs():
    iv = Interval(2.0, 0.1, 3, "student-t")
    cost = BatchCost("ot", 16, iv, iv, iv, (1.0, 2.0, 3.0))
    out = records.jsonable({"ot": [cost]})
    assert out["ot"][0]["cost"]["mean"] == 2.0
    assert "Interval(" not in json.dumps(out)


def test_jsonable_raises_on_an_unknown_object():
    with pytest.raises(TypeError, match=r"results\.model\[1\] is a .*Linear"):
        records.jsonable({"model": [1, torch.nn.Linear(2, 2)]})
    with pytest.raises(TypeError, match="function"):
        records.jsonable(math.sqrt)


def test_write_results_round_trip(tmp_path):
    iv = Interval(1.0, 0.5, 4)
    jpath, cpath = records.write_results(
        tmp_path, {"a": iv}, [{"x": 1, "v": 2.0}, {"x": 2, "w": float("inf")}]
    )
    assert json.loads(jpath.read_text())["a"]["se"] == 0.5
    lines = cpath.read_text().splitlines()
    assert lines[0] == "x,v,w" and lines[2] == "2,,"


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad in (blocker, blocker / "sub"):
        with pytest.raises(ValueError, match="cannot hold a run folder.*writable --out"):
            records.check_writable(bad)
        with pytest.raises(ValueError, match="cannot hold a run folder"):
            records.make_run_dir(bad, "study")
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only file system
        ro = Path("/sys/gcflows_test_out")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
    with pytest.raises(ValueError, match="cannot hold a run folder"):
        records.make_run_dir(ro, "study")


def test_an_unusable_out_ends_any_script_with_one_error_line(tmp_path):
    """A script that does not catch the error of make_run_dir (a read-only --out, a file in the
    way) still ends with one ``error:`` line and exit status 2, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = "import sys\nfrom gcflows.records import make_run_dir\n"
    code += "make_run_dir(sys.argv[1], 'study')\n"
    script = tmp_path / "study.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, str(script), str(blocker / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"study.py: error: output folder {str(blocker / 'out')!r} cannot hold a run folder "
        "(Not a directory): pass a writable --out"
    ]
    with pytest.raises(ValueError, match="cannot hold a run folder"):  # still a ValueError
        records.make_run_dir(blocker / "out", "study")


def test_write_results_writes_both_files_or_neither(tmp_path):
    """A value that cannot be written in a row leaves the previous results.json and .csv as they
    were (no half-updated pair, no temporary file)."""
    records.write_results(tmp_path, {"a": 1.0}, [{"x": 1}])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError, match=r"results\.csv\[1\]\.x is a builtins\.object"):
        records.write_results(tmp_path, {"a": 2.0}, [{"x": 2}, {"x": object()}])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_config_record_keeps_the_first_record_and_lists_every_resume(tmp_path):
    first = {"args": {"lr": 0.1}, "started": "t0", "git_sha": "a"}
    records.write_config_record(tmp_path, first)
    for lr, started, sha, step in ((0.2, "t1", "b", 40), (0.3, "t2", "c", 90)):
        record = {"args": {"lr": lr}, "started": started, "git_sha": sha}
        records.write_config_record(tmp_path, record, step)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["args"] == {"lr": 0.1} and saved["started"] == "t0"  # the run's first record
    assert saved["resumes"] == [
        {"step": 40, "started": "t1", "git_sha": "b"},
        {"step": 90, "started": "t2", "git_sha": "c"},
    ]
    records.write_config_record(tmp_path, {"args": {"lr": 0.5}})  # a fresh start replaces it
    assert json.loads((tmp_path / "config.json").read_text()) == {"args": {"lr": 0.5}}
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_claim_is_reentrant_and_leaves_nothing_when_released(tmp_path):
    from gcflows.atomic import LOCK_NAME, FolderInUseError, claim_folder

    folder = tmp_path / "new" / "run"
    outer = claim_folder(folder, "training")
    owner = json.loads((folder / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid()
    inner = claim_folder(folder / ".." / "run", "evaluation")  # the same folder, this process
    assert inner is outer
    inner.release()
    assert (folder / LOCK_NAME).exists()  # the outer claim still holds it
    outer.release()
    assert not folder.exists()  # created by the claim, nothing written: removed again
    kept = tmp_path / "kept"
    with claim_folder(kept):
        (kept / "results.json").write_text("{}")
    assert sorted(p.name for p in kept.iterdir()) == ["results.json"]
    err = FolderInUseError("'x' is in use by process 7", {"pid": 7})
    back = pickle.loads(pickle.dumps(err))  # as a pool worker sends it back
    assert str(back) == str(err) and back.owner == {"pid": 7} and isinstance(back, ValueError)


def test_bad_run_folder_name_and_output_file_are_named(tmp_path):
    # a name with a separator would climb out of --out; a folder cannot receive results.json
    with pytest.raises(ValueError, match=r"name='a/b' is invalid: use a plain folder name"):
        records.make_run_dir(tmp_path, "a/b")
    with pytest.raises(ValueError, match=r"name='' is invalid: use a plain folder name"):
        records.make_run_dir(tmp_path, "")
    assert list(tmp_path.iterdir()) == []  # checked before any folder is made
    with pytest.raises(ValueError, match=r"--results='.*' is invalid: it is a folder"):
        records.check_output_file(tmp_path, "--results")
