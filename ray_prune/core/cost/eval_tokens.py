"""Tokens the evaluation's scorer runs per question of each lm-eval task, measured once, and the stated fallback.

``core.cost.work.evaluation_work`` multiplies these by the FLOPs a token costs. Padding inside a batch is not
counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ray_prune.core.evaluation.tasks import TASKS


@dataclass(frozen=True)
class TaskTokens:
    """What ``core.evaluation.loglikelihood.score_continuations`` runs for a (task, shots) over its evaluation split,
    per question, in SmolLM2 tokens (see :data:`TASK_TOKENS`)."""

    questions: int  # in the evaluation split
    contexts: int  # distinct contexts (one per question; two for WinoGrande, fewer where questions repeat one)
    alone: float  # tokens run per question where no context shares a prefix with another: context + continuation rows
    full: float  # per question over the whole split: each prefix that contexts share (16+ tokens) run once
    clusters: int  # groups of contexts that share such a prefix (MMLU: its 57 subjects' exemplars)
    clustered: int  # contexts in those groups
    scored: float  # positions the LM head runs per question
    length: float  # mean tokens of a context with its longest continuation: the length attention runs over
    generated: bool = False  # a generate_until task: ``alone`` is the prompt

    def tokens(self, questions: int) -> float:
        """Tokens the scorer runs for a seeded sample of ``questions`` of the split: each question alone, less what
        shared prefixes save, which grows with how many members of a group the sample holds (the expected
        ``members - 1`` of each group, for contexts drawn without replacement)."""
        n = min(questions, self.questions)
        if n <= 0:
            return 0.0
        saved = (self.alone - self.full) * self.questions  # over the whole split
        if not self.clusters or saved <= 0 or self.clustered <= self.clusters:
            return n * self.alone
        size = self.clustered / self.clusters  # contexts per group
        drawn = n * self.contexts / self.questions  # contexts the sample holds
        N = self.contexts
        # P(a group has no member in the sample): hypergeometric, C(N - size, drawn) / C(N, drawn)
        none = 0.0 if drawn > N - size else math.exp(math.lgamma(N - size + 1) - math.lgamma(N - size - drawn + 1)
                                                      - math.lgamma(N + 1) + math.lgamma(N - drawn + 1))
        repeats = drawn * size / N - (1 - none)  # per group: E[members drawn] - P(any) = E[max(0, members drawn - 1)]
        return n * self.alone - saved * min(1.0, max(0.0, repeats / (size - 1)))


# Measured once at this commit on the local data mirror: lm-eval (0.4.13) built every request of each task's whole
# evaluation split (``build_all_requests``, the few-shot seed the harness uses, 1234), its HF wrapper tokenized them
# with SmolLM2-135M's tokenizer, and the scorer's own tree (``loglikelihood._contexts`` and ``_clusters``) counted
# the tokens it runs, with and without shared prefixes, and the positions it scores (GSM8K, generated: its prompts'
# tokens). Gemma-3-270M's tokenizer gives within 4% of these on every task; Llama-2's 32k vocabulary (no local copy
# to measure) spends more tokens per character than SmolLM2's 49k, so its evaluations cost somewhat more than these
# counts say. ``tests/core/test_cost.py`` measures WinoGrande again the same way and compares.
# TaskTokens(questions, contexts, alone, full, clusters, clustered, scored, length)
TASK_TOKENS: dict[tuple[str, int], TaskTokens] = {
    ("mmlu", 5): TaskTokens(14042, 14015, 721.65, 108.36, 57, 14015, 1.00, 723.04),
    ("mmlu", 0): TaskTokens(14042, 14015, 125.70, 106.59, 200, 13757, 1.00, 125.94),
    ("boolq", 0): TaskTokens(3270, 3270, 151.42, 136.79, 267, 637, 1.00, 151.42),
    ("arc_easy", 0): TaskTokens(2376, 2371, 40.44, 40.25, 7, 14, 14.15, 31.55),
    ("arc_easy", 25): TaskTokens(2376, 2376, 876.91, 849.51, 529, 2339, 14.16, 867.95),
    ("arc_challenge", 0): TaskTokens(1172, 1170, 50.60, 50.55, 2, 4, 20.51, 37.17),
    ("arc_challenge", 25): TaskTokens(1172, 1172, 1031.46, 1000.01, 273, 1151, 20.52, 1017.98),
    ("hellaswag", 0): TaskTokens(10042, 10019, 162.85, 161.95, 387, 786, 114.28, 86.34),
    ("piqa", 0): TaskTokens(1838, 1803, 56.66, 56.66, 0, 0, 44.32, 36.62),
    ("winogrande", 0): TaskTokens(1267, 2064, 36.78, 29.36, 465, 956, 10.87, 21.58),
    ("gsm8k", 5): TaskTokens(1319, 1319, 1021.05, 1021.05, 0, 0, 0.00, 1021.05, generated=True),
}
FALLBACK_TOKENS_PER_SHOT = 256  # a task without a measured entry: (shots + 1) x this many tokens, one scored position


def fallback_task_tokens(task: str, shots: int) -> TaskTokens:
    """The stated fallback for an unmeasured (task, shots): ``(shots + 1) x`` :data:`FALLBACK_TOKENS_PER_SHOT` tokens,
    one scored position, no shared prefix, 1,000 questions in the split (a generative task's prompt, generated
    tokens apart)."""
    tokens = (shots + 1) * FALLBACK_TOKENS_PER_SHOT
    return TaskTokens(questions=1000, contexts=1000, alone=tokens, full=tokens, clusters=0, clustered=0,
                      scored=0.0 if TASKS[task].generates else 1.0, length=tokens, generated=TASKS[task].generates)


def task_tokens(task: str, shots: int) -> tuple[TaskTokens, bool]:
    """(the task's tokens, whether they were measured)."""
    hit = TASK_TOKENS.get((task, shots))
    return (hit, True) if hit is not None else (fallback_task_tokens(task, shots), False)
