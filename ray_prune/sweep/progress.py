"""A compact live view of a sweep, printed instead of Ray Tune's tables.

One line whenever a cell changes state: per model, cells done / running /
stopped early / failed out of its total, the elapsed time, and an estimate of
the time left.

The estimate weighs each trial by its planned cost (``order.trial_cost``) and counts a running trial's heal
progress (its last reported step), so it does not halve and double as trials start and end: time left =
elapsed x (work left / work done). Lines, not bars: they read the same in a terminal and in a job's log.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TextIO

from ray import tune


def trial_error(trial) -> str:
    """A failed trial's error as its row records it: the exception the trainable raised (through Ray's task error),
    read from the files Tune writes next to the trial as it fails (its storage copy is synced only later)."""
    import traceback

    import cloudpickle

    try:
        if trial.pickled_error_file and Path(trial.pickled_error_file).is_file():
            with open(trial.pickled_error_file, "rb") as f:
                exc = cloudpickle.load(f)
            # a RayTaskError's text holds the remote traceback, ending in the trainable's own exception
            return "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if trial.error_file and Path(trial.error_file).is_file():
            return Path(trial.error_file).read_text().strip()
        return str(trial.get_error() or "the trial failed (no error text was stored)")
    except Exception as e:  # noqa: BLE001 - the row says what could be learned
        return f"the trial failed; its error could not be read ({type(e).__name__}: {e})"


def _last_line(trial, error: str | None = None) -> str:
    """The last line of a trial's error (the exception), which is what a user needs to read first."""
    if error is None:
        error = trial_error(trial)
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no error text")[:300]


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressView(tune.Callback):
    def __init__(self, totals: dict[str, int], out: TextIO | None = None, enabled: bool = True,
                 costs: dict[str, float] | None = None, tick=None) -> None:
        self.totals = totals
        self.tick = tick  # called at every step of Tune's loop (stage 1's progress lines, printed as they come)
        self.costs = costs or {}  # cell id -> planned cost (order.trial_cost); equal weights where missing
        self.progress: dict[str, float] = {}  # cell id -> share of its work done (heal steps reported / planned)
        self.out = out  # None: sys.stdout at print time (Tune pickles callbacks; streams do not pickle)
        self.enabled = enabled
        self.state: dict[str, str] = {}  # trial id -> running/done/stopped/failed
        self.model_of: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.durations: list[float] = []
        self.retries: dict[str, int] = {}  # cell id -> times Tune restarted it after a failure
        self.failed_at: dict[str, float] = {}  # cell id -> time.monotonic() when its last retry failed
        self.ended: dict[str, tuple] = {}  # cell id -> (TrialSpec, last result, error or None) of trials that ended
        self.curves: dict[str, list[tuple]] = {}  # cell id -> heal curve reported so far: (step, val loss, train loss)
        self.t0 = time.monotonic()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "out": None, "tick": None}

    def set_total(self, model: str, total: int) -> None:
        """A model's trials, once known (identical cells fold into one trial when its layers are chosen)."""
        self.totals[model] = total

    def on_step(self, iteration, trials, **info):
        if self.tick is not None:
            self.tick()

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

    def _cost(self, cell_id: str) -> float:
        return self.costs.get(cell_id) or (sum(self.costs.values()) / len(self.costs) if self.costs else 1.0)

    def eta(self) -> float | None:
        """Seconds left: the time since the first trial started scaled by the planned trial work left over the work
        done (None before any). Stage 1 is not trial work, so its minutes do not count as elapsed: counted, a long
        stage 1 inflated the first estimates several times over."""
        total = self.costs and sum(self.costs.values()) or float(sum(self.totals.values()))
        done = sum(self._cost(c) * f for c, f in self.progress.items())
        elapsed = time.monotonic() - min(self.started.values(), default=self.t0)
        if done <= 0 or elapsed <= 0:
            return None
        return elapsed * max(0.0, total - done) / done

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.out or sys.stdout, flush=True)

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
        print(f"[{_clock(time.monotonic() - self.t0)}] " + " | ".join(parts) + tail, file=self.out or sys.stdout,
              flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        cell = trial.config["run"].cell
        steps = cell.heal.get("steps") or 0
        if result.get("heal_step") is not None and steps:
            self.progress[cell.cell_id] = max(self.progress.get(cell.cell_id, 0.0),
                                              min(0.95, result["heal_step"] / steps))
        if result.get("heal_step") is not None:
            curve = self.curves.setdefault(trial.config["run"].cell.cell_id, [])
            point = (result["heal_step"], result.get("heal_val_loss"), result.get("heal_train_loss"))
            if not curve or curve[-1][0] < point[0]:  # a retry reports its resumed steps again: keep each once
                curve.append(point)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()
        self._set(trial, "running")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.durations.append(time.monotonic() - self.started.get(trial.trial_id, self.t0))
        done = bool((trial.last_result or {}).get("completed"))
        spec = trial.config["run"]
        cell = spec.cell
        self.progress[cell.cell_id] = 1.0  # stopped early counts as done: its remaining work will not run
        self.ended[cell.cell_id] = (spec, dict(trial.last_result or {}), None)
        self._set(trial, "done" if done else "stopped")

    def on_trial_recover(self, iteration, trials, trial, **info):
        cell = trial.config["run"].cell
        self.retries[cell.cell_id] = self.retries.get(cell.cell_id, 0) + 1
        self.say(f"cell {cell.cell_id} ({cell.model}, n={cell.n}, {cell.strategy}) failed: "
                 f"{_last_line(trial)}; retrying ({self.retries[cell.cell_id]})")

    def on_trial_error(self, iteration, trials, trial, **info):
        spec = trial.config["run"]
        cell = spec.cell
        self.failed_at[cell.cell_id] = time.monotonic()
        self.progress[cell.cell_id] = 1.0
        error = trial_error(trial)
        self.ended[cell.cell_id] = (spec, dict(trial.last_result or {}), error)
        self.say(f"cell {cell.cell_id} ({cell.model}, n={cell.n}, {cell.strategy}) failed for good: "
                 f"{_last_line(trial, str(error))}")
        self._set(trial, "failed")

    def done(self) -> int:
        """Trials that finished healing."""
        return sum(1 for s in self.state.values() if s == "done")
