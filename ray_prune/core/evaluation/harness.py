"""Evaluate a (pruned, healed) model: lm-eval tasks and the C4 validation loss.

The paper's two readouts are few-shot QA accuracy (MMLU 5-shot, BoolQ 0-shot)
and the C4 validation loss divided by ln(vocab). Both work on an in-memory
model, so a sweep evaluates exactly the object it pruned and healed (a plain
``PreTrainedModel``, a PEFT-wrapped one, or a 4-bit one) without a save/load.

Tasks run through lm-evaluation-harness, declared as lm-eval task YAMLs in
``lm_eval_tasks/`` whose prompts, choices and metrics are those of lm-eval's
built-in tasks (``tests/core/evaluation/test_harness.py`` checks the rendered prompts against
the built-ins). Our task names carry an ``rp_`` prefix so they never collide
with the built-ins; results are reported under the plain names.

Local data versus the hub
-------------------------
The YAMLs name the hub datasets, so ``lm_eval --include_path ray_prune/core/evaluation/lm_eval_tasks
--tasks rp_boolq`` works on its own. When a data dir is set (argument or
``$RAY_PRUNE_DATA_DIR``), :func:`evaluate_tasks` writes (``overlay.py``), into a temporary
folder, one small overlay YAML per task that ``include``\\ s the template by
absolute path and replaces only where the data comes from: ``dataset_path:
parquet`` with ``data_files`` pointing at ``<data dir>/<dataset>/<split>.parquet``
(plus a row filter per MMLU subject), and the split names the mirror has. The
prompt templates are never copied or rewritten. The mirror stores some fields
under other names than the hub (``answer`` for ``label``, flat ``choices`` and
``choice_labels`` for ARC's ``choices: {text, label}``...); each template's
``process_docs`` (``lm_eval_tasks/hub_schema.py``) maps rows of either source to the
hub schema, passing hub rows through. This keeps one prompt definition, the
built-in one, for both sources, with the schema difference in one small,
tested function per dataset, instead of two parallel sets of templates or
prompt functions that branch on the schema.

Limits and MMLU
---------------
``limit`` caps the questions per task, counted the same way for every task,
MMLU included: ``limit`` questions drawn without replacement from the task's
whole evaluation split by a ``seed``-ed RNG (so MMLU's sample spreads across its
57 subjects rather than taking the first questions of the first subject; lm-eval's
own ``--limit`` would cap each subject). MMLU runs as its 57 per-subject tasks,
as lm-eval's built-in ``mmlu`` group does (each subject has its own description
and its own first 5 dev questions as exemplars); its accuracy is the mean over
all questions run, which for a full run equals the group's size-weighted acc.
Standard errors are the standard error of that mean (sample std / sqrt(n), as
lm-eval reports for a single task). For a full MMLU run lm-eval's group stderr
differs slightly: it pools within-subject variances only.

Generative tasks and per-question records
-----------------------------------------
GSM8K (``output_type: generate_until``) runs through lm-eval's own generation
and filters; lm-eval scores it once per filter (``exact_match,strict-match``,
``exact_match,flexible-extract``), reported as ``exact_match_strict`` and
``exact_match_flexible`` (names derived in ``tasks.py``). Greedy generation
costs a forward pass per token, so ``max_gen_toks`` (lm-eval's ``gen_kwargs``)
caps it for CPU runs and tests. Every score is the mean over lm-eval's logged
per-question output, gathered into one record per question
(:class:`~ray_prune.core.evaluation.paired.QuestionRecord`); a caller that passes
``records`` keeps them, so two evaluations on the same questions can be
compared question by question (``paired.paired_difference``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ray_prune.core.data import data_dir as resolve_data_dir
from ray_prune.core.evaluation.config import DEFAULT, LOGPROBS, EvalConfig
from ray_prune.core.evaluation.overlay import load_tasks, local_subtask_sizes
from ray_prune.core.evaluation.paired import QuestionRecord, mean_stderr
from ray_prune.core.evaluation.tasks import DEFAULT_TASKS, TASKS, resolve_tasks
from ray_prune.errors import UserError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- lm-eval plumbing


class _Indices(list):
    """Doc indices for lm-eval's ``samples``, which it tests with ``i in indices`` for every doc."""

    def __contains__(self, item) -> bool:
        if not hasattr(self, "_set"):
            self._set = frozenset(self)
        return item in self._set


