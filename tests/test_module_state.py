"""No module registers anything at import time or keeps mutable state in module globals, nor
reads the process environment behind its caller's back."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rome", "memit", "emmet", "alphaedit", "encore", "prune", "rect", "util", "experiments", "data")
TOP_MODULES = ("editors",)


def project_files() -> list[Path]:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    return files + [ROOT / f"{name}.py" for name in TOP_MODULES if (ROOT / f"{name}.py").exists()]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Run in a fresh interpreter: the attention functions transformers knows of before and after
# importing every module of the project.
PROBE = """
import importlib, json, sys
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
known = lambda: {"global": sorted(AttentionInterface._global_mapping), "shared": sorted(ALL_ATTENTION_FUNCTIONS)}
before = known()
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"before": before, "after": known()}))
"""


def test_importing_every_module_leaves_transformers_attention_registry_unchanged():
    modules = [module_name(path) for path in project_files()]
    assert "rome.compute_v" in modules and "rome.values.replay" in modules and len(modules) > 40
    done = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["after"] == seen["before"]


def test_no_module_rebinds_globals():
    """`global` statements are how a module keeps mutable state between calls (a process-wide
    cache, a compiled function): such state belongs to an object the caller holds."""
    found = [f"{path.relative_to(ROOT)}:{node.lineno} global {', '.join(node.names)}"
             for path in project_files() for node in ast.walk(ast.parse(path.read_text(), str(path)))
             if isinstance(node, ast.Global)]
    assert not found, found


ENVIRONMENT_MODULE = ROOT / "util" / "environment.py"
# The other reader of os.environ, not for a setting passed down: the copy of the environment
# sweep.py gives its children.
OTHER_ENVIRON_READERS = {"experiments/sweep.py"}


def string_constants(path: Path) -> list[ast.Constant]:
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_environment_variables_are_read_once_in_util_environment():
    """The variables of util/environment.py (cache folders, corpus, data folders, offline, commit)
    are read there alone: each command line reads them once (Environment.read()) and passes the
    values down. Only the reader above touches os.environ besides, and not for these."""
    names = {node.value for node in string_constants(ENVIRONMENT_MODULE) if re.fullmatch(r"(KEDIT|HF)_[A-Z_]+", node.value)}
    assert {"KEDIT_CACHE", "KEDIT_MODEL_CACHE", "KEDIT_CORPUS", "HF_HUB_OFFLINE", "KEDIT_SYSTEM_MALLOC"} <= names
    readers = {path.relative_to(ROOT).as_posix() for path in project_files()
               for node in ast.walk(ast.parse(path.read_text(), str(path)))
               if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
                   and node.attr in ("environ", "environb", "getenv", "getenvb"))
               or (isinstance(node, ast.ImportFrom) and node.module == "os"
                   and any(alias.name in ("environ", "environb", "getenv", "getenvb") for alias in node.names))}
    assert readers == {"util/environment.py"} | OTHER_ENVIRON_READERS
    named = [f"{name}:{node.lineno} {node.value}" for name in sorted(OTHER_ENVIRON_READERS)
             for node in string_constants(ROOT / name) if node.value in names]
    assert not named, named
