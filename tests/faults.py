"""Fault injection for the reliability tests, installed from outside the product.

The product has no test-only parameters. This module wraps a few of its
functions when they are imported, in every Python process that has
``tests/sitecustomize`` on its ``PYTHONPATH`` (the test driver, a ``ray-prune``
subprocess, and Ray's workers, which inherit the environment of the process
that started Ray). Nothing is wrapped unless one of the variables below is set.

- ``RAY_PRUNE_TEST_FAULT="<text>:<stage>"``: cells whose model name contains ``<text>`` raise in
  ``<stage>`` (unhealed, heal or healed), as an out-of-memory error would.
- ``RAY_PRUNE_TEST_KILL="<point>:<glob>[,...]"``: the process that reaches ``<point>`` with a context
  matching ``<glob>`` (fnmatch) kills itself with SIGKILL: no ``finally``, no atexit, no flush, as a
  preempted node or the OOM killer would. Points: ``heal`` (right after a heal checkpoint is reported
  to Tune; context: the model name) and ``write`` (a row written to its temp file but not yet published;
  context: ``<stage>:<status>:<model>``).
- ``RAY_PRUNE_TEST_KILL_ONCE=<dir>``: each (point, context) kills only once: a marker file in ``<dir>``
  is created first, so a retried trial survives.
- ``RAY_PRUNE_TEST_SLOW="<text>:<seconds>[,<text>:<seconds>...]"``: stage 1 of models whose name contains
  ``<text>`` first sleeps that long, as a large model's profile would take.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import importlib.abc
import os
import signal
import sys
import threading

FAULT_ENV = "RAY_PRUNE_TEST_FAULT"
KILL_ENV = "RAY_PRUNE_TEST_KILL"
KILL_ONCE_ENV = "RAY_PRUNE_TEST_KILL_ONCE"
SLOW_ENV = "RAY_PRUNE_TEST_SLOW"
SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sitecustomize")

_state = threading.local()


def maybe_raise(model: str, stage: str) -> None:
    text, _, where = os.environ.get(FAULT_ENV, "").rpartition(":")
    if text and where == stage and text in model:
        raise RuntimeError(f"injected fault in {stage} (CUDA out of memory, simulated)")


def maybe_kill(point: str, context: str) -> None:
    specs = os.environ.get(KILL_ENV)
    if not specs:
        return
    wanted = (s.partition(":") for s in specs.split(","))
    if not any(w == point and fnmatch.fnmatchcase(context, g) for w, _, g in wanted):
        return
    once = os.environ.get(KILL_ONCE_ENV)
    if once:
        marker = os.path.join(once, hashlib.sha256(f"{point}|{context}".encode()).hexdigest()[:16])
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{point} {context} pid {os.getpid()}\n".encode())  # which kill this was, for the test's log
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- the wrappers


def _trial_step(fn, stage: str):
    @functools.wraps(fn)
    def wrapped(spec, *args, **kwargs):
        _state.model = spec.cell.model
        maybe_raise(spec.cell.model, stage)
        return fn(spec, *args, **kwargs)

    return wrapped


def _patch_trial(module) -> None:
    module.evaluate_unhealed = _trial_step(module.evaluate_unhealed, "unhealed")
    module.heal_cell = _trial_step(module.heal_cell, "heal")
    module.evaluate_healed = _trial_step(module.evaluate_healed, "healed")


def _patch_tune_run(module) -> None:
    report = module.report_to_tune

    @functools.wraps(report)
    def wrapped(metrics, checkpoint_dir):
        report(metrics, checkpoint_dir)
        if checkpoint_dir:
            maybe_kill("heal", getattr(_state, "model", ""))

    module.report_to_tune = wrapped


def _patch_storage(module) -> None:
    cls = module.Storage
    write_table, atomic = cls.write_table, cls._atomic

    def write_table_wrapped(self, relative, table):
        cols = {c: table.column(c)[0].as_py() for c in ("stage", "status", "model") if c in table.column_names}
        _state.row = f"{cols.get('stage')}:{cols.get('status')}:{cols.get('model')}" if cols else None
        try:
            return write_table(self, relative, table)
        finally:
            _state.row = None

    def atomic_wrapped(self, relative, write):
        def write_then_maybe_die(path):  # the temp file is whole, and not yet renamed into place
            write(path)
            if getattr(_state, "row", None):
                maybe_kill("write", _state.row)

        return atomic(self, relative, write_then_maybe_die)

    cls.write_table, cls._atomic = write_table_wrapped, atomic_wrapped


def _patch_profile_stage(module) -> None:
    profile_model = module.profile_model

    @functools.wraps(profile_model)
    def wrapped(exp_dict, spec_dict, *args, **kwargs):
        import time

        for spec in os.environ.get(SLOW_ENV, "").split(","):
            text, _, seconds = spec.rpartition(":")
            if text and text in spec_dict["name"]:
                time.sleep(float(seconds))
        return profile_model(exp_dict, spec_dict, *args, **kwargs)

    module.profile_model = wrapped


_PATCHES = {"ray_prune.sweep.trial": _patch_trial, "ray_prune.sweep.tune_run": _patch_tune_run,
            "ray_prune.ledger.storage": _patch_storage, "ray_prune.sweep.profile_stage": _patch_profile_stage}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when one of the modules above is loaded, patches it right after it runs."""

    def find_spec(self, name, path=None, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def run_then_patch(module, exec_module=exec_module):
                    exec_module(module)
                    _PATCHES[name](module)

                spec.loader.exec_module = run_then_patch
                return spec
        return None


def install() -> None:
    """Wrap the fault points on import, if a fault variable is set (the sitecustomize hook calls this)."""
    if not any(os.environ.get(k) for k in (FAULT_ENV, KILL_ENV, SLOW_ENV)):
        return
    if any(isinstance(f, _AfterImport) for f in sys.meta_path):
        return
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, _AfterImport())


def environment(**variables: str) -> dict[str, str]:
    """The environment a process needs to run with these fault variables: they, plus the hook on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH", "")
    if SITE_DIR not in path.split(os.pathsep):
        path = os.pathsep.join(p for p in (SITE_DIR, path) if p)
    return {**variables, "PYTHONPATH": path}


def local_ray(**variables: str):
    """One real local Ray (2 CPUs, no GPU) whose processes run with these fault (and other) variables.

    A generator for a module-scoped pytest fixture: it sets the variables, installs the fault points in
    this process, starts Ray (whose workers inherit the environment), yields, then undoes all of it.
    """
    import ray

    env = environment(**variables)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    install()
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
