"""Layer selection: the paper's argmin rule, the deepest baseline, explicit lists, and fraction rounding."""

from __future__ import annotations

import numpy as np
import pytest

from ray_prune.core.profile import DistanceTable
from ray_prune.errors import UserError
from ray_prune.core.select import best_start, layers_to_remove, n_from_fraction, optimal_starts


def _table(L: int, seed: int = 0) -> DistanceTable:
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.05, 0.6, size=(L + 1, L + 1))
    d = np.triu(d, 1)
    d = d + d.T
    return DistanceTable("synthetic", "angular", L, d, samples=1, tokens=1, data_hash="x", max_length=1)


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
