"""The settings a plan may change so that a stage fits, which change memory but not the method, and applying them.

:func:`heal_candidates` and :func:`batch_candidates` list what a plan tries, in order; :func:`adjust_heal` and
:func:`apply_adjustments` apply a plan's choice (``ModelPlan.adjustments``) to the settings a sweep runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.workload import Workload
from ray_prune.errors import UserError

OPTIMIZER_8BIT = "paged_adamw_8bit"  # heal.optimizer's low-memory choice (core.heal.config)
# The settings sections a stage's memory depends on, which an adjustment may change.
SECTIONS: dict[str, tuple[str, ...]] = {"profile": ("eval", "calibration"), "unhealed": ("eval",), "heal": ("heal",),
                                        "healed": ("eval",)}
Adjustments = dict[str, dict[str, Any]]  # section -> {setting: value}, e.g. {"eval": {"batch_size": 4}}


def adjust_heal(heal: HealConfig, values: Mapping[str, Any]) -> HealConfig:
    """``heal`` with a plan's heal adjustments: ``batch_size`` caps the micro-batch and ``grad_accum`` follows, so
    the sequences per step stay the same (the paper's 16 x 1024 tokens); the other values are set as they are."""
    out = replace(heal, **{k: v for k, v in values.items() if k not in ("batch_size", "grad_accum")})
    if "batch_size" in values:
        b = min(int(values["batch_size"]), heal.batch_size)
        total = heal.sequences_per_step
        if total % b:
            raise UserError(f"a micro-batch of {b} does not divide the {total} sequences of a heal step",
                            "use a micro-batch that divides heal.batch_size x heal.grad_accum")
        out = replace(out, batch_size=b, grad_accum=total // b)
    return out


def apply_adjustments(workload: Workload, adjustments: Mapping[str, Mapping[str, Any]]) -> Workload:
    """The workload with a plan's adjustments (:attr:`ModelPlan.adjustments`) applied."""
    if not adjustments:
        return workload
    heal = tuple(adjust_heal(h, adjustments.get("heal", {})) for h in workload.heal)
    return replace(workload, heal=heal, evaluation=replace(workload.evaluation, **adjustments.get("eval", {})),
                   calibration=replace(workload.calibration, **adjustments.get("calibration", {})))


def heal_candidates(workload: Workload) -> list[Adjustments]:
    """The heal settings a plan tries when the experiment's do not fit, in order, each keeping the sequences per
    step: smaller micro-batches with gradient accumulation (largest first); then gradient checkpointing (about a
    third more compute), largest micro-batch first; then, with checkpointing, the 8-bit paged optimizer."""
    totals = {h.sequences_per_step for h in workload.heal}
    largest = max(h.batch_size for h in workload.heal)
    sizes = [d for d in range(largest, 0, -1) if all(t % d == 0 for t in totals)]

    def values(b: int, **extra: Any) -> Adjustments:
        out: dict[str, Any] = {}
        if b < largest:
            out["batch_size"] = b
            if len(totals) == 1:
                out["grad_accum"] = next(iter(totals)) // b
        return {"heal": {**out, **extra}}

    out = [values(b) for b in sizes if b < largest]
    checkpointing = {} if all(h.gradient_checkpointing for h in workload.heal) else {"gradient_checkpointing": True}
    if checkpointing:
        out += [values(b, **checkpointing) for b in sizes]
    if not all(h.optimizer == OPTIMIZER_8BIT for h in workload.heal):
        out += [values(b, **checkpointing, optimizer=OPTIMIZER_8BIT) for b in sizes]
    return out


def batch_candidates(workload: Workload, stage: str) -> list[Adjustments]:
    """Smaller evaluation batches (and, for ``profile``, calibration batches), largest first: they change memory and
    speed, not the result."""
    ev, cal = workload.evaluation.batch_size, workload.calibration.batch_size
    out = []
    for be in range(ev, 0, -1):
        for bc in (range(cal, 0, -1) if stage == "profile" else [cal]):
            if (be, bc) != (ev, cal):
                out.append({k: v for k, v in (("eval", {"batch_size": be}), ("calibration", {"batch_size": bc}))
                            if v["batch_size"] != (ev if k == "eval" else cal)})
    return out
