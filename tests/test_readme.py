"""The README's library example runs as written and prints what it says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_ot_lowers_the_cost():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code, "README.md has no python example"
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code[0], str(README), "exec"), scope)
    assert "R~_t  (IC):" in out.getvalue()
    ot = scope["ot"]
    # Exact OT never increases the mean cost of the batch it re-pairs.
    assert ot.cost_after <= ot.cost_before
    assert scope["gc"].gc_mask.all()  # mu = 1: every row generator-induced
