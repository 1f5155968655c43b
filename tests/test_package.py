"""The package as users meet it: the public API of the README, its version, and files cut to readable size."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib

import pytest

from helpers import REPO

PUBLIC = ["load_model", "load_tokenizer", "load_texts", "profile", "DistanceTable", "optimal_starts",
          "layers_to_remove", "n_from_fraction", "prune_layers", "HealConfig", "heal", "evaluate", "load_results",
          "mergekit_config", "write_mergekit_config", "UserError"]

# Functions kept longer than ~60 lines because they read better whole: name -> why. None today.
LONG_FUNCTIONS: dict[str, str] = {}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_are_what_the_readme_says_before_and_after_the_submodules_load(name):
    code = ("import ray_prune, inspect, importlib\n"
            f"first = getattr(ray_prune, {name!r})\n"
            "for m in ('core.heal', 'core.heal.loop', 'core.evaluation', 'core.evaluation.harness', 'core.profile'):\n"
            "    importlib.import_module('ray_prune.' + m)\n"
            f"second = getattr(ray_prune, {name!r})\n"
            "print(first is second, inspect.isfunction(first) or inspect.isclass(first))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]


def test_no_public_name_is_also_a_submodule():
    import pkgutil

    import ray_prune

    submodules = {m.name for m in pkgutil.iter_modules(ray_prune.__path__)}
    assert not set(ray_prune.__all__) & submodules


def test_readme_api_names_exist():
    import ray_prune

    readme = (REPO / "README.md").read_text()
    used = set(re.findall(r"from ray_prune import ([\w, ]+)", readme))
    names = {n.strip() for group in used for n in group.split(",")}
    assert names and names <= set(ray_prune.__all__) | {"report"}, names - set(ray_prune.__all__)


def test_version_comes_from_the_package_metadata():
    import ray_prune

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert ray_prune.__version__ == declared
    hits = [p for p in (REPO / "ray_prune").rglob("*.py") if re.search(r"['\"]" + re.escape(declared) + r"['\"]",
                                                                      p.read_text())]
    assert not hits, f"the version is spelled out again in {hits}"


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_files_and_functions_are_cut_to_readable_size():
    long_files, long_functions = [], []
    for path in sorted((REPO / "ray_prune").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for fn in _functions(ast.parse(text)):
            doc = ast.get_docstring(fn)
            body_start = fn.body[1].lineno if doc and len(fn.body) > 1 else fn.body[0].lineno
            length = fn.end_lineno - body_start + 1
            if length > MAX_FUNCTION_LINES and fn.name not in LONG_FUNCTIONS:
                long_functions.append(f"{path.relative_to(REPO)}:{fn.lineno} {fn.name}: {length} lines")
    assert not long_files, long_files
    assert not long_functions, long_functions
