"""Evaluate a (pruned, healed) model: lm-eval tasks and the C4 validation loss.

The paper's two readouts are few-shot QA accuracy (MMLU 5-shot, BoolQ 0-shot)
and the C4 validation loss divided by ln(vocab). Both work on an in-memory
model, so a sweep evaluates exactly the object it pruned and healed (a plain
``PreTrainedModel``, a PEFT-wrapped one, or a 4-bit one) without a save/load.

Tasks run through lm-evaluation-harness, declared as lm-eval task YAMLs in
``ray_prune/tasks/`` whose prompts, choices and metrics are those of lm-eval's
built-in tasks (``tests/test_evaluate.py`` checks the rendered prompts against
the built-ins). Our task names carry an ``rp_`` prefix so they never collide
with the built-ins; results are reported under the plain names.

Local data versus the hub
-------------------------
The YAMLs name the hub datasets, so ``lm_eval --include_path ray_prune/tasks
--tasks rp_boolq`` works on its own. When a data dir is set (argument or
``$RAY_PRUNE_DATA_DIR``), :func:`evaluate_tasks` writes, into a temporary
folder, one small overlay YAML per task that ``include``\\ s the template by
absolute path and replaces only where the data comes from: ``dataset_path:
parquet`` with ``data_files`` pointing at ``<data dir>/<dataset>/<split>.parquet``
(plus a row filter per MMLU subject), and the split names the mirror has. The
prompt templates are never copied or rewritten. The mirror stores some fields
under other names than the hub (``answer`` for ``label``, flat ``choices`` and
``choice_labels`` for ARC's ``choices: {text, label}``...); each template's
``process_docs`` (``tasks/hub_schema.py``) maps rows of either source to the
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
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import yaml

from ray_prune.data import data_dir as resolve_data_dir
from ray_prune.data import load_texts, local_file
from ray_prune.packing import pack_texts
from ray_prune.errors import UserError

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

MMLU_SUBJECTS: tuple[str, ...] = tuple(
    sorted(p.stem[len("rp_mmlu_"):] for p in TASKS_DIR.glob("rp_mmlu_*.yaml"))
)


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task, as reported and as run."""

    name: str  # reported name
    builtin: str  # lm-eval's built-in task whose prompt and metrics we reproduce
    shots: int  # default number of in-context examples
    random_acc: float  # expected accuracy of uniform guessing
    majority_acc: float  # accuracy of always answering the most frequent gold choice (our eval split)
    metrics: tuple[str, ...]  # lm-eval metrics reported (each with its stderr)
    main_metric: str
    eval_split: str  # split evaluated, in the hub and in the mirror
    fewshot_split: str | None  # mirror split the exemplars come from (None: the mirror has none)
    local_dataset: str  # folder of the mirror

    @property
    def lm_eval_tasks(self) -> tuple[str, ...]:
        """Our lm-eval task names that make up this task."""
        if self.name == "mmlu":
            return tuple(f"rp_mmlu_{s}" for s in MMLU_SUBJECTS)
        return (f"rp_{self.name}",)


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        # Chance is 1/4; always answering "D" scores .269 on the test split.
        TaskSpec("mmlu", "mmlu", 5, 0.25, 0.269, ("acc",), "acc", "test", "dev", "mmlu"),
        # Chance is 1/2, but 62.2% of the validation answers are "yes": a model
        # that collapses to one answer reads .622, the number to compare with.
        TaskSpec("boolq", "boolq", 0, 0.5, 0.622, ("acc",), "acc", "validation", None, "boolq"),
        # A few ARC questions have 3 or 5 choices; mean 1/k is .2502 on both test sets. The
        # mirror has no ARC train split: exemplars (shots > 0) come from validation, disjoint from test.
        TaskSpec("arc_easy", "arc_easy", 0, 0.25, 0.266, ("acc", "acc_norm"), "acc", "test", "validation",
                 "arc_easy"),
        TaskSpec("arc_challenge", "arc_challenge", 0, 0.25, 0.265, ("acc", "acc_norm"), "acc_norm", "test",
                 "validation", "arc_challenge"),
        TaskSpec("hellaswag", "hellaswag", 0, 0.25, 0.257, ("acc", "acc_norm"), "acc_norm", "validation", None,
                 "hellaswag"),
        TaskSpec("piqa", "piqa", 0, 0.5, 0.505, ("acc", "acc_norm"), "acc", "validation", None, "piqa"),
        TaskSpec("winogrande", "winogrande", 0, 0.5, 0.504, ("acc",), "acc", "validation", None, "winogrande"),
    ]
}

