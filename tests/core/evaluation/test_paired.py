"""Per-question records and the paired difference of two rows on the same questions: a hand-computed example,
the refusals that keep a pairing honest, and records from real evaluations that agree with the reported scores."""

from __future__ import annotations

import math
import random

import pytest
from helpers import tiny_model

from ray_prune.core.evaluation.harness import evaluate, evaluate_tasks
from ray_prune.core.evaluation.paired import QuestionRecord, paired_difference
from ray_prune.core.evaluation.tasks import TASKS


def record(doc_id: int, acc: float, task: str = "boolq", subtask: str = "rp_boolq",
           doc_hash: str | None = None) -> QuestionRecord:
    return QuestionRecord(task=task, subtask=subtask, doc_id=doc_id, doc_hash=doc_hash or f"h{subtask}{doc_id}",
                          metrics={"acc": acc}, target="1", loglikelihoods=[-1.0, -2.0], response=None,
                          extracted=None)


A = [1, 0, 1, 1, 0]
B = [1, 1, 0, 1, 1]


def test_paired_difference_of_a_hand_computed_example():
    """Differences b - a: 0, 1, -1, 0, 1. Mean 0.2; sample variance (0.04 + 0.64 + 1.44 + 0.04 + 0.64) / 4 = 0.7;
    standard error sqrt(0.7 / 5). Unpaired, the two means' errors would add to sqrt(0.06 + 0.04) = 0.316..."""
    a = [record(i, v) for i, v in enumerate(A)]
    b = [record(i, v) for i, v in enumerate(B)]
    random.Random(0).shuffle(b)  # pairs by question, not by position
    d = paired_difference(a, b, "boolq", "acc")
    assert d.n == 5 and d.disagree == 3
    assert d.mean_a == pytest.approx(0.6) and d.mean_b == pytest.approx(0.8)
    assert d.diff == pytest.approx(0.2)
    assert d.stderr == pytest.approx(math.sqrt(0.7 / 5))
    assert paired_difference(b, a, "boolq", "acc").diff == pytest.approx(-0.2)
    same = paired_difference(a, a, "boolq", "acc")
    assert same.diff == 0 and same.stderr == 0 and same.disagree == 0


def test_questions_pair_by_subtask_and_doc_and_other_tasks_are_ignored():
    """MMLU's doc 0 of two subjects are two questions; records of another task in the same list do not count."""
    a = [record(0, 1.0, "mmlu", "rp_mmlu_anatomy"), record(0, 0.0, "mmlu", "rp_mmlu_virology"), record(0, 1.0)]
    b = [record(0, 1.0, "mmlu", "rp_mmlu_virology"), record(0, 1.0, "mmlu", "rp_mmlu_anatomy")]
    d = paired_difference(a, b, "mmlu", "acc")
    assert (d.n, d.diff, d.disagree) == (2, 0.5, 1)


def test_a_pairing_refuses_what_is_not_the_same_questions():
    a = [record(i, v) for i, v in enumerate(A)]
    with pytest.raises(ValueError, match="different questions"):
        paired_difference(a, a[:4], "boolq", "acc")
    with pytest.raises(ValueError, match="different documents"):
        paired_difference(a, a[:4] + [record(4, 0.0, doc_hash="another text")], "boolq", "acc")
    with pytest.raises(ValueError, match="twice"):
        paired_difference(a + a[:1], a, "boolq", "acc")
    with pytest.raises(ValueError, match="acc_norm"):
        paired_difference(a, a, "boolq", "acc_norm")
    with pytest.raises(ValueError, match="no records"):
        paired_difference(a, a, "piqa", "acc")


def test_records_of_two_models_pair_up_and_agree_with_their_scores(tokenizer):
    """Two evaluations on the same questions: their records hold every scored question once, the means of the
    records are the reported scores, and the paired difference is the difference of those scores."""
    tasks, limit = {"arc_easy": 0, "mmlu": 0}, 6
    a_records: list = []
    b_records: list = []
    a = evaluate_tasks(tiny_model("llama", num_layers=2, seed=5), tokenizer, tasks, limit=limit, progress=False,
                       records=a_records)
    b = evaluate_tasks(tiny_model("llama", num_layers=2, seed=6), tokenizer, tasks, limit=limit, progress=False,
                       records=b_records)
    for records, scores in ((a_records, a), (b_records, b)):
        assert len(records) == 2 * limit
        for name in tasks:
            mine = [r for r in records if r["task"] == name]
            assert len({(r["subtask"], r["doc_id"]) for r in mine}) == limit == scores[name]["n"]
            for metric in TASKS[name].metrics:
                assert sum(r["metrics"][metric] for r in mine) / limit == pytest.approx(scores[name][metric])
            for r in mine:  # multiple choice: one log-likelihood per choice, and acc is the argmax's correctness
                assert r["response"] is None and r["extracted"] is None and len(r["loglikelihoods"]) >= 2
                lls = r["loglikelihoods"]
                assert r["metrics"]["acc"] == float(lls.index(max(lls)) == int(r["target"]))
    assert [(r["subtask"], r["doc_id"]) for r in a_records] == [(r["subtask"], r["doc_id"]) for r in b_records]
    assert any(r["subtask"] != "rp_mmlu_abstract_algebra" for r in a_records if r["task"] == "mmlu")
    for name in tasks:
        for metric in TASKS[name].metrics:
            d = paired_difference(a_records, b_records, name, metric)
            assert d.n == limit
            assert d.diff == pytest.approx(b[name][metric] - a[name][metric], abs=1e-12)
    # evaluate() (an EvalConfig's tasks) collects the same records.
    again: list = []
    evaluate(tiny_model("llama", num_layers=2, seed=5), tokenizer, tasks={n: {"shots": s} for n, s in tasks.items()},
             limit=limit, c4_sequences=0,
             progress=False, records=again)
    assert again == a_records