def _choose_docs(sizes: Mapping[str, int], requested: Mapping[str, int], limit: int | None,
                 seed: int) -> dict[str, list[int] | None]:
    """Per lm-eval task, the doc indices to run (None: all); tasks that get none are left out.

    ``sizes`` maps each lm-eval task to its number of evaluation docs.
    """
    chosen: dict[str, list[int] | None] = {}
    for name in requested:
        pool = [(t, i) for t in TASKS[name].lm_eval_tasks for i in range(sizes[t])]
        if limit is None or limit >= len(pool):
            chosen.update({t: None for t in TASKS[name].lm_eval_tasks})
            continue
        picks = sorted(random.Random(f"{seed}:{name}").sample(range(len(pool)), limit))
        for k in picks:
            t, i = pool[k]
            chosen.setdefault(t, _Indices()).append(i)  # ascending within each task, as lm-eval expects
    return chosen


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Keep lm-eval's and datasets' chatter out of the way unless someone asked for it.

    The ``lm_eval`` logger is raised to ERROR only while it has no level of its
    own: ``logging.getLogger("lm_eval").setLevel(logging.INFO)`` brings every
    message back. lm-eval draws a progress bar per task while it builds prompts
    (57 of them for MMLU); those are switched off for the duration.
    """
    import datasets
    import lm_eval.api.task as lm_task

    logger = logging.getLogger("lm_eval")
    level = logger.level
    if level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    bars = datasets.is_progress_bar_enabled()
    ds_level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    tqdm = lm_task.tqdm
    lm_task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        lm_task.tqdm = tqdm
        datasets.logging.set_verbosity(ds_level)
        if bars:
            datasets.enable_progress_bars()
        logger.setLevel(level)


def _lm(model, tokenizer, batch_size: int, progress: bool, logprobs: str = DEFAULT.logprobs):
    """lm-eval's HF wrapper around the in-memory model (PEFT-wrapped and 4-bit models included).

    lm-eval tokenizes and builds the requests; the continuations are scored by
    ``score_continuations``, which runs the LM head only on the scored positions
    and takes the log-softmax in the precision ``logprobs`` names.
    Generation (``generate_until``: GSM8K) is lm-eval's own, so what a generative
    task scores is exactly what ``lm_eval --model hf`` would; only its progress
    bar follows ``progress``."""
    from lm_eval.models.huggingface import HFLM

    from ray_prune.core.evaluation.loglikelihood import score_continuations

    class _HFLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            answers = score_continuations(self.model, requests, self.max_length, int(override_bs or self.batch_size),
                                          self.device, progress=progress and not disable_tqdm,
                                          logprobs=logprobs)
            for (request, _, _), answer in zip(requests, answers):
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
            return answers

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


# --------------------------------------------------------------------------- public API


def _plan_docs(requested: Mapping[str, int], root, limit: int | None, seed: int):
    """Build the tasks and choose their docs: (manager, loaded tasks, chosen docs, lm-eval ``samples``)."""
    sizes = local_subtask_sizes(requested, root) if root is not None and limit is not None else {}
    only = None
    if sizes:  # pick MMLU's questions first, then build only the subjects they come from
        split = {n: s for n, s in requested.items() if TASKS[n].is_split}
        only = set(_choose_docs(sizes, split, limit, seed))
    manager, loaded = load_tasks(requested, root, only)
    sizes.update({t: len(task.eval_docs) for t, task in loaded.items() if t not in sizes})
    chosen = _choose_docs(sizes, requested, limit, seed)
    samples = {t: idx for t, idx in chosen.items() if idx is not None}
    if samples:  # lm-eval runs every doc of a task missing from `samples`
        samples.update({t: range(len(loaded[t].eval_docs)) for t in chosen if chosen[t] is None})
    return manager, loaded, chosen, samples


def _records(requested: Mapping[str, int], chosen: Mapping[str, object],
             samples_out: Mapping[str, list[dict[str, Any]]]) -> list[QuestionRecord]:
    """lm-eval's logged samples as one record per question, in task order, then subtask, then doc.

    lm-eval logs a question once per filter (a generative task's strict and
    flexible extractions are two entries); the record gathers them, each score
    under its reported name (``TaskSpec.metric_specs``).
    """
    out: list[QuestionRecord] = []
    for name in requested:
        spec = TASKS[name]
        for t in (t for t in spec.lm_eval_tasks if t in chosen):
            by_doc: dict[int, QuestionRecord] = {}
            for entry in samples_out[t]:
                doc_id = int(entry["doc_id"])
                rec = by_doc.get(doc_id)
                if rec is None:
                    rec = by_doc[doc_id] = QuestionRecord(
                        task=name, subtask=t, doc_id=doc_id, doc_hash=str(entry["doc_hash"]), metrics={},
                        target=str(entry["target"]),
                        loglikelihoods=None if spec.generates else [float(r[0]) for r in entry["filtered_resps"]],
                        response=str(entry["resps"][0][0]) if spec.generates else None,
                        extracted={} if spec.generates else None)
                f = entry["filter"]
                rec["metrics"].update({m.name: float(entry[m.metric]) for m in spec.metric_specs if m.filter == f})
                if rec["extracted"] is not None:
                    rec["extracted"][f] = str(entry["filtered_resps"][0])
            out += [by_doc[i] for i in sorted(by_doc)]
    return out


def _scores(requested: Mapping[str, int], records: Sequence[QuestionRecord]) -> dict[str, dict[str, float]]:
    """Per task: each score's mean and standard error over the questions run, their number, and the shots."""
    results: dict[str, dict[str, float]] = {}
    for name, shots in requested.items():
        docs = [r for r in records if r["task"] == name]
        row: dict[str, float] = {}
        for metric in TASKS[name].metrics:
            row[metric], row[f"{metric}_stderr"] = mean_stderr([d["metrics"][metric] for d in docs])
        row["n"] = len(docs)
        row["shots"] = shots
        results[name] = row
    return results


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[str] | Mapping[str, int] = DEFAULT_TASKS,
    limit: int | None = None,
    data_dir=None,
    batch_size: int = DEFAULT.batch_size,
    seed: int = DEFAULT.seed,
    progress: bool = True,
    max_gen_toks: int | None = DEFAULT.max_gen_toks,
    records: list[QuestionRecord] | None = None,
    logprobs: str = DEFAULT.logprobs,
) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on an in-memory model.

    ``tasks``: names (default shots from the task YAMLs) or ``{name: shots}``.
    ``limit``: at most this many questions per task, a seeded sample of the
    whole split (see the module docstring). Returns ``{task: {"acc": ..,
    "acc_stderr": .., ["acc_norm": .., "acc_norm_stderr": ..,] "n": ..,
    "shots": ..}}``, a generative task its ``exact_match_strict`` and
    ``exact_match_flexible`` (``TaskSpec.metrics``). ``max_gen_toks`` caps the
    tokens a generative task generates per question (lm-eval's ``gen_kwargs``;
    None: the task's own). ``records``: a list that receives one
    :class:`~ray_prune.core.evaluation.paired.QuestionRecord` per question run,
    for comparing two evaluations question by question. ``logprobs``: the
    precision of the continuations' log-softmax, "fp32" (whatever the model's
    dtype) or "model" (its dtype, as lm-eval; ``EvalConfig.logprobs``). Bad task
    names, shots, limits or precisions fail before any model work.
    """
    requested = resolve_tasks(tasks)
    root = resolve_data_dir(data_dir)
    if root is not None:
        resolve_tasks(requested, local=True)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer or None, got {limit!r}")
    if max_gen_toks is not None and (isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int)
                                     or max_gen_toks < 1):
        raise UserError(f"max_gen_toks must be a positive integer or None, got {max_gen_toks!r}")
    if logprobs not in LOGPROBS:
        raise UserError(f"logprobs must be one of {', '.join(LOGPROBS)}, got {logprobs!r}",
                        "use fp32 (ray-prune's default) or model (lm-eval's precision)")

    import lm_eval

    with _quiet_lm_eval():
        manager, loaded, chosen, samples = _plan_docs(requested, root, limit, seed)
        was_training = model.training
        model.eval()
        try:
            out = lm_eval.simple_evaluate(
                model=_lm(model, tokenizer, batch_size, progress, logprobs),
                tasks=[loaded[t] for t in chosen],
                task_manager=manager,  # else lm-eval builds one that indexes all its built-in tasks
                samples=samples or None,
                log_samples=True,
                gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None,
                bootstrap_iters=0,  # only means are reported; their stderr is computed below
                # Only exemplar sampling draws random numbers here; leave the caller's global RNGs alone.
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
                fewshot_random_seed=seed,
            )
        finally:
            model.train(was_training)
    run = _records(requested, chosen, out["samples"])
    if records is not None:
        records.extend(run)
    return _scores(requested, run)


def evaluate(
    model,
    tokenizer,
    config: EvalConfig | None = None,
    *,
    data_dir=None,
    progress: bool = True,
    c4_blocks=None,
    records: list[QuestionRecord] | None = None,
    **settings,
) -> dict[str, float]:
    """Tasks and C4 loss in one flat dict: ``{"mmlu/acc": .., "boolq/acc": .., "c4/loss_norm": ..}``.

    ``config`` is an :class:`EvalConfig` (its defaults: the paper's MMLU 5-shot, BoolQ 0-shot and the C4 loss);
    without one, keyword ``settings`` are its fields (``evaluate(model, tok, tasks=["boolq"], limit=20)``). Tasks
    run in one lm-eval call per limit (``EvalConfig.groups``); no task skips lm-eval, ``c4_sequences=0`` the C4
    loss. ``c4_blocks``: the C4 loss's blocks packed already (a sweep packs them once for every trial).
    ``records``: a list that receives every question's record (see :func:`evaluate_tasks`).
    """
    if config is None:
        config = EvalConfig.from_dict(settings)
    elif settings:
        raise TypeError(f"pass either an EvalConfig or its settings, not both ({', '.join(settings)})")
    config.validate()
    flat: dict[str, float] = {}
    for limit, tasks in config.groups().items():
        for name, row in evaluate_tasks(model, tokenizer, tasks, limit=limit, data_dir=data_dir,
                                        batch_size=config.batch_size, seed=config.seed, progress=progress,
                                        max_gen_toks=config.max_gen_toks, records=records,
                                        logprobs=config.logprobs).items():
            flat.update({f"{name}/{k}": v for k, v in row.items()})
    if config.c4_sequences:
        from ray_prune.core.loss import c4_loss

        c4 = c4_loss(model, tokenizer, num_sequences=config.c4_sequences, seq_len=config.seq_len,
                     batch_size=config.batch_size, data_dir=data_dir, blocks=c4_blocks)
        flat.update({f"c4/{k}": v for k, v in c4.items()})
    return flat
