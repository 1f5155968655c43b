"""Test machinery for sweeps run the way users run them: ``ray-prune sweep`` in a subprocess, SIGKILLed from here.

Shared by the tests that kill drivers on a local storage root and on object storage
(``tests/ledger/test_s3.py``). Import it as ``from sweep.drivers import Driver`` (``tests/`` is on the path).

- :class:`Driver`: the command with its own embedded Ray, its output collected line by line; ``kill_when``
  SIGKILLs it at a chosen moment and checks that none of its Ray processes outlives it.
- :func:`expected_rows`: the (cell_id, stage) pairs a finished sweep of an experiment holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

import faults
from faults import FAULT_ENV, KILL_ENV, KILL_ONCE_ENV


class Driver:
    """``ray-prune sweep`` in a subprocess with its own embedded Ray, its output collected line by line.

    ``storage``: the ``--storage`` argument (a local path or a URI such as ``s3://bucket/run``), or None to use
    the experiment's own ``storage:``. The experiment file is written to ``spec_dir`` (default: the local
    storage's parent). ``env``: fault variables (``tests/faults.py``); any of them not given is removed, as is
    ``RAY_ADDRESS``, so the driver always starts its own Ray. Everything else comes from this process.
    """

    def __init__(self, spec: dict, storage: str | Path | None, env: dict[str, str] | None = None,
                 spec_dir: Path | None = None) -> None:
        if spec_dir is None:
            assert isinstance(storage, Path), "pass spec_dir for a storage that is not a local path"
            spec_dir = storage.parent
        spec_dir.mkdir(parents=True, exist_ok=True)
        path = spec_dir / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec))
        full = {**os.environ, "PYTHONUNBUFFERED": "1", **(faults.environment(**env) if env else {})}
        for k in ("RAY_ADDRESS", FAULT_ENV, KILL_ENV, KILL_ONCE_ENV):
            if k not in (env or {}):
                full.pop(k, None)
        argv = [sys.executable, "-m", "ray_prune.cli", "sweep", str(path)]
        if storage is not None:
            argv += ["--storage", str(storage)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def output(self) -> str:
        return "".join(self.lines)

    def kill_when(self, condition, timeout: float = 300, poll: float = 0.05) -> None:
        """SIGKILL the driver as soon as ``condition()`` holds (None: it kills itself); check nothing outlives it."""
        deadline = time.monotonic() + timeout
        children: list[psutil.Process] = []
        while condition is None or not condition():
            if condition is None and self.proc.poll() is not None:
                break
            assert self.proc.poll() is None, f"the sweep ended before the kill point:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"kill point not reached:\n{self.output()[-3000:]}"
            try:
                children = psutil.Process(self.proc.pid).children(recursive=True) or children
            except psutil.NoSuchProcess:
                pass
            time.sleep(poll)
        if self.proc.poll() is None:
            children = psutil.Process(self.proc.pid).children(recursive=True)
            os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL, self.output()[-3000:]
        # Ray's processes share the driver's fate: no orphan trial can go on writing rows. (Ray's dashboard and
        # runtime-env agents poll for their raylet and follow a minute or two later; they write no rows.)
        workers = [p for p in children if not is_agent(p)]
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"processes outlived the killed driver: {[p.name() for p in alive]}"

    def wait_for(self, condition, timeout: float = 300, poll: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(poll)

    def finish(self, timeout: float = 600, rc: int = 0) -> str:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        assert code == rc, self.output()[-3000:]
        return self.output()


def is_agent(p: psutil.Process) -> bool:
    try:
        return p.name().endswith("Agent") or "agent" in " ".join(p.cmdline()[:3])
    except psutil.NoSuchProcess:
        return True


def expected_rows(exp) -> set[tuple[str, str]]:
    """Every (cell_id, stage) a completed sweep of ``exp`` holds: healed (and unhealed) per cell, baseline per model."""
    from ray_prune.sweep.grid import baseline_id, expand
    from ray_prune.sweep.plan import read_model

    cells = expand(exp, {m.name: read_model(m).num_layers for m in exp.models})
    want = {(c.cell_id, "healed") for c in cells} | {(baseline_id(exp, m.name), "baseline") for m in exp.models}
    if exp.eval.unhealed:
        want |= {(c.unhealed_id, "unhealed") for c in cells}
    return want
