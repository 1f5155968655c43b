"""Token blocks packed once per sweep and read by every trial: the heal data, the selection set, the test set.

Stage 1 packs, per tokenizer, exactly the blocks the sweep will consume: for each heal sequence length the
most training blocks any heal setting needs (steps x sequences per step), the selection blocks (heal
validation, ASHA), and the test blocks of the C4 loss that rows report. Each reads its C4 role from the
source in order and stops once its blocks are full, so a streamed hub corpus costs only those rows, and
no trial tokenizes anything: it reads the prefix of the blocks it needs from storage
(``layout.blocks_path``), as a memory map where storage is local.

A block file is named by a hash of everything that made it (the tokenizer, the corpus, the roles'
definition, the role, the length and the count), and a JSON beside it records its shape and checksum. Stage 1
reuses a stored file only if it matches both; otherwise it says so in one line, deletes it and packs it again.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import torch

from ray_prune.ledger.layout import blocks_path, stable_hash
from ray_prune.ledger.storage import Storage

DTYPE = np.int32  # token ids as stored: every vocabulary here fits, at half the bytes of int64


@dataclass(frozen=True)
class Need:
    role: str  # "heal", "selection" or "test"
    seq_len: int
    count: int


class InvalidBlocks(ValueError):
    """A stored block file that does not match its record; the message names the file and why."""


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


def _record_path(path: str) -> str:
    return path.removesuffix(".npy") + ".json"


def check(storage: Storage, path: str) -> None:
    """Raise :class:`InvalidBlocks` unless the block file at ``path`` matches its record (shape and sha256)."""
    where = storage.path(path)
    try:
        record = json.loads(storage.read_bytes(_record_path(path)))
        data = storage.read_bytes(path)
    except FileNotFoundError as e:
        raise InvalidBlocks(f"{where} has no record beside it ({e})") from None
    except (OSError, ValueError) as e:
        raise InvalidBlocks(f"{where} cannot be read ({e})") from None
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise InvalidBlocks(f"{where} does not match the checksum of its record ({len(data)} bytes): truncated "
                            "or changed")
    try:
        shape = np.load(io.BytesIO(data), mmap_mode=None).shape
    except ValueError as e:
        raise InvalidBlocks(f"{where} is not a readable array ({e})") from None
    if list(shape) != record.get("shape"):
        raise InvalidBlocks(f"{where} holds blocks of shape {list(shape)}, its record says {record.get('shape')}")


def make(storage: Storage, tokenizer, wanted: list[Need], data_dir: str | None, source,
         notes: list[str] | None = None, count=None) -> dict:
    """Pack and store every needed block set that storage does not hold whole yet; ``{Need: relative path}``.
    A stored set that fails :func:`check` is deleted and packed again, with a line in ``notes``. ``count`` (a
    :class:`~ray_prune.core.data.RowCount`) tallies the source rows read, which is what bounds hub traffic."""
    from ray_prune.core.data import data_dir as resolve, iter_role, roles_identity
    from ray_prune.core.packing import pack_stream

    root = resolve(data_dir)
    base = {"tokenizer": tokenizer_key(tokenizer), "text": source.identity(root), "roles": roles_identity()}
    out = {}
    for need in wanted:
        key = stable_hash({**base, "role": need.role, "seq_len": need.seq_len, "count": need.count})
        path = blocks_path(key, need.role, need.seq_len, need.count)
        if storage.exists(path) or storage.exists(_record_path(path)):
            try:
                check(storage, path)
                out[need] = path
                continue
            except InvalidBlocks as e:
                if notes is not None:
                    notes.append(f"{e}; packing it again")
                for stale in (path, _record_path(path)):
                    if storage.exists(stale):
                        storage.delete(stale)
        blocks = pack_stream(iter_role(need.role, "c4", data_dir, source, count), tokenizer, need.seq_len,
                             max_blocks=need.count)
        buffer = io.BytesIO()
        np.save(buffer, blocks.numpy().astype(DTYPE))
        data = buffer.getvalue()
        record = {"shape": list(blocks.shape), "dtype": np.dtype(DTYPE).name,
                  "sha256": hashlib.sha256(data).hexdigest(),
                  "role": need.role, "seq_len": need.seq_len, "count": need.count, **base}
        storage.write_bytes(path, data)  # the array first: a record without its array is re-made, never trusted
        storage.write_bytes(_record_path(path), json.dumps(record, indent=1).encode())
        out[need] = path
    return out


def read(storage: Storage, path: str, count: int | None = None) -> torch.Tensor:
    """The first ``count`` blocks (all for None) of a stored block set, as int64 token ids (fewer where the corpus
    held fewer: the readers warn about that). Stage 1 checked the file whole before any trial started."""
    local = storage.local_path(path)
    try:
        array = np.load(local, mmap_mode="r") if local is not None else np.load(io.BytesIO(storage.read_bytes(path)))
    except (OSError, ValueError) as e:
        raise InvalidBlocks(f"{storage.path(path)} cannot be read ({e}); run the sweep again to pack it anew") \
            from None
    return torch.from_numpy(np.asarray(array[:count], dtype=np.int64))
