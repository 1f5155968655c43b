"""A compact live view of a sweep, printed instead of Ray Tune's tables.

One line whenever a cell changes state: per model, cells done / running /
stopped early / failed out of its total, the elapsed time, and an estimate of
the time left from the mean wall time of finished cells and the concurrency.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from typing import TextIO

from ray import tune


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressView(tune.Callback):
    def __init__(self, totals: dict[str, int], out: TextIO | None = None, enabled: bool = True) -> None:
        self.totals = totals
        self.out = out  # None: sys.stdout at print time (Tune pickles callbacks; streams do not pickle)
        self.enabled = enabled
        self.state: dict[str, str] = {}  # trial id -> running/done/stopped/failed
        self.model_of: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.durations: list[float] = []
        self.retries: dict[str, int] = {}  # cell id -> times Tune restarted it after a failure
        self.failed_at: dict[str, float] = {}  # cell id -> time.monotonic() when its last retry failed
        self.t0 = time.monotonic()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "out": None}

    def _model(self, trial) -> str:
        return trial.config["run"].cell.model

    def _set(self, trial, state: str) -> None:
        self.model_of[trial.trial_id] = self._model(trial)
        if self.state.get(trial.trial_id) == state:
            return
        self.state[trial.trial_id] = state
        self.show()

    def counts(self) -> dict[str, Counter]:
        out: dict[str, Counter] = defaultdict(Counter)
        for tid, state in self.state.items():
            out[self.model_of[tid]][state] += 1
        return out

    def eta(self) -> float | None:
        if not self.durations:
            return None
        remaining = sum(self.totals.values()) - sum(1 for s in self.state.values() if s != "running")
        running = max(1, sum(1 for s in self.state.values() if s == "running"))
        return remaining * (sum(self.durations) / len(self.durations)) / running

    def show(self) -> None:
        if not self.enabled:
            return
        counts = self.counts()
        parts = []
        for model, total in self.totals.items():
            c = counts.get(model, Counter())
            parts.append(f"{model}: {c['done']}/{total} done, {c['running']} running, "
                         f"{c['stopped']} stopped, {c['failed']} failed")
        eta = self.eta()
        tail = f" | left ~{_clock(eta)}" if eta is not None else ""
        print(f"[{_clock(time.monotonic() - self.t0)}] " + " | ".join(parts) + tail, file=self.out or sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()
        self._set(trial, "running")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.durations.append(time.monotonic() - self.started.get(trial.trial_id, self.t0))
        done = bool((trial.last_result or {}).get("completed"))
        self._set(trial, "done" if done else "stopped")

    def on_trial_recover(self, iteration, trials, trial, **info):
        cell_id = trial.config["run"].cell.cell_id
        self.retries[cell_id] = self.retries.get(cell_id, 0) + 1

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed_at[trial.config["run"].cell.cell_id] = time.monotonic()
        self._set(trial, "failed")
