"""The layers hold: nothing under ``ray_prune/core`` imports Ray or the sweep, ledger or report layers.

Checked two ways: statically (every import statement of every core module, those inside functions
included) and at run time (importing every core module in a fresh interpreter loads no Ray module).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import REPO

CORE = REPO / "ray_prune" / "core"
FORBIDDEN = ("ray", "ray_prune.sweep", "ray_prune.ledger", "ray_prune.report", "ray_prune.cli")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_no_core_module_imports_ray_or_an_outer_layer():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 15, "the core package was not found"
    bad = [f"{p.relative_to(REPO)}:{line}: {name}" for p in files for line, name in _imports(p) if _forbidden(name)]
    assert not bad, "core imports an outer layer:\n" + "\n".join(bad)


def test_the_scan_catches_an_outer_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from ray_prune.ledger.rows import write_row\n    import ray.tune\n")
    assert [name for _, name in _imports(planted) if _forbidden(name)] == ["ray_prune.ledger.rows", "ray.tune"]


def test_importing_every_core_module_loads_no_ray():
    modules = sorted("ray_prune." + ".".join(p.relative_to(REPO / "ray_prune").with_suffix("").parts)
                     for p in CORE.rglob("*.py") if "lm_eval_tasks" not in p.parts)
    modules = [m.removesuffix(".__init__") for m in modules]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(n for n in sys.modules if n == 'ray' or n.startswith(('ray.', 'ray_prune.sweep', "
            "'ray_prune.ledger', 'ray_prune.report'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
