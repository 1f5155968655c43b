"""The standard errors the results quote: the standard error of a mean over questions, checked against values
computed by hand for known counts (not only against bounds)."""

from __future__ import annotations

import math

import pytest

from helpers import tiny_model
from ray_prune.core.evaluation.harness import evaluate_tasks, mean_stderr


@pytest.mark.parametrize("values,mean,stderr", [
    ([1, 1, 1, 0], 0.75, 0.25),  # sample variance 0.25 (ddof 1), over n = 4: sqrt(0.25 / 4)
    ([1, 0], 0.5, 0.5),  # sample variance 0.5, over 2: sqrt(0.25)
    ([0.0, 0.0, 0.0], 0.0, 0.0),  # every answer the same: no spread
    ([2.0, 4.0, 6.0, 8.0], 5.0, math.sqrt(20 / 3 / 4)),  # sample variance (9 + 1 + 1 + 9) / 3
])
def test_mean_stderr_of_known_values(values, mean, stderr):
    got_mean, got_se = mean_stderr(values)
    assert got_mean == pytest.approx(mean) and got_se == pytest.approx(stderr)


def test_one_question_has_no_standard_error():
    assert math.isnan(mean_stderr([1.0])[1])


def test_quoted_stderr_of_an_accuracy_is_that_of_its_questions(tokenizer):
    """For a 0/1 metric over n questions at accuracy p, the standard error of the mean is sqrt(p (1 - p) / (n - 1))."""
    scores = evaluate_tasks(tiny_model("llama", num_layers=2), tokenizer, ["boolq", "arc_easy"], limit=6,
                            progress=False)
    for row in scores.values():
        n, p = row["n"], row["acc"]
        assert n == 6
        assert row["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), abs=1e-12)
