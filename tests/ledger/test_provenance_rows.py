"""Rows written through ``cell_row`` and ``write_row`` carry every provenance column, each task's only where the row
scored the task; the results folder stays one dataset with one schema, and rows of older versions still load."""

from __future__ import annotations

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ray_prune.core import provenance
from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.ledger.layout import RESULTS, row_path
from ray_prune.ledger.rows import load_results, write_row
from ray_prune.ledger.schema import COLUMNS, PROVENANCE_COLUMNS, ROW_SCHEMA, TASK_PROVENANCE_COLUMNS
from ray_prune.ledger.storage import Storage
from ray_prune.sweep.grid import Cell
from ray_prune.sweep.rows import baseline_cell, cell_row, failure_row

EVAL = {"tasks": {"boolq": {"shots": None, "limit": 3}, "arc_easy": {"shots": 1}}, "batch_size": 2, "seed": 7,
        "max_gen_toks": 64, "unhealed": True, "precision": "trained"}


def _cell(cell_id: str, n: int, scored_as: str = "none") -> Cell:
    return Cell(experiment="prov", model="org/m", trust_remote_code=False, num_layers=10, fraction=n / 10, n=n,
                strategy="deepest", seed=0, heal={"lr": 1e-4, "quantize": scored_as}, calibration={}, eval=EVAL,
                dtype="fp32", cell_id=cell_id, unhealed_id=f"u{cell_id}", scored_as=scored_as,
                removed_layers=list(range(8 - n, 8)))


def _scores(task: str, acc: float) -> dict:
    return {f"{task}_acc": acc, f"{task}_acc_stderr": 0.1, f"{task}_n": 3, f"{task}_shots": 0}


def _write(tmp_path) -> Storage:
    s = Storage(str(tmp_path))
    base = baseline_cell("prov", "org/m", False, 10, {}, EVAL, "fp32", "base")
    write_row(s, cell_row(base, "baseline", "finished", eval_precision="nf4+fp32", device="cpu",
                          **_scores("boolq", 0.6)))
    write_row(s, cell_row(_cell("a", 2, "nf4"), "healed", "finished", eval_precision="nf4+fp32", device="cpu",
                          **_scores("boolq", 0.55), c4_loss=3.0))
    write_row(s, cell_row(_cell("a", 2, "nf4"), "unhealed", "finished", eval_precision="nf4+fp32", device="cpu",
                          c4_loss=3.5))  # scored for its loss alone (eval.unhealed: loss)
    write_row(s, cell_row(_cell("b", 3), "healed", "finished", eval_precision="fp32", device="cpu",
                          **_scores("boolq", 0.5)))
    write_row(s, failure_row(_cell("c", 4), "failed", RuntimeError("out of memory"), {}))
    return s


def test_rows_carry_every_provenance_column(tmp_path):
    _write(tmp_path)
    df = load_results(str(tmp_path)).set_index(["cell_id", "stage"])
    scored = df.loc[[("base", "baseline"), ("a", "healed"), ("b", "healed")]]
    for column in PROVENANCE_COLUMNS + TASK_PROVENANCE_COLUMNS["boolq"]:
        assert scored[column].notna().all(), column
    assert (scored["code_version"] == provenance.code_version()).all()
    for name, v in provenance.library_versions().items():
        assert (scored[f"{name}_version"] == v).all()
    assert (scored["device_name"] == provenance.device_name("cpu")).all()
    assert (scored["eval_batch_size"] == 2).all() and (scored["eval_seed"] == 7).all()
    assert (scored["eval_max_gen_toks"] == 64).all() and (scored["eval_logprobs"] == "fp32").all()
    assert (scored["boolq_config_hash"] == provenance.task_config_hashes(["boolq"])["boolq"]).all()
    assert (scored["boolq_metric"] == TASKS["boolq"].main_metric).all()
    # the quantization of what was scored: the baseline's NF4 base too, though its cell is built without scored_as
    assert list(scored["quantization"]) == ["nf4", "nf4", "none"]
    # a task's provenance only on rows that scored it: arc_easy is in the eval section but no row scored it
    assert df[list(TASK_PROVENANCE_COLUMNS["arc_easy"])].isna().all().all()
    unhealed = df.loc[("ua", "unhealed")]
    assert unhealed[list(TASK_PROVENANCE_COLUMNS["boolq"])].isna().all() and pd.notna(unhealed["code_version"])
    failed = df.loc[("c", "healed")]  # the driver writes it: no device, no scores
    assert failed["status"] == "failed" and pd.isna(failed["device_name"]) and pd.isna(failed["boolq_config_hash"])
    assert failed["eval_batch_size"] == 2 and failed["quantization"] == "none"


def test_one_dataset_with_one_schema_and_old_rows_load(tmp_path):
    _write(tmp_path)
    folder = tmp_path / RESULTS
    files = sorted(folder.rglob("*.parquet"))
    assert len(files) == 5 and all(pq.read_schema(p).equals(ROW_SCHEMA, check_metadata=False) for p in files)
    table = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 5 and set(COLUMNS) <= set(table.column_names)
    # A row of a version that recorded no provenance: every new column reads as null.
    old = ROW_SCHEMA.empty_table().drop_columns(
        [c for c in PROVENANCE_COLUMNS + sum(TASK_PROVENANCE_COLUMNS.values(), ()) if c != "eval_precision"
         and not c.endswith("_shots")] + ["code_version"])
    row = {"experiment": "prov", "cell_id": "old", "stage": "baseline", "status": "finished", "model": "org/m2",
           "n": 0, "boolq_acc": 0.7, "boolq_shots": 0}
    path = tmp_path / row_path("org/m2", "old", "baseline")
    path.parent.mkdir(parents=True)
    pq.write_table(old.from_pylist([row], schema=old.schema), path)
    df = load_results(str(tmp_path))
    assert len(df) == 6 and list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert df.loc[df["cell_id"] == "old", ["code_version", "lm_eval_version", "boolq_config_hash"]].isna().all().all()
