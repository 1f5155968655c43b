"""Distance tables on a sweep's storage: the one pair of functions that write and read them.

A table is a Parquet file (``layout.table_path``) whose schema metadata carries what made it
(``DistanceTable.to_arrow``). It goes through the storage's own atomic write and read, in memory, so a table
on S3 needs no temporary file and a reader never sees half of one.
"""

from __future__ import annotations

import warnings

from ray_prune.core.distance import DistanceTable
from ray_prune.ledger.layout import TABLES, table_path
from ray_prune.ledger.storage import Storage


def write_distance_table(storage: Storage, model: str, table: DistanceTable) -> str:
    """Store ``model``'s table; returns its path under the root."""
    path = table_path(model)
    storage.write_table(path, table.to_arrow())
    return path


def read_distance_table(storage: Storage, model: str) -> DistanceTable:
    """``model``'s stored table (FileNotFoundError where there is none)."""
    path = table_path(model)
    return DistanceTable.from_arrow(storage.read_table(path), storage.path(path))


def read_distance_tables(storage: Storage) -> dict[str, DistanceTable]:
    """Every stored table, keyed by model id; a file that cannot be read is skipped with a warning naming it."""
    tables = {}
    for rel in storage.list_files(TABLES, ".parquet"):
        try:
            table = DistanceTable.from_arrow(storage.read_table(rel), storage.path(rel))
        except Exception as e:  # noqa: BLE001 - a corrupt table must not sink a report
            warnings.warn(f"skipping distance table {storage.path(rel)}: {e}", stacklevel=2)
            continue
        tables[table.model_id] = table
    return tables
