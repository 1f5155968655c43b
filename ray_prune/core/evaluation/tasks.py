"""The evaluation tasks, read from their lm-eval YAMLs: names, shots, metrics and chance levels in one place.

Each task YAML in ``lm_eval_tasks/`` is an lm-eval task config. Shots
(``num_fewshot``), the kind of request (``output_type``), metrics
(``metric_list``, per filter of ``filter_list``) and the evaluated split come from
the lm-eval keys themselves; what lm-eval has no key for (the reported name,
chance and majority-answer accuracy, the main metric, the local mirror's
layout) sits under ``metadata.ray_prune``. Tasks that share a reported name
form one task: MMLU's 57 subject tasks report one MMLU score. Nothing here
imports torch or lm-eval, so the experiment schema and the report use it freely.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ray_prune.errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
DEFAULT_TASKS: tuple[str, ...] = ("mmlu", "boolq")  # the paper's


NO_FILTER = "none"  # lm-eval's name for the scores of a task without a filter_list


@dataclass(frozen=True)
class MetricSpec:
    """One reported score of a task: an lm-eval metric, computed on one filter's output.

    lm-eval scores a generative task once per filter of its ``filter_list`` and
    reports ``exact_match,strict-match`` and ``exact_match,flexible-extract``;
    a task without filters reports ``acc,none``. Our name for the score (the
    result column's suffix) is the metric alone where there is no filter, else
    the metric and the filter name's first word (``exact_match_strict``), so a
    column says which extraction it scored without repeating lm-eval's syntax.
    """

    name: str  # reported: the column suffix (``acc``, ``exact_match_strict``)
    metric: str  # lm-eval's metric (``exact_match``)
    filter: str  # lm-eval's filter whose output it scores (``none`` for a task without a filter_list)

    @property
    def lm_eval_key(self) -> str:
        """The key lm-eval reports the score under: ``exact_match,strict-match``."""
        return f"{self.metric},{self.filter}"


def _metric_specs(cfg: dict[str, Any]) -> tuple[MetricSpec, ...]:
    """Every (metric, filter) pair lm-eval reports for a task config, in the YAML's order, with our names."""
    filters = [f["name"] for f in cfg.get("filter_list") or []] or [NO_FILTER]
    out = []
    for f in filters:
        short = "" if f == NO_FILTER else "_" + re.sub(r"\W", "_", f.split("-")[0])
        out += [MetricSpec(name=m["metric"] + short, metric=m["metric"], filter=f) for m in cfg["metric_list"]]
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"task {cfg.get('task')}: two of its scores would be reported under one name: {names}")
    return tuple(out)


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task, as reported and as run."""

    name: str  # reported name (column prefix in the results)
    label: str  # display name
    builtin: str  # lm-eval's built-in task whose prompt and metrics we reproduce
    shots: int  # default number of in-context examples
    random_acc: float  # expected accuracy of uniform guessing
    majority_acc: float  # accuracy of always answering the most frequent gold answer (our eval split)
    metric_specs: tuple[MetricSpec, ...]  # what lm-eval reports, per metric and filter, and our name for each
    main_metric: str
    eval_split: str  # split evaluated, in the hub and in the mirror
    fewshot_split: str | None  # mirror split the exemplars come from (None: the mirror has none)
    local_dataset: str  # folder of the mirror
    lm_eval_tasks: tuple[str, ...]  # our lm-eval task names that make up this task
    output_type: str  # lm-eval's request kind: multiple_choice (log-likelihoods) or generate_until (generation)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The reported scores' names (each with its stderr): ``<task>_<metric>`` are the result columns."""
        return tuple(m.name for m in self.metric_specs)

    @property
    def generates(self) -> bool:
        """Whether lm-eval generates text for this task (``generate_until``) rather than scoring choices."""
        return self.output_type == "generate_until"

    @property
    def is_split(self) -> bool:
        """Whether the task runs as several lm-eval tasks (MMLU's subjects)."""
        return len(self.lm_eval_tasks) > 1


class _Loader(yaml.SafeLoader):
    """lm-eval's YAML dialect, read as plain data: ``!function`` names become strings."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _read(path: Path) -> dict[str, Any]:
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    if "include" in cfg:
        base = _read(path.parent / cfg.pop("include"))
        cfg = {**base, **cfg}
    return cfg


def _registry() -> dict[str, TaskSpec]:
    configs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(TASKS_DIR.glob("rp_*.yaml")):
        cfg = _read(path)
        if "task" not in cfg or "ray_prune" not in (cfg.get("metadata") or {}):
            continue  # a group file (rp_mmlu.yaml), for running the tasks with lm-eval directly
        configs.setdefault(cfg["metadata"]["ray_prune"]["name"], []).append(cfg)
    specs = {}
    for name, cfgs in configs.items():
        cfg, rp = cfgs[0], cfgs[0]["metadata"]["ray_prune"]
        metric_specs = _metric_specs(cfg)
        if rp["main_metric"] not in [m.name for m in metric_specs]:
            raise ValueError(f"task {name}: main_metric {rp['main_metric']!r} is none of its scores "
                             f"{[m.name for m in metric_specs]}")
        specs[name] = TaskSpec(
            name=name, label=rp["label"], builtin=rp["builtin"], shots=int(cfg.get("num_fewshot", 0)),
            random_acc=float(rp["random_acc"]), majority_acc=float(rp["majority_acc"]),
            metric_specs=metric_specs, main_metric=rp["main_metric"],
            eval_split=cfg.get("test_split") or cfg["validation_split"],
            fewshot_split=rp["mirror"]["fewshot_split"], local_dataset=rp["mirror"]["dataset"],
            lm_eval_tasks=tuple(sorted(c["task"] for c in cfgs)), output_type=cfg["output_type"])
    order = [t for t in DEFAULT_TASKS if t in specs] + sorted(set(specs) - set(DEFAULT_TASKS))
    return {name: specs[name] for name in order}


TASKS: dict[str, TaskSpec] = _registry()
MMLU_SUBJECTS: tuple[str, ...] = tuple(t[len("rp_mmlu_"):] for t in TASKS["mmlu"].lm_eval_tasks)


def unknown_task_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(TASKS), 1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown task {name!r}{hint}; known: {', '.join(TASKS)}"


def resolve_tasks(tasks: Sequence[str] | Mapping[str, int | None] | str, *, local: bool = False) -> dict[str, int]:
    """``["mmlu", "boolq"]`` or ``{"mmlu": 5}`` -> ``{name: shots}``, checked without loading anything.

    Unknown names and bad shot counts are a UserError. With ``local=True`` (a
    data dir is set) so is asking for exemplars the local mirror cannot supply:
    it has only the evaluated split of boolq, hellaswag, piqa and winogrande.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    requested = {str(k): v for k, v in tasks.items()} if isinstance(tasks, Mapping) else {str(t): None for t in tasks}
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
