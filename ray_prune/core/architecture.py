"""What ray-prune must know about each decoder family, declared as data.

Pruning, profiling and healing all need the same three facts about a model:
where its list of decoder layers lives, which linear layers form its FFN (the
paper's LoRA targets), and which config fields are per-layer lists or layer
indices. Adding a family means adding one entry to ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ray_prune.errors import UserError


@dataclass(frozen=True)
class Family:
    """Facts about one ``config.model_type``."""

    layers_path: str  # attribute path from the CausalLM to its nn.ModuleList of blocks
    ffn_modules: tuple[str, ...]  # names of the FFN linears, the paper's LoRA targets
    final_norm_path: str  # attribute path of the norm applied after the last block


_LLAMA_LIKE = Family("model.layers", ("gate_proj", "up_proj", "down_proj"), "model.norm")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": Family("model.layers", ("gate_up_proj", "down_proj"), "model.norm"),
    "phi": Family("model.layers", ("fc1", "fc2"), "model.final_layernorm"),
    "gpt_neox": Family("gpt_neox.layers", ("dense_h_to_4h", "dense_4h_to_h"), "gpt_neox.final_layer_norm"),
}

# Config fields that hold a layer index threshold rather than a per-layer list;
# pruning maps them to the number of kept layers below the old threshold.
INDEX_THRESHOLD_FIELDS = ("max_window_layers",)


def family_of(model_or_config: nn.Module | object) -> tuple[str, Family]:
    """Look up the family, or fail with the list of supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"unsupported architecture {model_type!r}: ray-prune knows how to prune "
            f"{', '.join(sorted(FAMILIES))}",
            "use a model of a supported family, or add its entry to ray_prune.architecture.FAMILIES",
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
