"""Remove decoder blocks so that the result is an ordinary transformers model.

Deleting entries of the layer list is not enough. The KV cache indexes layers
by each attention module's ``layer_idx``, the forward loop reads
``num_hidden_layers``, and configs carry per-layer lists (Gemma's
``layer_types``) or layer-index thresholds (Qwen2's ``max_window_layers``).
All of them are rewritten here, and the config records which original layers
survive (``config.layer_pruning``), so a saved model loads in plain
transformers and still says where it came from.
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

from ray_prune.core.architecture import INDEX_THRESHOLD_FIELDS, decoder_layers, family_of, set_decoder_layers
from ray_prune.core.select import check_layers

# Config list fields that are not per-layer even if their length happens to equal L.
_NOT_PER_LAYER = {"architectures", "eos_token_id", "bos_token_id", "pad_token_id", "suppress_tokens",
                  "begin_suppress_tokens", "bad_words_ids"}


def _per_layer_fields(config, num_layers: int) -> list[str]:
    return [k for k, v in vars(config).items()
            if isinstance(v, (list, tuple)) and len(v) == num_layers and k not in _NOT_PER_LAYER
            and not k.startswith("_")]


def _renumber(layer: nn.Module, index: int) -> None:
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
        if hasattr(module, "layer_id"):
            module.layer_id = index


def prune_layers(model: nn.Module, remove: Sequence[int], inplace: bool = True) -> nn.Module:
    """Drop the blocks at indices ``remove`` (of the current model) and fix everything that indexes them."""
    family_of(model)
    if not inplace:
        model = copy.deepcopy(model)
    layers = decoder_layers(model)
    L = len(layers)
    config = model.config
    if getattr(config, "num_hidden_layers", L) != L:
        raise RuntimeError(f"config.num_hidden_layers={config.num_hidden_layers} but the model has {L} blocks")
    drop = check_layers(remove, L)
    keep = [i for i in range(L) if i not in set(drop)]

    per_layer = _per_layer_fields(config, L)
    set_decoder_layers(model, nn.ModuleList([layers[i] for i in keep]))
    for new, block in enumerate(decoder_layers(model)):
        _renumber(block, new)
    for name in per_layer:
        value = getattr(config, name)
        setattr(config, name, type(value)(value[i] for i in keep))
    for name in INDEX_THRESHOLD_FIELDS:
        threshold = getattr(config, name, None)
        if isinstance(threshold, int):
            setattr(config, name, sum(1 for i in keep if i < threshold))
    config.num_hidden_layers = len(keep)

    # Compose with earlier pruning so indices always refer to the original model.
    history = getattr(config, "layer_pruning", None) or {}
    original = history.get("kept_layers", list(range(L)))
    kept_original = [original[i] for i in keep]
    config.layer_pruning = {
        "original_num_layers": history.get("original_num_layers", L),
        "kept_layers": kept_original,
        "removed_layers": sorted(set(range(history.get("original_num_layers", L))) - set(kept_original)),
    }
    return model
