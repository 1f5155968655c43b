"""Everything about a sweep that can be known and checked before Ray starts or a model loads.

``plan`` validates storage, data, tasks, models and LoRA targets, expands the grid and reads the ledger, and
returns a typed :class:`Plan`. Every check raises a ``UserError`` naming the problem and the fix, and writes
nothing. What the driver learns here it carries forward: each model's config is read once, into a
:class:`ModelRecord` (the layer count, the architecture the memory plan and the trial order use, where the
config came from), and the memory plan is made once, when the GPU size is known (:func:`plan_memory`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ray_prune.errors import UserError
from ray_prune.ledger.done import DONE, done_ids
from ray_prune.ledger.rows import read_experiment_record, read_rows
from ray_prune.ledger.storage import Storage
from ray_prune.sweep.experiment import Experiment, ModelSpec
from ray_prune.sweep.grid import Cell, calibration_id, expand, merged_fractions, stage1_need

DEFAULT_STORAGE_ROOT = "results"  # an experiment without storage writes to results/<name>


@dataclass(frozen=True)
class ModelRecord:
    """What the driver knows of one model from its config alone, read once (``core.model_configs``)."""

    spec: ModelSpec
    config: Any  # transformers.PretrainedConfig
    num_layers: int
    source: str  # bundled, local, hub or shipped (model_configs.LoadedConfig.source)
    identity: dict  # what its weights are (core.fingerprint.model_identity): part of every stored file's name
    note: str = ""  # why a fallback config was used, if one was

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def arch(self):
        """The memory model's view of the config (``core.memory.Arch``)."""
        from ray_prune.core.memory import Arch

        return Arch.from_config(self.config)


def read_model(spec: ModelSpec) -> ModelRecord:
    """The model's config (shipped configs where the hub is out of reach), its family checked, its layers counted.
    A local directory must hold a config and safetensors, never only pickles."""
    from ray_prune.core.architecture import family_of
    from ray_prune.core.fingerprint import check_weights, model_identity
    from ray_prune.core.model_configs import load_config

    loaded = load_config(spec.name, spec.trust_remote_code)
    family_of(loaded.config)
    if loaded.source == "local":
        check_weights(loaded.location)  # a truncated safetensors file fails here, from its header alone
    elif loaded.source == "bundled":
        from ray_prune.core.bundled import converted_dir

        if converted_dir(spec.name).is_dir():
            check_weights(converted_dir(spec.name), f"delete {converted_dir(spec.name)}: it is converted again")
    return ModelRecord(spec, loaded.config, int(loaded.config.num_hidden_layers), loaded.source,
                       model_identity(spec.name), loaded.note)


def need_key(need: tuple[str, dict[str, Any]]) -> tuple[str, str]:
    """(kind, calibration id) of a stage-1 need (``grid.stage1_need``)."""
    return need[0], calibration_id(need[1])


def stage1_key(exp: Experiment, record: ModelRecord, root, kind: str, calibration: dict[str, Any]) -> str:
    """The key a stage-1 result is stored under: a distance table's (:func:`table_key`), or a greedy order's,
    which is the key of the calibration text and model it was computed on with its own name in front."""
    from ray_prune.ledger.layout import stable_hash

    key = table_key(exp, record, root, calibration)
    return key if kind == "table" else stable_hash({"greedy_order": key})


def table_key(exp: Experiment, record: ModelRecord, root, calibration: dict[str, Any]) -> str:
    """The key a model's distance table is stored under: a hash of everything that makes the table (the weights,
    the calibration settings, the calibration text and the roles that pick it, the dtype), so that changing any
    of them makes a new table instead of reusing a stale one."""
    from ray_prune.core.calibration import CalibrationConfig
    from ray_prune.core.data import roles_identity
    from ray_prune.ledger.layout import stable_hash

    cal = CalibrationConfig.from_dict(calibration)
    return stable_hash({"model": record.identity, "calibration": CalibrationConfig.identity_of(cal.to_dict()),
                        "text": exp.text_source(cal.dataset).identity(root), "roles": roles_identity(),
                        "dtype": exp.dtype})


