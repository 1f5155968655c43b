"""ASHA within groups: heal settings compete only against other settings for the same pruned model.

Plain ASHA ranks every trial of the experiment against every other. In a
pruning sweep that would stop the heal of a 50%-pruned model because its loss
is worse than a 10%-pruned one's, which is the result we came for, not a weak
hyperparameter. Here each pruned model (model, n, strategy, seed) gets its own
ASHA brackets, and early stopping only prunes heal settings (lr, rank, steps...)
that lose to other settings of the same cell. A group with one setting is never
stopped.
"""

from __future__ import annotations

from typing import Callable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler


class GroupedASHA(FIFOScheduler):
    def __init__(self, group_of: Callable[[dict], str], **asha_kwargs) -> None:
        super().__init__()
        self._group_of = group_of
        self._kwargs = asha_kwargs
        self._groups: dict[str, ASHAScheduler] = {}
        self._metric = asha_kwargs.get("metric")
        self.stopped: set[str] = set()  # cell ids this scheduler stopped: the only cells that get "stopped" rows

    def _asha(self, trial) -> ASHAScheduler:
        key = self._group_of(trial.config)
        if key not in self._groups:
            self._groups[key] = ASHAScheduler(**self._kwargs)
        return self._groups[key]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._kwargs["metric"] not in result:
            return TrialScheduler.CONTINUE
        decision = self._asha(trial).on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            self.stopped.add(trial.config["run"].cell.cell_id)
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"GroupedASHA: {len(self._groups)} groups"
