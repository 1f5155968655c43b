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

import ray_prune
from ray_prune.ledger.layout import RESULTS, TABLES
from ray_prune.ledger.rows import load_results, save_experiment_record
from ray_prune.sweep.experiment import Experiment, load_experiment
from ray_prune.sweep.plan import Plan, plan

log = logging.getLogger(__name__)


def run_sweep(
    experiment: str | Experiment,
    storage: str | None = None,
    rerun: bool = False,
    progress: bool = True,
    num_cpus: int | None = None,
):
    """Run (or resume, or extend) a sweep and return its results as a DataFrame."""
    from ray_prune.sweep.lock import SweepLock

    exp = load_experiment(experiment) if isinstance(experiment, str) else experiment
    p = plan(exp, storage, rerun)
    with SweepLock(p.storage) as lock:
        if lock.took_over and progress:
            print(f"took over the lock of a sweep that died (pid {lock.took_over.get('pid')} on "
                  f"{lock.took_over.get('host')})")
        # Writers killed mid-write leave hidden temp files; nobody else writes while we hold the lock.
        for folder in (RESULTS, TABLES):
            p.storage.remove_temp_files(folder)
        return _run_planned(p, rerun, progress, num_cpus)


def _run_planned(p: Plan, rerun: bool, progress: bool, num_cpus: int | None):
    from ray_prune.core.select import layers_to_remove
    from ray_prune.sweep.cluster import connect, trial_resources
    from ray_prune.sweep.outcomes import record_outcomes
    from ray_prune.sweep.profile_stage import heal_shape, load_tables, run_profile_stage
    from ray_prune.sweep.progress import ProgressView
    from ray_prune.sweep.trial import TrialSpec
    from ray_prune.sweep.tune_run import run_tune

    exp, store = p.experiment, p.storage
    save_experiment_record(store, exp.name, {"experiment": exp.model_dump(mode="json"), "layers": p.layers,
                                             "cells": [{"cell_id": c.cell_id, "model": c.model} for c in p.cells],
                                             "code_version": ray_prune.__version__})
    say = print if progress else (lambda *a, **k: None)
    say(f"{exp.name}: {len(p.cells)} cells, {len(p.cells) - len(p.pending)} already done, "
        f"{len(p.pending)} to run -> {store.uri}")
    if not p.pending:
        return load_results(store.uri)

    connect(num_cpus)
    gpus, cpus = trial_resources(exp)
    say(f"stage 1: profiling {len(p.models_with_work())} model(s) on {'GPU' if gpus else 'CPU'}")
    profiled = run_profile_stage(p, gpus, cpus, rerun)
    tables = load_tables(p)
    specs = [TrialSpec(
        cell=replace(c, removed_layers=layers_to_remove(c.strategy, c.num_layers, n=c.n, table=tables.get(c.model))),
        storage_uri=store.uri, data_dir=p.data_dir, threads=cpus, baseline_loss=profiled[c.model].baseline_loss,
        reference_loss=profiled[c.model].heal_reference.get(heal_shape(c.heal["seq_len"], c.heal["val_sequences"])),
        do_unhealed=exp.eval.unhealed and c.owns_unhealed) for c in p.pending]

    totals: dict[str, int] = {}
    for s in specs:
        totals[s.cell.model] = totals.get(s.cell.model, 0) + 1
    view = ProgressView(totals, enabled=progress)
    say(f"stage 2: {len(specs)} trials, {gpus:g} GPU + {cpus} CPU each, scheduler {exp.scheduler.type}")
    grid = run_tune(exp, store, specs, gpus, cpus, [view])
    record_outcomes(grid, store, view.retries)
    return load_results(store.uri)
