"""Stage 2: the Ray Tune grid of cells, one trial each, with ASHA within each pruned model.

This is the only module that talks to Tune from inside a trial
(``tune.report``, ``tune.get_checkpoint``); the trial itself is
``trial.run_cell``, a recipe over the pure core.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ray_prune.ledger.storage import Storage
from ray_prune.sweep.experiment import Experiment
from ray_prune.sweep.trial import TrialSpec, run_cell


def report_to_tune(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    """A heal report to Tune, with the heal checkpoint a retry resumes from."""
    from ray import tune

    if checkpoint_dir:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
    else:
        tune.report(metrics)


def trainable(config: dict[str, Any]) -> None:
    """The Tune function trainable: a thin shell around ``trial.run_cell``."""
    import torch
    from ray import tune

    _release_memory()  # the previous trial of this worker (reuse_actors) has ended: its frames are gone
    spec: TrialSpec = config["run"]
    torch.set_num_threads(max(1, spec.threads))
    wait_for_free_gpus()
    checkpoint = tune.get_checkpoint()
    resume = checkpoint.to_directory() if checkpoint is not None else None
    storage = Storage(spec.storage_uri)
    if spec.do_unhealed and all(storage.exists(_unhealed_path(c)) for c in spec.cells("unhealed")):
        spec = TrialSpec(**{**spec.__dict__, "do_unhealed": False})  # a retry: the unhealed rows are there
    run_cell(spec, report=report_to_tune, resume_from=resume)


def _release_memory() -> None:
    """Free what an earlier trial of this worker process left (``reuse_actors``): a reference cycle or a cached
    CUDA block would otherwise count against this cell's memory plan. It runs when the next trial starts, not
    when one ends: a trial that stops or fails still holds its model in its traceback's frames until then,
    and Tune gives a stopped trial's thread only 2 s to exit before it refuses to reuse the worker."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _unhealed_path(cell) -> str:
    from ray_prune.ledger.layout import row_path

    return row_path(cell.model, cell.unhealed_id, "unhealed")


GPU_BUSY_GIB = 2.0  # memory in use on a GPU before this trial loads anything, above which it is taken to be busy
GPU_WAIT_S = 60.0  # how long a trial waits for a busy GPU to free up (an earlier trial's process winding down)


def wait_for_free_gpus(busy_gib: float = GPU_BUSY_GIB, wait_s: float = GPU_WAIT_S) -> None:
    """Before a GPU trial loads its model, the GPUs Ray gave it must be free: a process that has not let go of
    its memory (an earlier trial's, winding down) would make this trial run out of memory half-way, after its
    load. Wait up to ``wait_s`` for memory in use to fall under ``busy_gib``, then fail with a clear message
    (Tune retries the trial)."""
    import torch

    if not torch.cuda.is_available():
        return
    deadline = time.monotonic() + wait_s
    while True:
        busy = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            used = (total - free) / 2**30
            if used > busy_gib:
                busy.append(f"GPU {i} ({torch.cuda.get_device_name(i)}) has {used:.1f} of {total / 2**30:.0f} GiB "
                            "in use")
        if not busy:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("; ".join(busy) + f" before this trial loaded anything, after {wait_s:.0f} s of "
                               "waiting: another process holds it (nvidia-smi names it). Stop it, or give the sweep "
                               "GPUs of its own")
        time.sleep(2.0)


def make_scheduler(exp: Experiment, cells: list):
    """ASHA within each pruned model (``scheduler.GroupedASHA``), or FIFO; its ``stopped`` names ASHA's stops.
    ``cells``: those the sweep will run (their heal steps bound ASHA's time axis)."""
    from ray.tune.schedulers import FIFOScheduler

    from ray_prune.sweep.scheduler import GroupedASHA

    if exp.scheduler.type != "asha":
        return FIFOScheduler()
    max_steps = max([c.heal["steps"] for c in cells if c.heals] or [1])
    # max_t one past the last step: ASHA stops any trial that reaches max_t, which would cut off the healed eval.
    return GroupedASHA(group_of=lambda cfg: f"{cfg['run'].cell.unhealed_id}:{cfg['run'].cell.seed}",
                       time_attr="heal_step", metric="loss_ratio", mode="min", max_t=max_steps + 1,
                       grace_period=min(exp.scheduler.grace_period, max_steps),
                       reduction_factor=exp.scheduler.reduction_factor)


SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def _keep_secrets_out_of_runtime_envs() -> None:
    """Tune copies the AWS credential variables of the driver into every trainable's ``runtime_env``
    (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), and Ray writes runtime environments in plain text
    to its session logs (``runtime_env_agent.log``). The workers need no copy: on a local Ray they inherit the
    driver's environment, on a cluster each node has its own credentials (instance profile, its environment).
    So the credentials are taken off Tune's list before any trainable is registered."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(set(class_cache.ENV_VARS_TO_PROPAGATE) - set(SECRET_ENV_VARS))


def tune_config(exp: Experiment, feed, scheduler, gpus: float):
    """The Tune configuration of a sweep: the trials come from ``feed`` (``cell_feed.CellFeed``), as many as it
    gives. On CPUs one worker process serves trial after trial (``reuse_actors``): Python start and the torch,
    transformers, peft and lm-eval imports are paid once per slot, not once per cell (measured: 17 s -> 9 s of
    fixed cost per trial). On GPUs every trial gets a fresh process: a reused process keeps what CUDA's caching
    allocator and bitsandbytes hold (Ray issues 32725 and 30414), which the next trial's memory plan does not
    count."""
    from ray import tune

    return tune.TuneConfig(search_alg=feed, num_samples=-1, scheduler=scheduler,
                           max_concurrent_trials=exp.resources.max_concurrent, reuse_actors=not gpus)


# Tune's variables for how long a trial list may wait before Tune guesses the cluster cannot run it (local, autoscaled).
INSUFFICIENT_RESOURCE_GUESSES = ("TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S",
                                 "TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S_AUTOSCALER")
NEVER_S = 10 ** 9  # seconds: longer than any sweep


def run_tune(exp: Experiment, store: Storage, feed, gpus: float, cpus: int, callbacks: list, scheduler):
    """Fit the trials ``feed`` gives; returns Tune's ResultGrid. What each trial did is read from ``callbacks``
    (the live view) and from the ``scheduler`` (which cells ASHA stopped); the experiment's trackers (``tracking``)
    join them."""
    from ray import tune

    from ray_prune.ledger.layout import TUNE
    from ray_prune.sweep.tracking import callbacks as tracker_callbacks

    # Tune snapshots its state at every checkpoint; that is wanted here, and its warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 Tune then prints nothing: our view instead
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # interrupt.Interrupts handles SIGINT and SIGTERM
    # An interrupted sweep stops its trials within seconds, not after their next report (Tune's default
    # waits up to 600 s): a trial killed mid-write leaves only a hidden temp file, never a partial row.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "2")
    # The feed holds a model's trials back until its stage 1 ends, so the trial list is empty for as long as the
    # first profile takes (hours for a 70B model). Tune reads a minute without trials as a cluster too small for
    # them and, with none to name, fails on an IndexError (Ray 2.60, insufficient_resources_manager). Whether the
    # cluster can run the trials was checked before they were asked for (cluster.trial_resources).
    for name in INSUFFICIENT_RESOURCE_GUESSES:
        os.environ[name] = str(NEVER_S)
    # Tune logs every trial failure with its traceback, every failed sync of its own state, and, on an interrupt,
    # how to resume with Tuner.restore (which ray-prune never uses, see run.py). The live view says what failed in
    # one line and the rows keep the errors, so Tune's own log stays quiet.
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _keep_secrets_out_of_runtime_envs()
    tune_root = store.local_path(TUNE)
    tuner = tune.Tuner(
        # each trial asks for its own model's GPUs (the memory plan's), others' fit the same nodes
        tune.with_resources(trainable, lambda config: {"cpu": cpus, "gpu": config["run"].gpus}),
        tune_config=tune_config(exp, feed, scheduler, gpus),
        run_config=tune.RunConfig(
            name=f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(tune_root) if tune_root is not None else store.path(TUNE),
            storage_filesystem=None if tune_root is not None else store.fs,
            failure_config=tune.FailureConfig(max_failures=exp.resources.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[*callbacks, *tracker_callbacks(exp)], verbose=0),
    )
    return tuner.fit()
