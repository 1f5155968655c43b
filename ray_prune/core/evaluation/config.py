"""``EvalConfig``: what a model is scored on and how, declared once (lm-eval's ``EvaluatorConfig`` is the model).

The experiment's ``eval`` section, the ``ray-prune eval`` flags, the memory workload and the defaults of
:func:`~ray_prune.core.evaluation.harness.evaluate` and :func:`~ray_prune.core.loss.c4_loss` are derived from
these fields. A task's shots and limit are resolved in one place, :meth:`EvalConfig.shots` and
:meth:`EvalConfig.limits`. Defaults follow the paper: MMLU 5-shot and BoolQ 0-shot on every question, and the C4
loss on 64 held-out blocks of 1024 tokens. Nothing here imports torch or lm-eval.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ray_prune.core.evaluation.tasks import DEFAULT_TASKS, TASKS, resolve_tasks, unknown_task_message
from ray_prune.core.settings import Settings, is_int, need, setting
from ray_prune.errors import UserError

# The precision a continuation's log-probabilities are taken in (``loglikelihood.score_continuations``): "fp32",
# ray-prune's, the log-softmax of the logits cast to fp32 whatever the model's dtype; "model", lm-eval's (its HF
# wrapper's ``softmax_dtype`` unset), in the model's dtype, bf16 on a GPU, and summed in it.
LOGPROBS = ("fp32", "model")


@dataclass(frozen=True)
class TaskSettings:
    """One task's settings in an evaluation; None means the task's own default."""

    shots: int | None = None  # in-context examples; None: the task YAML's num_fewshot
    limit: int | None = None  # questions, a seeded sample of the split; None: EvalConfig.limit


def _default_tasks() -> dict[str, TaskSettings]:
    return {t: TaskSettings(shots=TASKS[t].shots) for t in DEFAULT_TASKS}


def parse_tasks(text: str) -> dict[str, TaskSettings]:
    """``mmlu,boolq`` or ``mmlu:5,boolq`` (``name:shots``) as task settings; ``none`` (or nothing) for no task."""
    out: dict[str, TaskSettings] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item or item == "none":
            continue
        name, _, shots = item.partition(":")
        try:
            out[name] = TaskSettings(shots=int(shots) if shots else None)
        except ValueError:
            raise UserError(f"task {item!r}: shots must be an integer", "write tasks as name or name:shots, e.g. "
                            "mmlu:5,boolq") from None
    return out


@dataclass(frozen=True)
class EvalConfig(Settings):
    """Everything that determines an evaluation's scores, given the model."""

    tasks: dict[str, TaskSettings] = setting(
        why="lm-eval tasks, each with its shots and limit (the paper: MMLU 5-shot, BoolQ 0-shot); on the command "
        "line name or name:shots, comma-separated, or none", factory=_default_tasks, parse=parse_tasks)
    limit: int | None = setting(None, "questions per task where the task sets no limit, a seeded sample of its "
                                "split (None: every question)", identity="if_changed")
    max_gen_toks: int | None = setting(
        None, "tokens a generative task (gsm8k) may generate per question (None: the task's own cap, lm-eval's 256); "
        "a smaller cap makes CPU runs and tests affordable but cuts long answers off", identity="if_changed")
    c4_sequences: int = setting(64, "held-out C4 blocks the reported loss is taken on (0 skips the loss)")
    seq_len: int = setting(1024, "tokens per C4 block")
    batch_size: int = setting(8, "sequences per forward pass: memory and speed, not the result")
    seed: int = setting(1234, "which questions a limit samples, and the order of few-shot exemplars",
                        identity="if_changed")
    logprobs: str = setting(
        "fp32", "precision of the continuations' log-softmax: fp32 whatever the model's dtype (ray-prune's), or "
        "model, the model's dtype as lm-eval takes it, to reproduce lm-eval's numbers (in bf16 they keep 8 "
        "significant bits of a score: up to 0.16 nats off on scores near -54)", identity="if_changed",
        choices=LOGPROBS)

    @classmethod
    def coerce(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Accept the shorthands a file or a caller writes: ``tasks`` as a list of names or a ``{name: shots}``
        mapping; a task's settings as a mapping (unknown keys refused), its shots alone, or None."""
        out = dict(values)
        tasks = out.get("tasks")
        if isinstance(tasks, (list, tuple)):
            tasks = {str(t): None for t in tasks}
        if isinstance(tasks, Mapping):
            known = {f.name for f in fields(TaskSettings)}
            coerced = {}
            for name, spec in tasks.items():
                if name not in TASKS:
                    raise UserError(unknown_task_message(str(name)), f"use any of {', '.join(TASKS)}")
                if isinstance(spec, TaskSettings):
                    coerced[name] = spec
                    continue
                if isinstance(spec, int) and not isinstance(spec, bool):  # {task: shots}, as the harness takes
                    coerced[name] = TaskSettings(shots=spec)
                    continue
                spec = dict(spec or {})
                unknown = sorted(set(spec) - known)
                if unknown:
                    raise UserError(f"eval.tasks.{name}: unknown key(s) {unknown}", f"use {', '.join(sorted(known))}")
                coerced[name] = TaskSettings(**spec)
            out["tasks"] = coerced
        return out

    def shots(self, local: bool = False) -> dict[str, int]:
        """``{task: shots}``, each task's default where none is set (``local``: the data mirror must hold the
        exemplars), checked without loading anything."""
        if not self.tasks:
            return {}
        return resolve_tasks({name: t.shots for name, t in self.tasks.items()}, local=local)

    def limits(self) -> dict[str, int | None]:
        """``{task: questions}``: the task's own limit, else the evaluation's (None: every question)."""
        return {name: self.limit if t.limit is None else t.limit for name, t in self.tasks.items()}

    def groups(self) -> dict[int | None, dict[str, int]]:
        """Tasks grouped by their limit, ``{limit: {task: shots}}``: lm-eval runs once per group."""
        shots, out = self.shots(), {}
        for name, limit in self.limits().items():
            out.setdefault(limit, {})[name] = shots[name]
        return out

    def validate(self, local: bool = False) -> EvalConfig:
        """Fail early, with a fix, before any model loads."""
        self.shots(local)
        for name, limit in [("limit", self.limit)] + [(f"tasks.{t}.limit", s.limit) for t, s in self.tasks.items()]:
            need(limit is None or (is_int(limit) and limit >= 1), "eval", f"{name} must be a positive integer, got "
                 f"{limit!r}", f"set {name} to the number of questions to score (at least 1), or leave it unset "
                 "for every question")
        need(self.max_gen_toks is None or (is_int(self.max_gen_toks) and self.max_gen_toks >= 1), "eval",
             f"max_gen_toks must be a positive integer, got {self.max_gen_toks!r}",
             "set max_gen_toks to the most tokens to generate per question, or leave it unset for the task's own")
        need(is_int(self.c4_sequences) and self.c4_sequences >= 0, "eval",
             f"c4_sequences must be >= 0, got {self.c4_sequences!r}", "set c4_sequences to 0 (no C4 loss) or more")
        need(is_int(self.seq_len) and self.seq_len >= 2, "eval", f"seq_len must be >= 2, got {self.seq_len!r}",
             "set seq_len to an integer >= 2")
        need(is_int(self.batch_size) and self.batch_size >= 1, "eval",
             f"batch_size must be > 0, got {self.batch_size!r}", "set batch_size to a positive integer")
        need(is_int(self.seed), "eval", f"seed must be an integer, got {self.seed!r}", "set seed to an integer")
        need(self.logprobs in LOGPROBS, "eval", f"logprobs must be one of {', '.join(LOGPROBS)}, got "
             f"{self.logprobs!r}", "use logprobs: fp32 (ray-prune's default) or model (lm-eval's precision, to "
             "reproduce its numbers)")
        return self


DEFAULT = EvalConfig()  # the signature defaults of the evaluation functions read this
