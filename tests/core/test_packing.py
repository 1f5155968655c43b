"""One packing for healing, the heal validation loss and the reported C4 loss."""

from __future__ import annotations

import pytest
import torch

from ray_prune.core.data import load_texts
from ray_prune.errors import UserError
from ray_prune.core.packing import pack_texts


@pytest.fixture(scope="module")
def texts(data_dir) -> list[str]:
    return load_texts("heal", 12)


@pytest.fixture(scope="module")
def gemma_tokenizer():
    from ray_prune.core.models import load_tokenizer

    return load_tokenizer("gemma3-270m")


def _stream(texts: list[str], tok) -> list[int]:
    out: list[int] = []
    for text in texts:
        ids = tok(text)["input_ids"]
        out += ids if ids[-1:] == [tok.eos_token_id] else ids + [tok.eos_token_id]
    return out


def test_without_bos_the_blocks_are_the_eos_joined_stream_cut_into_full_blocks(tokenizer, texts):
    assert tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]  # SmolLM2 adds no BOS
    seq_len = 64
    blocks = pack_texts(texts, tokenizer, seq_len)
    stream = _stream(texts, tokenizer)
    n = len(stream) // seq_len
    assert blocks.dtype == torch.int64 and blocks.shape == (n, seq_len) and n >= 10
    # No padding and nothing reordered: exactly the stream's first n * seq_len tokens.
    assert blocks.flatten().tolist() == stream[: n * seq_len]
    assert (blocks == tokenizer.eos_token_id).sum().item() == stream[: n * seq_len].count(tokenizer.eos_token_id) >= 2


def test_with_bos_every_block_opens_with_it_and_carries_the_stream_on(gemma_tokenizer, texts):
    tok = gemma_tokenizer
    bos = tok.bos_token_id
    assert tok("a")["input_ids"][0] == bos
    seq_len = 32
    blocks = pack_texts(texts, tok, seq_len)
    stream = _stream(texts, tok)
    n = len(stream) // (seq_len - 1)
    assert blocks.shape == (n, seq_len) and (blocks[:, 0] == bos).all()
    assert blocks[:, 1:].flatten().tolist() == stream[: n * (seq_len - 1)]


def test_max_blocks_is_a_prefix_of_the_full_packing(gemma_tokenizer, texts):
    full = pack_texts(texts, gemma_tokenizer, 32)
    assert torch.equal(pack_texts(texts, gemma_tokenizer, 32, max_blocks=5), full[:5])
    assert torch.equal(pack_texts(texts, gemma_tokenizer, 32, max_blocks=10**6), full)


def test_heal_and_evaluate_share_it_and_one_loss():
    from ray_prune.core import loss
    from ray_prune.core.heal import loop

    from ray_prune.core import packing

    assert loop.pack_texts is pack_texts and loop.pack_stream is packing.pack_stream is loss.pack_stream
    assert loop.next_token_loss is loss.next_token_loss
    assert loop.targets is loss.targets is packing.targets


@pytest.mark.parametrize("args,pattern", [((["just a few words"], 512), "fewer than one block"),
                                          ((["", None], 16), "no texts to pack"),
                                          ((["words"], 1), "seq_len")])
def test_bad_input(tokenizer, args, pattern):
    with pytest.raises(UserError, match=pattern):
        pack_texts(args[0], tokenizer, args[1])
