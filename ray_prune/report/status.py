"""``ray-prune status``: a sweep's state from storage alone: no Ray, no models, safe to run while a sweep is going.

The counts per model are the report's (:func:`~ray_prune.report.cells.cell_status`, and
:func:`~ray_prune.report.cells.missing_cells` for the failures), printed as text. So are the facts about the rows
that the report states too: how many questions each task was scored on (:func:`task_sizes`), and what the rows'
numbers were computed with (:func:`check_provenance`), with a warning wherever rows that are compared differ.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from ray_prune.core.provenance import LIBRARIES
from ray_prune.ledger.rows import load_results, read_experiment_record
from ray_prune.ledger.schema import PROVENANCE_COLUMNS, STAGES, TASK_PROVENANCE_COLUMNS
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
    return text + _size_note(ok) + "".join("\n" + line for line in check_provenance(df).lines())


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
    lines.extend("  " + line for line in check_provenance(df).lines())
    corrupt = df.attrs.get("corrupt_files", [])
    if corrupt:
        lines.append(f"  {len(corrupt)} corrupt result file(s), skipped (their cells will be rerun):")
        lines.extend(f"    {p}" for p in corrupt)
    foreign = df.attrs.get("foreign_files", [])
    if foreign:
        lines.append(f"  {len(foreign)} file(s) under results/ that are not result rows, skipped (move them out):")
        lines.extend(f"    {p}" for p in foreign)
    return "\n".join(lines)


# Where a known row has no value, what that means: a library that was not installed, the tasks' own generation
# cap. Any other provenance column without a value says nothing (a row that scored no task has no task config).
_NULL_MEANS = {**{f"{name}_version": "not installed" for name in LIBRARIES}, "eval_max_gen_toks": "each task's own"}
# Columns only rows written since ray-prune records provenance have: a row with none of them predates it.
_RECORDED_SINCE = tuple(f"{name}_version" for name in LIBRARIES) + ("eval_batch_size", "quantization")
PROVENANCE_TABLE = ["field", "value", "rows", "differs"]


@dataclass(frozen=True)
class ProvenanceCheck:
    """What the finished rows were computed with, and where rows that are compared disagree.

    Every finished row is compared with every other: the same model's rows across stages and cells are one line
    of a figure, and every model is drawn in each figure of the report. Per-task fields are compared among the
    rows that scored the task.
    """

    table: pd.DataFrame  # field, value, rows (where the value holds: "all N rows", or per model its stages), differs
    warnings: tuple[str, ...]  # one per field whose values differ, naming it, each value, and where it holds
    unknown: str  # the finished rows written before rows recorded provenance, said once ("" where none)

    def agreed(self) -> list[str]:
        """``field=value`` for each field every row that has it agrees on."""
        same = self.table[~self.table["differs"]]
        return [f"{f}={v}" for f, v in zip(same["field"], same["value"])]

    def lines(self) -> list[str]:
        """The check as text: the values all rows share, once; a warning per difference; the unknown rows."""
        out = []
        if self.agreed():
            out += ["provenance, the same in every finished row that records it:"] + _packed(self.agreed())
        out += [f"warning: {w}" for w in self.warnings]
        if self.unknown:
            out.append(self.unknown)
        return out


def _packed(items: list[str], width: int = 110) -> list[str]:
    """``items`` comma-separated on indented lines of at most ``width`` characters, none split (values have
    spaces: a CPU's name)."""
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + len(item) + 2 > width:
            lines.append("")
        lines[-1] += (", " if lines[-1] else "") + item
    return ["  " + line for line in lines]


def _text(value) -> str:
    """A provenance value as shown: whole numbers without ".0" (a column with nulls reads back as floats)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def _where(rows: pd.DataFrame) -> str:
    """Which rows: per model, its stages (with a count where a stage has several), ``m: baseline, healed ×3``."""
    parts = []
    for model, g in rows.groupby("model", sort=True, dropna=False):
        counts = Counter(g["stage"])
        stages = [f"{s} ×{counts[s]}" if counts[s] > 1 else s for s in STAGES if s in counts]
        parts.append(f"{model}: {', '.join(stages)}")
    return "; ".join(parts)


def _rows(n: int) -> str:
    return f"all {n} row{'s' if n != 1 else ''}"


def check_provenance(df: pd.DataFrame) -> ProvenanceCheck:
    """The provenance of the finished rows of ``df`` (``core/provenance.py``): each field's value where all rows
    agree, a warning naming the field and its values (and which model's which stages hold each) where they
    differ. Rows written before ray-prune recorded provenance are unknown: counted once, never compared."""
    df = conformed(df)
    ok = df[df["status"] == "finished"]
    recorded = ok[list(_RECORDED_SINCE)].notna().any(axis=1)
    known, old = ok[recorded], ok[~recorded]
    fields = list(PROVENANCE_COLUMNS) + [c for cols in TASK_PROVENANCE_COLUMNS.values() for c in cols]
    table, found = [], []
    for field in fields:
        if field in _NULL_MEANS:
            rows, values = known, known[field].map(lambda v, none=_NULL_MEANS[field]: none if pd.isna(v) else _text(v))
        else:
            rows = known[known[field].notna()]
            values = rows[field].map(_text)
        if rows.empty:
            continue
        distinct = sorted(set(values))
        if len(distinct) == 1:
            table.append({"field": field, "value": distinct[0], "rows": _rows(len(rows)), "differs": False})
            continue
        split = [m for m, g in values.groupby(rows["model"]) if g.nunique() > 1]
        scope = f"within {', '.join(map(str, split))}" if split else "between models drawn in one figure"
        found.append(f"rows that are compared differ in {field} ({scope}): "
                     + " vs ".join(f"{v} [{_where(rows[values == v])}]" for v in distinct))
        table += [{"field": field, "value": v, "rows": _where(rows[values == v]), "differs": True} for v in distinct]
    unknown = ""
    if len(old):
        unknown = (f"provenance unknown for {len(old)} finished row{'s' if len(old) != 1 else ''} "
                   f"[{_where(old)}]: written before ray-prune recorded the code, library versions, task configs "
                   "and device of each row, so not compared")
    frame = pd.DataFrame(table, columns=PROVENANCE_TABLE).astype({"differs": bool})
    return ProvenanceCheck(frame, tuple(found), unknown)
