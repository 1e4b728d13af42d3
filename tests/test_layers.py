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


# The value path: rome/compute_v.py (the algorithm) stands on rome/values/ (layout, replays), which
# imports from rome/ only what sits below the algorithm: the hparams and the keys' prompt templating.
VALUES = PROJECT_ROOT / "rome" / "values"
VALUES_MAY_IMPORT = ("rome.values", "rome.hparams", "rome.compute_u")


def test_the_value_path_imports_nothing_above_it():
    offenders = {}
    for path in sorted(VALUES.glob("*.py")):
        above = {m for m in imported_modules(path) if m.split(".")[0] in ABOVE_UTIL
                 and not any(m == allowed or m.startswith(allowed + ".") for allowed in VALUES_MAY_IMPORT)}
        if above:
            offenders[path.name] = sorted(above)
    assert offenders == {}
    assert len(list(VALUES.glob("*.py"))) >= 5  # the walk saw rome/values/


def project_modules() -> dict[str, Path]:
    skip = {".venv", "tests", "build", "dist"}
    files = [p for p in PROJECT_ROOT.rglob("*.py") if not skip & set(p.relative_to(PROJECT_ROOT).parts)]
    names = {}
    for path in files:
        parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from package import module` names the module)."""
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                for alias in node.names:
                    edges.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
        graph[name] = edges - {name}
    return graph


def test_the_project_imports_without_cycles():
    graph = import_graph(project_modules())
    assert "rome.values.replay" in graph["rome.compute_v"]
    state, cycles = {}, []  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_value_path_files_and_functions_stay_small():
    """rome/compute_v.py and rome/values/: files up to 300 lines, functions up to 60 lines and 8 parameters."""
    large = {}
    for path in [PROJECT_ROOT / "rome" / "compute_v.py", *sorted(VALUES.glob("*.py"))]:
        text = path.read_text()
        if len(text.splitlines()) > 300:
            large[path.name] = f"{len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                count = len(args.posonlyargs + args.args + args.kwonlyargs) - (args.args[:1] and args.args[0].arg in ("self", "cls"))
                if node.end_lineno - node.lineno + 1 > 60 or count > 8:
                    large[f"{path.name}:{node.name}"] = f"{node.end_lineno - node.lineno + 1} lines, {count} parameters"
    assert large == {}
