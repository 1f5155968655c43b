"""What to change where no option fits a stage: the fix a plan prints beside it, in the settings' own words."""

from __future__ import annotations

from dataclasses import replace

from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.arch import Arch
from ray_prune.core.memory.stages import Order, estimate, options
from ray_prune.core.memory.workload import Workload


def heal_fix(arch: Arch, workload: Workload, gpu_gib: float, headroom: float, n_removed: int) -> str:
    """Per heal point: the largest micro-batch that fits with the same sequences per step, without and with
    gradient checkpointing (which costs about a third more compute)."""
    def ok(h: HealConfig) -> bool:
        return estimate(arch, replace(workload, heal=(h,)), "heal", "auto", 1, n_removed).fits(gpu_gib, headroom)

    fixes = []
    for h in workload.heal:
        total = h.sequences_per_step
        found = []
        for ckpt in ([True] if h.gradient_checkpointing else [False, True]):
            for b in sorted((d for d in range(1, total + 1) if total % d == 0), reverse=True):
                if ok(replace(h, batch_size=b, grad_accum=total // b, gradient_checkpointing=ckpt)):
                    found.append((b, ckpt))
                    break
        if len(found) == 2 and found[1][0] <= found[0][0]:
            found = found[:1]  # checkpointing buys no larger micro-batch
        if found:
            fixes += [f"heal: {{batch_size: {b}, grad_accum: {total // b}"
                      + (", gradient_checkpointing: true}" if ckpt else "}") for b, ckpt in found]
        elif h.quantize != "nf4" and ok(replace(h, quantize="nf4", batch_size=1, grad_accum=total,
                                                gradient_checkpointing=True)):
            fixes.append("heal: {quantize: nf4} (with a smaller batch_size and gradient_checkpointing)")
        else:
            fixes.append("no micro-batch fits: use GPUs with more memory or a shorter heal.seq_len")
    return " or ".join(dict.fromkeys(fixes))


def batch_fix(arch: Arch, workload: Workload, stage: str, gpu_gib: float, gpus_per_node: int, headroom: float,
              n_removed: int, order: Order) -> str:
    """Evaluation and profiling: the largest batch sizes (both lowered together for profile) that make it fit."""
    ev, cal = workload.evaluation, workload.calibration
    top = max(ev.batch_size, cal.batch_size if stage == "profile" else 1)
    for b in range(top - 1, 0, -1):
        w = replace(workload, evaluation=replace(ev, batch_size=min(ev.batch_size, b)),
                    calibration=replace(cal, batch_size=min(cal.batch_size, b)) if stage == "profile" else cal)
        for p, g in options(stage, w, gpus_per_node, order):
            if estimate(arch, w, stage, p, g, n_removed).fits(gpu_gib, headroom):  # type: ignore[arg-type]
                changed = [f"calibration.batch_size: {w.calibration.batch_size}"] \
                    if w.calibration.batch_size != cal.batch_size else []
                if w.evaluation.batch_size != ev.batch_size:
                    changed.append(f"eval.batch_size: {w.evaluation.batch_size}")
                where = p if p != "auto" else "full precision"
                return ", ".join(changed) + f" (then {where} on {g} GPU" + ("s)" if g > 1 else ")")
    return "the weights do not fit: use GPUs with more memory, or more of them per node"
