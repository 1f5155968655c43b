"""Timing for the benchmarks: medians of repeated runs, and peak memory measured in a fresh process."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mib(code: str) -> float:
    """Peak resident memory of a fresh Python process running ``code`` (CPU runs)."""
    wrapped = code + "\nimport resource, json; print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))"
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) / 1024


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
