"""The layers hold: each layer of the package imports only the layers below it.

``core`` (the method) imports no other layer and no Ray; ``ledger`` (storage and rows) imports only ``core``;
``report`` reads storage through ``ledger`` and never rebuilds the sweep; ``sweep`` (the orchestration) may use
``core`` and ``ledger``; ``cli`` sits on top. Checked statically (every import statement of every module, those
inside functions included) and, for ``core``, at run time (importing every core module loads no Ray module).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "ray_prune"
# layer -> what it must not import
FORBIDDEN = {
    "core": ("ray", "ray_prune.sweep", "ray_prune.ledger", "ray_prune.report", "ray_prune.cli"),
    "ledger": ("ray", "ray_prune.sweep", "ray_prune.report", "ray_prune.cli"),
    "report": ("ray", "ray_prune.sweep", "ray_prune.cli"),
    "sweep": ("ray_prune.report", "ray_prune.cli"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def _forbidden(name: str, layer: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer])


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_a_layer_above_it(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert len(files) >= 5, f"the {layer} package was not found"
    bad = [f"{p.relative_to(REPO)}:{line}: {name}" for p in files for line, name in _imports(p)
           if _forbidden(name, layer)]
    assert not bad, f"{layer} imports a layer above it:\n" + "\n".join(bad)


def test_the_scan_catches_an_upward_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from ray_prune.ledger.rows import write_row\n    import ray.tune\n"
                       "    from ray_prune.sweep.grid import expand\n")
    assert [n for _, n in _imports(planted) if _forbidden(n, "core")] == ["ray_prune.ledger.rows", "ray.tune",
                                                                          "ray_prune.sweep.grid"]
    assert [n for _, n in _imports(planted) if _forbidden(n, "report")] == ["ray.tune", "ray_prune.sweep.grid"]


def test_importing_every_core_module_loads_no_ray():
    core = PACKAGE / "core"
    modules = sorted("ray_prune." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
                     for p in core.rglob("*.py") if "lm_eval_tasks" not in p.parts)
    modules = [m.removesuffix(".__init__") for m in modules]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(n for n in sys.modules if n == 'ray' or n.startswith(('ray.', 'ray_prune.sweep', "
            "'ray_prune.ledger', 'ray_prune.report'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
