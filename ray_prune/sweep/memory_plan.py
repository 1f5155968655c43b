"""The memory plan of an experiment: ``core.memory``'s estimates for each of its models, at its settings.

The estimates are pure functions of a config and a :class:`~ray_prune.core.memory.Workload`; this module builds
the workload from an experiment (its settings objects, as they are) and plans every model from the record the
plan already read (``plan.ModelRecord``), so ``ray-prune sweep --check`` can print the plan and refuse, and the
sweep can give each model's trials the GPUs the plan says they need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory import HEADROOM, ModelPlan, Order, Workload, choose
from ray_prune.sweep.experiment import Experiment, ModelSpec

if TYPE_CHECKING:
    from ray_prune.sweep.plan import ModelRecord


def workload(exp: Experiment, spec: ModelSpec) -> Workload:
    """The settings that size each stage of ``spec``'s cells."""
    points = exp.heal_points(spec)
    # the calibration setting with the largest batch sizes the in-memory profile, with the most text the streamed one
    calibration = max((c.config() for c in exp.calibrations()),
                      key=lambda c: (c.batch_size * c.max_length, c.samples * c.max_length))
    return Workload(dtype=exp.dtype, calibration=calibration, evaluation=exp.eval.config(),
                    heal=tuple(HealConfig.from_point(p, dtype=exp.dtype) for p in points),
                    heals=any(p.get("enabled", True) for p in points), unhealed=exp.eval.unhealed,
                    eval_precision=exp.eval.precision)


def plan_models(exp: Experiment, models: dict[str, ModelRecord], gpu_gib: float, gpus_per_node: int = 8,
                order: Order = "one_gpu", headroom: float = HEADROOM, adjust: bool = True) -> list[ModelPlan]:
    """:func:`choose` for every model of an experiment (no weights, no GPU), the trial stages sized for the
    smallest n of each model's grid. ``adjust``: where a stage does not fit as the experiment sets it, the plan
    changes the memory settings that keep the method (micro-batches at the same sequences per step, gradient
    checkpointing, the 8-bit paged optimizer, smaller evaluation and calibration batches) and says so in each
    model's ``ModelPlan.adjustments``, which the model's trials must then run with."""
    from ray_prune.core.select import n_from_fraction

    plans = []
    for spec in exp.models:
        record = models[spec.name]
        n_min = min(n_from_fraction(f, record.num_layers) for f in exp.fraction_values(spec))
        plans.append(choose(record.arch, workload(exp, spec), gpu_gib, gpus_per_node, spec.name, n_min,
                            order=order, headroom=headroom, config_source=record.source, adjust=adjust))
    return plans
