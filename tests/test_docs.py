"""The docs name what the tree holds: every script, doc, module and figure, nothing that is gone.

docs/design.md is the source of truth for the layout (its section 4 layout block lists the docs,
its section 7 table lists the scripts) and README.md lists the library's modules; these tests fail
when a file is added, renamed or removed without the page that describes it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = (ROOT / "docs" / "design.md").read_text()
README = (ROOT / "README.md").read_text()


def _section(text: str, heading: str) -> str:
    """The body of the markdown section whose heading starts with ``heading``."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section '## {heading}'"
    return match.group(1)


def _scripts_table() -> set[str]:
    body = _section(DESIGN, "7.")
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([\w]+\.py)`", row.split("|")[1])}


def test_every_experiment_script_is_in_the_design_table_and_exists():
    on_disk = {p.name for p in (ROOT / "experiments").glob("*.py")}
    listed = _scripts_table()
    assert on_disk - listed == set(), f"not in design.md section 7: {on_disk - listed}"
    assert listed - on_disk == set(), f"design.md section 7 names missing: {listed - on_disk}"


def test_every_doc_is_in_the_layout_and_exists():
    match = re.search(r"^docs/ .*?$(\n^ +.*?$)*", DESIGN, re.M)  # the entry and its continuations
    assert match, "docs/design.md's layout has no 'docs/' entry"
    listed = set(re.findall(r"([\w]+\.md)", match.group(0)))
    on_disk = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert on_disk - listed == set(), f"docs missing from design.md's layout: {on_disk - listed}"
    assert listed - on_disk == set(), f"design.md's layout names missing docs: {listed - on_disk}"


def _library_modules() -> set[str]:
    pkg = ROOT / "gcflows"
    names = {p.stem for p in pkg.glob("*.py") if not p.stem.startswith("_")}
    names |= {p.parent.name for p in pkg.glob("*/__init__.py")}
    return names


def test_every_module_is_in_the_readme_module_list():
    match = re.search(r"^Modules \(each owns one concept.*?(?=\n\n)", README, re.M | re.S)
    assert match, "README.md has no 'Modules (each owns one concept ...' paragraph"
    listed = set(re.findall(r"`(\w+)`", match.group(0)))
    missing = _library_modules() - listed
    assert missing == set(), f"modules missing from README's module list: {sorted(missing)}"
    gone = {n for n in listed if n not in _library_modules() and n != "kernels"}
    gone -= {"gcflows"}  # `import gcflows`, `gcflows.kernels`
    assert {n for n in gone if (ROOT / "gcflows" / f"{n}.py").exists()} == set()


def test_every_module_has_a_layer_in_design():
    body = _section(DESIGN, "4.")
    listed = set(re.findall(r"`(\w+)`", body))
    missing = _library_modules() - listed
    assert missing == set(), f"modules missing from docs/design.md section 4: {sorted(missing)}"


def test_every_figure_the_docs_show_exists():
    texts = {p: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]}
    for path, text in texts.items():
        for ref in re.findall(r"\]\((?:docs/)?(figures/[\w.-]+\.png)\)", text):
            assert (ROOT / "docs" / ref).is_file(), f"{path.name} shows a missing {ref}"


def test_every_readme_command_names_a_script_that_exists():
    for script in set(re.findall(r"python (experiments/[\w]+\.py)", README)):
        assert (ROOT / script).is_file(), script
    for script in set(re.findall(r"`(bench_\w+\.py)`", README)):
        assert (ROOT / "experiments" / script).is_file(), script
