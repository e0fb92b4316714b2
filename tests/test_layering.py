"""Import layering (docs/design.md): every gcflows module imports only modules of a lower layer, the
kernels import nothing from gcflows, plotting is imported only by experiments, and the library
imports without triton and without matplotlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower number = lower layer. processes <- flowmap <- gmm <- velocity <- couplings <- consistency <-
# training, with the modules outside that chain placed where their imports put them.
LAYERS = {
    "__init__": 0,
    "processes": 0,
    "checks": -1,  # the validators: below every module that checks its arguments
    "atomic": 0,
    "runrecord": 0,
    "records": 1,
    "stats": 1,
    "progress": 1,
    "metrics": 1,
    "flowmap": 0.5,  # the flow map's integrators: above processes, below the mixture that runs them
    "gmm": 1,
    "ema": 1,
    "data": 0,
    "velocity": 2,
    "couplings": 3,
    "classifier": 3,
    "networks": 3,
    "regression": 4,
    "consistency": 4,
    "distances": 0,  # torch and checks only
    "schedules": 0,
    "sampling": 5,
    "continuous": 5,
    "mixture_eval": 5,
    "curves": 2,
    "ensemble": 7,  # raises gcflows.training.NonFiniteLossError
    "training": 6,
    "presets": 0,  # plain data: imports nothing (gcflows.training.images resolves the presets)
    "discrepancy": 7,
    "transport": 7,
    "evaluation": 7,
    "mixture_study": 8,  # the toy study's sections over discrepancy, training and mixture_eval
    "transport_study": 8,  # the transport study's sections over transport
    "highdim_proxy": 8,  # the high-dimensional study's proxy part over regression and discrepancy
    "plotting": 8,
}

# The sub-modules of each package (the package's layer above as a whole): each imports only lower
# sub-modules of its package and lower layers outside it; the package's __init__ re-exports them.
TRAINING_LAYERS = {
    "config": 0,
    "rng": 0,
    "batches": 0,
    "distributed": 0,
    "checkpoint": 1,
    "rundir": 2,
    "step": 2,
    "loop": 3,
    "images": 3,
    "__init__": 4,
}
DISCREPANCY_LAYERS = {
    "times": 0,
    "derivatives": 1,
    "proxy": 1,
    "reference": 1,
    "theorem1": 2,
    "gaps": 3,
    "__init__": 4,
}
TRANSPORT_LAYERS = {
    "costs": 0,
    "gaussian": 0,
    "curves": 1,
    "lemma1": 2,
    "__init__": 3,
}
PACKAGES = {
    "training": TRAINING_LAYERS,
    "discrepancy": DISCREPANCY_LAYERS,
    "transport": TRANSPORT_LAYERS,
}
PACKAGE_FILES = sorted(
    (name, path) for name in PACKAGES for path in (ROOT / "gcflows" / name).glob("*.py")
)


def _gcflows_imports(path: Path) -> set[str]:
    """Names X of every ``gcflows.X`` (or relative ``.X``) module imported by the file."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "gcflows" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            parts = mod.split(".")
            if node.level == 0 and parts[0] == "gcflows":
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(a.name for a in node.names)
            elif node.level == 1 and path.parent.name == "gcflows":
                found.add(parts[0] if mod else node.names[0].name)
    return found


def _modules(path: Path) -> set[str]:
    """Dotted names of every gcflows module the file imports (relative imports resolved)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gcflows."))
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            mod = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            if mod == "gcflows" or (node.level and not node.module):
                found.update(f"{mod}.{a.name}" for a in node.names)
            elif mod.startswith("gcflows."):
                found.add(mod)
    return found


def test_every_library_module_has_a_layer():
    missing = [p.stem for p in (ROOT / "gcflows").glob("*.py") if p.stem not in LAYERS]
    assert not missing, f"add these modules to LAYERS in tests/test_layering.py: {missing}"
    packages = [p.name for p in (ROOT / "gcflows").iterdir() if (p / "__init__.py").exists()]
    assert sorted(packages) == sorted(PACKAGES), "add the package's sub-layers to PACKAGES"
    for name, path in PACKAGE_FILES:
        assert path.stem in PACKAGES[name], f"add {name}/{path.name} to its table in PACKAGES"
    assert all(name in LAYERS for name in PACKAGES)


@pytest.mark.parametrize("name, path", PACKAGE_FILES, ids=lambda v: getattr(v, "stem", v))
def test_package_submodules_import_lower_layers_only(name, path):
    layers = PACKAGES[name]
    me = layers[path.stem]
    for dep in _modules(path):
        parts = dep.split(".")
        if parts[1] == name:
            if len(parts) == 2:
                raise AssertionError(f"{name}/{path.name} imports the {name} package itself")
            sub = parts[2]
            assert sub in layers, f"{name}/{path.name} imports unknown {dep}"
            assert layers[sub] < me, (
                f"{name}/{path.name} (sub-layer {me}) imports {sub} (sub-layer "
                f"{layers[sub]}): reversed or cyclic edge"
            )
        elif parts[1] != "kernels":
            assert LAYERS[parts[1]] < LAYERS[name], f"{name}/{path.name} imports {dep}"


@pytest.mark.parametrize("path", sorted((ROOT / "gcflows").glob("*.py")), ids=lambda p: p.stem)
def test_imports_point_to_lower_layers(path):
    me = LAYERS[path.stem]
    for dep in _gcflows_imports(path):
        if dep == "kernels":
            continue  # the kernels sit below everything: they import nothing from gcflows
        assert dep in LAYERS, f"{path.name} imports unknown gcflows module {dep!r}"
        assert LAYERS[dep] < me or path.stem == "__init__", (
            f"{path.name} (layer {me}) imports {dep} (layer {LAYERS[dep]}): reversed or cyclic edge"
        )


def test_plotting_is_imported_only_by_experiments():
    for path in [*(ROOT / "gcflows").glob("*.py"), *(p for _, p in PACKAGE_FILES)]:
        if path.stem != "plotting":
            assert "gcflows.plotting" not in _modules(path), f"{path.name} imports plotting"


def test_kernels_import_nothing_from_gcflows():
    for path in (ROOT / "kernels").glob("*.py"):
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert not node.module.startswith("gcflows"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                raise AssertionError(f"{path.name} reaches above the kernels package")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("gcflows"), f"{path.name} imports {alias.name}"


BLOCKED_IMPORT = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('triton', 'matplotlib', 'seaborn'):
            raise ImportError('blocked for the test: ' + name)
        return None
sys.meta_path.insert(0, Block())
import gcflows, gcflows.kernels
import pkgutil
skip = ('plotting', 'kernels')
mods = [m.name for m in pkgutil.walk_packages(gcflows.__path__, 'gcflows.')
        if m.name.split('.')[1] not in skip]
for m in mods:
    importlib.import_module(m)
assert 'torch.cuda' not in sys.modules or not sys.modules['torch'].cuda.is_initialized()
print('imported', len(mods))
"""


def test_library_imports_without_triton_matplotlib_or_gpu():
    out = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("imported")
