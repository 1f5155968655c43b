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

from ray_prune.errors import UserError
from ray_prune.ledger.layout import EXPERIMENT_RECORD, RESULTS, ROW_SUFFIX, is_partitioned, row_path
from ray_prune.ledger.schema import COLUMNS, STAGES, STATUSES, conform, row_table
from ray_prune.ledger.storage import Storage

SORT_KEYS = ["model", "strategy", "n", "stage", "cell_id"]


def write_row(storage: Storage, row: dict[str, Any]) -> str:
    """Write one row (stamped with ``finished_at``) to its file; return the file's relative path."""
    row = {**row, "finished_at": row.get("finished_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = row_path(row["model"], row["cell_id"], row["stage"])
    storage.write_table(path, row_table(row))
    return path


def row_problem(rel: str, table: pa.Table) -> str | None:
    """Why a readable file under ``results/`` is not a row of this dataset (None: it is one). A row file holds one
    row with an identity (cell id, a known stage and status, a model), and sits where ``layout.row_path`` puts it
    (or where an older version did, ``results/<model>/<cell_id>-<stage>.parquet``)."""
    if table.num_rows != 1:
        return f"{table.num_rows} rows, a result file holds one"
    missing = [c for c in ("cell_id", "stage", "status", "model") if c not in table.column_names]
    if missing:
        return f"no {', '.join(missing)} column: not a ray-prune result row"
    row = table.select(["cell_id", "stage", "status", "model"]).to_pylist()[0]
    if row["stage"] not in STAGES or row["status"] not in STATUSES or not row["cell_id"] or not row["model"]:
        return f"stage {row['stage']!r}, status {row['status']!r}: not a ray-prune result row"
    name = rel.rsplit("/", 1)[-1]
    if name != f"{row['cell_id']}-{row['stage']}{ROW_SUFFIX}":
        return f"named {name}, but holds the {row['stage']} row of cell {row['cell_id']}"
    if is_partitioned(rel) and rel != row_path(row["model"], row["cell_id"], row["stage"]):
        home = row_path(row["model"], row["cell_id"], row["stage"])
        return f"its row is of model {row['model']!r}, which belongs in {home}"
    return None


def read_rows(storage: Storage) -> tuple[list[pa.Table], list[tuple[str, str]], list[tuple[str, str]]]:
    """Every row file as :data:`ROW_SCHEMA`; then (path, reason) for each file that cannot be read (corrupt or
    truncated), and for each that reads but is not a row of this dataset (a stray file, another tool's Parquet).
    Neither kind becomes a row."""
    tables, corrupt, foreign = [], [], []
    for rel in storage.list_files(RESULTS):
        if not rel.endswith(ROW_SUFFIX):
            foreign.append((rel, f"not a {ROW_SUFFIX} file"))
            continue
        try:
            table = storage.read_table(rel)
        except (pa.ArrowException, OSError) as e:
            corrupt.append((rel, str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        problem = row_problem(rel, table)
        if problem is not None:
            foreign.append((rel, problem))
            continue
        try:
            tables.append(conform(table))
        except (pa.ArrowException, ValueError) as e:
            foreign.append((rel, f"columns of the wrong type ({str(e).splitlines()[0]})"))
    return tables, corrupt, foreign


def load_results(path: str, include_failed: bool = True):
    """A sweep's results as a pandas DataFrame (local path, s3:// or gs://), one row per (cell, stage).

    Files that are not rows are skipped but never silently: a warning names each one, and
    ``df.attrs["corrupt_files"]`` (unreadable) and ``df.attrs["foreign_files"]`` (readable, but not a row of this
    dataset) list them. A folder with no results at all, where a storage root sits below it, names that root.
    """
    import pandas as pd

    storage = Storage(path)
    tables, corrupt, foreign = read_rows(storage)
    for rel, reason in corrupt:
        warnings.warn(f"skipping corrupt result file {storage.path(rel)}: {reason}", stacklevel=2)
    for rel, reason in foreign:
        warnings.warn(f"skipping {storage.path(rel)}: {reason}", stacklevel=2)
    if not tables and not corrupt and not storage.exists(EXPERIMENT_RECORD):
        roots = find_roots(storage)
        if roots:
            raise UserError(f"{storage.uri} holds no results; it holds the storage root {roots[0]}"
                            + (f" (and {len(roots) - 1} more)" if len(roots) > 1 else ""),
                            f"pass {roots[0]}")
    if tables:
        df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
        df = df.sort_values(SORT_KEYS, kind="stable").reset_index(drop=True)
    else:
        df = pd.DataFrame(columns=list(COLUMNS))
    if not include_failed:
        df = df[df["status"] != "failed"].reset_index(drop=True)
    df.attrs["corrupt_files"] = [storage.path(rel) for rel, _ in corrupt]
    df.attrs["foreign_files"] = [storage.path(rel) for rel, _ in foreign]
    return df


def find_roots(storage: Storage, limit: int = 5) -> list[str]:
    """Storage roots (folders holding an experiment record) below ``storage``, nearest first."""
    records = [rel for rel in storage.list_files("", EXPERIMENT_RECORD)
               if rel.rsplit("/", 1)[-1] == EXPERIMENT_RECORD and "/" in rel]
    records.sort(key=lambda rel: (rel.count("/"), rel))
    return [storage.path(rel.rsplit("/", 1)[0]) for rel in records[:limit]]


def upgrade_layout(storage: Storage) -> int:
    """Move row files of older versions (``results/<model>/``, per-file schemas) into the hive layout with the
    declared schema, so the root is one dataset again; returns how many moved. Only under the sweep lock. Files
    that are not rows stay where they are (``read_rows`` lists them)."""
    moved = 0
    for rel in storage.list_files(RESULTS, ROW_SUFFIX):
        if is_partitioned(rel):
            continue
        try:
            raw = storage.read_table(rel)
            if row_problem(rel, raw) is not None:
                continue
            table = conform(raw).select(list(COLUMNS))
        except (pa.ArrowException, OSError, ValueError):
            continue  # corrupt or foreign: left where it is, listed by load_results
        row = table.to_pylist()[0]
        storage.write_table(row_path(row["model"], row["cell_id"], row["stage"]), table)
        storage.delete(rel)
        moved += 1
    return moved


def save_experiment_record(storage: Storage, name: str, spec: dict[str, Any]) -> None:
    """What the sweep on this root is: its experiment and every cell it expects (the report reads them)."""
    storage.write_bytes(EXPERIMENT_RECORD, json.dumps({"name": name, "spec": spec}, indent=2, default=str).encode())


def read_experiment_record(storage: Storage) -> dict[str, Any] | None:
    """The experiment record, None where there is none; a record that does not read is a UserError naming it
    (the next sweep on the root writes it anew)."""
    if not storage.exists(EXPERIMENT_RECORD):
        return None
    try:
        record = json.loads(storage.read_bytes(EXPERIMENT_RECORD))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{storage.path(EXPERIMENT_RECORD)} is not readable JSON ({e}): truncated or overwritten",
                        "run the sweep again on this storage (it writes the record anew), or delete the file") from None
    if not isinstance(record, dict) or "name" not in record:
        raise UserError(f"{storage.path(EXPERIMENT_RECORD)} is not a ray-prune experiment record",
                        "point at a sweep's storage root, or delete the file")
    return record
