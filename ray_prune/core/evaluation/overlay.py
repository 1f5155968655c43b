r"""Point our task YAMLs at a local Parquet mirror instead of the hub, without copying a prompt.

For each task, a small overlay YAML written to a temporary folder
``include``\ s the template by absolute path and replaces only where the data
comes from: ``dataset_path: parquet`` with ``data_files`` at
``<data dir>/<dataset>/<split>.parquet`` (plus a row filter per MMLU subject),
and the split names the mirror has. lm-eval then builds the tasks as usual.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import yaml

from ray_prune.core.data import local_file
from ray_prune.core.evaluation.tasks import TASKS, TASKS_DIR, TaskSpec


def overlay(spec: TaskSpec, task: str, root: Path) -> dict:
    """The overlay config that points one of our task templates at the local mirror."""
    splits = [spec.eval_split] + ([spec.fewshot_split] if spec.fewshot_split else [])
    files = {s: str(local_file(root, f"{spec.local_dataset}/{s}.parquet")) for s in splits}
    kwargs: dict = {"data_files": files}
    if spec.is_split:  # one file holds all subjects (MMLU); each subject task reads its own rows
        kwargs["filters"] = [["subject", "==", task[len(f"rp_{spec.name}_"):]]]
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


def local_subtask_sizes(requested: Mapping[str, int], root: Path) -> dict[str, int]:
    """Docs per subtask of the split tasks (MMLU's subjects), counted from the mirror without building tasks."""
    import collections

    import pyarrow.parquet as pq

    sizes: dict[str, int] = {}
    for name in requested:
        spec = TASKS[name]
        if not spec.is_split:
            continue
        path = local_file(root, f"{spec.local_dataset}/{spec.eval_split}.parquet")
        counts = collections.Counter(pq.read_table(path, columns=["subject"]).column("subject").to_pylist())
        sizes.update({t: counts.get(t[len(f"rp_{name}_"):], 0) for t in spec.lm_eval_tasks})
    return sizes


def load_tasks(requested: Mapping[str, int], root: Path | None, only: set[str] | None = None):
    """The lm-eval TaskManager and Task objects (keyed by our lm-eval task name), shots set.

    The manager indexes only our tasks: lm-eval's ~14k built-in YAMLs take ~15 s to index.
    ``only`` restricts split tasks (MMLU's 57 subjects) to the subtasks listed: building all
    57 costs ~6 s per call, which dominates a small-``limit`` evaluation.
    """
    from lm_eval.tasks import TaskManager

    names = [t for name in requested for t in TASKS[name].lm_eval_tasks
             if only is None or not TASKS[name].is_split or t in only]
    with tempfile.TemporaryDirectory(prefix="ray_prune_tasks_") as tmp:
        if root is None:
            manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        else:
            for name in requested:
                for task in (t for t in TASKS[name].lm_eval_tasks if t in names):
                    text = yaml.safe_dump(overlay(TASKS[name], task, root), sort_keys=False)
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
