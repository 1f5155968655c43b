"""SLEB's greedy order: the same order and losses as pruning a copy for every candidate of every round."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model

from ray_prune.core.data import load_texts
from ray_prune.core.greedy import GreedyOrder, greedy_order
from ray_prune.core.loss import next_token_loss
from ray_prune.core.packing import pack_texts
from ray_prune.core.prune import prune_layers
from ray_prune.core.select import layers_to_remove
from ray_prune.errors import UserError

BOS = 1  # tiny models' BOS id: packed blocks hold none, so the test puts some in to check they are never scored


@pytest.fixture(scope="module")
def blocks(tokenizer, data_dir):
    packed = pack_texts(load_texts("calibration", 8, data_dir_path=data_dir), tokenizer, 40, max_blocks=5)
    packed[:, 0] = BOS
    packed[1, 17] = BOS
    return packed


def _brute_force(model, blocks, rounds, batch_size):
    """Every round, every candidate: prune a copy with prune_layers and take its loss with next_token_loss."""
    removed, losses, gaps = [], [], []
    L = model.config.num_hidden_layers
    for _ in range(rounds):
        cand = {j: next_token_loss(prune_layers(copy.deepcopy(model), sorted(removed + [j])), blocks,
                                   batch_size=batch_size, bos=BOS)
                for j in range(L) if j not in removed}
        ranked = sorted(cand.items(), key=lambda kv: (kv[1], kv[0]))
        removed.append(ranked[0][0])
        losses.append(ranked[0][1])
        gaps.append(ranked[1][1] - ranked[0][1] if len(ranked) > 1 else float("inf"))
    return removed, losses, gaps


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma2"])
def test_greedy_order_equals_the_brute_force_loop(family, blocks):
    """gemma3_text: sliding and full layers (sliding_window 16 < 40 tokens), so a kept block must keep its own
    attention type; gemma2: soft-capped logits and post-feedforward norms."""
    model = tiny_model(family, num_layers=6)
    got = greedy_order(model, blocks, bos=BOS, batch_size=2)
    want, losses, gaps = _brute_force(model, blocks, 5, batch_size=2)
    # The comparison means something only if no round is a near-tie the rounding could flip.
    assert min(gaps) > 1e-4
    assert got.order == want
    assert got.losses == pytest.approx(losses, abs=5e-6)
    assert got.base_loss == pytest.approx(next_token_loss(model, blocks, bos=BOS), abs=5e-6)
    assert got.candidates == 6 + 5 + 4 + 3 + 2
    # Every prefix, pruned and run whole, has the loss the order records.
    for k in range(1, 6):
        pruned = prune_layers(copy.deepcopy(model), layers_to_remove("greedy", 6, k, order=got.order))
        assert next_token_loss(pruned, blocks, bos=BOS) == pytest.approx(got.losses[k - 1], abs=5e-6)


def test_bos_is_never_a_target_and_the_model_is_unchanged(blocks):
    model = tiny_model("llama", num_layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = greedy_order(model, blocks, bos=BOS, batch_size=3, max_remove=1)
    _, count = next_token_loss(model, blocks, bos=BOS, return_count=True)
    assert got.tokens == count == blocks.shape[0] * (blocks.shape[1] - 1) - 1  # one BOS inside block 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    unscored = greedy_order(model, blocks, bos=None, batch_size=3, max_remove=1)
    assert unscored.tokens == blocks.shape[0] * (blocks.shape[1] - 1)


def test_a_short_order_is_the_start_of_the_full_one(blocks):
    model = tiny_model("qwen2", num_layers=5)
    full = greedy_order(model, blocks, bos=BOS, batch_size=5)
    short = greedy_order(model, blocks, bos=BOS, batch_size=2, max_remove=2)  # batching does not change it
    assert len(full.order) == 4 and short.order == full.order[:2]
    assert short.losses == pytest.approx(full.losses[:2], abs=5e-6)
    assert short.prefix(2) == sorted(full.order[:2])
    assert GreedyOrder.from_dict(full.to_dict()) == full
    none = greedy_order(model, blocks, bos=BOS, max_remove=0)
    assert none.order == [] and none.base_loss == pytest.approx(full.base_loss, abs=5e-6)
    with pytest.raises(UserError, match="cannot remove n=5"):
        greedy_order(model, blocks, max_remove=5)
    with pytest.raises(UserError, match="token blocks"):
        greedy_order(model, blocks[0])


def test_each_round_is_one_log_line_naming_the_layer_it_removes(blocks, caplog):
    """A sweep's stage 1 forwards these lines to the driver: a long order shows its rounds as they end."""
    model = tiny_model("llama", num_layers=4)
    with caplog.at_level("INFO", logger="ray_prune.core.greedy"):
        got = greedy_order(model, blocks, bos=BOS, batch_size=2, max_remove=2, model_id="tiny")
    lines = [r.getMessage() for r in caplog.records if r.name == "ray_prune.core.greedy"]
    assert [line.split(" (")[0] for line in lines] == [f"tiny: greedy round {k + 1} of 2 removes layer {layer}"
                                                       for k, layer in enumerate(got.order)]


@pytest.mark.slow
def test_greedy_first_round_on_smollm2(smollm2, data_dir):
    """The real model (tied embeddings, its own rotary scaling): the first round equals the brute-force loop's."""
    model, tok = smollm2
    blocks = pack_texts(load_texts("calibration", 4, data_dir_path=data_dir), tok, 32, max_blocks=2)
    got = greedy_order(model, blocks, bos=None, batch_size=2, max_remove=1)
    cand = {j: next_token_loss(prune_layers(model, [j], inplace=False), blocks, batch_size=2) for j in range(30)}
    best = min(cand, key=lambda j: (cand[j], j))
    assert got.order == [best]
    assert got.losses[0] == pytest.approx(cand[best], abs=1e-5)
    assert got.base_loss == pytest.approx(next_token_loss(model, blocks, batch_size=2), abs=1e-5)
