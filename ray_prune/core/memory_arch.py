"""The facts of a transformers config that memory depends on, and its parameters by where they live.

``Arch.from_config`` reads one decoder family's structure (the linears of a block, the norms, the
attention kind) from the config alone; ``param_count`` counts parameters in closed form. Both are
checked against meta-device builds of every family in ``tests/core/test_memory.py``. NF4 sizes follow
bitsandbytes 0.50 with double quantization (see ``nf4_bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from ray_prune.core.architecture import FAMILIES
from ray_prune.errors import UserError

# Tensors an FFN activation saves, in units of c x intermediate per token (measured, see memory_terms).
_ACT_SAVES = {"silu": 1, "swish": 1, "gelu": 1, "gelu_pytorch_tanh": 1, "relu": 1, "gelu_new": 4, "gelu_fast": 4}
_EAGER_ONLY = {"gemma2"}  # transformers 5.24: Gemma2PreTrainedModel._supports_sdpa = False


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
    def from_config(cls, config: Any) -> "Arch":
        mt = getattr(config, "model_type", None)
        if mt not in FAMILIES:
            raise UserError(f"no memory model for architecture {mt!r}",
                            f"use a model of a supported family: {', '.join(sorted(FAMILIES))}")
        H, L = int(config.hidden_size), int(config.num_hidden_layers)
        nh = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or nh)
        hd = int(getattr(config, "head_dim", None) or H // nh)
        I = int(config.intermediate_size)
        q, k = nh * hd, kv * hd
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        attn_bias = bool(getattr(config, "attention_bias", False))
        if mt == "phi":
            lin = (Linear("q_proj", H, q, True), Linear("k_proj", H, k, True), Linear("v_proj", H, k, True),
                   Linear("dense", q, H, True), Linear("fc1", H, I, True), Linear("fc2", I, H, True))
        elif mt == "phi3":
            lin = (Linear("qkv_proj", H, q + 2 * k, False), Linear("o_proj", q, H, False),
                   Linear("gate_up_proj", H, 2 * I, False), Linear("down_proj", I, H, False))
        elif mt == "gpt_neox":
            b = bool(getattr(config, "attention_bias", True))
            lin = (Linear("query_key_value", H, 3 * q, b), Linear("dense", q, H, b),
                   Linear("dense_h_to_4h", H, I, True), Linear("dense_4h_to_h", I, H, True))
        else:
            qkv_bias = attn_bias or mt == "qwen2"
            mlp_bias = bool(getattr(config, "mlp_bias", False))
            lin = (Linear("q_proj", H, q, qkv_bias), Linear("k_proj", H, k, qkv_bias),
                   Linear("v_proj", H, k, qkv_bias), Linear("o_proj", q, H, attn_bias),
                   Linear("gate_proj", H, I, mlp_bias), Linear("up_proj", H, I, mlp_bias),
                   Linear("down_proj", I, H, mlp_bias))
        norms = {"gemma2": 4, "gemma3_text": 4, "phi": 1}.get(mt, 2)
        parallel = mt == "phi" or (mt == "gpt_neox" and bool(getattr(config, "use_parallel_residual", True)))
        window = getattr(config, "sliding_window", None)
        if mt == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        types = getattr(config, "layer_types", None)
        sliding = (sum(1 for t in types if t == "sliding_attention") if types else L) if window else 0
        eager = mt in _EAGER_ONLY or getattr(config, "_attn_implementation_internal", None) == "eager"
        return cls(
            model_type=mt, layers=L, hidden=H, intermediate=I, heads=nh, kv_heads=kv, head_dim=hd,
            vocab=int(config.vocab_size), tied=bool(getattr(config, "tie_word_embeddings", False)),
            max_length=int(getattr(config, "max_position_embeddings", None) or 2048), linears=lin,
            ffn=FAMILIES[mt].ffn_modules, gated=mt not in ("phi", "gpt_neox"), act_saves=_ACT_SAVES.get(act, 4),
            norm="layer" if mt in ("phi", "gpt_neox") else "rms", norms_per_layer=norms,
            norm_inputs_per_layer=1 if parallel else norms,
            qk_norm=mt in ("qwen3", "gemma3_text") or bool(getattr(config, "qk_layernorm", False)),
            fused_qkv=mt in ("phi3", "gpt_neox"), parallel=parallel, eager=eager,
            attn_softcap=getattr(config, "attn_logit_softcapping", None) is not None and eager,
            final_softcap=getattr(config, "final_logit_softcapping", None) is not None,
            sliding_window=int(window) if window else None, sliding_layers=sliding, lm_head_bias=mt == "phi")

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

