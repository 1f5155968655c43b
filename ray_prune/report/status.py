"""``ray-prune status``: a sweep's state from storage alone: no Ray, no models, safe to run while a sweep is going.

The counts per model are the report's (:func:`~ray_prune.report.cells.cell_status`, and
:func:`~ray_prune.report.cells.missing_cells` for the failures), printed as text.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pandas as pd

from ray_prune.ledger.rows import load_results, read_experiment_record
from ray_prune.ledger.storage import Storage
from ray_prune.report.cells import cell_status, expected_cells, missing_cells
from ray_prune.report.frames import conformed, has_values

SUMMARY_METRICS = ("mmlu_acc", "boolq_acc", "arc_easy_acc", "c4_loss_norm")


def summary_table(df) -> str:
    """Unpruned baseline, then unhealed/healed scores per model, strategy and n."""
    if df.empty:
        return "no results yet"
    df = conformed(df)
    ok = df[df["status"] == "finished"]
    metrics = [m for m in SUMMARY_METRICS if has_values(ok[m])]
    cols = ["model", "strategy", "n", "fraction_removed", "stage", "heal_lr", "heal_rank"] + metrics
    view = ok[cols].sort_values(["model", "stage", "strategy", "n"], kind="stable")
    with pd.option_context("display.width", 160, "display.max_rows", 500, "display.float_format", "{:.4f}".format):
        text = view.to_string(index=False)
    other = df[df["status"] != "finished"]
    if len(other):
        text += f"\n{len(other)} cell(s) not finished: " + ", ".join(
            f"{s}={c}" for s, c in Counter(other["status"]).items())
    return text + _size_note(ok)


MEASUREMENT_QUESTIONS = 100  # fewer questions per task than this: scores move by whole tenths from noise alone


def task_sizes(df: pd.DataFrame) -> dict[str, int]:
    """Questions each task was scored on: the fewest any finished row of the task used (``<task>_n``)."""
    from ray_prune.core.evaluation.tasks import TASKS

    ok = conformed(df)
    ok = ok[ok["status"] == "finished"]
    return {t: int(ok[f"{t}_n"].dropna().min()) for t in TASKS if f"{t}_n" in ok and ok[f"{t}_n"].notna().any()}


def _size_note(ok: pd.DataFrame) -> str:
    """Says so when the evaluations are too small to measure anything (a smoke run), and, in a run that does
    measure, which tasks are small enough that only large differences between rows mean anything."""
    from ray_prune.core.evaluation.tasks import TASKS

    sizes = task_sizes(ok)
    if not sizes or min(sizes.values()) >= MEASUREMENT_QUESTIONS:
        return ""
    errors = [float(e) for t, spec in TASKS.items() for m in spec.metrics if f"{t}_{m}_stderr" in ok
              for e in ok[f"{t}_{m}_stderr"].dropna()]
    worst = f", standard errors up to {max(errors):.2f}" if errors else ""
    if max(sizes.values()) < MEASUREMENT_QUESTIONS:
        return (f"\nnote: {min(sizes.values())} questions per task{worst}: a check of the pipeline, not a "
                f"measurement (experiments/study.yaml measures; its results are in docs/study/)")
    small = ", ".join(f"{t} {n}" for t, n in sorted(sizes.items()) if n < MEASUREMENT_QUESTIONS)
    return (f"\nnote: few questions in {small}{worst}: a difference between two rows smaller than about twice "
            "its standard error is noise")


def status_report(uri: str) -> str:
    """Per model: cells expected, finished, stopped early, failed (each with its error) and not run;
    then the result files that could not be read."""
    storage = Storage(uri)
    record = read_experiment_record(storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt files are listed below; counts need only the record's cell ids
        df = load_results(uri)
        expected = expected_cells(record)
    if record is None:
        lines = [f"{uri}: no experiment record (not a ray-prune sweep, or it never started)"]
    else:
        lines = [f"experiment {record['name']} at {storage.uri}"]
    missing = missing_cells(df, expected)
    failed = missing[missing["state"] == "failed"]
    for s in cell_status(df, expected).to_dict("records"):
        lines.append(f"  {s['model']}: {s['expected']} cells: {s['finished']} finished, {s['stopped early']} "
                     f"stopped early, {s['failed']} failed, {s['not run']} not run")
        for _, r in failed[failed["model"] == s["model"]].iterrows():
            n = int(r["n"]) if pd.notna(r["n"]) else "?"
            lines.append(f"    failed {r['cell_id']} (n={n}, {r['strategy']}): {r['error']}")
    corrupt = df.attrs.get("corrupt_files", [])
    if corrupt:
        lines.append(f"  {len(corrupt)} corrupt result file(s), skipped (their cells will be rerun):")
        lines.extend(f"    {p}" for p in corrupt)
    foreign = df.attrs.get("foreign_files", [])
    if foreign:
        lines.append(f"  {len(foreign)} file(s) under results/ that are not result rows, skipped (move them out):")
        lines.extend(f"    {p}" for p in foreign)
    return "\n".join(lines)
