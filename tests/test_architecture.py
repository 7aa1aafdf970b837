"""The layers: import-linter contracts (pyproject.toml) hold, and no two top-level packages import
each other, even through a chain. A deliberately broken copy of the tree shows both checks can fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
PACKAGES = CONFIG["root_packages"]


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """import-linter on `tree`, which must win over the installed (editable) packages."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]
    return subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def package_cycles(tree: Path) -> list[list[str]]:
    """Pairs of top-level packages of `tree` that reach each other through imports (a cycle between
    layers). grimp finds packages through the import system, so it runs in a process of its own."""
    script = f"""
import json, grimp
packages = {PACKAGES!r}
graph = grimp.build_graph(*packages, cache_dir=None)
reach = {{(a, b) for a in packages for b in packages if a != b and graph.chain_exists(importer=a, imported=b, as_packages=True)}}
print(json.dumps(sorted([a, b] for a, b in reach if a < b and (b, a) in reach)))
"""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for name in [*PACKAGES, "pyproject.toml"]:
        source = ROOT / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, tree / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if source.is_dir() else {}))
    return tree


def test_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_cycle_between_top_level_packages():
    assert package_cycles(ROOT) == []


@pytest.mark.parametrize(
    "module, line",
    [
        ("actors/router.py", "import cluster.spec  # noqa\n"),  # upward: actors -> cluster
        ("serving/app.py", "import jobs.config  # noqa\n"),  # sideways: serving -> jobs
        ("model/cache.py", "import ray  # noqa\n"),  # the model layer stays free of Ray
    ],
)
def test_a_broken_layer_fails_the_contracts(tmp_path, module, line):
    tree = copy_tree(tmp_path)
    target = tree / module
    target.write_text(line + target.read_text())
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout.upper()


def test_an_upward_import_is_a_cycle(tmp_path):
    tree = copy_tree(tmp_path)
    target = tree / "actors" / "expert.py"
    target.write_text("import cluster.graph  # noqa\n" + target.read_text())
    assert ["actors", "cluster"] in package_cycles(tree)