DEFAULT_TASKS: tuple[str, ...] = ("mmlu", "boolq")  # the paper's


# --------------------------------------------------------------------------- task selection


def resolve_tasks(tasks: Sequence[str] | Mapping[str, int] | str, *, local: bool = False) -> dict[str, int]:
    """``["mmlu", "boolq"]`` or ``{"mmlu": 5}`` -> ``{name: shots}``, checked without loading anything.

    Unknown names and bad shot counts are a UserError. With ``local=True`` (a
    data dir is set) so is asking for exemplars the local mirror cannot supply:
    it has only the evaluated split of boolq, hellaswag, piqa and winogrande.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    if isinstance(tasks, Mapping):
        requested = {str(k): v for k, v in tasks.items()}
    else:
        requested = {str(t): None for t in tasks}
    if not requested:
        raise UserError("no evaluation tasks given", f"name at least one of {', '.join(TASKS)}")
    unknown = [t for t in requested if t not in TASKS]
    if unknown:
        raise UserError(f"unknown evaluation task(s) {', '.join(map(repr, unknown))}",
                        f"use any of {', '.join(TASKS)}")
    out: dict[str, int] = {}
    for name, shots in requested.items():
        shots = TASKS[name].shots if shots is None else shots
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise UserError(f"{name}: shots must be a non-negative integer, got {shots!r}")
        if local and shots > 0 and TASKS[name].fewshot_split is None:
            raise UserError(
                f"{name} with {shots} shots: the local data mirror has no split to draw exemplars from "
                f"(only {TASKS[name].eval_split}, which is evaluated)",
                f"evaluate {name} 0-shot, or unset the data dir to use the hub's training split",
            )
        out[name] = shots
    return out


# --------------------------------------------------------------------------- lm-eval plumbing


def _overlay(spec: TaskSpec, task: str, root: Path) -> dict:
    """The overlay config that points one of our task templates at the local mirror."""
    splits = [spec.eval_split] + ([spec.fewshot_split] if spec.fewshot_split else [])
    files = {s: str(local_file(root, f"{spec.local_dataset}/{s}.parquet")) for s in splits}
    kwargs: dict = {"data_files": files}
    if spec.name == "mmlu":  # one file holds all subjects; each subject task reads its own rows
        kwargs["filters"] = [["subject", "==", task[len("rp_mmlu_"):]]]
    return {
        "include": str(TASKS_DIR / f"{task}.yaml"),
        "dataset_path": "parquet",
        "dataset_name": None,
        "dataset_kwargs": kwargs,
        "training_split": None,
        "validation_split": spec.eval_split if spec.eval_split == "validation" else None,
        "test_split": spec.eval_split if spec.eval_split == "test" else None,
        "fewshot_split": spec.fewshot_split,
    }


def _local_subtask_sizes(requested: Mapping[str, int], root: Path) -> dict[str, int]:
    """Docs per subtask of the split tasks (MMLU's subjects), counted from the mirror without building tasks."""
    import collections

    import pyarrow.parquet as pq

    sizes: dict[str, int] = {}
    for name in requested:
        spec = TASKS[name]
        if len(spec.lm_eval_tasks) == 1:
            continue
        path = local_file(root, f"{spec.local_dataset}/{spec.eval_split}.parquet")
        counts = collections.Counter(pq.read_table(path, columns=["subject"]).column("subject").to_pylist())
        sizes.update({t: counts.get(t[len(f"rp_{name}_"):], 0) for t in spec.lm_eval_tasks})
    return sizes


def _load_tasks(requested: Mapping[str, int], root: Path | None, only: set[str] | None = None):
    """The lm-eval TaskManager and Task objects (keyed by our lm-eval task name), shots set.

    The manager indexes only our tasks: lm-eval's ~14k built-in YAMLs take ~15 s to index.
    ``only`` restricts split tasks (MMLU's 57 subjects) to the subtasks listed: building all
    57 costs ~6 s per call, which dominates a small-``limit`` evaluation.
    """
    from lm_eval.tasks import TaskManager

    names = [t for name in requested for t in TASKS[name].lm_eval_tasks
             if only is None or len(TASKS[name].lm_eval_tasks) == 1 or t in only]
    with tempfile.TemporaryDirectory(prefix="ray_prune_tasks_") as tmp:
        if root is None:
            manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        else:
            for name in requested:
                for task in (t for t in TASKS[name].lm_eval_tasks if t in names):
                    text = yaml.safe_dump(_overlay(TASKS[name], task, root), sort_keys=False)
                    (Path(tmp) / f"{task}.yaml").write_text(text)
            manager = TaskManager(include_path=tmp, include_defaults=False)
        loaded = manager.load(names)["tasks"]  # reads the YAMLs and the data now
    missing = [n for n in names if n not in loaded]
    if missing:
        raise RuntimeError(f"lm-eval did not build tasks {missing} from {TASKS_DIR}")
    owner = {t: name for name in requested for t in TASKS[name].lm_eval_tasks}
    for task_name, task in loaded.items():
        task.set_config(key="num_fewshot", value=requested[owner[task_name]])
    return manager, loaded


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


def _lm(model, tokenizer, batch_size: int, progress: bool):
    """lm-eval's HF wrapper around the in-memory model (PEFT-wrapped and 4-bit models included)."""
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

    return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


# --------------------------------------------------------------------------- public API


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[str] | Mapping[str, int] = DEFAULT_TASKS,
    limit: int | None = None,
    data_dir=None,
    batch_size: int = 8,
    seed: int = 1234,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on an in-memory model.

    ``tasks``: names (default shots from :data:`TASKS`) or ``{name: shots}``.
    ``limit``: at most this many questions per task, a seeded sample of the
    whole split (see the module docstring). Returns ``{task: {"acc": ..,
    "acc_stderr": .., ["acc_norm": .., "acc_norm_stderr": ..,] "n": ..,
    "shots": ..}}``. Bad task names, shots or limits fail before any model work.
    """
    requested = resolve_tasks(tasks)
    root = resolve_data_dir(data_dir)
    if root is not None:
        resolve_tasks(requested, local=True)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer or None, got {limit!r}")

    import lm_eval

    with _quiet_lm_eval():
        sizes = _local_subtask_sizes(requested, root) if root is not None and limit is not None else {}
        only = None
        if sizes:  # pick MMLU's questions first, then build only the subjects they come from
            split = {n: s for n, s in requested.items() if len(TASKS[n].lm_eval_tasks) > 1}
            only = {t for t in _choose_docs(sizes, split, limit, seed)}
        manager, loaded = _load_tasks(requested, root, only)
        sizes.update({t: len(task.eval_docs) for t, task in loaded.items() if t not in sizes})
        chosen = _choose_docs(sizes, requested, limit, seed)
        run = [loaded[t] for t in chosen]
        samples = {t: idx for t, idx in chosen.items() if idx is not None}
        if samples:  # lm-eval runs every doc of a task missing from `samples`
            samples.update({t: range(len(loaded[t].eval_docs)) for t in chosen if chosen[t] is None})
        was_training = model.training
        model.eval()
        try:
            out = lm_eval.simple_evaluate(
                model=_lm(model, tokenizer, batch_size, progress),
                tasks=run,
                task_manager=manager,  # else lm-eval builds one that indexes all its built-in tasks
                samples=samples or None,
                log_samples=True,
                bootstrap_iters=0,  # only means are reported; their stderr is computed below
                # Only exemplar sampling draws random numbers here; leave the caller's global RNGs alone.
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
                fewshot_random_seed=seed,
            )
        finally:
            model.train(was_training)

    results: dict[str, dict[str, float]] = {}
    for name, shots in requested.items():
        spec = TASKS[name]
        docs = [d for t in spec.lm_eval_tasks if t in chosen for d in out["samples"][t]]
        row: dict[str, float] = {}
        for metric in spec.metrics:
            row[metric], row[f"{metric}_stderr"] = _mean_stderr([float(d[metric]) for d in docs])
        row["n"] = len(docs)
        row["shots"] = shots
        results[name] = row
    return results


def _validation_texts(tokenizer, num_sequences: int, seq_len: int, data_dir) -> list[str]:
    """Held-out C4 documents (the ``validation`` role), enough to fill the blocks if the source can."""
    if resolve_data_dir(data_dir) is not None:  # the mirror is small: take its whole validation share
        return load_texts("validation", None, "c4", data_dir)
    n = max(8, math.ceil(num_sequences * seq_len / 300))  # C4 documents average ~500 tokens
    while True:  # the hub streams; ask for more documents until they fill the blocks
        texts = load_texts("validation", n, "c4", data_dir)
        if sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts) >= num_sequences * seq_len:
            return texts
        n *= 2


@torch.no_grad()
def c4_loss(
    model,
    tokenizer,
    texts: list[str] | None = None,
    num_sequences: int = 64,
    seq_len: int = 1024,
    batch_size: int = 8,
    data_dir=None,
) -> dict:
    """Mean next-token cross-entropy (nats) on a fixed held-out C4 set, and that over ln(vocab).

    The texts default to the C4 documents of the ``validation`` role
    (:func:`ray_prune.data.load_texts`), disjoint from calibration and healing
    by construction. They are packed (tokenize, EOS after each document,
    concatenate, cut into ``seq_len`` blocks, keep the first ``num_sequences``),
    so the set is the same for every model that shares a tokenizer. If the
    source holds fewer tokens than asked for, all full blocks are used and
    ``sequences`` says how many (the local mirror's C4 sample holds 45 blocks of
    1024 SmolLM2 tokens); a warning is logged.

    ``loss_norm`` divides by ln(``model.config.vocab_size``), the size of the
    softmax the model predicts over, as the paper divides by the log of the
    vocabulary size: a uniform guess over the model's outputs scores exactly 1.
    Every position of a block but the first is predicted (BOS is never a target).
    """
    if num_sequences < 1 or seq_len < 2:
        raise UserError(f"c4_loss needs num_sequences >= 1 and seq_len >= 2, got {num_sequences}, {seq_len}")
    if texts is None:
        texts = _validation_texts(tokenizer, num_sequences, seq_len, data_dir)
    blocks = pack_texts(texts, tokenizer, seq_len, max_blocks=num_sequences)
    if len(blocks) < num_sequences:
        log.warning("C4 loss on %d blocks of %d tokens: the texts hold no more (%d were asked for)",
                    len(blocks), seq_len, num_sequences)
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    # Logits are [batch, seq_len, vocab]: keep a batch's logits under ~2^28 elements (Gemma's 262k vocab).
    step = max(1, min(batch_size, (1 << 28) // (seq_len * vocab)))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(blocks), step):
            ids = blocks[start:start + step].to(device)
            logits = model(input_ids=ids, use_cache=False).logits  # no KV cache to build and drop
            for row in range(ids.shape[0]):  # fp32 cross-entropy, one row at a time
                total += torch.nn.functional.cross_entropy(
                    logits[row, :-1].float(), ids[row, 1:], reduction="sum").item()
            count += ids.shape[0] * (seq_len - 1)
            del logits
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "loss_norm": loss / math.log(vocab), "tokens": count,
            "sequences": len(blocks), "seq_len": seq_len, "vocab_size": vocab}


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str] | Mapping[str, int] = DEFAULT_TASKS,
    limit: int | None = None,
    data_dir=None,
    c4_sequences: int = 64,
    seq_len: int = 1024,
    batch_size: int = 8,
    seed: int = 1234,
    progress: bool = True,
) -> dict[str, float]:
    """Tasks and C4 loss in one flat dict: ``{"mmlu/acc": .., "boolq/acc": .., "c4/loss_norm": ..}``.

    ``tasks`` empty skips lm-eval; ``c4_sequences=0`` skips the C4 loss.
    """
    flat: dict[str, float] = {}
    if tasks:
        for name, row in evaluate_tasks(model, tokenizer, tasks, limit=limit, data_dir=data_dir,
                                        batch_size=batch_size, seed=seed, progress=progress).items():
            flat.update({f"{name}/{k}": v for k, v in row.items()})
    if c4_sequences:
        c4 = c4_loss(model, tokenizer, num_sequences=c4_sequences, seq_len=seq_len,
                     batch_size=batch_size, data_dir=data_dir)
        flat.update({f"c4/{k}": v for k, v in c4.items()})
    return flat
