"""Per-question outputs of every evaluated row: a second Parquet dataset beside the results, as lm-eval's
``log_samples`` keeps them, so two rows scored on the same questions can be compared question by question.

One file per (cell, stage), like the rows (``layout.questions_path``), hive-partitioned by model, with one
row per question in one Arrow schema (:data:`QUESTION_SCHEMA`): the row it belongs to (``cell_id``, ``stage``),
the question (``task``, ``subtask``, ``doc_id``, ``doc_hash``), every reported score of any task (null where the
task has no such score: ``acc`` and ``acc_norm`` for multiple choice, ``exact_match_strict``/``_flexible`` for
GSM8K; the names come from the task registry), the gold answer, and what the model did: the log-likelihood of
each choice, or the generated text and the answers extracted from it (JSON). Readers: pandas, pyarrow, DuckDB;
:func:`load_questions` and ``core.evaluation.paired.paired_difference`` for a paired comparison.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Iterable

import pyarrow as pa

from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.ledger.layout import QUESTIONS, ROW_SUFFIX, questions_path
from ray_prune.ledger.storage import Storage

SCORES: tuple[str, ...] = tuple(dict.fromkeys(m for spec in TASKS.values() for m in spec.metrics))
QUESTION_SCHEMA: pa.Schema = pa.schema(
    [("experiment", pa.string()), ("cell_id", pa.string()), ("stage", pa.string()), ("model", pa.string()),
     ("task", pa.string()), ("subtask", pa.string()), ("doc_id", pa.int64()), ("doc_hash", pa.string())]
    + [(m, pa.float64()) for m in SCORES]
    + [("target", pa.string()), ("loglikelihoods", pa.list_(pa.float64())), ("response", pa.string()),
       ("extracted", pa.string())])


def question_table(experiment: str, cell_id: str, stage: str, model: str, records: Iterable[dict]) -> pa.Table:
    """The records of one evaluation (``core.evaluation.paired.QuestionRecord``) as a table of the schema."""
    rows: list[dict[str, Any]] = []
    for r in records:
        metrics = r.get("metrics") or {}
        unknown = sorted(set(metrics) - set(SCORES))
        if unknown:
            raise KeyError(f"scores not in the question schema (ray_prune/ledger/questions.py): {unknown}")
        rows.append({"experiment": experiment, "cell_id": cell_id, "stage": stage, "model": model,
                     "task": r["task"], "subtask": r["subtask"], "doc_id": int(r["doc_id"]),
                     "doc_hash": r.get("doc_hash"), **{m: metrics.get(m) for m in SCORES},
                     "target": None if r.get("target") is None else str(r["target"]),
                     "loglikelihoods": r.get("loglikelihoods"), "response": r.get("response"),
                     "extracted": None if r.get("extracted") is None else json.dumps(r["extracted"])})
    return pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA)


def write_questions(storage: Storage, experiment: str, cell_id: str, stage: str, model: str,
                    records: list[dict]) -> str | None:
    """Store one evaluation's questions (none: nothing written); returns the file's path under the root."""
    if not records:
        return None
    path = questions_path(model, cell_id, stage)
    storage.write_table(path, question_table(experiment, cell_id, stage, model, records))
    return path


def load_questions(path: str, cell_ids: Iterable[str] | None = None):
    """The per-question outputs of a sweep (local path, s3:// or gs://) as a pandas DataFrame, optionally of
    some cells only; unreadable files are skipped with a warning naming each."""
    import pandas as pd

    storage = Storage(path)
    wanted = None if cell_ids is None else set(cell_ids)
    tables = []
    for rel in storage.list_files(QUESTIONS, ROW_SUFFIX):
        if wanted is not None and rel.rsplit("/", 1)[-1].split("-", 1)[0] not in wanted:
            continue
        try:
            tables.append(storage.read_table(rel).cast(QUESTION_SCHEMA))
        except (pa.ArrowException, OSError, ValueError) as e:
            warnings.warn(f"skipping question file {storage.path(rel)}: {e}", stacklevel=2)
    if not tables:
        return pd.DataFrame(columns=QUESTION_SCHEMA.names)
    return pa.concat_tables(tables).to_pandas()


def records_of(df) -> list[dict]:
    """Rows of :func:`load_questions` back as records (``paired_difference`` takes them)."""
    out = []
    for r in df.to_dict("records"):
        out.append({"task": r["task"], "subtask": r["subtask"], "doc_id": int(r["doc_id"]),
                    "doc_hash": r["doc_hash"], "metrics": {m: r[m] for m in SCORES if r.get(m) == r.get(m)
                                                           and r.get(m) is not None}})
    return out
