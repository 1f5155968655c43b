"""The cost plan of an experiment: ``core.cost`` for each model's cells as the grid runs them, at default or probed
rates, for ``ray-prune sweep --check``.

Cells are the plan's (``grid.expand``): fraction 0 is one cell shared by the strategies, and one cell per pruned
model owns its unhealed row (``eval.unhealed: loss`` scores only the C4 loss there). Stage 1 computes each distance
table and greedy order the cells need once (``grid.stage1_need``). Every cell is counted as a trial
of its own, although a sweep folds cells whose layers turn out identical (the same blocks chosen by two strategies)
into one trial: that is known only once the distance table exists, so the plan is an upper bound there. A model's
trials hold the GPUs its memory plan gives them (one where there is no memory plan), for all their stages, and run
with the settings the memory plan changed (``ModelPlan.adjustments``: gradient checkpointing adds its recompute).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.cost import (
    DEFAULT_GPU,
    ModelCost,
    Rates,
    Stage1Work,
    TrialWork,
    default_rates,
    gpu_type_for,
    model_cost,
)
from ray_prune.core.memory import Workload, adjust_heal, apply_adjustments
from ray_prune.sweep.experiment import Experiment
from ray_prune.sweep.grid import Cell
from ray_prune.sweep.memory_plan import workload

if TYPE_CHECKING:
    from ray_prune.sweep.plan import Plan


def trial_work(exp: Experiment, cell: Cell, heal_adjustments: Mapping[str, Any] | None = None) -> TrialWork:
    """What ``trial.run_cell`` does for ``cell``: its kept blocks, its heal (with the memory plan's heal adjustments:
    gradient checkpointing recomputes), its unhealed row if it owns one, its repair, and its loads: another where it
    heals in another precision than it is scored in, and where a repaired NF4 cell reloads its repaired model."""
    unhealed = exp.eval.unhealed if cell.owns_unhealed else False
    heal = adjust_heal(cell.heal_config(), heal_adjustments or {}) if cell.heals else None
    repaired = cell.repair != "none"
    loads = 1 + int(heal is not None and cell.scored_as != heal.quantize) + int(repaired and cell.scored_as == "nf4")
    return TrialWork(kept=cell.num_layers - cell.n, heal=heal, unhealed=unhealed, loads=loads,
                     repair=CalibrationConfig.from_dict(cell.calibration) if repaired else None)


def stage1_work(cells: list[Cell]) -> list[Stage1Work]:
    """What a model's profile actor computes for ``cells`` (``profile_stage``): each distance table and greedy order
    they need, once, a greedy order for as many rounds as its deepest cell removes."""
    from ray_prune.sweep.grid import stage1_need
    from ray_prune.sweep.plan import need_key

    wanted: dict[tuple[str, str], list] = {}
    for c in cells:
        need = stage1_need(c)
        if need is not None:
            entry = wanted.setdefault(need_key(need), [need[1], 0])
            entry[1] = max(entry[1], c.n)
    return [Stage1Work(kind, CalibrationConfig.from_dict(cal), rounds if kind == "order" else 0)
            for (kind, _), (cal, rounds) in wanted.items()]


def gpu_type(exp: Experiment, gpu: str | None = None, gpu_memory_gb: float | None = None) -> str:
    """The GPU type to price with: the one named, else the one the memory size identifies (``--gpu-memory-gb``, else
    ``resources.gpu_memory_gb``), else :data:`~ray_prune.core.cost.DEFAULT_GPU`."""
    return gpu or gpu_type_for(gpu_memory_gb or exp.resources.gpu_memory_gb) or DEFAULT_GPU


@dataclass
class CostPlan:
    """Each model's cost, and what the plan could not do as asked (a probe that failed, tasks without measured
    lengths)."""

    costs: list[ModelCost]
    gpu: str
    notes: list[str] = field(default_factory=list)


def plan_costs(p: Plan, gpu: str, probe: bool = False, force: bool = False) -> CostPlan:
    """The cost of every model's cells in ``p`` at ``gpu``'s default rates, or (``probe``) at rates measured here by
    ``core.probe.probe`` (cached; ``force`` measures again). A model whose probe fails is priced at the defaults,
    and a note says why."""
    exp = p.experiment
    base = default_rates(gpu)
    gpus = {m.model: m for m in p.memory}
    out = CostPlan([], gpu)
    for spec in exp.models:
        record = p.models[spec.name]
        plan = gpus.get(spec.name)
        adjusted = plan.adjustments if plan is not None else {}
        w = apply_adjustments(workload(exp, spec), adjusted)  # as the memory plan runs it
        rates = base
        if probe:
            rates = _probed(spec.name, w, exp, base, out.notes, force)
        cells = [c for c in p.cells if c.model == spec.name]
        trials = [trial_work(exp, c, adjusted.get("heal")) for c in cells]
        out.costs.append(model_cost(spec.name, record.arch, w, trials, rates, plan.profile_gpus if plan else 1,
                                    plan.trial_gpus if plan else 1, stage1_work(cells), len(exp.precisions(spec))))
    unmeasured = sorted({f"{n} {k}-shot" for n, k in exp.eval.config().shots().items()
                         if (n, k) not in _measured()})
    if unmeasured:
        out.notes.append(f"no measured request lengths for {', '.join(unmeasured)}: counted with the fallback of "
                         "core.cost.fallback_task_tokens")
    return out


def _measured() -> set[tuple[str, int]]:
    from ray_prune.core.cost import TASK_TOKENS

    return set(TASK_TOKENS)


def _probed(model: str, w: Workload, exp: Experiment, base: Rates, notes: list[str], force: bool) -> Rates:
    """``base`` with the kinds ``core.probe.probe`` measured here for ``model``, at the trials' CPU threads."""
    import torch

    from ray_prune.core.probe import probe
    from ray_prune.errors import UserError

    threads = torch.get_num_threads()
    cpus = exp.resources.cpus_per_trial
    if not torch.cuda.is_available() and isinstance(cpus, int):
        torch.set_num_threads(cpus)  # a CPU trial runs with cpus_per_trial threads
    try:
        result = probe(model, w, force=force, trust_remote_code=next(
            m.trust_remote_code for m in exp.models if m.name == model))
    except (UserError, OSError, RuntimeError, ValueError) as e:
        notes.append(f"{model}: probe failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); priced at "
                     f"the {base.device} defaults")
        return base
    finally:
        torch.set_num_threads(threads)
    notes.append(f"{model}: rates {'read from' if result.cached else 'measured and cached in'} {result.path} "
                 f"({result.device}, {result.precision}, measured {result.measured_at})")
    return base.with_measured(result.rates, result.device, result.how)
