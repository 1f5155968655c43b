"""ray-prune: layer-pruning experiments on open-weight LLMs (Gromov et al., ICLR 2025), as sweeps on Ray.

The core steps are plain functions that never import Ray, so a notebook can use
them directly::

    from ray_prune import load_model, load_texts, profile, layers_to_remove, prune_layers
    model, tok = load_model("smollm2-135m")
    table = profile(model, tok, load_texts("calibration", 128))
    prune_layers(model, layers_to_remove("similarity", table.num_layers, n=6, table=table))

Layers: ``core`` (the method), ``sweep`` (Ray orchestration), ``ledger``
(storage and the results dataset), ``report`` (figures and tables), ``cli``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("ray-prune")  # the one declaration is pyproject.toml
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

# Public name -> the module that defines it. No public name is also a submodule of this package.
_EXPORTS = {
    "load_model": "ray_prune.core.models",
    "load_tokenizer": "ray_prune.core.models",
    "load_texts": "ray_prune.core.data",
    "profile": "ray_prune.core.profile",
    "profile_streamed": "ray_prune.core.profile_streamed",
    "DistanceTable": "ray_prune.core.distance",
    "layers_to_remove": "ray_prune.core.select",
    "n_from_fraction": "ray_prune.core.select",
    "optimal_starts": "ray_prune.core.select",
    "prune_layers": "ray_prune.core.prune",
    "HealConfig": "ray_prune.core.heal.config",
    "prepare_for_healing": "ray_prune.core.heal.lora",
    "merge_adapter": "ray_prune.core.heal.lora",
    "heal": "ray_prune.core.heal.loop",
    "evaluate": "ray_prune.core.evaluation.harness",
    "c4_loss": "ray_prune.core.loss",
    "mergekit_config": "ray_prune.core.export",
    "write_mergekit_config": "ray_prune.core.export",
    "load_results": "ray_prune.ledger.rows",
    "run_sweep": "ray_prune.sweep.run",
    "UserError": "ray_prune.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import lazily: `import ray_prune` stays fast and pulls in neither torch nor Ray."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ray_prune' has no attribute {name!r}")
