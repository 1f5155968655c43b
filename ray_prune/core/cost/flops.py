"""FLOPs per token of the work a sweep does, counted from a model's config (``core.memory.Arch``).

FLOPs (a multiply-add is 2 FLOPs; norms, activations and softmax are not counted)
----------------------------------------------------------------------------------
Per token of a model that keeps ``k`` of its blocks (:func:`forward_flops`):

* block linears: 2 x k x (one block's linear weights, ``core.memory.param_count``);
* the LM head: 2 x vocab x hidden where it runs: every position for the C4 and heal losses and in training; none for
  the distance table (the decoder runs without it); for lm-eval's questions only the scored positions
  (``logits_to_keep``: one per context for answer letters and " yes"/" no", each continuation's tokens otherwise);
* attention scores: 4 x heads x head_dim x the keys a token attends to (QK^T and the weighted sum of V), causal: on
  average (T + 1) / 2 keys in a sequence of T tokens, at most the window in sliding-window blocks;
* LoRA adapters (training, and scoring the healed model unmerged): 2 x the adapter's parameters.

Training a LoRA adapter on a frozen base (:func:`train_flops`): the forward, then a backward that computes gradients
of the activations only (the base gets none): 2x the forward for the linears and the head, 2x the forward's
attention, 3x the adapters' own (activations and weights): **4N + 3A + 6P** per token (N: linears and head, A:
attention, P: adapter parameters). Gradient checkpointing recomputes each block's forward during the backward:
**+2N(blocks) + A + 2P** (the LM head is outside the checkpointed blocks). Generation (GSM8K) counts each generated
token's forward, which understates it: decoding is memory-bound, not FLOP-bound.
"""

from __future__ import annotations

from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.arch import Arch, param_count
from ray_prune.core.memory.training import lora_params


def mean_keys(length: int | float, window: int | None = None) -> float:
    """Keys a token attends to on average in a causal sequence of ``length`` tokens (at most ``window`` each)."""
    T = max(1.0, float(length))
    if window is None or T <= window:
        return (T + 1) / 2
    return (window * (window + 1) / 2 + (T - window) * window) / T


def attention_flops(arch: Arch, kept: int, length: int | float) -> float:
    """Attention-score FLOPs per token of a ``kept``-block model over sequences of ``length`` tokens (sliding-window
    blocks in the share the full model has)."""
    slide = arch.sliding_layers / arch.layers if arch.sliding_window else 0.0
    keys = (1 - slide) * mean_keys(length) + slide * mean_keys(length, arch.sliding_window)
    return 4.0 * arch.heads * arch.head_dim * keys * kept


def head_flops(arch: Arch) -> float:
    """FLOPs of the LM head for one position."""
    return 2.0 * arch.vocab * arch.hidden


def forward_flops(arch: Arch, kept: int, length: int | float, head: bool = True, lora: int = 0) -> float:
    """FLOPs per token of a forward: the kept blocks' linears, attention over ``length``-token sequences, the LM
    head (``head``), and ``lora`` adapter parameters run unmerged."""
    blocks = 2.0 * kept * param_count(arch).layer_linear
    return blocks + attention_flops(arch, kept, length) + (head_flops(arch) if head else 0.0) + 2.0 * lora


def train_flops(arch: Arch, kept: int, heal: HealConfig) -> float:
    """FLOPs per training token of a LoRA step on a frozen base (module docstring): 4N + 3A + 6P, and 2N(blocks) +
    A + 2P more with gradient checkpointing."""
    blocks = 2.0 * kept * param_count(arch).layer_linear
    attention = attention_flops(arch, kept, heal.seq_len)
    adapters = 2.0 * lora_params(arch, kept, heal.rank, arch.targets(heal.target))
    flops = 2 * (blocks + head_flops(arch)) + 3 * attention + 3 * adapters
    if heal.gradient_checkpointing:
        flops += blocks + attention + adapters
    return flops


def adapter_params(arch: Arch, kept: int, heal: HealConfig | None) -> int:
    """LoRA parameters a ``kept``-block model's adapter adds to its forward; 0 where the cell does not heal."""
    return 0 if heal is None else lora_params(arch, kept, heal.rank, arch.targets(heal.target))
