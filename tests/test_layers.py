"""The import graph runs one way: util/ (what every layer uses) imports no editor, no registry
and nothing from experiments/."""
import ast
from pathlib import Path

from util.paths import PROJECT_ROOT

ABOVE_UTIL = {"rome", "memit", "emmet", "alphaedit", "encore", "prune", "rect", "editors", "experiments", "data"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_util_imports_nothing_above_it():
    offenders = {path.name: sorted(imported_roots(path) & ABOVE_UTIL) for path in sorted((PROJECT_ROOT / "util").glob("*.py"))}
    assert {name: mods for name, mods in offenders.items() if mods} == {}
    assert len(offenders) > 10  # the walk saw util/
