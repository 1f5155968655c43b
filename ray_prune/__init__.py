"""ray-prune: layer-pruning experiments on open-weight LLMs (Gromov et al., ICLR 2025), as sweeps on Ray.

The core steps are plain functions that never import Ray, so a notebook can use
them directly::

    from ray_prune import load_model, load_texts, profile, layers_to_remove, prune_layers
    model, tok = load_model("smollm2-135m")
    table = profile(model, tok, load_texts("calibration", 128))
    prune_layers(model, layers_to_remove("similarity", table.num_layers, n=6, table=table))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "ray_prune.models",
    "load_tokenizer": "ray_prune.models",
    "load_texts": "ray_prune.data",
    "profile": "ray_prune.distance",
    "DistanceTable": "ray_prune.distance",
    "layers_to_remove": "ray_prune.select",
    "n_from_fraction": "ray_prune.select",
    "optimal_starts": "ray_prune.select",
    "prune_layers": "ray_prune.prune",
    "HealConfig": "ray_prune.heal",
    "heal": "ray_prune.heal",
    "evaluate": "ray_prune.evaluate",
    "load_results": "ray_prune.results",
    "UserError": "ray_prune.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import lazily: `import ray_prune` stays fast and pulls in neither torch nor Ray."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ray_prune' has no attribute {name!r}")
