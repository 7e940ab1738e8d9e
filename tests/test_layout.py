"""The layout holds: imports point one way, gateway -> tfserving <- model_server, training ->
tfserving, and only `python -m serving` (serving/__main__.py) knows both programs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Which of the project's packages each folder may import (its own included).
ALLOWED = {
    "serving/tfserving": {"serving.tfserving"},
    "serving/gateway": {"serving.gateway", "serving.tfserving"},
    "serving/model_server": {"serving.model_server", "serving.tfserving"},
    "training": {"training", "serving.tfserving"},
    "client": {"client"},
    "bench": {"bench", "serving", "training"},
}
PROJECT = ("serving", "training", "client", "bench")
LONGEST_FUNCTION = 60  # lines, outside tests/ and bench/


def project_imports(path: Path) -> set[str]:
    """Every module of the project that `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PROJECT}


def allowed(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes) or name in ("serving",)


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_point_one_way(folder):
    crossing = {f"{path.relative_to(ROOT)} imports {name}"
                for path in sources(folder) for name in project_imports(path)
                if not allowed(name, ALLOWED[folder])}
    assert not crossing, sorted(crossing)


def test_only_the_entry_point_knows_both_programs():
    knows_both = [str(path.relative_to(ROOT)) for path in ROOT.rglob("*.py")
                  if path.parts[len(ROOT.parts)] in ("serving", "training", "client")
                  and {"serving.gateway", "serving.model_server"} <= {
                      ".".join(name.split(".")[:2]) for name in project_imports(path)}]
    assert knows_both == ["serving/__main__.py"]


def test_the_gateway_and_the_shared_package_run_without_tensorflow():
    """At module level: TensorFlow is loaded by the model server and training alone (the shared
    session loader is theirs; tensors.py reaches TensorFlow only for dtypes no model sends)."""
    heavy = []
    for path in sources("serving/gateway") + sources("serving/tfserving"):
        if path.name == "session.py":
            continue
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            heavy += [f"{path.relative_to(ROOT)}: {n}" for n in names
                      if n.split(".")[0] in ("tensorflow", "tensorflow_serving", "keras")]
    assert not heavy


def test_no_function_is_long():
    """Functions say one thing each: none over LONGEST_FUNCTION lines outside tests and bench."""
    long = []
    for folder in ("serving", "training", "client"):
        for path in sources(folder):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > LONGEST_FUNCTION:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, long
