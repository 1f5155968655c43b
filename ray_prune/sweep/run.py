"""Run an experiment on Ray, as named stages: plan, lock, profile each model once, the Tune grid, outcomes.

Stage 1 (``profile_stage``) starts one profiling actor per model; stage 2
(``tune_run``) is a Ray Tune ``Tuner`` over the cells not yet in the results
ledger (``ledger.done``): each trial prunes, evaluates, heals while reporting
to Tune (ASHA may stop it) and evaluates again. Rerunning the same command
runs only missing or failed cells; adding fractions or models to the YAML runs
only the new ones. ``Tuner.restore`` is never used: it cannot add grid points,
and object refs in configs die with the driver.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, NoReturn

from ray_prune.errors import UserError
from ray_prune.ledger.rows import load_results, save_experiment_record, upgrade_layout
from ray_prune.sweep.experiment import Experiment, load_experiment
from ray_prune.sweep.interrupt import Interrupts, SweepInterrupted
from ray_prune.sweep.plan import Plan, plan

log = logging.getLogger(__name__)


def run_sweep(
    experiment: str | Experiment,
    storage: str | None = None,
    rerun: bool = False,
    progress: bool = True,
    num_cpus: int | None = None,
    exit_on_interrupt: Callable[[SweepInterrupted], NoReturn] | None = None,
):
    """Run (or resume, or extend) a sweep and return its results as a DataFrame.

    ``exit_on_interrupt`` (the CLI's): on Ctrl-C or SIGTERM in stage 2, the rows of cells that failed or that
    ASHA stopped before the signal are written, the lock is released, and this is called with the interrupt
    instead of waiting for Tune to wind its trials down (it exits the process, which takes its trials with it:
    every row is written atomically, so a fast stop loses nothing). Without it, the sweep stops Tune and raises
    :class:`SweepInterrupted`, which suits a notebook.
    """
    from ray_prune.sweep.lock import SweepLock

    exp = load_experiment(experiment) if isinstance(experiment, str) else experiment
    p = plan(exp, storage, rerun)
    with Interrupts() as interrupts, SweepLock(p.storage, on_lost=lambda holder: interrupts.lose_lock(holder)) \
            as lock:
        if lock.took_over and progress:
            print(f"took over the lock of a sweep that died (pid {lock.took_over.get('pid')} on "
                  f"{lock.took_over.get('host')})")
        # Writers killed mid-write leave hidden temp files; nobody else writes while we hold the lock.
        p.storage.remove_temp_files("")
        upgrade_layout(p.storage)  # rows of older versions join the dataset
        try:
            return _run_planned(p, rerun, progress, num_cpus, interrupts, lock, exit_on_interrupt)
        except SweepInterrupted:
            if lock.lost:
                raise _lost(p, lock.lost) from None
            raise


def _lost(p: Plan, holder: dict) -> UserError:
    return UserError(f"another sweep (pid {holder.get('pid')} on {holder.get('host')}) took over the lock of "
                     f"{p.storage.uri}; this sweep stopped writing", "let the other sweep finish, or stop it and "
                     "run this one again")


def _run_planned(p: Plan, rerun: bool, progress: bool, num_cpus: int | None, interrupts: Interrupts, lock,
                 exit_on_interrupt):
    from ray_prune.sweep.cell_feed import CellFeed
    from ray_prune.sweep.cluster import connect, trial_resources
    from ray_prune.sweep.outcomes import record_outcomes
    from ray_prune.sweep.profile_stage import Stage1
    from ray_prune.sweep.progress import ProgressView
    from ray_prune.sweep.tune_run import make_scheduler, run_tune

    exp, store = p.experiment, p.storage
    say = _announce(p, progress)
    if not p.pending:
        return load_results(store.uri)

    connect(num_cpus)
    interrupts.arm()
    gpus, cpus = trial_resources(exp)
    per_model = _gpus_per_model(p, gpus, say)
    models = p.models_with_work()
    say(f"stage 1: profiling {len(models)} model(s) on {'GPU' if gpus else 'CPU'}; each model's trials start "
        "as soon as its own stage 1 ends")
    stage1 = Stage1(p, per_model, cpus, rerun, say if progress else None)
    totals: dict[str, int] = {}
    for c in p.pending:
        totals[c.model] = totals.get(c.model, 0) + 1
    view = ProgressView(totals, enabled=progress, costs={}, tick=stage1.drain)
    feed = CellFeed(stage1, _trial_builder(p, per_model, cpus, view, say),
                    cost=lambda s: view.costs.get(s.cell.cell_id, 0.0))
    scheduler = make_scheduler(exp, p.pending)
    already = len(p.cells) - len(p.pending)

    def stop_now(signum: int) -> NoReturn:
        """The fast stop (``exit_on_interrupt``): what the slow one would write, then out."""
        done = record_outcomes(store, view, getattr(scheduler, "stopped", set()), interrupts.at)
        lock.release()
        if lock.lost:
            raise _lost(p, lock.lost)
        exit_on_interrupt(SweepInterrupted(signum, already + done, len(p.cells)))

    say(f"stage 2: {gpus:g} GPU + {cpus} CPU per trial, scheduler {exp.scheduler.type}")
    interrupts.check()
    interrupts.stop_now = stop_now if exit_on_interrupt is not None else None
    try:
        with interrupts.during("tune"):
            run_tune(exp, store, feed, gpus, cpus, [view], scheduler)
    finally:
        interrupts.stop_now = None
        stage1.cancel()  # after an interrupt or a failure, no actor goes on profiling for nobody
    if feed.error is not None:
        raise feed.error
    with interrupts.during("writing"):
        done = record_outcomes(store, view, getattr(scheduler, "stopped", set()), interrupts.at)
    interrupts.check(already + done, len(p.cells))
    return load_results(store.uri)


def _announce(p: Plan, progress: bool):
    """Record every cell in full in storage (what report/ and status read, never rebuilding the grid) and print
    what will run; returns the printer the sweep speaks through (silent without ``progress``)."""
    exp, store = p.experiment, p.storage
    save_experiment_record(store, exp.name, {"experiment": exp.model_dump(mode="json"), "layers": p.layers,
                                             "cells": [c.to_dict() for c in p.cells],
                                             "code_version": p.code_version})
    say = print if progress else (lambda *a, **k: None)
    if p.storage_note:
        say(p.storage_note)
    say(f"{exp.name}: {len(p.cells)} cells, {len(p.cells) - len(p.pending)} already done, "
        f"{len(p.pending)} to run -> {store.uri}")
    for line in p.summary():
        say(line)
    return say


def _trial_builder(p: Plan, per_model: dict, cpus: int, view, say):
    """The function that turns a model's stage-1 result into its trials (``CellFeed`` calls it per model)."""
    from ray_prune.sweep.order import trial_cost
    from ray_prune.sweep.profile_stage import load_stage1
    from ray_prune.sweep.trial import fold_identical

    said_repairs: list[bool] = []

    def build(model: str, profiled) -> list:
        """A model's trials, once its stage 1 ended: its cells with their layers chosen, identical ones folded."""
        tables = load_stage1(p, model)
        specs = fold_identical([_trial_spec(c, p, profiled, tables, cpus, per_model[model]["trial"])
                                for c in p.pending if c.model == model])
        if _write_mergekit_configs(p.storage, specs, p, say) and not said_repairs:
            said_repairs.append(True)
            say(NO_MERGEKIT_FOR_REPAIRS)
        folded = sum(len(s.twins) for s in specs)
        say(f"stage 2 for {model}: {len(specs)} trial(s)" + (f" ({folded} cell(s) computed by an identical "
                                                              "cell's trial)" if folded else ""))
        view.set_total(model, len(specs))
        view.costs.update({s.cell.cell_id: trial_cost(s.cell, s.do_unhealed, p.models.get(model)) for s in specs})
        return specs

    return build


def _gpus_per_model(p: Plan, gpus: float, say) -> dict[str, dict]:
    """Per model: GPUs of its profiling actor and of each trial, and whether to profile streamed, from the memory
    plan. The plan is made here, once, when the experiment did not give the GPU size and the cluster has GPUs to
    read it from (``--check`` and a given size make it in ``plan``)."""
    from ray_prune.sweep.cluster import probe_gpu_memory_gb
    from ray_prune.sweep.plan import plan_memory

    out = {m.name: {"profile": gpus, "trial": gpus, "streamed": False} for m in p.experiment.models}
    if not gpus:
        return out
    if not p.memory and p.experiment.resources.gpus_per_trial == "auto":
        plan_memory(p, probe_gpu_memory_gb())
    for mp in p.memory:
        streamed = mp.choice("profile") is not None and mp.choice("profile").precision.startswith("streamed")
        out[mp.model] = {"profile": float(mp.profile_gpus), "trial": float(mp.trial_gpus), "streamed": streamed}
        if mp.trial_gpus > 1 or streamed:
            say(f"{mp.model}: {mp.trial_gpus} GPU(s) per trial" + (", profiled one block at a time" if streamed
                                                                     else ""))
    return out


def _trial_spec(c, p: Plan, profiled, stage1: dict, cpus: int, gpus: float):
    """A cell's trial: its layers chosen (from what its model's stage 1 made: ``stage1``, (kind, calibration id)
    -> a table or a greedy order), its shared blocks, its reference losses, whether it owns its unhealed row."""
    from ray_prune.core.select import layers_to_remove
    from ray_prune.sweep.grid import stage1_need
    from ray_prune.sweep.plan import need_key
    from ray_prune.sweep.profile_stage import reference_key
    from ray_prune.sweep.trial import TrialSpec

    need = stage1_need(c)
    made = stage1.get(need_key(need)) if need is not None else None
    removed = layers_to_remove(c.strategy if c.n else "deepest", c.num_layers, n=c.n,
                               table=made if need is not None and need[0] == "table" else None,
                               order=made.order if need is not None and need[0] == "order" else None)
    key = p.stage1_keys.get((c.model, *need_key(need))) if need is not None else None
    blocks = {}
    for need, path in profiled.blocks.items():
        if need.role == "test" or (c.heals and need.seq_len == c.heal["seq_len"]):
            blocks[need.role] = path
    return TrialSpec(
        cell=replace(adjusted(c, p.adjustments(c.model)), removed_layers=removed, table_key=key,
                     code_version=p.code_version),
        storage_uri=p.storage.uri, data_dir=p.data_dir, threads=cpus,
        baseline_loss=profiled.baseline_loss.get(c.scored_as),
        reference_loss=profiled.heal_reference.get(reference_key(c.scored_as, c.heal.get("seq_len"),
                                                                  c.heal.get("val_sequences"))),
        do_unhealed=p.experiment.eval.unhealed and c.owns_unhealed, blocks=blocks, gpus=gpus,
        calibration_source=p.experiment.text_source(c.calibration["dataset"]))


def adjusted(c, adjustments: dict) -> object:
    """A cell as its trial runs it on the GPUs the memory plan sized: the plan's micro-batch (the sequences per step
    kept through gradient accumulation), checkpointing, optimizer and evaluation batch (``core.memory``'s
    ``ModelPlan.adjustments``). Its id stays the one the experiment asked for; its rows record what ran."""
    if not adjustments:
        return c
    from ray_prune.core.heal.config import HealConfig
    from ray_prune.core.memory import adjust_heal

    heal = dict(c.heal)
    if c.heals and adjustments.get("heal"):
        ran = adjust_heal(HealConfig.from_point(c.heal, seed=c.seed, dtype=c.dtype), adjustments["heal"])
        heal.update({k: getattr(ran, k) for k in heal if hasattr(ran, k) and k not in ("seed", "dtype")})
    return replace(c, heal=heal, eval={**c.eval, **adjustments.get("eval", {})})


def _write_mergekit_configs(store, specs, p: Plan, say) -> bool:
    """Each pending cell's pruning as a mergekit passthrough config (``layout.mergekit_path``), for the models
    mergekit can prune faithfully (``core.export`` says which, and why not the others); whether some cell was
    left out for its repair."""
    from ray_prune.core.export import mergekit_yaml
    from ray_prune.errors import UserError
    from ray_prune.ledger.layout import mergekit_path

    refused: dict[str, str] = {}
    repaired = False
    for c in (cell for s in specs for cell in (s.cell, *s.twins)):
        if c.repair != "none":
            repaired = True  # a fold into weights is not a slicing: mergekit's passthrough cannot express it
            continue
        if c.model in refused or not c.removed_layers:
            continue
        path = mergekit_path(c.model, c.cell_id)
        try:
            text = mergekit_yaml(store.path(path), c.model, c.num_layers, c.removed_layers, c.dtype,
                                 config=p.models[c.model].config)
        except UserError as e:
            refused[c.model] = e.problem
            continue
        store.write_bytes(path, text.encode())
    for model, why in refused.items():
        say(f"no mergekit configs for {model}: {why}")
    return repaired


NO_MERGEKIT_FOR_REPAIRS = ("no mergekit configs for repaired cells: a linear repair changes weights, which "
                           "mergekit's passthrough (a slicing of layers) cannot express; a repaired model saves with "
                           "save_pretrained instead")
