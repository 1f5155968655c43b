"""The next-token loss: one function for the heal validation loss and for the C4 loss that rows report.

Both readouts score packed blocks (``core.packing``): every position of a
block but the first is a target, so the loss is the mean over
``blocks x (seq_len - 1)`` predictions, token-weighted by construction.
Cross-entropy is taken in fp32 one block at a time and summed in Python
floats, so the result does not depend on how blocks are batched; batches of
logits are capped near 2^28 elements (Gemma's 262k vocabulary makes
``[batch, seq_len, vocab]`` the largest tensor of an evaluation).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ray_prune.core.data import texts_for_tokens
from ray_prune.core.packing import pack_texts
from ray_prune.errors import UserError

log = logging.getLogger(__name__)

LOGITS_BUDGET = 1 << 28  # elements of one batch's logits


@torch.no_grad()
def next_token_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over packed ``blocks`` (num_blocks, seq_len).

    The model's train/eval mode is restored afterwards, so the heal loop can call it mid-training.
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"expected (num_blocks, seq_len >= 2) token blocks, got shape {tuple(blocks.shape)}")
    vocab = int(model.config.vocab_size)
    step = max(1, min(batch_size, LOGITS_BUDGET // (blocks.shape[1] * vocab)))
    device = next(model.parameters()).device
    total = 0.0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, blocks.shape[0], step):
            ids = blocks[start:start + step].to(device)
            logits = model(input_ids=ids, use_cache=False).logits  # no KV cache to build and drop
            for row in range(ids.shape[0]):
                total += nn.functional.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="sum").item()
            del logits
    finally:
        model.train(was_training)
    return total / (blocks.shape[0] * (blocks.shape[1] - 1))


def c4_loss(
    model: nn.Module,
    tokenizer,
    texts: list[str] | None = None,
    num_sequences: int = 64,
    seq_len: int = 1024,
    batch_size: int = 8,
    data_dir=None,
) -> dict:
    """Mean next-token cross-entropy (nats) on a fixed held-out C4 set, and that over ln(vocab).

    The texts default to the C4 documents of the ``validation`` role
    (:func:`ray_prune.core.data.texts_for_tokens`), disjoint from calibration and
    healing by construction. They are packed (tokenize, EOS after each document,
    concatenate, cut into ``seq_len`` blocks, keep the first ``num_sequences``),
    so the set is the same for every model that shares a tokenizer. If the
    source holds fewer tokens than asked for, all full blocks are used and
    ``sequences`` says how many (the local mirror's C4 sample holds 45 blocks of
    1024 SmolLM2 tokens); a warning is logged.

    ``loss_norm`` divides by ln(``model.config.vocab_size``), the size of the
    softmax the model predicts over, as the paper divides by the log of the
    vocabulary size: a uniform guess over the model's outputs scores exactly 1.
    """
    if num_sequences < 1 or seq_len < 2:
        raise UserError(f"c4_loss needs num_sequences >= 1 and seq_len >= 2, got {num_sequences}, {seq_len}")
    if texts is None:
        texts = texts_for_tokens("validation", num_sequences * seq_len, tokenizer, data_dir_path=data_dir)
    blocks = pack_texts(texts, tokenizer, seq_len, max_blocks=num_sequences)
    if len(blocks) < num_sequences:
        log.warning("C4 loss on %d blocks of %d tokens: the texts hold no more (%d were asked for)",
                    len(blocks), seq_len, num_sequences)
    vocab = int(model.config.vocab_size)
    loss = next_token_loss(model, blocks, batch_size)
    return {"loss": loss, "loss_norm": loss / math.log(vocab), "tokens": blocks.shape[0] * (seq_len - 1),
            "sequences": len(blocks), "seq_len": seq_len, "vocab_size": vocab}
