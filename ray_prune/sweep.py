"""Run an experiment on Ray: profile each model once, then a Tune grid of cells.

Stage 1 starts one profiling actor per model (one GPU each where there are
GPUs). It computes the distance table and the unpruned baseline, writes both to
storage and exits, freeing its GPU. Stage 2 is a Ray Tune ``Tuner`` over the
cells that are not yet in the results ledger: each trial prunes, evaluates,
heals while reporting to Tune (ASHA may stop it) and evaluates again.

The ledger is the results dataset itself, keyed by cell hash: rerunning the
same command runs only missing or failed cells, and adding fractions or models
to the YAML runs only the new ones. ``Tuner.restore`` is never used: it cannot
add grid points, and object refs in configs die with the driver.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace
from typing import Any

from ray_prune.errors import UserError
from ray_prune.experiment import Experiment, ModelSpec, load_experiment, stable_hash
from ray_prune.grid import Cell, expand, model_num_layers
from ray_prune.results import (done_ids, load_results, read_experiment_record, row_path, save_experiment_record,
                               slug, write_row)
from ray_prune.storage import Storage
from ray_prune.trial import CODE_VERSION, cell_row, curve_columns, failure_row, run_cell, run_evaluation

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- validation (no Ray, no models)


def plan(exp: Experiment, storage_uri: str | None = None, rerun: bool = False) -> dict[str, Any]:
    """Everything that can be checked before Ray starts or a model loads."""
    from ray_prune.data import data_dir
    from ray_prune.evaluate import resolve_tasks

    uri = storage_uri or exp.storage or os.path.join("results", exp.name)
    storage = Storage(uri)
    storage.check_writable()
    record = read_experiment_record(storage)
    if record is not None and record.get("name") != exp.name:
        raise UserError(f"storage {uri} holds results of experiment {record.get('name')!r}, not {exp.name!r}",
                        "use a separate --storage per experiment, or keep the experiment's name")
    root = data_dir(exp.data_dir)
    if exp.eval.tasks:
        defaults = resolve_tasks(list(exp.eval.tasks))
        resolve_tasks({k: v.shots if v.shots is not None else defaults[k] for k, v in exp.eval.tasks.items()},
                      local=root is not None)  # e.g. few-shot BoolQ needs a train split the local mirror lacks
    if root is not None:
        check_local_data(exp, root)
    layers = {m.name: model_num_layers(m) for m in exp.models}
    check_lora_targets(exp)
    cells = expand(exp, layers)
    ledger = {} if rerun else done_ids(storage)
    pending = [c for c in cells if ledger.get((c.cell_id, "healed")) not in ("finished", "stopped")]
    return {"storage": storage, "data_dir": str(root) if root else None, "layers": layers, "cells": cells,
            "pending": pending, "ledger": ledger}


def check_local_data(exp: Experiment, root) -> None:
    """Every mirror file the sweep will read exists, is readable UTF-8 text, and holds enough documents."""
    from ray_prune.data import check_texts, local_file
    from ray_prune.evaluate import TASKS

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

    from ray_prune.heal import resolve_targets
    from ray_prune.models import resolve

    for spec, target in explicit:
        config = AutoConfig.from_pretrained(resolve(spec.name), trust_remote_code=spec.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
        try:
            resolve_targets(skeleton, target)
        except UserError as e:
            raise UserError(f"heal.target for {spec.name}: {e.problem}", e.fix) from None


def baseline_id(exp: Experiment, model: str) -> str:
    return stable_hash({"baseline": model, "eval": exp.eval.model_dump(), "dtype": exp.dtype})


def table_path(model: str) -> str:
    return f"tables/{slug(model)}.parquet"


# ----------------------------------------------------------------------------- stage 1: one actor per model


def profile_model(exp_dict: dict, spec_dict: dict, storage_uri: str, data_dir: str | None, need_table: bool,
                  need_baseline: bool, heal_shapes: list[tuple[int, int]], threads: int) -> dict[str, Any]:
    """Distance table + unpruned baseline of one model (runs inside the profiling actor)."""
    import torch

    from ray_prune.architecture import family_of, num_layers
    from ray_prune.data import load_texts
    from ray_prune.distance import profile
    from ray_prune.heal import pack_texts, validation_loss
    from ray_prune.models import load_model

    torch.set_num_threads(max(1, threads))
    exp = Experiment(**exp_dict)
    spec = ModelSpec(**spec_dict)
    storage = Storage(storage_uri)
    model, tok = load_model(spec.name, dtype=exp.dtype, trust_remote_code=spec.trust_remote_code)
    family, _ = family_of(model)
    cal = exp.calibration
    t0 = time.perf_counter()
    if need_table:
        texts = load_texts("calibration", cal.samples, dataset=cal.dataset, data_dir_path=data_dir)
        table = profile(model, tok, texts, metric=cal.metric, batch_size=cal.batch_size, max_length=cal.max_length,
                        model_id=spec.name, progress=False)
        local = storage.local_path(table_path(spec.name))
        if local is not None:
            table.save(local)
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                storage.write_bytes(table_path(spec.name), table.save(os.path.join(d, "t.parquet")).read_bytes())
    profile_s = time.perf_counter() - t0
    # The unpruned model's loss on each heal validation set: ASHA compares cells by loss relative to it.
    val_texts = load_texts("validation", None, data_dir_path=data_dir)
    heal_reference = {f"{s}x{v}": validation_loss(model, pack_texts(val_texts, tok, s, max_blocks=v)) for s, v in heal_shapes}
    baseline_loss = None
    if need_baseline:
        t = time.perf_counter()
        scores = run_evaluation(model, tok, exp.eval.model_dump(), data_dir)
        from ray_prune.results import flatten_metrics

        flat = flatten_metrics(scores)
        baseline_loss = flat.get("c4_loss")
        cell = Cell(experiment=exp.name, model=spec.name, trust_remote_code=spec.trust_remote_code,
                    num_layers=num_layers(model), fraction=0.0, n=0,
                    strategy="none", seed=0, heal={}, calibration=cal.model_dump(), eval=exp.eval.model_dump(),
                    dtype=exp.dtype, cell_id=baseline_id(exp, spec.name), unhealed_id="")
        wall = time.perf_counter() - t
        write_row(storage, {**cell_row(cell, "baseline", "finished", family=family), **flat, "loss_ratio": 1.0,
                            "wall_s": wall, "profile_s": profile_s, "gpu_s": wall * torch.cuda.device_count(),
                            "device": str(next(model.parameters()).device)})
    return {"heal_reference": heal_reference, "baseline_loss": baseline_loss, "profile_s": profile_s}


# ----------------------------------------------------------------------------- Ray plumbing


def _connect(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level=logging.WARNING)
    else:
        # address="local": always a fresh embedded Ray, even where a `ray start` cluster runs on this machine
        # (attaching to it would reject num_cpus); clusters are reached through RAY_ADDRESS above.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, **kwargs)


def trial_resources(exp: Experiment) -> tuple[float, int]:
    """(GPUs, CPUs) per trial, refusing a GPU request that this cluster can never satisfy."""
    import ray

    total = ray.cluster_resources()
    gpus_total, cpus_total = total.get("GPU", 0.0), int(total.get("CPU", 1))
    want = exp.resources.gpus_per_trial
    # auto: a GPU per trial where GPUs exist or an autoscaler will add them (clusters start at zero workers)
    gpus = (1.0 if gpus_total >= 1 or exp.resources.autoscaling else 0.0) if want == "auto" else float(want)
    if gpus > gpus_total and not exp.resources.autoscaling:
        raise UserError(
            f"each trial asks for {gpus:g} GPU but the Ray cluster has {gpus_total:g}; "
            "the trials would wait forever", "set resources.gpus_per_trial: 0 (or auto), connect to a GPU cluster, "
            "or set resources.autoscaling: true if GPU nodes are added on demand")
    if exp.resources.cpus_per_trial == "auto":
        per = cpus_total if gpus == 0 else max(1, cpus_total // max(1, int(gpus_total or 1)))
        cpus = max(1, min(per, 8 if gpus else cpus_total))
    else:
        cpus = int(exp.resources.cpus_per_trial)
    if cpus > cpus_total and not exp.resources.autoscaling:
        raise UserError(f"each trial asks for {cpus} CPUs but the Ray cluster has {cpus_total}",
                        "lower resources.cpus_per_trial or use auto")
    return gpus, cpus


def _trainable(config: dict[str, Any]) -> None:
    """The Tune function trainable: a thin shell around trial.run_cell."""
    import torch
    from ray import tune

    config = config["run"]
    torch.set_num_threads(max(1, int(config["threads"])))
    cell = Cell.from_dict(config["cell"])
    storage = Storage(config["storage"])
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume = checkpoint.to_directory()
    do_unhealed = config["do_unhealed"] and not storage.exists(row_path(cell.model, cell.unhealed_id, "unhealed"))

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        if ckpt_dir:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))
        else:
            tune.report(metrics)

    run_cell(cell, storage, config["baseline_loss"], config["data_dir"], do_unhealed, report=report,
             resume_from=resume, reference_loss=config["reference_loss"])


def run_sweep(
    experiment: str | Experiment,
    storage: str | None = None,
    rerun: bool = False,
    progress: bool = True,
    num_cpus: int | None = None,
):
    """Run (or resume, or extend) a sweep and return its results as a DataFrame."""
    exp = load_experiment(experiment) if isinstance(experiment, str) else experiment
    p = plan(exp, storage, rerun)
    from ray_prune.lock import SweepLock

    with SweepLock(p["storage"]) as lock:
        if lock.took_over and progress:
            print(f"took over the lock of a sweep that died (pid {lock.took_over.get('pid')} on "
                  f"{lock.took_over.get('host')})")
        # Writers killed mid-write leave hidden temp files; nobody else writes while we hold the lock.
        for folder in ("results", "tables"):
            p["storage"].remove_temp_files(folder)
        return _run_planned(exp, p, rerun, progress, num_cpus)


def _run_planned(exp: Experiment, p: dict[str, Any], rerun: bool, progress: bool, num_cpus: int | None):
    store: Storage = p["storage"]
    save_experiment_record(store, exp.name, {"experiment": exp.model_dump(mode="json"), "layers": p["layers"],
                                             "cells": [{"cell_id": c.cell_id, "model": c.model} for c in p["cells"]],
                                             "code_version": CODE_VERSION})
    pending: list[Cell] = p["pending"]
    say = print if progress else (lambda *a, **k: None)
    say(f"{exp.name}: {len(p['cells'])} cells, {len(p['cells']) - len(pending)} already done, "
        f"{len(pending)} to run -> {store.uri}")
    if not pending:
        return load_results(store.uri)

    _connect(num_cpus)
    gpus, cpus = trial_resources(exp)
    ledger = p["ledger"]
    import ray

    # Stage 1: profile every model that still has work, one actor each, in parallel.
    profiler = ray.remote(profile_model)
    models = [m for m in exp.models if any(c.model == m.name for c in pending)]
    futures = {}
    for m in models:
        shapes = sorted({(h["seq_len"], h["val_sequences"]) for h in exp.heal_points(m)})
        need_table = rerun or not store.exists(table_path(m.name))
        need_base = rerun or ledger.get((baseline_id(exp, m.name), "baseline")) != "finished"
        futures[m.name] = profiler.options(num_gpus=gpus, num_cpus=cpus, max_retries=1).remote(
            exp.model_dump(), m.model_dump(), store.uri, p["data_dir"], need_table, need_base, shapes, cpus)
    say(f"stage 1: profiling {len(models)} model(s) on {'GPU' if gpus else 'CPU'}")
    refs = {}
    for name, fut in futures.items():
        try:
            refs[name] = ray.get(fut)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), UserError) else None
            if cause is not None:
                raise cause from None
            raise
    from ray_prune.distance import DistanceTable
    from ray_prune.select import layers_to_remove

    baselines = {m.name: refs[m.name]["baseline_loss"] for m in models}
    if any(v is None for v in baselines.values()):  # baselines evaluated in an earlier run: read their loss back
        earlier = load_results(store.uri)
        for m in models:
            hit = earlier[(earlier["stage"] == "baseline") & (earlier["cell_id"] == baseline_id(exp, m.name))]
            if baselines[m.name] is None and len(hit) and "c4_loss" in hit:
                baselines[m.name] = float(hit["c4_loss"].iloc[0])
    tables = {}
    for c in pending:
        if c.strategy == "similarity" and c.n > 0 and c.model not in tables:
            tables[c.model] = DistanceTable.load(store.local_path(table_path(c.model)) or _fetch(store, c.model))
    cells = [replace(c, removed_layers=layers_to_remove(c.strategy, c.num_layers, n=c.n, table=tables.get(c.model)))
             for c in pending]

    # Stage 2: the Tune grid.
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from ray_prune.progress import ProgressView

    max_steps = max(c.heal["steps"] for c in cells)
    from ray_prune.scheduler import GroupedASHA

    # max_t one past the last step: ASHA stops any trial that reaches max_t, which would cut off the healed eval.
    scheduler = (GroupedASHA(group_of=lambda cfg: f"{cfg['run']['cell']['unhealed_id']}:{cfg['run']['cell']['seed']}",
                             time_attr="heal_step", metric="loss_ratio", mode="min", max_t=max_steps + 1,
                             grace_period=min(exp.scheduler.grace_period, max_steps),
                             reduction_factor=exp.scheduler.reduction_factor)
                 if exp.scheduler.type == "asha" else FIFOScheduler())
    totals: dict[str, int] = {}
    for c in cells:
        totals[c.model] = totals.get(c.model, 0) + 1
    view = ProgressView(totals, enabled=progress)
    configs = [{
        "cell": c.to_dict(), "storage": store.uri, "data_dir": p["data_dir"], "threads": cpus,
        "baseline_loss": baselines.get(c.model),
        "reference_loss": refs[c.model]["heal_reference"].get(f"{c.heal['seq_len']}x{c.heal['val_sequences']}"),
        "do_unhealed": exp.eval.unhealed and c.owns_unhealed,
    } for c in cells]
    # Tune snapshots its state at every checkpoint; that is wanted here, and its warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 Tune then prints nothing: our view instead
    tune_root = store.local_path("tune")
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": cpus, "gpu": gpus}),
        param_space={"run": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=exp.resources.max_concurrent,
                                    reuse_actors=False),
        run_config=tune.RunConfig(
            name=f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(tune_root) if tune_root is not None else store.path("tune"),
            storage_filesystem=None if tune_root is not None else store.fs,
            failure_config=tune.FailureConfig(max_failures=exp.resources.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[view], verbose=0),
    )
    say(f"stage 2: {len(cells)} trials, {gpus:g} GPU + {cpus} CPU each, scheduler {exp.scheduler.type}")
    grid = tuner.fit()
    record_outcomes(grid, store, view.retries)
    df = load_results(store.uri)
    return df


def _fetch(store: Storage, model: str) -> str:
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="ray-prune-table-"), "t.parquet")
    with open(path, "wb") as f:
        f.write(store.read_bytes(table_path(model)))
    return path


def _row_status(store: Storage, rel: str) -> str | None:
    try:
        return store.read_table(rel).column("status")[0].as_py()
    except (OSError, ValueError, KeyError, IndexError):
        return None  # missing or unreadable: written anew


def record_outcomes(grid, store: Storage, retries: dict[str, int]) -> None:
    """Rows for cells that ended without their healed row: failed for good, or stopped by ASHA."""
    for result in grid:
        cfg = result.config["run"]
        cell = Cell.from_dict(cfg["cell"])
        metrics = result.metrics or {}
        if _row_status(store, row_path(cell.model, cell.cell_id, "healed")) == "finished":
            continue  # the trial wrote its own row; a failed row of an earlier run is replaced below
        if result.error is not None:
            row = failure_row(cell, "failed", result.error, metrics)
        elif not metrics.get("completed"):
            row = failure_row(cell, "stopped", None, metrics)
        else:
            continue
        curve = []
        history = result.metrics_dataframe
        if history is not None and "heal_step" in history:
            for _, h in history.dropna(subset=["heal_step"]).iterrows():
                curve.append((h["heal_step"], h.get("heal_val_loss"), h.get("heal_train_loss")))
        write_row(store, {**row, **curve_columns(curve), "attempts": 1 + retries.get(cell.cell_id, 0)})
