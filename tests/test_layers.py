"""The import graph runs one way: util/ (what every layer uses) imports no editor, no registry
and nothing from experiments/; inside experiments/, the CLIs stand on the run pipeline, which
stands on the reporting, which stands on the metrics."""
import ast
from pathlib import Path

from util.paths import PROJECT_ROOT

# Every package and top-level module of the project but util/ itself (found, not listed: a new
# editor's package is covered the day it is added).
ABOVE_UTIL = ({path.parent.name for path in PROJECT_ROOT.glob("*/__init__.py")}
              | {path.stem for path in PROJECT_ROOT.glob("*.py")}) - {"util"}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def imported_roots(path: Path) -> set[str]:
    return {module.split(".")[0] for module in imported_modules(path)}


def test_util_imports_nothing_above_it():
    offenders = {path.name: sorted(imported_roots(path) & ABOVE_UTIL) for path in sorted((PROJECT_ROOT / "util").glob("*.py"))}
    assert {name: mods for name, mods in offenders.items() if mods} == {}
    assert len(offenders) > 10  # the walk saw util/
    assert {"rome", "memit", "editors", "experiments", "data"} <= ABOVE_UTIL


def test_every_declared_editor_is_listed_in_the_registry():
    """Each Editor a package declares (rome/declaration.py) is one entry of editors.EDITORS."""
    import importlib

    from editors import EDITORS
    from rome.declaration import Editor

    declared = []
    for path in sorted(PROJECT_ROOT.glob("*/*.py")):
        if "rome.declaration" in imported_modules(path):
            module = importlib.import_module(f"{path.parent.name}.{path.stem}")
            declared += [value for value in vars(module).values() if isinstance(value, Editor)]
    assert len(declared) == len(EDITORS) == len({e.name for e in EDITORS})
    assert all(any(d is e for e in EDITORS) for d in declared)


# Each subpackage of experiments/ and the subpackages (or CLI modules) it may import from.
EXPERIMENTS_BELOW = {"metrics": set(), "reporting": {"metrics"}, "pipeline": {"reporting", "metrics"},
                     "benchmarking": set()}


def test_experiments_layers_import_downwards_only():
    offenders = {}
    for layer, below in EXPERIMENTS_BELOW.items():
        files = sorted((PROJECT_ROOT / "experiments" / layer).glob("*.py"))
        assert files, layer
        for path in files:
            reached = {m.split(".")[1] for m in imported_modules(path) if m.startswith("experiments.")}
            if reached - below - {layer}:
                offenders[f"{layer}/{path.name}"] = sorted(reached - below - {layer})
    assert offenders == {}
