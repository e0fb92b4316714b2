"""scripts/mutation_audit.py: its machinery end to end on a cheap stats.py mutant caught by one
fast test, run on a temporary copy (the working tree is unchanged after); the outcome of each
pytest result; a bad table or name refused with exit 2 and an ``error:`` line before any run."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location(
        "mutation_audit", ROOT / "scripts" / "mutation_audit.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


audit = _load()
FAST = "tests/test_stats.py::test_paired_ratio_standard_error_is_the_written_out_delta_method"
CAUGHT = audit.Mutant(
    "se-not-over-mean-den",
    "gcflows/stats.py",
    'return Interval(r, se / abs(mden), num.numel(), "paired-ratio", level)',
    'return Interval(r, se, num.numel(), "paired-ratio", level)',
    (FAST,),
)


def _snapshot() -> dict[str, str]:
    return {p: hashlib.sha256((ROOT / p).read_bytes()).hexdigest() for p in audit._files(ROOT)}


def test_audit_runs_a_mutant_on_a_copy_and_leaves_the_tree_unchanged():
    """End to end: the copy, the edit, one real pytest run that fails, the restore."""
    before = _snapshot()
    lines: list[str] = []
    outcomes = audit.audit([CAUGHT], ROOT, timeout=300, baseline=False, log=lines.append)
    assert _snapshot() == before
    assert [o.status for o in outcomes] == ["caught"], outcomes[0].detail
    assert outcomes[0].detail.startswith("FAILED " + FAST)
    assert len(lines) == 1 and lines[0].startswith("se-not-over-mean-den: caught")
    assert "| se-not-over-mean-den | gcflows/stats.py | caught |" in audit.table(outcomes)


@pytest.mark.parametrize(
    ("result", "status"),
    [((0, "1 passed"), "survived"), ((None, ""), "caught"), ((4, "no tests ran"), "error")],
)
def test_outcome_of_each_pytest_result(tmp_path, monkeypatch, result, status):
    """Exit 0: survived; a timeout: caught (a hang is the failure); exit 4 (bad id): error. The
    file in the copy is restored whatever pytest did (here: pytest replaced by a stub)."""
    (tmp_path / "gcflows").mkdir()
    stats = (ROOT / "gcflows" / "stats.py").read_bytes()
    (tmp_path / "gcflows" / "stats.py").write_bytes(stats)
    seen = []

    def fake(root, tests, timeout):
        seen.append((root / "gcflows" / "stats.py").read_text())
        return result

    monkeypatch.setattr(audit, "_pytest", fake)
    out = audit.run_mutant(CAUGHT, tmp_path, timeout=1.0)
    assert out.status == status
    assert CAUGHT.replacement in seen[0] and CAUGHT.original not in seen[0]
    assert (tmp_path / "gcflows" / "stats.py").read_bytes() == stats
    no_tests = audit.Mutant("todo", "gcflows/stats.py", "import", "x", ())
    assert audit.run_mutant(no_tests, tmp_path, timeout=1.0).status == "no tests"


def test_bad_table_or_names_exit_2_before_any_run(capsys):
    missing = audit.Mutant("gone", "gcflows/stats.py", "no such text in the file", "x", (FAST,))
    assert audit.main(["--no-baseline"], mutants=[missing]) == 2
    assert capsys.readouterr().err.startswith("error: mutant gone: original text not found")
    twice = audit.Mutant("twice", "gcflows/stats.py", "import", "imp0rt", (FAST,))
    assert audit.main([], mutants=[twice]) == 2
    assert "found" in capsys.readouterr().err
    assert audit.main(["--only", "no-such-mutant"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown mutant(s) ['no-such-mutant']")
    assert audit.main(["--list", "--only", CAUGHT.name], mutants=[CAUGHT]) == 0
    assert FAST in capsys.readouterr().out


def test_the_table_is_well_formed():
    """Unique names; every original text is in its file exactly once (so the coordinator's run
    cannot stop on a stale entry of this branch); a listed test id names an existing file."""
    names = [m.name for m in audit.MUTANTS]
    assert len(set(names)) == len(names)
    audit.check_table(audit.MUTANTS, ROOT)
    for m in audit.MUTANTS:
        for test in m.tests:
            assert (ROOT / test.split("::")[0]).is_file(), (m.name, test)
