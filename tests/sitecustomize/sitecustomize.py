"""Test-only: installs tests/faults.py's fault points in every Python process started with this folder on
PYTHONPATH (pytest's, a ray-prune subprocess's, Ray's workers'). Never on the product's path."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    import faults

    faults.install()
finally:
    sys.path.pop(0)
