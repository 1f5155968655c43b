"""Token blocks packed once per sweep and read by every trial: the heal data, the selection set, the test set.

Stage 1 packs, per tokenizer, exactly the blocks the sweep will consume: for each heal sequence length the
most training blocks any heal setting needs (steps x sequences per step), the selection blocks (heal
validation, ASHA), and the test blocks of the C4 loss that rows report. Each reads its C4 role from the
source in order and stops once its blocks are full, so a streamed hub corpus costs only those rows, and
no trial tokenizes anything: it reads the prefix of the blocks it needs from storage
(``layout.blocks_path``), as a memory map where storage is local.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch

from ray_prune.ledger.layout import blocks_path
from ray_prune.ledger.storage import Storage


@dataclass(frozen=True)
class Need:
    role: str  # "heal", "selection" or "test"
    seq_len: int
    count: int


def tokenizer_key(tokenizer) -> str:
    """A short fingerprint of what tokenization produces: models sharing a tokenizer share their blocks."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer("a")["input_ids"])).encode())
    return h.hexdigest()[:16]


def needs(heal_points: list[dict], c4_sequences: int, eval_seq_len: int) -> list[Need]:
    """The blocks a model's cells read: the largest count per (role, seq_len), since every cell uses a prefix."""
    most: dict[tuple[str, int], int] = {}

    def want(role: str, seq_len: int, count: int) -> None:
        most[(role, seq_len)] = max(count, most.get((role, seq_len), 0))

    for h in heal_points:
        if h.get("enabled", True):
            want("heal", h["seq_len"], h["steps"] * h["batch_size"] * h["grad_accum"])
            want("selection", h["seq_len"], h["val_sequences"])
    if c4_sequences:
        want("test", eval_seq_len, c4_sequences)
    return [Need(role, seq_len, count) for (role, seq_len), count in sorted(most.items())]


def make(storage: Storage, tokenizer, wanted: list[Need], data_dir: str | None, source, count=None) -> dict:
    """Pack and store every needed block set that storage does not hold yet; ``{Need: relative path}``."""
    from ray_prune.core.data import iter_role
    from ray_prune.core.packing import pack_stream

    key = tokenizer_key(tokenizer)
    out = {}
    for need in wanted:
        path = blocks_path(key, need.role, need.seq_len, need.count)
        if not storage.exists(path):
            blocks = pack_stream(iter_role(need.role, "c4", data_dir, source, count), tokenizer, need.seq_len,
                                 max_blocks=need.count)
            buffer = io.BytesIO()
            np.save(buffer, blocks.numpy().astype(np.int32))
            storage.write_bytes(path, buffer.getvalue())
        out[need] = path
    return out


def read(storage: Storage, path: str, count: int | None = None) -> torch.Tensor:
    """The first ``count`` blocks (all for None) of a stored block set, as int64 token ids."""
    local = storage.local_path(path)
    array = np.load(local, mmap_mode="r") if local is not None else np.load(io.BytesIO(storage.read_bytes(path)))
    return torch.from_numpy(np.asarray(array[:count], dtype=np.int64))
