"""The one Arrow schema of a result row, derived from the things rows record.

Every row file of a sweep has exactly this schema, whatever values the row
happens to hold (a baseline row has null heal settings, typed like everyone
else's), so the results folder is one Parquet dataset that pandas, pyarrow,
DuckDB, Polars and Ray Data read directly. Columns come from their owners:

- identity and model: declared here;
- ``heal_<setting>``: one per field of :class:`~ray_prune.core.heal.config.HealConfig`'s heal section;
- ``calibration_<setting>``: one per field of :class:`~ray_prune.core.calibration.CalibrationConfig`, set on
  the rows whose layers were chosen from calibration data, with ``table_key``, the key of the stored table
  that chose them (``ledger.tables``);
- ``<task>_<metric>``, ``<task>_<metric>_stderr``, ``<task>_n``, ``<task>_shots``: one set per task of
  the registry (``core/evaluation/tasks.py``) and per metric its YAML lists;
- ``<task>_config_hash``, ``<task>_metric``: one pair per task of the registry, and the provenance columns
  (``code_version``, library versions, evaluation batch size, seed, generation cap and log-softmax precision,
  ``quantization``, ``device_name``): what :func:`~ray_prune.core.provenance.eval_provenance` returns
  (``core/provenance.py`` says what each means); :data:`PROVENANCE_COLUMNS` lists every column two compared
  rows should agree on;
- ``c4_*``: what :func:`~ray_prune.core.loss.c4_loss` returns;
- heal progress, the heal curve (one list entry per evaluation) and cost: declared here.

Statuses: ``finished`` (the stage ran to the end), ``stopped`` (ASHA stopped the heal early: a result,
with its curve), ``failed`` (every retry failed; ``error`` says why).
"""

from __future__ import annotations

import typing
from typing import Any

import pyarrow as pa

from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.provenance import FIELDS, TASK_FIELDS, task_field

STAGES = ("baseline", "unhealed", "healed")
STATUSES = ("finished", "stopped", "failed")
C4_FIELDS = {"loss": pa.float64(), "loss_norm": pa.float64(), "tokens": pa.int64(), "sequences": pa.int64(),
             "seq_len": pa.int64(), "vocab_size": pa.int64()}

_IDENTITY = [
    ("experiment", pa.string()), ("cell_id", pa.string()), ("unhealed_id", pa.string()), ("stage", pa.string()),
    ("status", pa.string()), ("error", pa.string()),
    ("model", pa.string()), ("trust_remote_code", pa.bool_()), ("family", pa.string()),
    ("num_layers", pa.int64()), ("n", pa.int64()), ("fraction", pa.float64()), ("fraction_removed", pa.float64()),
    ("strategy", pa.string()), ("removed_layers", pa.list_(pa.int64())),
    ("repair", pa.string()),  # the training-free repair applied after pruning: none, linear (core.repair)
    ("eval_precision", pa.string()),  # what was scored: "nf4+fp32" (NF4 base computing in fp32), "bf16", ...
]
_PROGRESS = [
    ("seed", pa.int64()), ("loss_ratio", pa.float64()),
    ("heal_val_loss", pa.float64()), ("steps_done", pa.int64()), ("tokens_seen", pa.int64()),
    ("resumed_from_step", pa.int64()), ("attempts", pa.int64()),
    ("curve_step", pa.list_(pa.int64())), ("curve_val_loss", pa.list_(pa.float64())),
    ("curve_train_loss", pa.list_(pa.float64())),
    ("adapter", pa.string()),  # healed rows: the adapter's folder under the storage root (layout.adapter_path)
    ("computed_by", pa.string()),  # the cell whose trial computed this row, where another identical cell's did
]
_COST = [
    ("wall_s", pa.float64()), ("load_s", pa.float64()), ("heal_s", pa.float64()), ("eval_s", pa.float64()),
    ("profile_s", pa.float64()), ("gpu_s", pa.float64()), ("device", pa.string()), ("finished_at", pa.string()),
]


