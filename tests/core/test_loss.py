"""The one next-token loss (heal validation and the reported C4 loss) against HF's own shifted-label loss."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from helpers import tiny_model
from ray_prune.core.data import texts_for_tokens
from ray_prune.core.data import load_texts
from ray_prune.core.loss import c4_loss, next_token_loss
from ray_prune.core.packing import pack_texts
from ray_prune.errors import UserError


@pytest.fixture(scope="module")
def heal_texts(data_dir) -> list[str]:
    return load_texts("heal", 12)


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
    texts = texts_for_tokens("validation", 6 * 128, tokenizer, data_dir_path=data_dir)
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


def test_c4_default_texts_are_the_held_out_role(tokenizer, data_dir):
    from ray_prune.core.data import load_texts, role_of

    texts = texts_for_tokens("validation", 64 * 1024, tokenizer, data_dir_path=data_dir)
    assert texts and all(role_of(t) == "validation" for t in texts)
    others = set(load_texts("calibration", None, "c4", data_dir)) | set(load_texts("heal", None, "c4", data_dir))
    assert not set(texts) & others


def test_c4_uses_the_blocks_the_texts_hold_and_says_so(tokenizer, caplog):
    model = tiny_model("llama", num_layers=2)
    texts = ["A short document about the weather. " * 20, "Another one, about rivers and hills. " * 20]
    with caplog.at_level(logging.WARNING, logger="ray_prune.core.loss"):
        out = c4_loss(model, tokenizer, texts=texts, num_sequences=50, seq_len=64)
    assert 1 <= out["sequences"] < 50 and out["tokens"] == out["sequences"] * 63
    assert "no more" in caplog.text
    with pytest.raises(UserError):
        c4_loss(model, tokenizer, texts=["too short"], num_sequences=1, seq_len=64)
