"""The distance table: Gram form equals a per-pair loop, padding side does not matter, hooks see x^L before the norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import tiny_model
from ray_prune.core.data import load_texts
from ray_prune.core.profile import METRICS, DistanceTable, last_token_index, profile
from ray_prune.errors import UserError


@pytest.fixture(scope="module")
def texts(data_dir):
    return load_texts("calibration", 12, data_dir_path=data_dir)


def _streams(model, tokenizer, texts, max_length):
    """Reference: hidden states via output_hidden_states, with x^L re-derived before the final norm."""
    outs = []
    for t in texts:  # one at a time: no padding at all
        enc = tokenizer([t], return_tensors="pt", truncation=True, max_length=max_length)
        captured = {}
        last = model.model.layers[-1]
        h = last.register_forward_hook(
            lambda m, a, o, captured=captured: captured.__setitem__("xL", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        h.remove()
        streams = list(hs[:-1]) + [captured["xL"]]
        outs.append((torch.stack([s[0] for s in streams]).double(), enc["attention_mask"][0]))
    return outs


def _loop_table(model, tokenizer, texts, metric, max_length=64):
    """Direct per-pair, per-sample loop: the definition, with no Gram trick."""
    data = _streams(model, tokenizer, texts, max_length)
    L = data[0][0].shape[0] - 1
    table = np.zeros((L + 1, L + 1))
    count = 0
    for streams, mask in data:
        positions = [int(mask.shape[0] - 1)] if metric == "angular" else list(range(mask.shape[0]))
        for p in positions:
            for l in range(L + 1):
                for m in range(L + 1):
                    c = torch.nn.functional.cosine_similarity(streams[l, p], streams[m, p], dim=0).clamp(-1, 1)
                    table[l, m] += (1 - c.item()) if metric == "block_influence" else math.acos(c.item()) / math.pi
            count += 1
    table /= count
    np.fill_diagonal(table, 0)
    return table


@pytest.mark.parametrize("metric", METRICS)
def test_gram_form_equals_per_pair_loop(metric, tokenizer, texts):
    model = tiny_model("llama", num_layers=5)
    got = profile(model, tokenizer, texts[:4], metric=metric, batch_size=3, max_length=64, progress=False)
    want = _loop_table(model, tokenizer, texts[:4], metric)
    assert got.distances.shape == (6, 6)
    np.testing.assert_allclose(got.distances, want, atol=2e-5)
    assert got.samples == 4
    assert np.all(got.distances >= 0) and np.all(got.distances <= 1)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2", "gpt_neox"])
def test_padding_side_does_not_change_the_table(family, tokenizer, texts):
    model = tiny_model(family, num_layers=4)
    tables = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        tables[side] = profile(model, tokenizer, texts, batch_size=4, max_length=48, progress=False)
    tokenizer.padding_side = "right"
    one_by_one = profile(model, tokenizer, texts, batch_size=1, max_length=48, progress=False)
    np.testing.assert_allclose(tables["left"].distances, tables["right"].distances, atol=1e-5)
    np.testing.assert_allclose(tables["left"].distances, one_by_one.distances, atol=1e-5)
    assert tables["left"].tokens == one_by_one.tokens


def test_last_token_index_both_sides():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


def test_last_stream_is_before_the_final_norm(tokenizer, texts):
    """x^L must be the raw residual stream: a model whose final norm is scaled must give the same table."""
    model = tiny_model("llama", num_layers=3)
    base = profile(model, tokenizer, texts[:3], max_length=32, progress=False)
    with torch.no_grad():
        model.model.norm.weight.mul_(-3.0)  # would change hidden_states[-1] of HF, not x^L
    again = profile(model, tokenizer, texts[:3], max_length=32, progress=False)
    np.testing.assert_allclose(base.distances, again.distances, atol=1e-6)


def test_parquet_round_trip_and_frame(tmp_path, tokenizer, texts):
    model = tiny_model("mistral", num_layers=4)
    table = profile(model, tokenizer, texts[:5], metric="angular_all", max_length=32, progress=False,
                    model_id="tiny-mistral")
    path = table.save(tmp_path / "t" / "distance.parquet")
    back = DistanceTable.load(path)
    np.testing.assert_allclose(back.distances, table.distances)
    for k in ("model_id", "metric", "num_layers", "samples", "tokens", "data_hash", "max_length"):
        assert getattr(back, k) == getattr(table, k), k
    frame = table.to_frame()
    assert len(frame) == 4 * 5 // 2  # pairs (l, l+n) with n >= 1 among 5 streams
    assert back.d(1, 2) == pytest.approx(table.distances[1, 3])
    assert not list(tmp_path.glob("t/.*tmp"))


def test_data_hash_tracks_the_texts(tokenizer, texts):
    model = tiny_model("llama", num_layers=2)
    a = profile(model, tokenizer, texts[:3], max_length=16, progress=False)
    b = profile(model, tokenizer, texts[1:4], max_length=16, progress=False)
    assert a.data_hash != b.data_hash


def test_bad_input_is_a_user_error(tokenizer, texts):
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(UserError, match="unknown metric"):
        profile(model, tokenizer, texts, metric="cosine")
    with pytest.raises(UserError, match="no calibration texts"):
        profile(model, tokenizer, [])
    with pytest.raises(IndexError):
        profile(model, tokenizer, texts[:2], max_length=16, progress=False).d(1, 2)
