"""The cost of one model's cells: its stages' work summed over their runs (:func:`model_cost`), priced at its rates.

A pipeline split across GPUs (``device_map="auto"``) runs one GPU at a time: the same seconds, GPUs x the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.cost.flops import adapter_params
from ray_prune.core.cost.rates import Rates
from ray_prune.core.cost.work import (
    Work,
    evaluation_work,
    greedy_work,
    heal_work,
    load_work,
    profile_work,
    reference_work,
    repair_work,
)
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.arch import Arch
from ray_prune.core.memory.workload import Workload

HOUR = 3600.0


@dataclass(frozen=True)
class TrialWork:
    """What one trial of a model does, as ``sweep.trial.run_cell`` runs it."""

    kept: int  # blocks the pruned model keeps
    heal: HealConfig | None  # None: the cell does not heal
    unhealed: bool | str = False  # True: every task before healing; "loss": the C4 loss only; False: no unhealed row
    loads: int = 1  # checkpoint loads: another where it heals in another precision than it is scored in, and where
    # a repaired QLoRA cell reloads its repaired model in NF4
    repair: CalibrationConfig | None = None  # the calibration a linear repair fits on, None without a repair


@dataclass(frozen=True)
class Stage1Work:
    """One thing a model's profile actor computes for its cells (``sweep.profile_stage``): a distance table or a
    greedy removal order on one calibration setting."""

    kind: str  # "table" or "order"
    calibration: CalibrationConfig
    rounds: int = 0  # a greedy order's rounds: the largest n of its cells


@dataclass(frozen=True)
class StageCost:
    """One stage of one model over all its runs."""

    stage: str  # profile, baseline, unhealed, heal, healed, load
    runs: int
    work: tuple[Work, ...]  # summed over the runs
    gpus: int  # GPUs held while it runs

    @property
    def tokens(self) -> float:
        return sum(w.tokens for w in self.work)

    @property
    def flops(self) -> float:
        return sum(w.amount for w in self.work if w.kind != "load")

    def seconds(self, rates: Rates) -> float:
        """Wall seconds on one of its GPUs (a pipeline split runs one GPU at a time)."""
        return sum(rates.seconds(w) for w in self.work)

    def device_hours(self, rates: Rates) -> float:
        return self.seconds(rates) * self.gpus / HOUR

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(w.kind for w in self.work))


@dataclass(frozen=True)
class ModelCost:
    """Every stage of one model's cells, priced at ``rates``."""

    model: str
    stages: tuple[StageCost, ...]
    rates: Rates
    cells: int

    def stage(self, name: str) -> StageCost | None:
        return next((s for s in self.stages if s.stage == name), None)

    @property
    def device_hours(self) -> float:
        return sum(s.device_hours(self.rates) for s in self.stages)

    @property
    def seconds(self) -> float:
        return sum(s.seconds(self.rates) for s in self.stages)


def _summed(parts: Sequence[Sequence[Work]]) -> tuple[Work, ...]:
    """Works of several runs, summed per kind (the first run's description kept)."""
    out: dict[tuple[str, str], Work] = {}
    for part in parts:
        for w in part:
            key = (w.kind, w.what.split(" ")[0])  # per kind and per what: each task, the C4 loss, the references...
            hit = out.get(key)
            out[key] = w if hit is None else Work(w.kind, hit.tokens + w.tokens, hit.amount + w.amount, hit.what)
    return tuple(out.values())


def model_cost(model: str, arch: Arch, workload: Workload, trials: Sequence[TrialWork], rates: Rates,
               profile_gpus: int = 1, trial_gpus: int = 1, stage1: Sequence[Stage1Work] = (),
               precisions: int = 1) -> ModelCost:
    """The cost of one model's cells. Its profile actor (``sweep.profile_stage``) loads the model once for its
    ``stage1`` work (distance tables, greedy orders) and once per scoring precision (``precisions``), each time
    computing the reference losses and the baseline row; then each trial loads the model (:class:`TrialWork`'s
    ``loads``, with its repair), evaluates it unhealed if it owns that row, heals it and evaluates it healed."""
    actor = int(bool(stage1)) + precisions
    first: list[Work] = []
    for need in stage1:
        first += profile_work(arch, need.calibration) if need.kind == "table" else \
            greedy_work(arch, need.calibration, need.rounds)
    stages = [StageCost("profile", 1, _summed([first, load_work(arch, actor)]), profile_gpus),
              StageCost("baseline", precisions, _summed(
                  [evaluation_work(arch, arch.layers, workload.evaluation) + reference_work(arch, workload)
                   for _ in range(precisions)]), profile_gpus)]
    if trials:  # a trial's load_s: the loads, and the repair fit where the cell repairs
        stages.append(StageCost("load", sum(t.loads for t in trials), _summed(
            [load_work(arch, t.loads) + (repair_work(arch, t.kept, t.repair) if t.repair else []) for t in trials]),
            trial_gpus))
    unhealed = [t for t in trials if t.unhealed]
    if unhealed:
        stages.append(StageCost("unhealed", len(unhealed), _summed(
            [evaluation_work(arch, t.kept, workload.evaluation, tasks=t.unhealed is True) for t in unhealed]),
            trial_gpus))
    healing = [(t, t.heal) for t in trials if t.heal is not None]
    if healing:
        stages.append(StageCost("heal", len(healing), _summed([heal_work(arch, t.kept, h) for t, h in healing]),
                                trial_gpus))
        unmerged = workload.scored_precision() == "nf4"  # scored as trained: the adapter runs beside the NF4 base
        stages.append(StageCost("healed", len(healing), _summed(
            [evaluation_work(arch, t.kept, workload.evaluation, lora=adapter_params(arch, t.kept, h) if unmerged
                             else 0) for t, h in healing]), trial_gpus))
    return ModelCost(model, tuple(stages), rates, len(trials))

