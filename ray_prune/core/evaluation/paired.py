"""Per-question records of an evaluation, and the paired difference of two rows scored on the same questions.

Two models scored on the same questions differ in accuracy by much less noise than two independent samples
would: most questions are answered alike by both, and only the questions on which they disagree move the
difference. The standard error of a difference of two means, ``sqrt(se_a**2 + se_b**2)``, ignores that and is
often several times too large; the paired one, taken from the per-question differences, is not. So an
evaluation keeps, per question, what lm-eval's ``log_samples`` keeps (its correctness and scores), and rows
on the same questions are compared question by question. Pure: nothing here imports torch or lm-eval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypedDict


class QuestionRecord(TypedDict):
    """One question of one evaluation: what was asked, what the model answered and how that scored.

    ``(task, subtask, doc_id)`` names the question (``doc_id`` is its index in the subtask's evaluation split,
    the same for every row that evaluates that split, whatever its limit), and ``doc_hash`` is lm-eval's hash
    of the document itself, so a pairing can check that the ids name the same text.
    """

    task: str  # reported task ("mmlu")
    subtask: str  # lm-eval task it ran as ("rp_mmlu_anatomy"; the task's own for unsplit tasks)
    doc_id: int  # index within the subtask's evaluation split
    doc_hash: str  # lm-eval's hash of the document
    metrics: dict[str, float]  # per reported score (the result column's suffix: "acc", "exact_match_strict")
    target: str  # the gold answer as lm-eval has it: the choice index, or the reference solution's text
    loglikelihoods: list[float] | None  # multiple choice: each choice's log-likelihood, in choice order
    response: str | None  # generation: the text the model generated
    extracted: dict[str, str] | None  # generation: per lm-eval filter, the answer it extracted from the response


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n), as lm-eval reports); nan stderr below 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass(frozen=True)
class PairedDifference:
    """``b`` minus ``a`` on the same questions."""

    task: str
    metric: str
    n: int  # questions paired
    mean_a: float
    mean_b: float
    diff: float  # mean of the per-question differences b - a (= mean_b - mean_a)
    stderr: float  # standard error of that mean, from the per-question differences
    disagree: int  # questions on which the two scores differ: the only ones that move ``diff``


def _by_question(records: Iterable[QuestionRecord], task: str, side: str) -> dict[tuple[str, int], QuestionRecord]:
    out: dict[tuple[str, int], QuestionRecord] = {}
    for r in records:
        if r["task"] != task:
            continue
        key = (r["subtask"], int(r["doc_id"]))
        if key in out:
            raise ValueError(f"{side}: question {key} of {task} appears twice")
        out[key] = r
    return out


def paired_difference(a: Iterable[QuestionRecord], b: Iterable[QuestionRecord], task: str,
                      metric: str) -> PairedDifference:
    """``metric`` of ``task`` in ``b`` minus in ``a``, question by question, with the paired standard error.

    Both must hold the same questions of ``task`` (records of other tasks are ignored): a pairing over a
    subset would compare different questions from the two unpaired means, so a mismatch is an error, and so
    is a question whose ``doc_hash`` differs (the same index of two different datasets, the hub and a mirror).
    """
    left, right = _by_question(a, task, "a"), _by_question(b, task, "b")
    if not left and not right:
        raise ValueError(f"no records of task {task!r}")
    if left.keys() != right.keys():
        only_a, only_b = len(left.keys() - right.keys()), len(right.keys() - left.keys())
        raise ValueError(f"{task}: the two sets hold different questions ({only_a} only in a, {only_b} only in b); "
                         "a paired difference needs the same questions on both sides")
    keys = sorted(left)
    changed = [k for k in keys if left[k]["doc_hash"] != right[k]["doc_hash"]]
    if changed:
        raise ValueError(f"{task}: {len(changed)} question(s) have the same id but different documents, "
                         f"e.g. {changed[0]}")
    missing = [k for k in keys if metric not in left[k]["metrics"] or metric not in right[k]["metrics"]]
    if missing:
        raise ValueError(f"{task}: no {metric!r} score for question {missing[0]}")
    xa = [float(left[k]["metrics"][metric]) for k in keys]
    xb = [float(right[k]["metrics"][metric]) for k in keys]
    diff, stderr = mean_stderr([vb - va for va, vb in zip(xa, xb)])
    return PairedDifference(task=task, metric=metric, n=len(keys), mean_a=sum(xa) / len(xa), mean_b=sum(xb) / len(xb),
                            diff=diff, stderr=stderr, disagree=sum(va != vb for va, vb in zip(xa, xb)))
