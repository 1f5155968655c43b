"""Timing for the benchmarks: medians of repeated runs, peak memory in a fresh process, the machine.

Every ratio a benchmark prints compares runs made in one process on one machine.
Where two things are compared, their repeats are interleaved (A, B, A, B, ...)
so that a burst of load from another process hits both alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def interleaved_medians(fns: dict, repeats: int = 3, warmup: int = 1) -> dict:
    """Median seconds of each function, timed in rounds that call every function once, in turn.

    A function that returns a float reports its own seconds (to leave its set-up
    out); otherwise its wall time counts.
    """
    times: dict = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            _sync()
            t = time.perf_counter()
            got = fn()
            _sync()
            if r >= warmup:
                times[k].append(got if isinstance(got, float) else time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


_PEAK_SNIPPET = """
import json, torch
def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")
def _before():
    if torch.cuda.is_available():
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident size, to the current size
        f.write("5")
    return _rss("VmRSS")
def _peak():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss("VmHWM")
_out = {{}}
{setup}
"""

_PEAK_RUN = """
_b = _before()
{run}
_out[{name!r}] = [_b, _peak()]
"""


def peak_memory_mib(setup: str, runs: dict[str, str], cwd: str | None = None) -> dict[str, tuple[float, float]]:
    """For each named snippet of ``runs``: (memory before it, peak memory while it runs), in MiB.

    All run, one after another, in one fresh Python process after ``setup``. On
    CPU this is resident memory (VmRSS, and VmHWM reset just before each run),
    with glibc told to return every block of 64 KiB or more to the system when
    it is freed, so memory an earlier run freed cannot hide a later run's peak.
    On a GPU it is memory allocated by torch.
    """
    code = _PEAK_SNIPPET.format(setup=textwrap.dedent(setup))
    code += "".join(_PEAK_RUN.format(name=k, run=textwrap.dedent(v)) for k, v in runs.items())
    code += '\nprint("PEAK " + json.dumps(_out))\n'
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=cwd or os.path.dirname(os.path.abspath(__file__)))
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-2000:]}")
    line = [s for s in out.stdout.splitlines() if s.startswith("PEAK ")][-1]
    return {k: tuple(v) for k, v in json.loads(line[5:]).items()}


def memory_unit() -> str:
    return "GPU MiB allocated" if torch.cuda.is_available() else "MiB resident"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, cores, torch threads and version, and the GPU when there is one."""
    cpu = f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}); host {cpu}"
    return f"CPU: {cpu}"


def device_tag() -> str:
    return "GPU" if torch.cuda.is_available() else "CPU"


def verdict(value: float, target: float, at_least: bool) -> str:
    """'met' or 'MISSED' against a target that ``value`` must reach (at_least) or stay under."""
    ok = value >= target if at_least else value <= target
    return "met" if ok else "MISSED"
