"""``ray-prune status``: the report's per-model account of the cells (cell_status, missing_cells) as text."""

from __future__ import annotations

import pytest

from ray_prune.ledger.rows import load_results, save_experiment_record, write_row
from ray_prune.ledger.storage import Storage
from ray_prune.report.status import status_report, summary_table


def _store(tmp_path, record: bool = True) -> Storage:
    s = Storage(str(tmp_path))
    if record:  # ids only: a record whose grid cannot be rebuilt; the rows still give each failure's n and strategy
        save_experiment_record(s, "st", {"cells": [{"cell_id": c, "model": "m"} for c in "abcde"]})
    row = dict(experiment="st", model="m", stage="healed", num_layers=10, strategy="deepest")
    write_row(s, {**row, "stage": "baseline", "cell_id": "base", "status": "finished", "n": 0, "strategy": "none",
                  "boolq_acc": 0.6})
    write_row(s, {**row, "cell_id": "a", "status": "finished", "n": 1, "boolq_acc": 0.5})
    write_row(s, {**row, "cell_id": "b", "status": "stopped", "n": 2})
    write_row(s, {**row, "cell_id": "c", "status": "failed", "n": 3,
                  "error": "Traceback (most recent call last):\n  File ...\nRuntimeError: out of memory"})
    (tmp_path / "results" / "model_slug=m" / "x-healed.parquet").write_bytes(b"PAR1 truncated")
    return s


def test_status_report_counts_failures_and_corrupt_files(tmp_path):
    s = _store(tmp_path)
    lines = status_report(str(tmp_path)).splitlines()
    assert lines[0] == f"experiment st at {s.uri}"
    assert "  m: 5 cells: 1 finished, 1 stopped early, 1 failed, 2 not run" in lines
    assert "    failed c (n=3, deepest): RuntimeError: out of memory" in lines  # the error's last line
    assert "  1 corrupt result file(s), skipped (their cells will be rerun):" in lines
    assert lines[-1].strip().endswith("x-healed.parquet")


def test_status_report_without_a_record(tmp_path):
    _store(tmp_path, record=False)
    lines = status_report(str(tmp_path)).splitlines()
    assert lines[0].endswith("no experiment record (not a ray-prune sweep, or it never started)")
    assert "  m: 3 cells: 1 finished, 1 stopped early, 1 failed, 0 not run" in lines


def test_summary_table(tmp_path):
    _store(tmp_path)
    with pytest.warns(UserWarning, match="corrupt result file"):
        df = load_results(str(tmp_path))
    text = summary_table(df)
    assert "boolq_acc" in text and "mmlu_acc" not in text  # only the metrics the sweep has
    assert "2 cell(s) not finished: stopped=1, failed=1" in text
    assert summary_table(df.iloc[0:0]) == "no results yet"
