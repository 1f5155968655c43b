"""The methods comparison: each method's paired difference from the paper's method on the same questions, with the
standard error of those per-question differences, and each row's cost counted as getting that row alone."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ray_prune.ledger.questions import question_table
from ray_prune.report.compare import method_comparison, row_costs

N = 40  # questions of arc_easy both rows answered


def _row(cell: str, strategy: str, repair: str, stage: str, acc: float, **times) -> dict:
    """A row as a trial writes it: the healed row under the cell's id, the unhealed one under the pruned model's
    (``unhealed_id``)."""
    ids = {"cell_id": cell, "unhealed_id": f"u-{cell}"} if stage == "healed" else {"cell_id": f"u-{cell}"}
    return {"experiment": "x", **ids, "stage": stage, "status": "finished", "model": "m", "n": 3,
            "num_layers": 12, "fraction": 0.25, "strategy": strategy, "repair": repair, "c4_loss_norm": 0.5 + acc,
            "arc_easy_acc": acc, **times}


def _records(correct: np.ndarray) -> list[dict]:
    return [{"task": "arc_easy", "subtask": "rp_arc_easy", "doc_id": i, "doc_hash": f"h{i}",
             "metrics": {"acc": float(c), "acc_norm": float(c)}} for i, c in enumerate(correct)]


@pytest.fixture
def frames():
    rng = np.random.default_rng(0)
    ref = rng.random(N) < 0.6
    other = ref.copy()
    flip = rng.choice(N, 3, replace=False)  # the two methods disagree on 3 questions only
    other[flip] = ~other[flip]
    rows = pd.DataFrame([
        _row("ref", "similarity", "none", "healed", ref.mean(), wall_s=100.0, load_s=4.0, eval_s=30.0),
        _row("ref", "similarity", "none", "unhealed", 0.3, eval_s=20.0, wall_s=20.0),
        _row("lin", "greedy", "linear", "unhealed", other.mean(), eval_s=25.0, wall_s=25.0),
        _row("lin", "greedy", "linear", "healed", 0.5, wall_s=90.0, load_s=9.0, eval_s=30.0, gpu_s=180.0),
    ])
    questions = pd.concat([question_table("x", "ref", "healed", "m", _records(ref)).to_pandas(),
                           question_table("x", "u-lin", "unhealed", "m", _records(other)).to_pandas()])
    return rows, questions, ref, other


def test_the_paired_difference_and_its_error_come_from_the_same_questions(frames):
    rows, questions, ref, other = frames
    table = method_comparison(rows, questions).set_index(["method", "stage"])
    got = table.loc[("greedy + linear", "unhealed")]
    d = other.astype(float) - ref.astype(float)
    assert got["arc_easy_diff"] == pytest.approx(d.mean())
    assert got["arc_easy_diff_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(N))
    unpaired = math.sqrt(ref.var(ddof=1) / N + other.var(ddof=1) / N)
    assert got["arc_easy_diff_se"] < unpaired / 2  # why pairing: 3 disagreements out of 40
    assert table.loc[("similarity", "healed"), "is_reference"] and not got["is_reference"]
    assert math.isnan(table.loc[("greedy + linear", "healed"), "arc_easy_diff_se"])  # no questions stored for it


def test_each_row_costs_what_getting_it_alone_costs(frames):
    rows = frames[0]
    costs = row_costs(rows)
    assert costs[("u-ref", "unhealed")] == 4.0 + 20.0  # load, prune and repair, then its evaluation
    assert costs[("ref", "healed")] == 100.0 - 20.0  # the whole trial less the unhealed evaluation
    assert costs[("u-lin", "unhealed")] == (9.0 + 25.0) * 2  # on 2 GPUs: device-seconds
    assert costs[("lin", "healed")] == (90.0 - 25.0) * 2
