"""Stored distance tables are checked against the range of their own metric: 1 - cos (block influence) reaches
above 1 where a block turns the stream by more than 90 degrees, as real models' first blocks do."""

from __future__ import annotations

import numpy as np
import pytest

from ray_prune.core.distance import DistanceTable
from ray_prune.ledger.storage import Storage
from ray_prune.ledger.tables import InvalidTable, read_distance_table, write_distance_table


def _table(metric: str, top: float) -> DistanceTable:
    L = 4
    d = np.zeros((L + 1, L + 1))
    for l in range(L + 1):
        for m in range(l + 1, L + 1):
            d[l, m] = d[m, l] = top * (m - l) / L
    return DistanceTable("m", metric, L, d, samples=2, tokens=10, data_hash="h", max_length=8)


def test_block_influence_up_to_two_reads_back_and_angular_over_one_is_refused(tmp_path):
    storage = Storage(str(tmp_path))
    write_distance_table(storage, "m", "k1", _table("block_influence", 1.6))
    back = read_distance_table(storage, "m", "k1")
    assert back.metric == "block_influence" and back.distances.max() == pytest.approx(1.6)
    write_distance_table(storage, "m", "k2", _table("angular", 1.6))
    with pytest.raises(InvalidTable, match=r"angular distances outside \[0, 1\]"):
        read_distance_table(storage, "m", "k2")
    write_distance_table(storage, "m", "k3", _table("block_influence", 2.5))
    with pytest.raises(InvalidTable, match=r"block_influence distances outside \[0, 2\]"):
        read_distance_table(storage, "m", "k3")
