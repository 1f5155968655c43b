"""Everything about a sweep that can be known and checked before Ray starts or a model loads.

``plan`` validates storage, data, tasks, layer counts and LoRA targets, expands
the grid and reads the ledger, and returns a typed :class:`Plan`. Every check
raises a ``UserError`` naming the problem and the fix, and writes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ray_prune.errors import UserError
from ray_prune.ledger.done import DONE, done_ids
from ray_prune.ledger.rows import read_experiment_record
from ray_prune.ledger.storage import Storage
from ray_prune.sweep.experiment import Experiment
from ray_prune.sweep.grid import Cell, expand, model_num_layers

DEFAULT_STORAGE_ROOT = "results"  # an experiment without storage writes to results/<name>


@dataclass
class Plan:
    """A validated experiment, expanded, with what its storage already holds."""

    experiment: Experiment
    storage: Storage
    data_dir: str | None
    layers: dict[str, int]  # model -> L
    cells: list[Cell]
    pending: list[Cell]  # cells without a finished or stopped healed row
    ledger: dict[tuple[str, str], str]  # (cell_id, stage) -> status of the rows already there
    memory: list = field(default_factory=list)  # core.memory.ModelPlan per model, when the GPU size is known
    storage_note: str = ""  # why storage was not checked (--check on a machine that cannot reach it)

    def models_with_work(self) -> list:
        return [m for m in self.experiment.models if any(c.model == m.name for c in self.pending)]


def plan(exp: Experiment, storage_uri: str | None = None, rerun: bool = False, check: bool = False,
         gpu_memory_gb: float | None = None) -> Plan:
    """Check everything that can be checked up front; expand the grid; read the ledger; plan GPU memory.

    ``check`` (``--check``): a remote storage root that cannot be reached is noted instead of refused,
    so the plan prints on a laptop with no access to the cluster's bucket. ``gpu_memory_gb`` overrides
    ``resources.gpu_memory_gb``; with neither, no memory plan is made (a CPU sweep needs none).
    """
    from ray_prune.core.data import data_dir

    uri = storage_uri or exp.storage or os.path.join(DEFAULT_STORAGE_ROOT, exp.name)
    storage, ledger, note = _open_storage(exp, uri, rerun, check)
    root = data_dir(exp.data_dir)
    check_tasks(exp, local=root is not None)
    if root is not None:
        check_local_data(exp, root)
    layers = {m.name: model_num_layers(m) for m in exp.models}
    check_lora_targets(exp)
    cells = expand(exp, layers)
    pending = [c for c in cells if ledger.get((c.cell_id, "healed")) not in DONE]
    memory = plan_memory(exp, gpu_memory_gb or exp.resources.gpu_memory_gb)
    return Plan(exp, storage, str(root) if root else None, layers, cells, pending, ledger, memory, note)


def _open_storage(exp: Experiment, uri: str, rerun: bool, check: bool):
    """The storage, what it already holds, and a note if it could not be reached (``--check`` only)."""
    try:
        storage = Storage(uri)
        storage.check_writable()
    except UserError as e:
        if not (check and "://" in uri and not uri.startswith("file://")):
            raise
        return None, {}, f"storage not checked: {e.problem}"
    record = read_experiment_record(storage)
    if record is not None and record.get("name") != exp.name:
        raise UserError(f"storage {uri} holds results of experiment {record.get('name')!r}, not {exp.name!r}",
                        "use a separate --storage per experiment, or keep the experiment's name")
    return storage, ({} if rerun else done_ids(storage)), ""


def plan_memory(exp: Experiment, gpu_memory_gb: float | None) -> list:
    """Each model's memory plan on GPUs of ``gpu_memory_gb``; refuses, naming the model and the fix, when a
    stage fits nowhere."""
    if gpu_memory_gb is None:
        return []
    from ray_prune.sweep.memory_plan import plan_models

    plans = plan_models(exp, gpu_memory_gb, exp.resources.gpus_per_node)
    for p in plans:
        for c in p.choices:
            if not c.fits:
                raise UserError(f"{p.model}: the {c.stage} stage fits no {gpu_memory_gb:g} GB GPU, nor "
                                f"{exp.resources.gpus_per_node} of them (estimated {c.estimate.peak_gib:.1f} GiB "
                                f"per GPU)", c.fix or "use GPUs with more memory")
    return plans


def check_tasks(exp: Experiment, local: bool) -> None:
    """Shots every task can be run with (few-shot BoolQ needs a train split the local mirror lacks)."""
    from ray_prune.core.evaluation.tasks import resolve_tasks

    if exp.eval.tasks:
        defaults = resolve_tasks(list(exp.eval.tasks))
        resolve_tasks({k: v.shots if v.shots is not None else defaults[k] for k, v in exp.eval.tasks.items()},
                      local=local)


def check_local_data(exp: Experiment, root) -> None:
    """Every mirror file the sweep will read exists, is readable UTF-8 text, and holds enough documents."""
    from ray_prune.core.data import check_texts, local_file
    from ray_prune.core.evaluation.tasks import TASKS

    # Healing, the heal validation loss and the C4 loss read the C4 sample's heal and validation documents.
    c4_needs = {"heal": 1, "validation": 1}
    if exp.calibration.dataset == "c4":
        c4_needs["calibration"] = exp.calibration.samples
    else:
        check_texts({"calibration": exp.calibration.samples}, exp.calibration.dataset, root)
    check_texts(c4_needs, "c4", root)
    for name in exp.eval.tasks:
        spec = TASKS[name]
        for split in filter(None, (spec.eval_split, spec.fewshot_split)):
            local_file(root, f"{spec.local_dataset}/{split}.parquet")


def check_lora_targets(exp: Experiment) -> None:
    """Explicit LoRA target names must exist: checked on a weightless (meta-device) copy of each model."""
    explicit = [(m, h["target"]) for m in exp.models for h in exp.heal_points(m) if isinstance(h["target"], list)]
    if not explicit:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ray_prune.core.heal.lora import resolve_targets
    from ray_prune.core.models import resolve

    for spec, target in explicit:
        config = AutoConfig.from_pretrained(resolve(spec.name), trust_remote_code=spec.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
        try:
            resolve_targets(skeleton, target)
        except UserError as e:
            raise UserError(f"heal.target for {spec.name}: {e.problem}", e.fix) from None
