"""Documents -> fixed-length token blocks, one packing for healing, heal validation and the reported C4 loss.

Packing wastes no compute on padding and gives every block the same number of
loss tokens, so plain means over blocks are token-weighted. Each document is
tokenized as its tokenizer does by default and ends in EOS. Where the
tokenizer adds a BOS, every block also starts with one and holds
``seq_len - 1`` text tokens: Gemma-style models are far off without it, and
the training, the heal validation loss and the C4 loss in the results then all
see the same kind of block.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ray_prune.errors import UserError

_CHUNK = 64  # documents tokenized per call: batched for speed, small enough to stop early


def pack_texts(texts: Sequence[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """``(num_blocks, seq_len)`` int64 blocks; the tail that does not fill a block is dropped."""
    if seq_len < 2:
        raise UserError(f"seq_len = {seq_len}", "use seq_len >= 2")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token to separate packed documents",
                        "set tokenizer.eos_token before packing text")
    texts = [t for t in texts if isinstance(t, str) and t]
    if not texts:
        raise UserError("no texts to pack", "pass at least one non-empty document")
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    body = seq_len - 1 if adds_bos else seq_len
    need = None if max_blocks is None else max_blocks * body
    stream: list[int] = []
    for start in range(0, len(texts), _CHUNK):
        for doc in tokenizer(texts[start:start + _CHUNK], verbose=False)["input_ids"]:
            stream.extend(doc)
            if not doc or doc[-1] != eos:
                stream.append(eos)
        if need is not None and len(stream) >= need:
            break
    n_blocks = len(stream) // body if max_blocks is None else min(max_blocks, len(stream) // body)
    if n_blocks == 0:
        raise UserError(f"{len(texts)} documents give {len(stream)} tokens, fewer than one block of {seq_len}",
                        "pass more text or use a shorter seq_len")
    blocks = torch.tensor(stream[: n_blocks * body], dtype=torch.long).view(n_blocks, body)
    if adds_bos:
        blocks = torch.cat([torch.full((n_blocks, 1), bos, dtype=torch.long), blocks], dim=1)
    return blocks
