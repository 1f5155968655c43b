"""Peak memory of a no-grad forward: one block at its widest point, the next-token loss, and the profile pass.

Sources
-------
* Inference transients (profile, evaluation): the live tensors of one block at its
  widest point (the MLP: 3 intermediates; or attention), derived from the modeling
  code. The C4 loss and the profile pass ``use_cache=False``.
* Attention: SDPA (transformers' default) keeps O(T) memory (flash / memory-efficient
  kernels; only the bool mask is T x T), using GQA natively when there is no mask;
  Gemma-2 runs eager attention (``_supports_sdpa = False``), which materialises
  ``B x heads x T x T`` scores (fp32 softmax, compute-dtype scores and probabilities).
"""

from __future__ import annotations

from ray_prune.core.memory.arch import Arch
from ray_prune.core.memory.terms import GIB, Term
from ray_prune.core.memory.workload import Workload

LOGITS_BUDGET = 1 << 28  # ray_prune.core.loss.LOGITS_BUDGET: the C4 / validation loss caps a batch's logits
REFERENCE_LOSS_BATCH = 8  # next_token_loss's default batch, which the profile stage's reference loss uses


def inference_layer_bytes(arch: Arch, tokens: int, c: int, context: int, masked: bool) -> int:
    """Live tensors of one block at its widest point in a no-grad forward (derived from the modeling code).

    Attention: input, normed input, q/k/v, rotated q/k, output, o_proj output, plus (with a mask and GQA) k/v
    repeated to every head and (eager) the scores, fp32 softmax and probabilities. FFN: input, residual,
    normed input and three intermediates (activation, up projection, their product).
    """
    H, I, q, k = arch.hidden, arch.intermediate, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    attn = 3 * H + (q + 2 * k) + (q + k) + q
    if masked and arch.kv_heads != arch.heads:
        attn += 2 * q
    attn_bytes = attn * c * tokens
    if arch.eager:
        attn_bytes += tokens * arch.heads * context * (2 * c + 4 + (c if arch.attn_softcap else 0))
    ffn_bytes = (3 * H + 3 * I + (H if arch.parallel else 0)) * c * tokens
    return max(attn_bytes, ffn_bytes)


def _loss_batch(batch: int, seq_len: int, vocab: int) -> int:
    """Blocks per forward of ``core.loss.next_token_loss``."""
    return max(1, min(batch, LOGITS_BUDGET // (seq_len * vocab)))


def next_token_loss_bytes(arch: Arch, c: int, batch: int, seq_len: int) -> tuple[int, str]:
    """Peak of ``next_token_loss`` over its weights: a forward, the capped logits and one row's fp32 cross-entropy."""
    b = _loss_batch(batch, seq_len, arch.vocab)
    logits = b * seq_len * arch.vocab * c * (2 if arch.final_softcap else 1)
    fwd = inference_layer_bytes(arch, b * seq_len, c, seq_len, arch.sliding_window is not None
                                and seq_len > arch.sliding_window)
    per_row = 2 * seq_len * arch.vocab * 4
    return max(fwd, logits + per_row), f"{b} x {seq_len} tokens per forward"


def profile_terms(arch: Arch, w: Workload, c: int) -> list[Term]:
    """``core.profile.profile``: a decoder forward plus the captured unit vectors of every stream."""
    B, T, L, H = w.calibration.batch_size, w.calibration.max_length, arch.layers, arch.hidden
    tokens = B * T
    rows = B if w.calibration.metric == "angular" else tokens  # angular: each sample's last token; others: every token
    vectors = (L + 1) * rows * H * 4
    gram = rows * (L + 1) ** 2 * 4
    fwd = inference_layer_bytes(arch, tokens, c, T, True) + B * T * T * (c if arch.eager else 1)
    peak = max(vectors + fwd, 2 * vectors + 2 * gram)
    return [Term("profile: forward and captured streams", peak, False, f"batch {B} x {T}, {w.calibration.metric}: "
                 f"{(vectors + gram) / GIB:.2f} GiB of vectors and Gram products")]

