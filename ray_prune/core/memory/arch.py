"""The facts of a transformers config that memory depends on, and its parameters by where they live.

``Arch.from_config`` reads one decoder family's structure (the linears of a block, the norms, the
attention kind) from the config through the family's entry in ``core.families.FAMILIES``, which
declares it as data: this module names no family. ``param_count`` counts parameters in closed form.
Both are checked against meta-device builds of every family in ``tests/core/test_memory.py``. NF4
sizes follow bitsandbytes 0.50 with double quantization (see ``nf4_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ray_prune.core.families import FAMILIES, dimension, flag
from ray_prune.errors import UserError

# Tensors an FFN activation saves, in units of c x intermediate per token (measured, see ``training``).
_ACT_SAVES = {"silu": 1, "swish": 1, "gelu": 1, "gelu_pytorch_tanh": 1, "relu": 1, "gelu_new": 4, "gelu_fast": 4}


def dtype_bytes(precision: str) -> int:
    """Bytes per element of a compute dtype; ``auto`` is bf16, what the sweep picks on every GPU it targets."""
    return {"auto": 2, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}[precision]


def nf4_bytes(elements: int) -> int:
    """Bytes of one weight in bitsandbytes NF4 with double quantization (blocksize 64, second level 256)."""
    blocks = math.ceil(elements / 64)
    return math.ceil(elements / 2) + blocks + 4 * math.ceil(blocks / 256) + 1100


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool


@dataclass(frozen=True)
class Arch:
    """The facts of a config that memory depends on."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_length: int  # lm-eval's max_length: max_position_embeddings
    linears: tuple[Linear, ...]  # one block's
    ffn: tuple[str, ...]  # the family's FFN linears (LoRA target "ffn")
    gated: bool  # FFN = down(act(gate) * up)
    act_saves: int  # c x I tensors the activation saves
    norm: Literal["rms", "layer"]
    norms_per_layer: int  # norm modules in a block
    norm_inputs_per_layer: int  # distinct tensors those norms normalise (parallel residuals share one)
    qk_norm: bool
    fused_qkv: bool  # q, k, v are views of one projection output
    parallel: bool  # attention and FFN read the same input (phi, gpt_neox)
    eager: bool  # eager attention: B x heads x T x T scores
    attn_softcap: bool
    final_softcap: bool
    sliding_window: int | None
    sliding_layers: int  # blocks with sliding-window attention (a mask once the sequence is longer than the window)
    lm_head_bias: bool

    def sliding_fraction(self, context: int) -> float:
        """Share of the blocks that need an explicit attention mask at this sequence length."""
        if self.sliding_window is None or context <= self.sliding_window:
            return 0.0
        return self.sliding_layers / self.layers

    @classmethod
    def from_config(cls, config: Any) -> Arch:
        """The facts of ``config``, its block's shape read from its family's entry (``families.FAMILIES``)."""
        mt = getattr(config, "model_type", None)
        if mt not in FAMILIES:
            raise UserError(f"no memory model for architecture {mt!r}",
                            f"use a model of a supported family: {', '.join(sorted(FAMILIES))}")
        fam = FAMILIES[mt]
        H, L = int(config.hidden_size), int(config.num_hidden_layers)
        nh = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or nh)
        hd = int(getattr(config, "head_dim", None) or H // nh)
        I = int(config.intermediate_size)
        sizes = {"H": H, "Q": nh * hd, "K": kv * hd, "I": I}
        lin = tuple(Linear(s.name, dimension(s.fan_in, sizes), dimension(s.fan_out, sizes), flag(s.bias, config))
                    for s in fam.linears)
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        parallel = flag(fam.parallel_residual, config)
        window = getattr(config, "sliding_window", None) if flag(fam.uses_sliding_window, config) else None
        types = getattr(config, "layer_types", None)
        sliding = (sum(1 for t in types if t == "sliding_attention") if types else L) if window else 0
        eager = fam.eager_only or getattr(config, "_attn_implementation_internal", None) == "eager"
        return cls(
            model_type=mt, layers=L, hidden=H, intermediate=I, heads=nh, kv_heads=kv, head_dim=hd,
            vocab=int(config.vocab_size), tied=bool(getattr(config, "tie_word_embeddings", False)),
            max_length=int(getattr(config, "max_position_embeddings", None) or 2048), linears=lin,
            ffn=fam.ffn_modules, gated=fam.gated, act_saves=_ACT_SAVES.get(act, 4), norm=fam.norm,
            norms_per_layer=fam.norms_per_layer, norm_inputs_per_layer=1 if parallel else fam.norms_per_layer,
            qk_norm=flag(fam.qk_norm, config), fused_qkv=fam.fused_qkv, parallel=parallel, eager=eager,
            attn_softcap=getattr(config, "attn_logit_softcapping", None) is not None and eager,
            final_softcap=getattr(config, "final_logit_softcapping", None) is not None,
            sliding_window=int(window) if window else None, sliding_layers=sliding, lm_head_bias=fam.lm_head_bias)

    def linear(self, name: str) -> Linear:
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise UserError(f"LoRA target {name!r} is not a linear layer of {self.model_type} blocks",
                        f"use 'ffn', 'all-linear' or some of {', '.join(x.name for x in self.linears)}")

    def targets(self, target: str | Sequence[str]) -> tuple[Linear, ...]:
        """The linears LoRA wraps, as ``heal.lora.resolve_targets`` picks them."""
        if target == "ffn":
            return tuple(self.linear(n) for n in self.ffn)
        if target == "all-linear":
            return self.linears
        return tuple(self.linear(n) for n in ([target] if isinstance(target, str) else target))


@dataclass(frozen=True)
class ParamCount:
    """Parameters by where they live and how they are stored."""

    embedding: int
    lm_head: int  # 0 when tied to the embedding
    final_norm: int
    layer_linear: int  # one block's linear weights: what NF4 quantizes
    layer_other: int  # one block's biases and norm weights: kept in the compute dtype
    layers: int
    linear_sizes: tuple[int, ...]  # one block's linear weights, each

    def total(self, layers: int | None = None) -> int:
        n = self.layers if layers is None else layers
        return self.embedding + self.lm_head + self.final_norm + n * (self.layer_linear + self.layer_other)


def param_count(arch: Arch) -> ParamCount:
    """Closed-form parameter count (tests check it against meta-device builds)."""
    H, hd = arch.hidden, arch.head_dim
    sizes = tuple(x.fan_in * x.fan_out for x in arch.linears)
    biases = sum(x.fan_out for x in arch.linears if x.bias)
    per_norm = 2 * H if arch.norm == "layer" else H
    qk = 0
    if arch.qk_norm:
        qk = (4 if arch.norm == "layer" else 2) * hd
    embedding = arch.vocab * H
    lm_head = 0 if arch.tied else arch.vocab * H + (arch.vocab if arch.lm_head_bias else 0)
    return ParamCount(embedding=embedding, lm_head=lm_head, final_norm=per_norm, layer_linear=sum(sizes),
                      layer_other=biases + arch.norms_per_layer * per_norm + qk, layers=arch.layers,
                      linear_sizes=sizes)

