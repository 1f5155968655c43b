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


def _sized(tmp_path, sizes: dict[str, int]) -> str:
    s = Storage(str(tmp_path))
    row = dict(experiment="st", model="m", stage="healed", num_layers=10, strategy="deepest", status="finished")
    for i, n in enumerate((1, 2)):
        extra = {}
        for t, k in sizes.items():
            extra |= {f"{t}_n": k, f"{t}_acc": 0.5, f"{t}_acc_stderr": (0.25 / k) ** 0.5}
        write_row(s, {**row, "cell_id": f"c{i}", "n": n, **extra})
    return summary_table(load_results(str(tmp_path)))


def test_summary_says_when_evaluations_are_too_small_to_measure(tmp_path):
    smoke = _sized(tmp_path / "smoke", {"boolq": 5, "mmlu": 5})
    assert "note: 5 questions per task, standard errors up to 0.22: a check of the pipeline" in smoke
    mixed = _sized(tmp_path / "mixed", {"arc_easy": 150, "boolq": 60, "mmlu": 60})
    assert "a check of the pipeline" not in mixed  # some tasks measure: the run is not a smoke check
    assert "note: few questions in boolq 60, mmlu 60, standard errors up to 0.06" in mixed
    assert "note:" not in _sized(tmp_path / "big", {"arc_easy": 150, "boolq": 200})
