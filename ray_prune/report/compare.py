"""Methods compared on equal terms: per model and fraction, every (strategy, repair, healed or not) cell against
the paper's method (similarity + heal) on the same questions, with the cost of each.

The paired difference of two rows scored on the same questions (``core.evaluation.paired``) has a standard error
from the per-question differences, several times smaller than the unpaired one when most questions are answered
alike; so a method that is one point better can be told from noise with the same number of questions. The C4
loss needs no pairing: every row of a model is scored on the same held-out blocks. Cost is what the row's trial
measured (device-seconds where it ran on GPUs, CPU wall seconds otherwise), counted as what it takes to get that
row alone: for an unhealed row, the trial's load, prune and repair (``load_s``) and the row's evaluation; for a
healed row, the whole trial less the unhealed evaluation it also ran.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ray_prune.core.evaluation.paired import paired_difference
from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.report.frames import conformed, fraction_key, fractions_removed

REFERENCE = ("similarity", "none", "healed")  # the paper's method: similarity, no training-free repair, healed


def method_label(strategy: Any, repair: Any) -> str:
    """How a method reads in tables and legends: ``similarity``, ``greedy + linear``."""
    strategy = str(strategy) if isinstance(strategy, str) else "?"
    return strategy if not isinstance(repair, str) or repair in ("", "none") else f"{strategy} + {repair}"


def _seconds(row: pd.Series | None, col: str) -> float:
    v = pd.to_numeric(pd.Series([None if row is None else row.get(col)]), errors="coerce").iloc[0]
    return float(v) if pd.notna(v) else math.nan


def row_costs(rows: pd.DataFrame) -> dict[tuple[str, str], float]:
    """``{(cell_id, stage): seconds}``: what getting each unhealed or healed row alone cost (see the module's
    docstring), in device-seconds where the trial ran on GPUs (``gpu_s / wall_s`` of the healed row scales wall
    seconds), else in wall seconds. NaN where the rows lack the timings."""
    out: dict[tuple[str, str], float] = {}
    healed = {r["cell_id"]: r for _, r in rows[rows["stage"] == "healed"].iterrows()}
    unhealed = {r["cell_id"]: r for _, r in rows[rows["stage"] == "unhealed"].iterrows()}
    # A trial writes its unhealed row under the pruned model's own id (``unhealed_id``: shared by the heal settings
    # of one pruned model), its healed row under the cell's.
    trial_of = {h.get("unhealed_id"): h for h in healed.values() if isinstance(h.get("unhealed_id"), str)}
    for cell, h in healed.items():
        u = unhealed.get(h.get("unhealed_id"))
        wall, gpu = _seconds(h, "wall_s"), _seconds(h, "gpu_s")
        scale = gpu / wall if gpu > 0 and wall > 0 else 1.0
        out[(cell, "healed")] = (wall - (_seconds(u, "eval_s") if u is not None else 0.0)) * scale
    for cell, u in unhealed.items():
        h = trial_of.get(cell)
        wall, gpu = _seconds(h, "wall_s"), _seconds(h, "gpu_s")
        scale = gpu / wall if gpu > 0 and wall > 0 else 1.0
        out[(cell, "unhealed")] = (_seconds(h, "load_s") + _seconds(u, "eval_s")) * scale
    return out


def row_records(questions: pd.DataFrame, cell_id: str, stage: str) -> list[dict]:
    """The per-question records of one row: a cell's unhealed and healed rows answer the same questions apart."""
    from ray_prune.ledger.questions import records_of

    if not len(questions):
        return []
    return records_of(questions[(questions["cell_id"] == cell_id) & (questions["stage"] == stage)])


