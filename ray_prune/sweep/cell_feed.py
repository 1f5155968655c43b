"""Stage 2's trials, fed to Tune as each model's stage 1 ends: a Tune ``Searcher`` over the sweep's own cells.

Tune asks its search algorithm for a trial whenever it has room for one. This one answers from a queue of the
trials whose model finished stage 1 (its distance tables, shared blocks and baselines), costliest first
(``order``); while a model still profiles it answers "not yet" (None), and once every model has reported and the
queue is empty, "finished". So a 7B model's trials start while a 70B model is still being profiled, and a slot
never waits for a stage 1 it does not need. Nothing here decides what a trial computes: ``build(model, profiled)``
turns a model's stage-1 result into its trial specs (the cells with their layers chosen, identical cells folded
into one trial).
"""

from __future__ import annotations

from typing import Any, Callable

from ray.tune.search import Searcher


class CellFeed(Searcher):
    def __init__(self, stage1, build: Callable[[str, Any], list], cost: Callable[[Any], float],
                 on_ready: Callable[[str, list], None] | None = None) -> None:
        super().__init__()
        self.stage1 = stage1
        self.build, self.cost, self.on_ready = build, cost, on_ready
        self.queue: list = []
        self.error: BaseException | None = None  # a stage-1 failure: the sweep raises it once Tune has stopped

    def poll(self) -> None:
        """Take in every model whose stage 1 ended since the last call."""
        if self.error is not None:
            return
        try:
            ready = self.stage1.poll()
        except Exception as e:  # noqa: BLE001 - kept and raised by the sweep after Tune stops, not inside Tune
            self.error = e
            self.stage1.cancel()
            return
        for model, profiled in ready:
            specs = self.build(model, profiled)
            if self.on_ready is not None:
                self.on_ready(model, specs)
            self.queue.extend(specs)
        if ready:
            self.queue.sort(key=lambda s: -self.cost(s))  # sorted() is stable: ties keep the grid order

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        self.poll()
        if self.queue:
            return {"run": self.queue.pop(0)}
        if self.stage1.pending and self.error is None:
            return None  # a model is still in stage 1: ask again
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # the feed does not learn from results: what runs is the grid
