"""Writing a result row, reading a sweep's rows as a DataFrame, and the experiment record.

One Parquet file per (cell, stage), written atomically as each stage finishes
(``layout.row_path``), in a hive partition per model (``results/model_slug=<model>/``). Every file
has the one :data:`~ray_prune.ledger.schema.ROW_SCHEMA` (columns documented in ``ledger/schema.py``),
so the results folder is a Parquet dataset that ``pandas.read_parquet``, ``pyarrow.dataset``, DuckDB,
Polars and Ray Data read directly, with the same rows and values as :func:`load_results`.

One file per row makes every write atomic and idempotent: a rerun that recomputes a cell overwrites
the same file, so a row can never be duplicated, and a crash can lose only rows not yet written.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

import pyarrow as pa

from ray_prune.ledger.layout import EXPERIMENT_RECORD, RESULTS, ROW_SUFFIX, is_partitioned, row_path
from ray_prune.ledger.schema import COLUMNS, conform, row_table
from ray_prune.ledger.storage import Storage

SORT_KEYS = ["model", "strategy", "n", "stage", "cell_id"]


def write_row(storage: Storage, row: dict[str, Any]) -> str:
    """Write one row (stamped with ``finished_at``) to its file; return the file's relative path."""
    row = {**row, "finished_at": row.get("finished_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = row_path(row["model"], row["cell_id"], row["stage"])
    storage.write_table(path, row_table(row))
    return path


def read_rows(storage: Storage) -> tuple[list[pa.Table], list[tuple[str, str]]]:
    """Every readable row file as :data:`ROW_SCHEMA`, and (path, reason) for each corrupt or truncated one."""
    tables, corrupt = [], []
    for rel in storage.list_files(RESULTS, ROW_SUFFIX):
        try:
            tables.append(conform(storage.read_table(rel)))
        except (pa.ArrowException, OSError) as e:
            corrupt.append((rel, str(e).splitlines()[0] if str(e) else type(e).__name__))
    return tables, corrupt


def load_results(path: str, include_failed: bool = True):
    """A sweep's results as a pandas DataFrame (local path, s3:// or gs://), one row per (cell, stage).

    Corrupt files are skipped but never silently: a warning names each one and
    ``df.attrs["corrupt_files"]`` lists them.
    """
    import pandas as pd

    storage = Storage(path)
    tables, corrupt = read_rows(storage)
    for rel, reason in corrupt:
        warnings.warn(f"skipping corrupt result file {storage.path(rel)}: {reason}", stacklevel=2)
    if tables:
        df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
        df = df.sort_values(SORT_KEYS, kind="stable").reset_index(drop=True)
    else:
        df = pd.DataFrame(columns=list(COLUMNS))
    if not include_failed:
        df = df[df["status"] != "failed"].reset_index(drop=True)
    df.attrs["corrupt_files"] = [storage.path(rel) for rel, _ in corrupt]
    return df


def upgrade_layout(storage: Storage) -> int:
    """Move row files of older versions (``results/<model>/``, per-file schemas) into the hive layout with the
    declared schema, so the root is one dataset again; returns how many moved. Only under the sweep lock."""
    moved = 0
    for rel in storage.list_files(RESULTS, ROW_SUFFIX):
        if is_partitioned(rel):
            continue
        try:
            table = conform(storage.read_table(rel)).select(list(COLUMNS))
        except (pa.ArrowException, OSError):
            continue  # corrupt: left where it is, listed by load_results, its cell rerun
        row = table.to_pylist()[0]
        storage.write_table(row_path(row["model"], row["cell_id"], row["stage"]), table)
        storage.delete(rel)
        moved += 1
    return moved


def save_experiment_record(storage: Storage, name: str, spec: dict[str, Any]) -> None:
    storage.write_bytes(EXPERIMENT_RECORD, json.dumps({"name": name, "spec": spec}, indent=2, default=str).encode())


def read_experiment_record(storage: Storage) -> dict[str, Any] | None:
    if not storage.exists(EXPERIMENT_RECORD):
        return None
    return json.loads(storage.read_bytes(EXPERIMENT_RECORD))
