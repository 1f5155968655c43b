"""What ray-prune must know about each decoder family, declared as data: one entry of ``FAMILIES`` per family.

Pruning, profiling and healing need where a model's list of decoder layers lives, which linear layers form
its FFN (the paper's LoRA targets) and which config fields are per-layer lists or layer indices; the memory
plan (``core.memory``) needs the shape of a block: its linear layers, norms and attention kind. Both read
this one table, so adding a family is one entry here, written as data, not as a branch in the code that
reads it. Nothing here imports torch: the memory plan runs where no model is ever built.

Linear layers are written in symbolic dimensions of the config: ``H`` (hidden size), ``Q`` (heads x
head_dim), ``K`` (key/value heads x head_dim) and ``I`` (intermediate size), combined as sums of integer
multiples (``"Q+2K"``, ``"2I"``). Whether a linear has a bias, and some block facts, are either fixed by
the family or read from a config field (:class:`FromConfig`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple


@dataclass(frozen=True)
class FromConfig:
    """A fact a config field sets, with the default the family's modeling code uses when the field is absent."""

    field: str
    default: bool = False


Flag = bool | FromConfig  # fixed by the family, or read from the config


def flag(value: Flag, config: Any) -> bool:
    """The value of a :data:`Flag` for one config."""
    if isinstance(value, FromConfig):
        return bool(getattr(config, value.field, value.default))
    return value


class LinearSpec(NamedTuple):
    """One linear layer of a block: its module name, fan-in and fan-out in symbolic dimensions, and its bias."""

    name: str
    fan_in: str
    fan_out: str
    bias: Flag


DIMENSIONS = ("H", "Q", "K", "I")
_TERM = re.compile(r"\s*(\d*)\s*([A-Z])\s*")


def dimension(expression: str, sizes: Mapping[str, int]) -> int:
    """The size a symbolic dimension (``"Q+2K"``) has for the ``sizes`` of one config."""
    total = 0
    for term in expression.split("+"):
        match = _TERM.fullmatch(term)
        if match is None or match.group(2) not in DIMENSIONS:
            raise ValueError(f"bad dimension {expression!r}: write sums of multiples of {', '.join(DIMENSIONS)}")
        total += int(match.group(1) or 1) * sizes[match.group(2)]
    return total


ATTENTION_BIAS = FromConfig("attention_bias")
LLAMA_LINEARS: tuple[LinearSpec, ...] = (
    LinearSpec("q_proj", "H", "Q", ATTENTION_BIAS), LinearSpec("k_proj", "H", "K", ATTENTION_BIAS),
    LinearSpec("v_proj", "H", "K", ATTENTION_BIAS), LinearSpec("o_proj", "Q", "H", ATTENTION_BIAS),
    LinearSpec("gate_proj", "H", "I", FromConfig("mlp_bias")), LinearSpec("up_proj", "H", "I", FromConfig("mlp_bias")),
    LinearSpec("down_proj", "I", "H", FromConfig("mlp_bias")),
)


@dataclass(frozen=True)
class Family:
    """Facts about one ``config.model_type``; the defaults are Llama's."""

    layers_path: str  # attribute path from the CausalLM to its nn.ModuleList of blocks
    ffn_modules: tuple[str, ...]  # names of the FFN linears, the paper's LoRA targets
    final_norm_path: str  # attribute path of the norm applied after the last block
    linears: tuple[LinearSpec, ...] = LLAMA_LINEARS  # one block's, in module order
    norm: Literal["rms", "layer"] = "rms"  # RMSNorm, or LayerNorm (a weight and a bias)
    norms_per_layer: int = 2  # norm modules in a block (q/k norms apart)
    gated: bool = True  # FFN = down(act(gate) * up)
    parallel_residual: Flag = False  # attention and FFN read the same normed input
    qk_norm: Flag = FromConfig("qk_layernorm")  # a norm on q and on k, per head
    fused_qkv: bool = False  # q, k and v are views of one projection's output
    eager_only: bool = False  # the modeling code supports no SDPA: eager attention, T x T scores per head
    lm_head_bias: bool = False
    uses_sliding_window: Flag = True  # whether config.sliding_window is in force


_LLAMA_LIKE = Family("model.layers", ("gate_proj", "up_proj", "down_proj"), "model.norm")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": replace(_LLAMA_LIKE, linears=(LinearSpec("q_proj", "H", "Q", True), LinearSpec("k_proj", "H", "K", True),
                                           LinearSpec("v_proj", "H", "K", True), *LLAMA_LINEARS[3:]),
                     uses_sliding_window=FromConfig("use_sliding_window")),
    "qwen3": replace(_LLAMA_LIKE, qk_norm=True),
    "gemma": _LLAMA_LIKE,
    "gemma2": replace(_LLAMA_LIKE, norms_per_layer=4, eager_only=True),  # Gemma2PreTrainedModel._supports_sdpa = False
    "gemma3_text": replace(_LLAMA_LIKE, norms_per_layer=4, qk_norm=True),
    "phi3": Family("model.layers", ("gate_up_proj", "down_proj"), "model.norm",
                   linears=(LinearSpec("qkv_proj", "H", "Q+2K", False), LinearSpec("o_proj", "Q", "H", False),
                            LinearSpec("gate_up_proj", "H", "2I", False), LinearSpec("down_proj", "I", "H", False)),
                   fused_qkv=True),
    "phi": Family("model.layers", ("fc1", "fc2"), "model.final_layernorm",
                  linears=(LinearSpec("q_proj", "H", "Q", True), LinearSpec("k_proj", "H", "K", True),
                           LinearSpec("v_proj", "H", "K", True), LinearSpec("dense", "Q", "H", True),
                           LinearSpec("fc1", "H", "I", True), LinearSpec("fc2", "I", "H", True)),
                  norm="layer", norms_per_layer=1, gated=False, parallel_residual=True, lm_head_bias=True),
    "gpt_neox": Family("gpt_neox.layers", ("dense_h_to_4h", "dense_4h_to_h"), "gpt_neox.final_layer_norm",
                       linears=(LinearSpec("query_key_value", "H", "3Q", FromConfig("attention_bias", True)),
                                LinearSpec("dense", "Q", "H", FromConfig("attention_bias", True)),
                                LinearSpec("dense_h_to_4h", "H", "I", True),
                                LinearSpec("dense_4h_to_h", "I", "H", True)),
                       norm="layer", gated=False, parallel_residual=FromConfig("use_parallel_residual", True),
                       fused_qkv=True),
}

# Config fields that hold a layer index threshold rather than a per-layer list;
# pruning maps them to the number of kept layers below the old threshold.
INDEX_THRESHOLD_FIELDS = ("max_window_layers",)
