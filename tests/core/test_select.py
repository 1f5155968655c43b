"""Layer selection: the paper's argmin rule, the deepest baseline, explicit lists, ShortGPT's block influence,
greedy prefixes, and fraction rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_model

from ray_prune.core.architecture import decoder_layers
from ray_prune.core.data import load_texts
from ray_prune.core.profile import DistanceTable, profile
from ray_prune.core.select import best_start, block_influence, layers_to_remove, n_from_fraction, optimal_starts
from ray_prune.errors import UserError


def _table(L: int, seed: int = 0, metric: str = "angular") -> DistanceTable:
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.05, 0.6, size=(L + 1, L + 1))
    d = np.triu(d, 1)
    d = d + d.T
    return DistanceTable("synthetic", metric, L, d, samples=1, tokens=1, data_hash="x", max_length=1)


@pytest.mark.parametrize("seed", range(5))
def test_best_start_is_the_brute_force_argmin(seed):
    t = _table(12, seed)
    for n in range(1, 12):
        brute = min(range(0, 12 - n + 1), key=lambda l: t.distances[l, l + n])
        assert best_start(t, n) == brute
        assert layers_to_remove("similarity", 12, n, table=t) == list(range(brute, brute + n))


def test_ties_go_to_the_shallowest_block():
    t = _table(6)
    t.distances[:] = 0.3
    assert best_start(t, 2) == 0


def test_optimal_starts_curve():
    t = _table(8, 3)
    curve = optimal_starts(t)
    assert [n for n, _, _ in curve] == list(range(1, 8))
    for n, l, d in curve:
        assert d == pytest.approx(t.distances[l, l + n])
        assert d == pytest.approx(min(t.distances[k, k + n] for k in range(0, 8 - n + 1)))


def test_deepest_keeps_the_final_layer():
    assert layers_to_remove("deepest", 30, 3) == [26, 27, 28]
    assert layers_to_remove("deepest", 18, 17) == list(range(0, 17))
    assert layers_to_remove("deepest", 18, 0) == []


def test_explicit_layers():
    assert layers_to_remove("layers", 10, layers=[7, 2, 2, 5]) == [2, 5, 7]
    with pytest.raises(UserError, match="do not exist"):
        layers_to_remove("layers", 10, layers=[10])
    with pytest.raises(UserError, match="explicit list"):
        layers_to_remove("layers", 10)


@pytest.mark.parametrize("f,L,n", [(0.0, 30, 0), (0.25, 30, 8), (0.25, 18, 5), (0.1, 30, 3), (0.5, 18, 9),
                                   (0.05, 18, 1), (0.7, 30, 21), (0.95, 30, 29)])
def test_fraction_rounds_half_up(f, L, n):
    assert n_from_fraction(f, L) == n


@pytest.mark.parametrize("f", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_fraction(f):
    with pytest.raises(UserError, match=r"outside \[0, 1\)"):
        n_from_fraction(f, 30)


def test_bad_n_and_strategy():
    with pytest.raises(UserError, match="cannot remove n=30"):
        layers_to_remove("deepest", 30, 30)
    with pytest.raises(UserError, match="unknown strategy"):
        layers_to_remove("random", 30, 3)
    with pytest.raises(UserError, match="needs a distance table"):
        layers_to_remove("similarity", 30, 3)
    with pytest.raises(UserError, match="table is for 12 layers"):
        layers_to_remove("similarity", 30, 3, table=_table(12))


def test_fraction_that_rounds_to_all_layers_is_refused():
    with pytest.raises(UserError, match="cannot remove n=30 of 30"):
        n_from_fraction(0.99, 30)


# --- block influence (ShortGPT) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_block_influence_removes_the_lowest_bi_layers(seed):
    t = _table(10, seed, metric="block_influence")
    bi = [t.distances[l, l + 1] for l in range(10)]
    for n in range(1, 10):
        want = sorted(sorted(range(10), key=lambda l: bi[l])[:n])
        assert layers_to_remove("block_influence", 10, n, table=t) == want


def test_block_influence_ties_go_to_the_shallowest_layer():
    t = _table(6, metric="block_influence")
    for l in (1, 3, 4):
        t.distances[l, l + 1] = t.distances[l + 1, l] = 0.01
    assert layers_to_remove("block_influence", 6, 2, table=t) == [1, 3]


def test_block_influence_needs_a_block_influence_table():
    with pytest.raises(UserError, match="block_influence distance table"):
        layers_to_remove("block_influence", 8, 2, table=_table(8, metric="angular_all"))
    with pytest.raises(UserError, match="needs a distance table"):
        layers_to_remove("block_influence", 8, 2)


def _direct_block_influence(model, tokenizer, texts, max_length):
    """ShortGPT's BI by its definition: each text alone (no padding at all), HF's hidden states x^0..x^{L-1} and
    the last block's own output for x^L (HF's last hidden state is after the final norm), 1 - cos per token,
    averaged over every token of every text."""
    seen = {}
    handle = decoder_layers(model)[-1].register_forward_hook(
        lambda m, a, o: seen.__setitem__("xL", o[0] if isinstance(o, tuple) else o))
    L = len(decoder_layers(model))
    total, count = None, 0
    for text in texts:
        enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=max_length)
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        assert len(hs) == L + 1
        streams = [h[0].double() for h in hs[:-1]] + [seen["xL"][0].double()]
        bi = torch.stack([1 - torch.nn.functional.cosine_similarity(streams[l], streams[l + 1], dim=-1)
                          for l in range(L)])  # (L, tokens)
        total = bi.sum(1) if total is None else total + bi.sum(1)
        count += bi.shape[1]
    handle.remove()
    return (total / count).numpy()


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2"])
def test_block_influence_equals_its_definition(family, tokenizer, data_dir):
    """BI from the profile's table (batched, padded, hooks) equals a direct per-text loop over HF's hidden states."""
    texts = load_texts("calibration", 5, data_dir_path=data_dir)
    model = tiny_model(family, num_layers=6)
    table = profile(model, tokenizer, texts, metric="block_influence", batch_size=3, max_length=40, progress=False)
    want = _direct_block_influence(model, tokenizer, texts, 40)
    np.testing.assert_allclose(block_influence(table), want, rtol=1e-4, atol=1e-6)
    for n in range(1, 6):
        assert layers_to_remove("block_influence", 6, n, table=table) == sorted(np.argsort(want)[:n].tolist())


# --- greedy prefixes --------------------------------------------------------------------------------------------


def test_greedy_reads_a_prefix_of_the_order():
    order = [4, 0, 7, 2, 5]
    assert layers_to_remove("greedy", 9, 0, order=order) == []
    assert layers_to_remove("greedy", 9, 1, order=order) == [4]
    assert layers_to_remove("greedy", 9, 3, order=order) == [0, 4, 7]
    assert layers_to_remove("greedy", 9, 5, order=order) == [0, 2, 4, 5, 7]
    with pytest.raises(UserError, match="does not hold 6 distinct layers"):
        layers_to_remove("greedy", 9, 6, order=order)
    with pytest.raises(UserError, match="does not hold 2 distinct"):
        layers_to_remove("greedy", 9, 2, order=[3, 3])
    with pytest.raises(UserError, match="do not exist"):
        layers_to_remove("greedy", 9, 1, order=[9])
    with pytest.raises(UserError, match="needs a greedy removal order"):
        layers_to_remove("greedy", 9, 2)
