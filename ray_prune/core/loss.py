"""The next-token loss: one function for the heal validation loss and for the C4 loss that rows report.

Both readouts score packed blocks (``core.packing``): every position of a
block but the first is a target, except a BOS (``packing.targets``), so the
loss is the mean over the real next tokens of the blocks. Cross-entropy is
taken in fp32 one block at a time and summed in Python floats, so the result
does not depend on how blocks are batched; batches of logits are capped near
2^28 elements (Gemma's 262k vocabulary makes ``[batch, seq_len, vocab]`` the
largest tensor of an evaluation).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ray_prune.core.data import TextSource, iter_role
from ray_prune.core.evaluation.config import DEFAULT
from ray_prune.core.packing import IGNORE, pack_stream, scored_bos, targets
from ray_prune.errors import UserError

log = logging.getLogger(__name__)

LOGITS_BUDGET = 1 << 28  # elements of one batch's logits


@torch.no_grad()
def next_token_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, bos: int | None = None,
                    return_count: bool = False):
    """Mean next-token cross-entropy (nats) of ``model`` over packed ``blocks`` (num_blocks, seq_len).

    ``bos``: a token id that is input but never a target (``packing.scored_bos(tokenizer)``). With
    ``return_count``, also the number of targets scored. The model's train/eval mode is restored
    afterwards, so the heal loop can call it mid-training.
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"expected (num_blocks, seq_len >= 2) token blocks, got shape {tuple(blocks.shape)}")
    vocab = int(model.config.vocab_size)
    step = max(1, min(batch_size, LOGITS_BUDGET // (blocks.shape[1] * vocab)))
    device = next(model.parameters()).device
    labels = targets(blocks, bos)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, blocks.shape[0], step):
            ids = blocks[start:start + step].to(device)
            gold = labels[start:start + step, 1:].to(device)
            logits = model(input_ids=ids, use_cache=False).logits  # no KV cache to build and drop
            for row in range(ids.shape[0]):
                total += nn.functional.cross_entropy(logits[row, :-1].float(), gold[row], reduction="sum",
                                                     ignore_index=IGNORE).item()
            count += int((gold != IGNORE).sum())
            del logits
    finally:
        model.train(was_training)
    loss = total / count
    return (loss, count) if return_count else loss


def c4_blocks(tokenizer, num_sequences: int, seq_len: int, data_dir=None, source: TextSource | None = None):
    """The reported loss's blocks: the first ``num_sequences`` packed blocks of the C4 ``test`` role."""
    return pack_stream(iter_role("test", "c4", data_dir, source), tokenizer, seq_len, max_blocks=num_sequences)


def c4_loss(
    model: nn.Module,
    tokenizer,
    texts: list[str] | None = None,
    num_sequences: int = DEFAULT.c4_sequences,
    seq_len: int = DEFAULT.seq_len,
    batch_size: int = DEFAULT.batch_size,
    data_dir=None,
    blocks: torch.Tensor | None = None,
) -> dict:
    """Mean next-token cross-entropy (nats) on a fixed held-out C4 set, and that over ln(vocab).

    The blocks default to those of the C4 ``test`` role (:func:`c4_blocks`), disjoint from calibration,
    healing and the selection set heal settings are chosen on, by construction. ``texts`` (packed here) or
    ``blocks`` (packed already, as the sweep shares them between trials) replace them. They are packed
    (tokenize, EOS after each document, concatenate, cut into ``seq_len`` blocks, keep the first
    ``num_sequences``), so the set is the same for every model that shares a tokenizer. If the source
    holds fewer tokens than asked for, all full blocks are used and ``sequences`` says how many (the local
    mirror's C4 sample holds 45 blocks of 1024 SmolLM2 tokens); a warning is logged.

    ``loss_norm`` divides by ln(``model.config.vocab_size``), the size of the softmax the model predicts
    over, as the paper divides by the log of the vocabulary size: a uniform guess scores exactly 1.
    """
    if num_sequences < 1 or seq_len < 2:
        raise UserError(f"c4_loss needs num_sequences >= 1 and seq_len >= 2, got {num_sequences}, {seq_len}")
    if blocks is None:
        blocks = (pack_stream(texts, tokenizer, seq_len, max_blocks=num_sequences) if texts is not None
                  else c4_blocks(tokenizer, num_sequences, seq_len, data_dir))
    if len(blocks) < num_sequences:
        log.warning("C4 loss on %d blocks of %d tokens: the texts hold no more (%d were asked for)",
                    len(blocks), seq_len, num_sequences)
    vocab = int(model.config.vocab_size)
    loss, count = next_token_loss(model, blocks, batch_size, scored_bos(tokenizer), return_count=True)
    return {"loss": loss, "loss_norm": loss / math.log(vocab), "tokens": count,
            "sequences": len(blocks), "seq_len": blocks.shape[1], "vocab_size": vocab}
