"""The results dataset: one Parquet file per (cell, stage), written atomically as each finishes.

Layout under the storage root::

    experiment.json                 the experiment that owns this root
    tables/<model>.parquet          distance tables (one per model)
    results/<model>/<cell_id>-<stage>.parquet   one row each
    tune/                           Ray Tune's own trial state (logs, checkpoints)

One file per row makes every write atomic and idempotent: a rerun that
recomputes a cell overwrites the same file, so a row can never be duplicated,
and a crash can lose only rows that were not yet written.

Row schema (columns; metric columns depend on the tasks run):

- identity: ``experiment``, ``cell_id`` (config hash), ``unhealed_id``, ``stage`` (baseline | unhealed | healed),
  ``status`` (finished | stopped | failed), ``error``
- model: ``model``, ``trust_remote_code`` (whether the model's own Python ran), ``family``, ``num_layers`` (L), ``n``, ``fraction`` (requested), ``fraction_removed`` (n/L),
  ``strategy``, ``removed_layers`` (list<int>)
- heal settings: ``heal_lr``, ``heal_rank``, ``heal_steps``, ``heal_batch_size``, ``heal_seq_len``,
  ``heal_quantize``, ``seed``; and ``steps_done``, ``tokens_seen``, ``resumed_from_step`` (the heal checkpoint a
  retried trial resumed from; 0 when it ran in one go)
- metrics: ``<task>_acc``, ``<task>_acc_stderr``, ``<task>_acc_norm`` ..., ``c4_loss``, ``c4_loss_norm`` (loss / ln V),
  ``heal_val_loss``, ``loss_ratio`` (healed or unhealed C4 loss over the model's unpruned loss)
- heal curve (healed and stopped rows): ``curve_step``, ``curve_val_loss``, ``curve_train_loss`` (lists, one
  entry per evaluation during healing); ``attempts`` on failed/stopped rows
- cost and provenance: ``wall_s`` (the whole cell for healed rows, the evaluation for unhealed ones), ``load_s``
  (model load + prune), ``heal_s``, ``eval_s``, ``profile_s`` (baseline rows), ``gpu_s`` (wall x GPUs), ``device``, ``code_version``, ``finished_at``
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

import pyarrow as pa

from ray_prune.faults import maybe_kill
from ray_prune.storage import Storage

STAGES = ("baseline", "unhealed", "healed")
STATUSES = ("finished", "stopped", "failed")


def slug(model: str) -> str:
    """A file-system-safe name for a model id (org/name -> org--name)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in model.replace("/", "--")).strip(".")


def row_path(model: str, cell_id: str, stage: str) -> str:
    return f"results/{slug(model)}/{cell_id}-{stage}.parquet"


def flatten_metrics(scores: dict[str, Any]) -> dict[str, Any]:
    """``{"mmlu/acc": .5}`` -> ``{"mmlu_acc": .5}``: plain column names for pandas."""
    return {k.replace("/", "_").replace(",", "_"): v for k, v in scores.items()}


def write_row(storage: Storage, row: dict[str, Any]) -> str:
    if row.get("stage") not in STAGES or row.get("status") not in STATUSES:
        raise ValueError(f"bad stage/status in row: {row.get('stage')}/{row.get('status')}")
    row = {**row, "finished_at": row.get("finished_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = row_path(row["model"], row["cell_id"], row["stage"])
    table = pa.Table.from_pylist([row])
    context = f"{row['stage']}:{row['status']}:{row['model']}"
    storage.write_table(path, table, before_publish=lambda: maybe_kill("write", context))
    return path


def read_rows(storage: Storage) -> tuple[list[pa.Table], list[tuple[str, str]]]:
    """Every readable row file, and (path, reason) for each one that is corrupt or truncated."""
    tables, corrupt = [], []
    for rel in storage.list_files("results", ".parquet"):
        try:
            tables.append(storage.read_table(rel))
        except (pa.ArrowException, OSError) as e:
            corrupt.append((rel, str(e).splitlines()[0] if str(e) else type(e).__name__))
    return tables, corrupt


def load_results(path: str, include_failed: bool = True):
    """A sweep's results as a pandas DataFrame (local path, s3:// or gs://).

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
        df = df.sort_values(["model", "strategy", "n", "stage", "cell_id"], kind="stable").reset_index(drop=True)
    else:
        df = pd.DataFrame(columns=["experiment", "cell_id", "stage", "status", "model", "strategy", "n"])
    if not include_failed:
        df = df[df["status"] != "failed"].reset_index(drop=True)
    df.attrs["corrupt_files"] = [storage.path(rel) for rel, _ in corrupt]
    return df


def done_ids(storage: Storage) -> dict[tuple[str, str], str]:
    """(cell_id, stage) -> status, for every row on storage: the sweep's ledger."""
    ledger: dict[tuple[str, str], str] = {}
    tables, _ = read_rows(storage)
    for t in tables:
        for r in t.select(["cell_id", "stage", "status"]).to_pylist():
            ledger[(r["cell_id"], r["stage"])] = r["status"]
    return ledger


def save_experiment_record(storage: Storage, name: str, spec: dict[str, Any]) -> None:
    storage.write_bytes("experiment.json", json.dumps({"name": name, "spec": spec}, indent=2, default=str).encode())


def read_experiment_record(storage: Storage) -> dict[str, Any] | None:
    if not storage.exists("experiment.json"):
        return None
    return json.loads(storage.read_bytes("experiment.json"))
