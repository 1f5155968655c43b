"""Documents -> fixed-length token blocks, one packing for healing, heal validation and the reported C4 loss.

Packing wastes no compute on padding. Each document is tokenized as its
tokenizer does by default and ends in EOS. Where the tokenizer adds a BOS,
every block also starts with one and holds ``seq_len - 1`` text tokens:
Gemma-style models are far off without it, and the training, the heal
validation loss and the C4 loss in the results then all see the same kind of
block.

Targets: every position of a block but the first is predicted, except where
the token is a BOS. A document that starts inside a block keeps its BOS as
input (the model reads documents as it was trained to), but "EOS -> BOS" is
not a real next token: it is the same free prediction at every boundary, and
scoring it would flatten the loss and flatter healing, which learns it at once.
:func:`targets` marks those positions with -100, the ignore index of PyTorch's
and HF's cross-entropy.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ray_prune.errors import UserError

_CHUNK = 64  # documents tokenized per call: batched for speed, small enough to stop early
IGNORE = -100  # the label of a position that is not scored


def scored_bos(tokenizer) -> int | None:
    """The BOS id that blocks carry as input but never score as a target, or None if the tokenizer adds none."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def targets(blocks: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Labels for HF's shifted-label loss: the blocks themselves, with every BOS made IGNORE."""
    labels = blocks.clone()
    if bos is not None:
        labels[labels == bos] = IGNORE
    return labels


def pack_stream(texts: Iterable[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """``(num_blocks, seq_len)`` int64 blocks from documents read in order, reading no more than it needs.

    With ``max_blocks``, reading stops once that many blocks are full (a lazy iterable of documents is never
    read further); the tail that does not fill a block is dropped.
    """
    if seq_len < 2:
        raise UserError(f"seq_len = {seq_len}", "use seq_len >= 2")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token to separate packed documents",
                        "set tokenizer.eos_token before packing text")
    bos = scored_bos(tokenizer)
    body = seq_len - 1 if bos is not None else seq_len
    need = None if max_blocks is None else max_blocks * body
    stream: list[int] = []
    docs = 0
    chunk: list[str] = []
    for text in (t for t in texts if isinstance(t, str) and t):
        chunk.append(text)
        if len(chunk) == _CHUNK:
            docs += len(chunk)
            _extend(stream, tokenizer, chunk, eos)
            chunk = []
            if need is not None and len(stream) >= need:
                break
    if chunk:
        docs += len(chunk)
        _extend(stream, tokenizer, chunk, eos)
    if docs == 0:
        raise UserError("no texts to pack", "pass at least one non-empty document")
    n_blocks = len(stream) // body if max_blocks is None else min(max_blocks, len(stream) // body)
    if n_blocks == 0:
        raise UserError(f"{docs} documents give {len(stream)} tokens, fewer than one block of {seq_len}",
                        "pass more text or use a shorter seq_len")
    blocks = torch.tensor(stream[: n_blocks * body], dtype=torch.long).view(n_blocks, body)
    if bos is not None:
        blocks = torch.cat([torch.full((n_blocks, 1), bos, dtype=torch.long), blocks], dim=1)
    return blocks


def _extend(stream: list[int], tokenizer, docs: list[str], eos: int) -> None:
    for ids in tokenizer(docs, verbose=False)["input_ids"]:
        stream.extend(ids)
        if not ids or ids[-1] != eos:
            stream.append(eos)


def pack_texts(texts: Sequence[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """``(num_blocks, seq_len)`` int64 blocks of a list of documents (see :func:`pack_stream`)."""
    return pack_stream(texts, tokenizer, seq_len, max_blocks)
