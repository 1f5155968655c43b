"""Peak memory of a LoRA training step: the activations saved for the backward, the loss, the LoRA state.

Sources
-------
* Training activations (:func:`train_layer_bytes`): the tensors autograd saves per
  block, derived op by op and checked *exactly* against
  ``torch.autograd.graph.saved_tensors_hooks`` on tiny models of every family on CPU
  (transformers 5.24, peft 0.21, torch 2.13). Two ops save differently on CUDA, and
  the CUDA variant is used here: dropout saves a bool mask (CPU: an fp32 noise
  tensor) and layer_norm saves fp32 mean/rstd (CPU: compute dtype).
  bitsandbytes' ``MatMul4Bit`` saves no activation (only the packed weight), so an
  NF4 base saves the same tensors as a frozen bf16 one.
* Gradient checkpointing (non-reentrant, per decoder block): one block input
  (``c x H`` per token) per block, plus one block's saved tensors while it is
  recomputed, checked with the same hooks.
* The LM-head loss: transformers upcasts the logits to fp32 (``ForCausalLMLoss``) and
  ``cross_entropy`` saves its fp32 log-softmax; the backward peak holds that, the
  incoming gradient and the result: 12 bytes per logit (+ ``c`` for Gemma-2's saved
  tanh softcap). Not a saved tensor, so *derived*, not measured.
* LoRA state (:func:`optimizer_state_bytes`): fp32 weights and grads, and the moments of
  ``heal.optimizer``: AdamW's two fp32 moments, or bitsandbytes' 8-bit ones (uint8 with an
  fp32 absmax per 256, tensors under 4096 elements kept in fp32), as bitsandbytes 0.50
  allocates them (``tests/core/heal/test_optimizer.py`` checks the 8-bit state's dtype).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.arch import Arch, Linear, param_count
from ray_prune.core.memory.inference import next_token_loss_bytes
from ray_prune.core.memory.terms import Term, total_bytes


def train_layer_bytes(arch: Arch, c: int, rank: int, dropout: float, targets: Sequence[Linear], context: int,
                      device: str = "cuda") -> float:
    """Bytes autograd saves per token in one decoder block of a LoRA model on a frozen base (no checkpointing).

    Checked exactly against ``saved_tensors_hooks`` on CPU (``device="cpu"``); the CUDA variant differs in the
    two ops the module docstring names. ``context`` is the key length (eager attention saves T x T per head).
    """
    H, I, nh, kv, hd = arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.head_dim
    q, k = nh * hd, kv * hd
    if arch.norm == "rms":  # fp32 copy of the input and the rsqrt
        norm = 4 * H + 4
        norms = arch.norm_inputs_per_layer * norm
    else:  # layer_norm: the input, and mean and rstd (fp32 on CUDA, compute dtype on CPU)
        stats = 8 if device == "cuda" else 2 * c
        norms = arch.norm_inputs_per_layer * c * H + arch.norms_per_layer * stats
    if arch.qk_norm:
        norms += 4 * (q + k) + 4 * (nh + kv) if arch.norm == "rms" else c * (q + k) + 8 * (nh + kv)
    if arch.eager:  # q, k and v repeated to every head; fp32 softmax, probabilities (and the tanh of a softcap)
        attn = 3 * c * q + nh * context * (4 + c + (c if arch.attn_softcap else 0))
    else:  # SDPA: rotated q and k, v (or the fused qkv output it views), output, fp32 logsumexp
        v = (q + 2 * k) if arch.fused_qkv else k
        attn = c * (q + k + v + q) + 4 * nh
        # A block that needs a mask (sliding window shorter than the sequence) repeats k and v to every head
        # (transformers uses SDPA's native GQA only without a mask) and SDPA saves the mask as a float bias.
        extra = (c * (q - k) * (1 if arch.fused_qkv else 2) if kv != nh else 0) + c * context
        attn += arch.sliding_fraction(context) * extra
    ffn = c * I * (arch.act_saves + (2 if arch.gated else 0))
    lora = 0.0
    for lin in targets:  # fp32 LoRA input (after dropout, whose mask is saved too) and lora_A's output
        mask = 0 if dropout == 0 else (1 if device == "cuda" else 4)
        lora += (4 + mask) * lin.fan_in + 4 * rank
    return norms + attn + ffn + lora


def lora_params(arch: Arch, layers: int, rank: int, targets: Sequence[Linear]) -> int:
    """Parameters of rank-``rank`` adapters on ``targets`` in ``layers`` blocks: what a heal trains and stores."""
    return layers * sum(rank * (t.fan_in + t.fan_out) for t in targets)


BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' optimizers keep a tensor's moments in fp32 below this many elements
BNB_BLOCK = 256  # bitsandbytes' 8-bit optimizer state is blockwise: one fp32 absmax per 256 moments


def optimizer_state_bytes(arch: Arch, layers: int, rank: int, targets: Sequence[Linear], optimizer: str) -> int:
    """LoRA weights and grads (fp32) and the optimizer's moments: ``adamw``'s two fp32 moments (16 bytes a
    parameter in all); ``paged_adamw_8bit``'s two uint8 moments with an fp32 absmax per block of 256 (about 10 bytes
    a parameter; tensors under 4096 elements keep fp32 moments), as bitsandbytes 0.50 allocates them. Paged moments
    can be evicted to CPU memory under pressure; the plan still counts them on the GPU (the peak they may hold)."""
    total = 0
    for t in targets:
        for elements in (rank * t.fan_in, t.fan_out * rank):  # lora_A, lora_B
            if optimizer == "paged_adamw_8bit" and elements >= BNB_MIN_8BIT_SIZE:
                moments = 2 * (elements + 4 * math.ceil(elements / BNB_BLOCK))
            else:
                moments = 8 * elements
            total += 8 * elements + moments
    return layers * total


def heal_terms(arch: Arch, config: HealConfig, layers: int, c: int) -> list[Term]:
    """One QLoRA/LoRA training step, and the validation loss between steps (``heal.loop``)."""
    B, T = config.batch_size, config.seq_len
    tokens = B * T
    targets = arch.targets(config.target)
    P = lora_params(arch, layers, config.rank, targets)
    per_layer = train_layer_bytes(arch, c, config.rank, config.dropout, targets, T)
    block = int(per_layer * tokens)
    out = [Term(f"LoRA weights, grads, {config.optimizer} moments", optimizer_state_bytes(arch, layers, config.rank,
                targets, config.optimizer), True, f"{P:,} LoRA parameters, rank {config.rank} on "
                f"{', '.join(t.name for t in targets)}")]
    norm_saved = (4 * arch.hidden + 4) if arch.norm == "rms" else (c * arch.hidden + 8)
    rest = tokens * (norm_saved + 8)  # final norm, labels
    logits = tokens * arch.vocab * (12 + (c if arch.final_softcap else 0))
    if config.gradient_checkpointing:
        saved = layers * tokens * arch.hidden * c
        out.append(Term("activations: block inputs (checkpointed)", saved, True, f"{B} x {T} tokens"))
        transient = max(logits, 2 * block)  # one block recomputed, plus its backward
        what = "max(loss backward, one block recomputed + its backward)"
    else:
        out.append(Term("activations: saved for backward", layers * block, True,
                        f"{B} x {T} tokens, {per_layer / 1024:.0f} KiB per token per block"))
        transient = max(logits, block)
        what = "max(loss backward, one block's backward)"
    out.append(Term("activations: LM-head loss and backward transient", rest + transient, False,
                    f"{what}; logits {tokens * arch.vocab / 1e6:.0f}M"))
    if config.quantize == "nf4":
        largest = max(param_count(arch).linear_sizes)
        out.append(Term("NF4 dequantized weight (transient)", largest * c, False, "the largest linear, compute dtype"))
    val, how = next_token_loss_bytes(arch, c, B, T)
    train_act = total_bytes(out[1:])
    if val - 4 * P > train_act:  # between steps, the grads are freed (zero_grad(set_to_none=True))
        out[1:] = [Term("validation loss (no grad)", val - 4 * P, False, how)]
    return out


