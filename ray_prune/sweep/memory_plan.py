"""The memory plan of an experiment: ``core.memory``'s estimates for each of its models, at its settings.

The estimates are pure functions of a config and a :class:`~ray_prune.core.memory_terms.Workload`; this
module builds the workload from an experiment and plans every model, so ``ray-prune sweep --check`` can
print the plan and refuse, and the sweep can give each model's trials the GPUs the plan says they need.
"""

from __future__ import annotations

from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory import HEADROOM, Arch, ModelPlan, Order, choose
from ray_prune.core.memory_terms import Workload
from ray_prune.sweep.experiment import Experiment, ModelSpec


def workload(exp: Experiment, spec: ModelSpec) -> Workload:
    """The batch and sequence settings that size each stage of ``spec``'s cells."""
    from ray_prune.core.evaluation.tasks import TASKS

    points = exp.heal_points(spec)
    names = {f.name for f in HealConfig.settings()}
    heal = tuple(HealConfig(**{k: v for k, v in p.items() if k in names}, dtype=exp.dtype) for p in points)
    tasks = tuple((name, TASKS[name].shots if t.shots is None else t.shots) for name, t in exp.eval.tasks.items())
    cal, ev = exp.calibration, exp.eval
    return Workload(dtype=exp.dtype, calibration_batch=cal.batch_size, calibration_length=cal.max_length,
                    calibration_samples=cal.samples,
                    metric=cal.metric, eval_batch=ev.batch_size, eval_seq_len=ev.seq_len,
                    c4_sequences=ev.c4_sequences, tasks=tasks, heal=heal,
                    heals=any(p.get("enabled", True) for p in points), unhealed=ev.unhealed,
                    eval_precision=ev.precision)


def plan_models(exp: Experiment, gpu_gib: float, gpus_per_node: int = 8, order: Order = "one_gpu",
                headroom: float = HEADROOM) -> list[ModelPlan]:
    """:func:`choose` for every model of an experiment (configs via ``load_config``; no weights, no GPU), the
    trial stages sized for the smallest n of each model's grid."""
    from ray_prune.core.model_configs import load_config
    from ray_prune.core.select import n_from_fraction

    plans = []
    for spec in exp.models:
        loaded = load_config(spec.name, spec.trust_remote_code)
        arch = Arch.from_config(loaded.config)
        n_min = min(n_from_fraction(f, arch.layers) for f in exp.fraction_values())
        plans.append(choose(arch, workload(exp, spec), gpu_gib, gpus_per_node, spec.name, n_min,
                            order=order, headroom=headroom, config_source=loaded.source))
    return plans


