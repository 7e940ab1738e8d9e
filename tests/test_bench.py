"""The benchmarks do not run in make test, but every script `make bench` runs must start: run as
a script, bench/ comes first on Python's path, so a file there named like one of the project's
packages (bench/training.py did) hides it from every import in every benchmark."""

import ast
import re
import subprocess
import sys

from conftest import ROOT

BENCH = ROOT / "bench"


def bench_scripts() -> list[str]:
    """The scripts in the bench, bench-accuracy and bench-ladder recipes, as the Makefile runs them."""
    makefile = (ROOT / "Makefile").read_text()
    recipes = re.findall(r"^bench(?:-accuracy|-ladder)?:.*?(?=^\S|\Z)", makefile, re.M | re.S)
    return [script for recipe in recipes for script in re.findall(r"\$\(PY\) (bench/\S+\.py)", recipe)]


def imported_modules(script: str) -> set[str]:
    """Every absolute import in the script, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse((ROOT / script).read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            names.add(node.module)
    return names


def test_no_benchmark_file_hides_a_project_package():
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert {"training", "serving", "client"} <= packages
    assert not packages & {path.stem for path in BENCH.glob("*.py")}


def test_every_script_make_bench_runs_starts_and_finds_its_imports(tmp_path):
    scripts = bench_scripts()
    assert len(scripts) == 5, scripts
    for script in scripts:
        done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"{script}: {done.stderr[-2000:]}"
        assert done.stdout.startswith("usage:"), done.stdout[:500]
        # Imports inside functions run only once a benchmark is under way: find each one as the
        # script would, with bench/ first on the path and no project folder as the current one.
        modules = sorted(imported_modules(script))
        check = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
                 "missing = [m for m in sys.argv[2:] if importlib.util.find_spec(m) is None]; "
                 "sys.exit(f'not found: {missing}' if missing else 0)")
        found = subprocess.run([sys.executable, "-c", check, str(BENCH), *modules], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
        assert found.returncode == 0, f"{script}: {found.stderr[-2000:]}"