def _arrow_type(annotation: Any) -> pa.DataType:
    """A HealConfig field's type as a column: numbers as numbers, anything else (targets, names) as text."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return pa.string()
    if args == [bool]:
        return pa.bool_()
    if args == [int]:
        return pa.int64()
    if args in ([float], [int, float]):
        return pa.float64()
    return pa.string()


def heal_column(name: str) -> str:
    return f"heal_{name}"


def calibration_column(name: str) -> str:
    return f"calibration_{name}"


HEAL_COLUMNS: tuple[str, ...] = tuple(heal_column(f.name) for f in HealConfig.settings())
CALIBRATION_COLUMNS: tuple[str, ...] = tuple(calibration_column(f.name) for f in CalibrationConfig.settings())
AXIS_COLUMNS: tuple[str, ...] = tuple(heal_column(n) for n in HealConfig.names(axis=True))


def metric_column(task: str, metric: str) -> str:
    return f"{task}_{metric}"


def _heal_fields() -> list[tuple[str, pa.DataType]]:
    hints = typing.get_type_hints(HealConfig)
    return [(heal_column(f.name), _arrow_type(hints[f.name])) for f in HealConfig.settings()]


def _calibration_fields() -> list[tuple[str, pa.DataType]]:
    hints = typing.get_type_hints(CalibrationConfig)
    return [(calibration_column(f.name), _arrow_type(hints[f.name])) for f in CalibrationConfig.settings()] + [
        ("table_key", pa.string())]


def _metric_fields() -> list[tuple[str, pa.DataType]]:
    out: list[tuple[str, pa.DataType]] = []
    for name, spec in TASKS.items():
        for metric in spec.metrics:
            column = metric_column(name, metric)
            out += [(column, pa.float64()), (f"{column}_stderr", pa.float64())]
        out += [(f"{name}_n", pa.int64()), (f"{name}_shots", pa.int64())]
        out += [(task_field(name, f), _arrow_type(t)) for f, t in TASK_FIELDS.items()]
    return out + [(f"c4_{k}", t) for k, t in C4_FIELDS.items()]


def _provenance_fields() -> list[tuple[str, pa.DataType]]:
    return [(name, _arrow_type(t)) for name, t in FIELDS.items()]


ROW_SCHEMA: pa.Schema = pa.schema(_IDENTITY + _heal_fields() + _calibration_fields() + _PROGRESS + _metric_fields()
                                  + _provenance_fields() + _COST)
COLUMNS: tuple[str, ...] = tuple(ROW_SCHEMA.names)
# What two rows that are compared should agree on: the provenance, the precision scored, and per task its shots.
PROVENANCE_COLUMNS: tuple[str, ...] = tuple(FIELDS) + ("eval_precision",)
TASK_PROVENANCE_COLUMNS: dict[str, tuple[str, ...]] = {
    name: (f"{name}_shots", *(task_field(name, f) for f in TASK_FIELDS)) for name in TASKS}


def flatten_metrics(scores: dict[str, Any]) -> dict[str, Any]:
    """``{"mmlu/acc": .5}`` -> ``{"mmlu_acc": .5}``: the column names of the schema."""
    return {k.replace("/", "_").replace(",", "_"): v for k, v in scores.items()}


def calibration_values(settings: dict[str, Any], table_key: str | None) -> dict[str, Any]:
    """The calibration settings that chose a row's layers, and the key of the table they made."""
    return {**{calibration_column(f.name): settings.get(f.name) for f in CalibrationConfig.settings()},
            "table_key": table_key}


def heal_values(settings: dict[str, Any]) -> dict[str, Any]:
    """A cell's heal settings as row values (a list of LoRA targets as comma-joined text)."""
    out = {}
    for f in HealConfig.settings():
        v = settings.get(f.name)
        out[heal_column(f.name)] = ",".join(v) if isinstance(v, (list, tuple)) else v
    return out


def row_table(row: dict[str, Any]) -> pa.Table:
    """One row as a table of exactly :data:`ROW_SCHEMA`; a key the schema lacks is a bug, and says so."""
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise KeyError(f"row keys not in the row schema (ray_prune/ledger/schema.py): {unknown}")
    if row.get("stage") not in STAGES or row.get("status") not in STATUSES:
        raise ValueError(f"bad stage/status in row: {row.get('stage')}/{row.get('status')}")
    return pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS}], schema=ROW_SCHEMA)


def conform(table: pa.Table) -> pa.Table:
    """A row file of any ray-prune version as :data:`ROW_SCHEMA` (missing columns null, types cast);
    columns the schema does not know (a newer version's) are kept after the declared ones."""
    columns, fields = [], []
    for field in ROW_SCHEMA:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
        fields.append(field)
    for name in table.column_names:
        if name not in COLUMNS:
            columns.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def conform_frame(df):
    """A DataFrame with every schema column present (null where absent), for functions that read rows."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if not missing:
        return df
    import pandas as pd

    extra = pa.table({c: pa.nulls(len(df), ROW_SCHEMA.field(c).type) for c in missing}).to_pandas()
    extra.index = df.index
    return pd.concat([df, extra], axis=1)