def method_comparison(df: pd.DataFrame, questions: pd.DataFrame | None = None,
                      reference: tuple[str, str, str] = REFERENCE) -> pd.DataFrame:
    """One row per (model, n, method, stage) with a finished row: its C4 loss / ln V, each task's main score,
    and where the reference method has a row at the same (model, n), the paired difference from it and that
    difference's standard error (from ``questions``, the per-question outputs; NaN without them), and the cost."""
    df = conformed(df)
    rows = df[df["stage"].isin(["unhealed", "healed"]) & (df["status"] == "finished")].copy()
    if rows.empty:
        return pd.DataFrame()
    rows["repair"] = rows["repair"].where(rows["repair"].notna(), "none") if "repair" in rows else "none"
    rows["_f"] = fractions_removed(rows)
    questions = questions if questions is not None else pd.DataFrame()
    tasks = [t for t in TASKS if f"{t}_{TASKS[t].main_metric}" in rows
             and rows[f"{t}_{TASKS[t].main_metric}"].notna().any()]
    costs = row_costs(rows)
    out = []
    for (model, n), group in rows.groupby(["model", "n"], sort=True):
        ref = group[(group["strategy"] == reference[0]) & (group["repair"] == reference[1])
                    & (group["stage"] == reference[2])]
        ref = ref.iloc[0] if len(ref) else None
        ref_records = row_records(questions, ref["cell_id"], ref["stage"]) if ref is not None else []
        for _, r in group.iterrows():
            entry: dict[str, Any] = {"model": model, "n": int(n), "fraction_removed": fraction_key(r["_f"]),
                                     "method": method_label(r["strategy"], r["repair"]), "stage": r["stage"],
                                     "c4_loss_norm": r["c4_loss_norm"],
                                     "cost_s": costs.get((r["cell_id"], r["stage"]), math.nan),
                                     "is_reference": ref is not None and r["cell_id"] == ref["cell_id"]}
            if ref is not None:
                entry["c4_loss_norm_diff"] = r["c4_loss_norm"] - ref["c4_loss_norm"]
            records = row_records(questions, r["cell_id"], r["stage"]) if ref_records else []
            for t in tasks:
                metric = TASKS[t].main_metric
                entry[t] = r[f"{t}_{metric}"]
                if ref is None or pd.isna(r[f"{t}_{metric}"]):
                    continue
                entry[f"{t}_diff"] = r[f"{t}_{metric}"] - ref[f"{t}_{metric}"]
                try:
                    paired = paired_difference(ref_records, records, t, metric)
                    entry[f"{t}_diff_se"] = paired.stderr
                except (ValueError, KeyError):
                    entry[f"{t}_diff_se"] = math.nan  # not the same questions, or none stored
            out.append(entry)
    table = pd.DataFrame(out)
    return table.sort_values(["model", "n", "stage", "method"], kind="stable").reset_index(drop=True)


def plot_quality_cost(table: pd.DataFrame, ax=None, colors: dict[str, str] | None = None):
    """Quality against cost: each (model, fraction, method, stage) as a point, x = measured cost (log scale), y =
    its C4 loss / ln V (lower is better); healed filled, unhealed hollow; one marker shape per method."""
    from ray_prune.report.style import model_colors, new_axes, style_context

    ax = new_axes(ax, figsize=(8.6, 5.0))
    if table.empty:
        return ax.figure
    colors = colors or model_colors(table["model"].unique())
    methods = sorted(table["method"].unique())
    markers = dict(zip(methods, "osD^vP*Xh<>p"))
    with style_context():
        for (model, method, stage), g in table.groupby(["model", "method", "stage"]):
            filled = stage == "healed"
            ax.scatter(g["cost_s"], g["c4_loss_norm"], marker=markers[method], s=46,
                       facecolors=colors[model] if filled else "white", edgecolors=colors[model], linewidths=1.4,
                       label=f"{method} ({stage})")
            for _, r in g.iterrows():
                ax.annotate(f"{r['fraction_removed']:.0%}", (r["cost_s"], r["c4_loss_norm"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points", color="#555555")
        if np.isfinite(table["cost_s"]).any() and (table["cost_s"] > 0).any():
            ax.set_xscale("log")
        ax.set_xlabel("measured cost of the row (device-seconds; CPU wall seconds on a CPU)")
        ax.set_ylabel("C4 loss / ln V (lower is better)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return ax.figure
