"""What stage 1 stores per model: distance tables (the one pair of functions that write and read them, and their
check), and greedy removal orders.

A table is a Parquet file named by a key that hashes everything that made it (``layout.table_path``: the
model's weights, the calibration settings and text, the dtype), whose schema metadata carries the same key and
the table's facts (``DistanceTable.to_arrow``). It goes through the storage's own atomic write and read, in
memory, so a table on S3 needs no temporary file and a reader never sees half of one. A stored table is reused
only if it validates: it reads, its key is the one asked for, and it holds every (l, n) pair with a distance in
[0, 1]. Otherwise the caller is told why, in one line, and the stage that owns it makes it again.
"""

from __future__ import annotations

import math
import warnings

from ray_prune.core.distance import METRIC_RANGE, DistanceTable
from ray_prune.ledger.layout import TABLES, order_path, table_path
from ray_prune.ledger.storage import Storage

KEY = "key"  # where a table's key sits in its facts (DistanceTable.extra)


class InvalidTable(ValueError):
    """A stored table that cannot be trusted; the message names the file and why."""


def write_distance_table(storage: Storage, model: str, key: str, table: DistanceTable) -> str:
    """Store ``model``'s table under ``key``; returns its path under the root."""
    path = table_path(model, key)
    table.extra = {**table.extra, KEY: key}
    storage.write_table(path, table.to_arrow())
    return path


def read_distance_table(storage: Storage, model: str, key: str) -> DistanceTable:
    """``model``'s table stored under ``key``: FileNotFoundError where there is none, :class:`InvalidTable` where
    the file cannot be trusted."""
    path = table_path(model, key)
    where = storage.path(path)
    try:
        arrow = storage.read_table(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated Parquet, bad metadata: all mean "rebuild it"
        raise InvalidTable(f"{where} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    try:
        table = DistanceTable.from_arrow(arrow, where)
    except Exception as e:  # noqa: BLE001
        raise InvalidTable(f"{where} is not a ray-prune distance table ({e})") from None
    L = table.num_layers
    if table.extra.get(KEY) != key:
        raise InvalidTable(f"{where} was made for key {table.extra.get(KEY)!r}, not {key!r}")
    if arrow.num_rows != L * (L + 1) // 2:
        raise InvalidTable(f"{where} holds {arrow.num_rows} (l, n) pairs; a {L}-layer table has {L * (L + 1) // 2}")
    values = arrow.column("distance").to_pylist()
    low, high = METRIC_RANGE.get(table.metric, (0.0, 1.0))
    if not all(isinstance(v, float) and math.isfinite(v) and low - 1e-9 <= v <= high + 1e-9 for v in values):
        raise InvalidTable(f"{where} holds {table.metric} distances outside [{low:g}, {high:g}]")
    return table


def read_distance_tables(storage: Storage) -> list[DistanceTable]:
    """Every stored table that reads; a file that does not is skipped with a warning naming it."""
    tables = []
    for rel in storage.list_files(TABLES, ".parquet"):
        try:
            tables.append(DistanceTable.from_arrow(storage.read_table(rel), storage.path(rel)))
        except Exception as e:  # noqa: BLE001 - a corrupt table must not sink a report
            warnings.warn(f"skipping distance table {storage.path(rel)}: {e}", stacklevel=2)
    return tables


def write_greedy_order(storage: Storage, model: str, key: str, order) -> str:
    """Store ``model``'s greedy removal order (``core.greedy.GreedyOrder``) under ``key``, as JSON with its key."""
    import json

    path = order_path(model, key)
    storage.write_bytes(path, json.dumps({KEY: key, **order.to_dict()}, indent=1).encode())
    return path


def read_greedy_order(storage: Storage, model: str, key: str, rounds: int):
    """``model``'s stored greedy order under ``key`` if it holds at least ``rounds`` removals: FileNotFoundError
    where there is none, :class:`InvalidTable` where it cannot be trusted or is too short."""
    import json

    from ray_prune.core.greedy import GreedyOrder

    path = order_path(model, key)
    where = storage.path(path)
    raw = storage.read_bytes(path)
    try:
        data = json.loads(raw)
        if data.pop(KEY, None) != key:
            raise InvalidTable(f"{where} was made for another key")
        order = GreedyOrder.from_dict(data)
    except (ValueError, TypeError) as e:
        raise InvalidTable(f"{where} is not a readable greedy order ({e})") from None
    if len(order.order) < rounds or len(set(order.order)) != len(order.order) or \
            not all(0 <= i < order.num_layers for i in order.order):
        raise InvalidTable(f"{where} holds {len(order.order)} removals, {rounds} are needed")
    return order
