"""The one next-token loss (heal validation and the reported C4 loss) against HF's own shifted-label loss."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from helpers import tiny_model
from ray_prune.core.data import load_texts
from ray_prune.core.loss import c4_loss, next_token_loss
from ray_prune.core.packing import pack_texts
from ray_prune.errors import UserError


@pytest.fixture(scope="module")
def heal_texts(data_dir) -> list[str]:
    return load_texts("heal", 12)


@pytest.fixture(scope="module")
def gemma_tokenizer():
    from ray_prune.core.models import load_tokenizer

    return load_tokenizer("gemma3-270m")


def test_validation_loss_is_the_token_mean_next_token_ce(tokenizer, heal_texts):
    model = tiny_model("llama", num_layers=2)
    blocks = pack_texts(heal_texts[:3], tokenizer, 32)[:3]
    with torch.no_grad():
        per_block = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
    assert next_token_loss(model, blocks, batch_size=2) == pytest.approx(sum(per_block) / 3, rel=1e-5)



def test_batching_does_not_change_the_loss(tokenizer, heal_texts):
    model = tiny_model("llama", num_layers=2)
    blocks = pack_texts(heal_texts, tokenizer, 32)[:5]
    one = next_token_loss(model, blocks, batch_size=1)
    assert next_token_loss(model, blocks, batch_size=5) == pytest.approx(one, rel=1e-6)


def test_c4_loss_of_a_random_model_is_ln_vocab_and_equals_manual_cross_entropy(tokenizer, data_dir):
    model = tiny_model("llama", num_layers=2)
    texts = load_texts("test", 30, data_dir_path=data_dir)
    out = c4_loss(model, tokenizer, texts=texts, num_sequences=6, seq_len=128, batch_size=4)
    assert out["sequences"] == 6 and out["tokens"] == 6 * 127 and out["vocab_size"] == 49152
    assert abs(out["loss_norm"] - 1) < 0.01  # a random model is a uniform guess: ln V nats
    # By hand: documents + EOS, concatenated, first 6 blocks of 128; HF's own shifted-label loss per block.
    stream = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = torch.tensor(stream[:6 * 128]).view(6, 128)
    with torch.no_grad():
        manual = sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks) / 6
    assert out["loss"] == pytest.approx(manual, rel=1e-5)
    assert out["loss_norm"] == pytest.approx(out["loss"] / math.log(49152))


def test_c4_default_blocks_are_the_test_role_and_nothing_else(tokenizer, data_dir):
    """The reported loss reads the test role, in order, and only as far as its blocks need."""
    from ray_prune.core.data import ROLES, iter_role, role_of
    from ray_prune.core.loss import c4_blocks

    blocks = c4_blocks(tokenizer, 4, 128, data_dir)
    first = list(iter_role("test", "c4", data_dir))
    assert torch.equal(blocks, pack_texts(first, tokenizer, 128, max_blocks=4))
    assert all(role_of(t) == "test" for t in first)
    others = {t for r in ROLES if r != "test" for t in load_texts(r, None, "c4", data_dir)}
    assert not set(first) & others


def test_a_bos_is_never_a_target(gemma_tokenizer, data_dir):
    """Gemma's tokenizer opens every document with BOS: a block that holds several documents carries each one's
    BOS as input, and the loss scores every real next token but those."""
    from ray_prune.core.packing import IGNORE, scored_bos, targets

    bos = scored_bos(gemma_tokenizer)
    assert bos is not None
    blocks = pack_texts(load_texts("test", 40, data_dir_path=data_dir), gemma_tokenizer, 256, max_blocks=6)
    inner = (blocks[:, 1:] == bos).sum()
    assert inner > 0, "the blocks should hold document boundaries"
    labels = targets(blocks, bos)
    assert (labels == IGNORE).sum() == (blocks == bos).sum() and (labels[blocks != bos] == blocks[blocks != bos]).all()
    model = tiny_model("gemma3_text", num_layers=2)
    model.resize_token_embeddings(len(gemma_tokenizer))
    loss, count = next_token_loss(model, blocks, batch_size=2, bos=bos, return_count=True)
    assert count == blocks.shape[0] * (blocks.shape[1] - 1) - int(inner)
    with torch.no_grad():  # HF's own shifted-label loss with those labels, block by block, token-weighted
        sums = [model(input_ids=b[None], labels=labels[i][None]).loss.item() * int((labels[i, 1:] != IGNORE).sum())
                for i, b in enumerate(blocks)]
    assert loss == pytest.approx(sum(sums) / count, rel=1e-5)
    _, every = next_token_loss(model, blocks, batch_size=2, return_count=True)  # without bos: BOS targets count
    assert every == blocks.shape[0] * (blocks.shape[1] - 1)


def test_c4_uses_the_blocks_the_texts_hold_and_says_so(tokenizer, caplog):
    model = tiny_model("llama", num_layers=2)
    texts = ["A short document about the weather. " * 20, "Another one, about rivers and hills. " * 20]
    with caplog.at_level(logging.WARNING, logger="ray_prune.core.loss"):
        out = c4_loss(model, tokenizer, texts=texts, num_sequences=50, seq_len=64)
    assert 1 <= out["sequences"] < 50 and out["tokens"] == out["sequences"] * 63  # SmolLM2 adds no BOS
    assert "no more" in caplog.text
    with pytest.raises(UserError):
        c4_loss(model, tokenizer, texts=["too short"], num_sequences=1, seq_len=64)