@dataclass
class Plan:
    """A validated experiment, expanded, with what its storage already holds."""

    experiment: Experiment
    storage: Storage
    data_dir: str | None
    models: dict[str, ModelRecord]  # name -> what its config says, read once
    cells: list[Cell]
    pending: list[Cell]  # cells without a finished or stopped healed row
    ledger: dict[tuple[str, str], str]  # (cell_id, stage) -> status of the rows already there
    # (model, kind, calibration id) -> the key of what stage 1 stores for it (table_key): a table or an order
    stage1_keys: dict[tuple[str, str, str], str] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)  # fractions that share another's cell (grid.merged_fractions)
    code_version: str = ""  # this checkout's commit (core.provenance.code_version), which every row records
    memory: list = field(default_factory=list)  # core.memory.ModelPlan per model, once the GPU size is known
    storage_note: str = ""  # why storage was not checked (--check on a machine that cannot reach it)

    @property
    def layers(self) -> dict[str, int]:
        return {name: m.num_layers for name, m in self.models.items()}

    def summary(self) -> list[str]:
        """What will run, before anything loads: cells per model (to run of all), and the fractions that share a
        cell."""
        lines = []
        for name, m in self.models.items():
            mine = [c for c in self.cells if c.model == name]
            todo = sum(1 for c in self.pending if c.model == name)
            lines.append(f"  {name} (L={m.num_layers}): {len(mine)} cells, {todo} to run")
        return lines + [f"  note: {line}" for line in self.merged]

    def adjustments(self, model: str) -> dict:
        """What the memory plan changed so that ``model``'s stages fit its GPUs (``ModelPlan.adjustments``)."""
        return next((dict(mp.adjustments) for mp in self.memory if mp.model == model), {})

    def models_with_work(self) -> list[ModelSpec]:
        return [m for m in self.experiment.models if any(c.model == m.name for c in self.pending)]


def plan(exp: Experiment, storage_uri: str | None = None, rerun: bool = False, check: bool = False,
         gpu_memory_gb: float | None = None) -> Plan:
    """Check everything that can be checked up front; expand the grid; read the ledger; plan GPU memory.

    ``check`` (``--check``): a remote storage root that cannot be reached is noted instead of refused,
    so the plan prints on a laptop with no access to the cluster's bucket. ``gpu_memory_gb`` overrides
    ``resources.gpu_memory_gb``; with neither, no memory plan is made yet (a CPU sweep needs none; a GPU
    sweep makes it once it has read the size off a GPU, ``run``).
    """
    from ray_prune.core.data import data_dir

    uri = storage_uri or exp.storage or os.path.join(DEFAULT_STORAGE_ROOT, exp.name)
    check_job_storage(uri)
    storage, ledger, note = _open_storage(exp, uri, rerun, check)
    root = data_dir(exp.data_dir)
    exp.eval.config().validate(local=root is not None)
    if exp.tracking is not None:
        from ray_prune.sweep.tracking import check as check_tracking

        check_tracking(exp.tracking)  # a tracker that cannot be reached is refused before stage 1, not after
    if root is not None:
        check_local_data(exp, root)
    models = {m.name: read_model(m) for m in exp.models}
    check_lora_targets(exp, models)
    cells = expand(exp, {name: m.num_layers for name, m in models.items()})
    pending = [c for c in cells if ledger.get((c.cell_id, "healed")) not in DONE]
    needs = {(c.model, *need_key(need)): need[1] for c in cells if (need := stage1_need(c)) is not None}
    keys = {k: stage1_key(exp, models[k[0]], root, k[1], cal) for k, cal in needs.items()}
    layers = {name: m.num_layers for name, m in models.items()}
    from ray_prune.core.provenance import code_version

    p = Plan(exp, storage, str(root) if root else None, models, cells, pending, ledger, keys,
             merged_fractions(exp, layers), code_version(), storage_note=note)
    plan_memory(p, gpu_memory_gb or exp.resources.gpu_memory_gb)
    return p


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in the environment of a job's driver


def running_as_ray_job() -> bool:
    """Whether this process is the driver of a ``ray job submit`` job (whose working directory is Ray's temporary
    copy of the one the job was submitted from)."""
    return bool(os.environ.get(JOB_CONFIG_ENV))


