"""The memory plan as a table: a row per model and stage, then what to change where a stage does not fit."""

from __future__ import annotations

from collections.abc import Sequence

from ray_prune.core.memory.plan import ModelPlan


def format_plan_table(plans: Sequence[ModelPlan]) -> str:
    """One row per model and stage: model, stage, precision, GPUs per trial, the settings the plan changed (a column
    only when some plan changed one), estimated peak GiB per GPU, fits; then the fix of every stage that does not
    fit, with how much more memory it needs."""
    adjusted = any(c.settings_text() for plan in plans for c in plan.choices)
    rows = [("model", "stage", "precision", "GPUs") + (("settings changed",) if adjusted else ()) +
            ("est. peak GiB", "fits")]
    fixes = []
    for plan in plans:
        for c in plan.choices:
            rows.append((plan.model, c.stage, c.precision, str(c.gpus)) + ((c.settings_text() or "-",) if adjusted
                                                                           else ()) +
                        (f"{c.estimate.peak_gib:.1f}", "yes" if c.fits else f"no (+{c.short_gib:.1f})"))
            if not c.fits:
                fixes.append(f"  {plan.model} {c.stage}: {c.fix}")
    left = 5 if adjusted else 3  # left-aligned text columns
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(widths[i]) if i < left and i != 3 else v.rjust(widths[i]) for i, v in enumerate(r))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if plans:
        p = plans[0]
        lines.append(f"GPUs of {p.gpu_gib:g} GiB, {p.gpus_per_node} per node, {p.headroom:.0%} left free; trial "
                     "stages sized for the smallest n of each model's grid; GPUs = per profile actor or trial")
    if adjusted:
        lines.append("settings changed: what the plan changed so that the stage fits (ModelPlan.adjustments; the "
                     "sweep must run the model's cells with them); 'no (+X)': X GiB more than the GPU leaves usable")
    if fixes:
        lines += ["fixes:"] + fixes
    return "\n".join(lines)
