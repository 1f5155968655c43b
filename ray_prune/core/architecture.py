"""A model's decoder family, and its blocks, decoder and FFN modules found through it.

The facts per family are data in ``core.families`` (torch-free, so the memory plan reads them too); this
module applies them to built models. Adding a family means adding one entry to ``families.FAMILIES``.
"""

from __future__ import annotations

from torch import nn

from ray_prune.core.families import FAMILIES, INDEX_THRESHOLD_FIELDS, Family
from ray_prune.errors import UserError

__all__ = ["FAMILIES", "INDEX_THRESHOLD_FIELDS", "Family", "decoder", "decoder_layers", "family_of", "ffn_modules",
           "num_layers", "set_decoder_layers"]


def family_of(model_or_config: nn.Module | object) -> tuple[str, Family]:
    """Look up the family, or fail with the list of supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"unsupported architecture {model_type!r}: ray-prune knows how to prune "
            f"{', '.join(sorted(FAMILIES))}",
            "use a model of a supported family, or add its entry to ray_prune.core.families.FAMILIES",
        )
    return model_type, FAMILIES[model_type]


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _unwrap(model: nn.Module) -> nn.Module:
    """Reach the transformers model inside a PEFT wrapper, if any."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    model = _unwrap(model)
    _, fam = family_of(model)
    layers = _get_path(model, fam.layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{fam.layers_path} of {type(model).__name__} is not a ModuleList")
    return layers


def set_decoder_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    model = _unwrap(model)
    _, fam = family_of(model)
    parent_path, _, name = fam.layers_path.rpartition(".")
    setattr(_get_path(model, parent_path), name, layers)


def decoder(model: nn.Module) -> nn.Module:
    """The bare decoder (embeddings, blocks, final norm) without the LM head.

    Profiling runs this instead of the CausalLM: the LM head is the largest
    matmul in small-vocab-heavy models (Gemma-3-270M: 168M of 268M parameters)
    and its output is never needed for distances.
    """
    model = _unwrap(model)
    _, fam = family_of(model)
    return _get_path(model, fam.layers_path.rpartition(".")[0])


def ffn_modules(model: nn.Module) -> list[str]:
    _, fam = family_of(model)
    return list(fam.ffn_modules)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))
