"""The benchmarks share the tests' builders (``tests/helpers.py``) and tiny experiment (``tests/tiny.yaml``).

Importing this puts ``tests/`` on the path once, so each benchmark can say
``from benchmark_paths import save_tiny_models, tiny_spec``.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from helpers import save_tiny_models, tiny_spec  # noqa: E402

__all__ = ["save_tiny_models", "tiny_spec"]