def check_job_storage(uri: str) -> None:
    """Under ``ray job submit``, a relative local storage path resolves inside Ray's temporary copy of the job's
    working directory, which goes with the Ray session: the results would vanish and a resubmission would start
    over. Refused before anything runs."""
    local = "://" not in uri or uri.startswith("file://")
    path = uri.removeprefix("file://")
    if running_as_ray_job() and local and not os.path.isabs(os.path.expanduser(path)):
        raise UserError(f"storage {uri!r} is a relative path, and this sweep runs as a Ray job: it would be written "
                        "inside Ray's temporary copy of the job's working directory and vanish with the session",
                        "pass --storage with an absolute path on storage every node sees (e.g. /mnt/shared/run), "
                        "or an object store (s3://bucket/prefix, gs://bucket/prefix)")


def _open_storage(exp: Experiment, uri: str, rerun: bool, check: bool):
    """The storage, what it already holds, and a note (a remote root not reached at ``--check``, a record that did
    not read and is written anew)."""
    try:
        storage = Storage(uri)
        storage.check_writable()
    except UserError as e:
        if not (check and "://" in uri and not uri.startswith("file://")):
            raise
        return None, {}, f"storage not checked: {e.problem}"
    note = ""
    try:
        record = read_experiment_record(storage)
    except UserError as e:
        record, unreadable = None, e
        others = {row["experiment"] for t in read_rows(storage)[0] for row in t.select(["experiment"]).to_pylist()}
        if others - {exp.name}:
            raise UserError(f"{unreadable.problem}; its rows are of experiment(s) {sorted(others)}",
                            "use a separate --storage per experiment") from None
        note = f"{unreadable.problem}; this sweep writes it anew"
    if record is not None and record.get("name") != exp.name:
        raise UserError(f"storage {uri} holds results of experiment {record.get('name')!r}, not {exp.name!r}",
                        "use a separate --storage per experiment, or keep the experiment's name")
    return storage, ({} if rerun else done_ids(storage)), note


def plan_memory(p: Plan, gpu_memory_gb: float | None) -> list:
    """Each model's memory plan on GPUs of ``gpu_memory_gb``, kept in ``p.memory``; refuses, naming the model and
    the fix, when a stage fits nowhere. Without a size, nothing is planned."""
    if gpu_memory_gb is None:
        return p.memory
    from ray_prune.sweep.memory_plan import plan_models

    exp = p.experiment
    p.memory = plan_models(exp, p.models, gpu_memory_gb, exp.resources.gpus_per_node)
    for mp in p.memory:
        for c in mp.choices:
            if not c.fits:
                raise UserError(f"{mp.model}: the {c.stage} stage fits no {gpu_memory_gb:g} GB GPU, nor "
                                f"{exp.resources.gpus_per_node} of them (estimated {c.estimate.peak_gib:.1f} GiB "
                                f"per GPU)", c.fix or "use GPUs with more memory")
    return p.memory


def check_local_data(exp: Experiment, root) -> None:
    """Every mirror file the sweep will read exists, is readable UTF-8 text, and holds enough documents."""
    from ray_prune.core.data import check_texts, local_file
    from ray_prune.core.evaluation.tasks import TASKS

    # Healing, the heal validation loss and the C4 loss read the C4 sample's heal, selection and test documents.
    c4_needs = {"heal": 1, "selection": 1, "test": 1}
    for cal in exp.calibrations():
        if cal.dataset == "c4":
            c4_needs["calibration"] = max(c4_needs.get("calibration", 0), cal.samples)
        else:
            check_texts({"calibration": cal.samples}, cal.dataset, root)
    check_texts(c4_needs, "c4", root)
    for name in exp.eval.tasks:
        spec = TASKS[name]
        for split in filter(None, (spec.eval_split, spec.fewshot_split)):
            local_file(root, f"{spec.local_dataset}/{split}.parquet")


def check_lora_targets(exp: Experiment, models: dict[str, ModelRecord]) -> None:
    """Explicit LoRA target names must exist: checked on a weightless (meta-device) copy of each model."""
    explicit = [(m, h["target"]) for m in exp.models for h in exp.heal_points(m) if isinstance(h["target"], list)]
    if not explicit:
        return
    import torch
    from transformers import AutoModelForCausalLM

    from ray_prune.core.heal.lora import resolve_targets

    for spec, target in explicit:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(models[spec.name].config,
                                                        trust_remote_code=spec.trust_remote_code)
        try:
            resolve_targets(skeleton, target)
        except UserError as e:
            raise UserError(f"heal.target for {spec.name}: {e.problem}", e.fix) from None
