"""The import graph runs one way: util/ (what every layer uses) imports no editor, no registry
and nothing from experiments/; inside experiments/, the CLIs stand on the run pipeline, which
stands on the reporting, which stands on the metrics."""
import ast
from pathlib import Path

from util.paths import PROJECT_ROOT

ABOVE_UTIL = {"rome", "memit", "emmet", "alphaedit", "encore", "prune", "rect", "editors", "experiments", "data"}


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


# Each subpackage of experiments/ and the subpackages (or CLI modules) it may import from.
EXPERIMENTS_BELOW = {"metrics": set(), "reporting": {"metrics"}, "pipeline": {"reporting", "metrics"},
                     "benchmarking": {"metrics"}}


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
