"""Fault injection for the reliability tests: raise, or die by SIGKILL, at named points of a sweep.

Both hooks read the environment, which Ray's worker processes inherit from the
process that started Ray, so a test can make a trial fail inside a real worker.
Outside tests the variables are unset and each hook costs one dict lookup.

- ``RAY_PRUNE_TEST_FAULT="<text>:<stage>"``: cells whose model name contains
  ``<text>`` raise in ``<stage>`` (unhealed, heal or healed), as an
  out-of-memory error would.
- ``RAY_PRUNE_TEST_KILL="<point>:<glob>[,<point>:<glob>...]"``: the process that
  reaches ``<point>`` with a context matching ``<glob>`` (fnmatch) kills itself with
  SIGKILL: no ``finally``, no atexit, no flush, as a preempted node or the OOM
  killer would. Points: ``heal`` (right after a heal checkpoint is reported;
  context: the model name) and ``write`` (a row written to a temp file but not
  yet published; context: ``<stage>:<status>:<model>``).
- ``RAY_PRUNE_TEST_KILL_ONCE=<dir>``: each (point, context) kills only once: a
  marker file in ``<dir>`` is created first, so a retried trial survives.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import signal

FAULT_ENV = "RAY_PRUNE_TEST_FAULT"
KILL_ENV = "RAY_PRUNE_TEST_KILL"
KILL_ONCE_ENV = "RAY_PRUNE_TEST_KILL_ONCE"


def maybe_raise(model: str, stage: str) -> None:
    text, _, where = os.environ.get(FAULT_ENV, "").rpartition(":")
    if text and where == stage and text in model:
        raise RuntimeError(f"injected fault in {stage} (CUDA out of memory, simulated)")


def maybe_kill(point: str, context: str) -> None:
    specs = os.environ.get(KILL_ENV)
    if not specs:
        return
    for spec in specs.split(","):
        where, _, text = spec.partition(":")
        if where == point and fnmatch.fnmatchcase(context, text):
            break
    else:
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
