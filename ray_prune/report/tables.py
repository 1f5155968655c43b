"""The report's two tables of numbers: how much can be dropped safely (:func:`safe_fractions`), and what the
sweep cost (:func:`cost_table`)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ray_prune.ledger.schema import AXIS_COLUMNS, heal_column
from ray_prune.report.frames import (as_text, available_metrics, conformed, expected_grid, fraction_key,
                                     fractions_removed, metric_points, score_column)

# ----------------------------------------------------------------------------- safely removable fraction


def _healed_states(df: pd.DataFrame) -> dict[tuple, set]:
    """(model, strategy, fraction) -> the statuses of its healed rows: why a grid point may have no healed score."""
    healed = df[df["stage"] == "healed"]
    states: dict[tuple, set] = {}
    for m, st, f, status in zip(healed["model"], healed["strategy"], fractions_removed(healed), healed["status"]):
        states.setdefault((m, st, f), set()).add(status)
    return states


def _why_missing(seen: set) -> str:
    if "failed" in seen:
        return "failed"
    if "stopped" in seen:
        return "every heal setting stopped early"
    return "not evaluated" if "finished" in seen else "not run"


def _num_layers(df: pd.DataFrame, expected: pd.DataFrame | None, model: str) -> int | None:
    nums = pd.to_numeric(df.loc[df["model"] == model, "num_layers"], errors="coerce").dropna()
    if expected is not None and nums.empty:
        nums = pd.to_numeric(expected.loc[expected["model"] == model, "num_layers"], errors="coerce").dropna()
    return int(nums.iloc[0]) if len(nums) else None


def _chain(fractions: Sequence[float], values: dict[float, float], floor: float,
           seen: Callable[[float], set]) -> tuple[float, str | None]:
    """The largest fraction up to which every grid fraction scores >= ``floor``, and what ended the chain:
    None (nothing: every fraction qualifies), ``"fail"`` (a score below the floor) or a note (no score)."""
    best = 0.0
    for f in fractions:
        v = values.get(f, math.nan)
        if math.isnan(v):
            return best, f"chain ends at f={f:.3g}: no healed score ({_why_missing(seen(f))})"
        if v < floor - 1e-12:
            return best, "fail"
        best = f
    return best, None


def _safe_row(rec: dict[str, Any], b: float, fractions: Sequence[float], values: dict[float, float],
              tolerances: Sequence[float], seen: Callable[[float], set]) -> dict[str, Any]:
    """``rec`` (model, metric, strategy, num_layers) plus the baseline, the grid, the answer per tolerance, the note."""
    L = rec["num_layers"]
    rec.update(baseline=b * 100 if not math.isnan(b) else math.nan, fractions=" ".join(f"{f:.3g}" for f in fractions))
    notes: dict[str, list[str]] = {}  # note -> tolerances it applies to
    if math.isnan(b):
        notes["no baseline row: cannot compare"] = []
    for k in tolerances:
        name = f"{k:g}pt"
        if math.isnan(b):
            rec[f"f_within_{name}"] = rec[f"n_within_{name}"] = math.nan
            continue
        best, stop = _chain(fractions, values, b - k / 100.0, seen)
        rec[f"f_within_{name}"] = best
        rec[f"n_within_{name}"] = int(round(best * L)) if L else math.nan
        if stop is None and fractions:
            notes.setdefault("every grid fraction qualifies (a lower bound)", []).append(f"{k:g}")
        elif stop is not None and stop != "fail":
            notes.setdefault(stop, []).append(f"{k:g}")
    rec["note"] = "; ".join((f"{'/'.join(ks)} pt: " if ks else "") + text for text, ks in notes.items())
    return rec


def safe_fractions(df: pd.DataFrame, tolerances: Sequence[float] = (1, 2, 5), metrics: Sequence[str] | None = None,
                   expected: pd.DataFrame | None = None) -> pd.DataFrame:
    """The largest fraction of layers that can be dropped while the healed score stays within
    k accuracy points of the unpruned model, per model, metric and strategy.

    Definition (strict and monotone): let b be the baseline (unpruned, stage ``baseline``)
    accuracy and f_1 < f_2 < ... the fractions n/L of the sweep's grid for that model and
    strategy. f_j is safe at tolerance k if the healed accuracy at f_j AND at every smaller
    grid fraction f_i (i <= j) is >= b - k/100 (k points, accuracy in [0, 1]). The table
    gives the largest safe f_j, or 0 if already f_1 fails. A grid fraction without a healed
    result (not run, failed, every heal setting stopped) cannot be certified, so it ends the
    chain like a failing score does; the ``note`` says so. If every grid fraction qualifies
    the answer is a lower bound (the grid ends there), also noted. Healed scores are those of
    :func:`select_healed` (best heal setting on the heal validation loss, mean over seeds).

    Columns: model, metric, strategy, num_layers, baseline (accuracy, %), fractions (the grid),
    then ``f_within_{k}pt`` (fraction) and ``n_within_{k}pt`` (layers) for each k, and ``note``.
    """
    df, expected = conformed(df), conformed(expected)
    ks = [float(k) for k in tolerances]
    tol_cols = [c for k in ks for c in (f"f_within_{k:g}pt", f"n_within_{k:g}pt")]
    grid = expected_grid(df, expected)
    states = _healed_states(df)
    out = []
    for metric in list(metrics) if metrics is not None else available_metrics(df):
        column = score_column(df, metric)
        points = metric_points(df, column)
        base = points[points["stage"] == "baseline"].set_index("model")["value"]
        healed = points[points["stage"] == "healed"]
        for (model, strategy), fractions in sorted(grid.items()):
            sel = healed[(healed["model"] == model) & (healed["strategy"] == strategy)]
            values = {fraction_key(f): v for f, v in zip(sel["fraction_removed"], sel["value"])}
            rec = {"model": model, "metric": column, "strategy": strategy,
                   "num_layers": _num_layers(df, expected, model)}
            out.append(_safe_row(rec, float(base.get(model, math.nan)), fractions, values, ks,
                                 lambda f, key=(model, strategy): states.get((*key, f), set())))
    return pd.DataFrame(out, columns=["model", "metric", "strategy", "num_layers", "baseline", "fractions"]
                        + tol_cols + ["note"])


# ----------------------------------------------------------------------------- cost

COST_STAGES = ("profile", "baseline", "unhealed", "healed", "stopped (est.)", "failed", "total (measured)",
               "total incl. stopped (est.)", "saved by early stopping (est.)")
COST_COLUMNS = ["model", "stage", "rows", "gpu_hours", "cpu_hours", "estimated", "note"]
_MEASURED = ("profile", "baseline", "unhealed", "healed")
_ESTIMATES = ("stopped (est.)", "total incl. stopped (est.)", "saved by early stopping (est.)")


def _entry(model, stage: str, seconds, gpu_count: float, estimated: bool = False) -> dict[str, Any]:
    """One row's time as GPU-seconds (on GPUs) or CPU wall seconds; both NaN where it is unknown."""
    if seconds is None or not np.isfinite(seconds):
        seconds = 0.0 if stage == "failed" else math.nan
    entry = {"model": model, "stage": stage, "rows": 1, "estimated": estimated}
    if math.isnan(seconds):  # unknown: neither kind of hour
        return {**entry, "gpu_s": math.nan, "cpu_s": math.nan}
    on_gpu = gpu_count > 0
    return {**entry, "gpu_s": seconds * gpu_count if on_gpu else 0.0, "cpu_s": 0.0 if on_gpu else seconds}


def _measured(df: pd.DataFrame, wall: pd.Series, gpus: pd.Series) -> list[dict[str, Any]]:
    """The recorded time of profiling, baseline, unhealed and finished healed rows."""
    out = []
    finished = df["status"] == "finished"
    for i in df.index[(df["stage"] == "baseline") & finished]:
        out.append(_entry(df.at[i, "model"], "baseline", wall[i], gpus[i]))
        if pd.notna(df.at[i, "profile_s"]):
            out.append(_entry(df.at[i, "model"], "profile", float(df.at[i, "profile_s"]), gpus[i]))
    unhealed = df[(df["stage"] == "unhealed") & finished]
    for i in unhealed.index:
        out.append(_entry(df.at[i, "model"], "unhealed", wall[i], gpus[i]))
    # A healed row's wall_s covers its whole trial, including the unhealed evaluation if that trial ran it:
    # the earliest finished cell of each pruned model (unhealed_id) is taken to be that trial.
    un_wall = {df.at[i, "unhealed_id"]: wall[i] for i in unhealed.index if pd.notna(df.at[i, "unhealed_id"])}
    owned: set = set()
    for i in df[(df["stage"] == "healed") & finished].sort_values("finished_at", kind="stable").index:
        seconds = wall[i]
        uid = df.at[i, "unhealed_id"]
        if pd.notna(uid) and uid in un_wall and uid not in owned:
            owned.add(uid)
            if pd.notna(un_wall[uid]) and pd.notna(seconds):
                seconds = max(0.0, seconds - un_wall[uid])
        out.append(_entry(df.at[i, "model"], "healed", seconds, gpus[i]))
    return out


def _stopped(df: pd.DataFrame, wall: pd.Series, gpus: pd.Series) -> list[dict[str, Any]]:
    """Estimates for cells ASHA stopped, from finished cells of the same model and heal settings. The learning
    rate does not change the time a step takes, so cells that differ only in it are compared."""
    out = []
    keys = [k for k in AXIS_COLUMNS if k != heal_column("lr")]
    heal_time = pd.to_numeric(df["heal_s"], errors="coerce").fillna(wall)
    finished = df[(df["stage"] == "healed") & (df["status"] == "finished")]
    for i in df.index[(df["stage"] == "healed") & (df["status"] == "stopped")]:
        model = df.at[i, "model"]
        same = finished[finished["model"] == model]
        for k in keys:
            same = same[as_text(same[k]) == str(df.at[i, k])]
        total_steps = pd.to_numeric(pd.Series([df.at[i, "heal_steps"]]), errors="coerce").iloc[0]
        done = pd.to_numeric(pd.Series([df.at[i, "steps_done"]]), errors="coerce").fillna(0.0).iloc[0]
        if same.empty or not (total_steps > 0):
            out.append(_entry(model, "stopped (est.)", math.nan, 0.0, estimated=True))
            out.append(_entry(model, "saved by early stopping (est.)", math.nan, 0.0, estimated=True))
            continue
        mean_heal = float(heal_time[same.index].mean())
        g = float(gpus[same.index].mean())
        done = min(float(done), float(total_steps))
        out.append(_entry(model, "stopped (est.)", done / total_steps * mean_heal, g, estimated=True))
        out.append(_entry(model, "saved by early stopping (est.)", (total_steps - done) / total_steps * mean_heal, g,
                          estimated=True))
    return out


def _stage_part(sub: pd.DataFrame, stage: str) -> pd.DataFrame:
    """The entries a stage of the table sums (empty where the stage has none)."""
    if stage == "total (measured)":
        return sub[sub["stage"].isin(_MEASURED)]
    if stage == "total incl. stopped (est.)":
        part = sub[sub["stage"].isin(_MEASURED + ("stopped (est.)",))]
        return part if (part["stage"] == "stopped (est.)").any() else part.iloc[0:0]
    return sub[sub["stage"] == stage]


def _summary_row(model: str, stage: str, part: pd.DataFrame) -> dict[str, Any]:
    gpu_h = part["gpu_s"].sum(min_count=1) / 3600
    cpu_h = part["cpu_s"].sum(min_count=1) / 3600
    note = ""
    unknown = int((part["gpu_s"].isna() & part["cpu_s"].isna()).sum())
    if stage == "failed":
        gpu_h = cpu_h = math.nan
        note = "time not recorded for failed cells"
    elif unknown and stage in _ESTIMATES:
        note = (f"{unknown} of {len(part)} stopped cell(s) not estimated: no finished cell of the same model "
                "and heal settings to take a heal time from")
    elif unknown:
        note = f"{unknown} row(s) without wall_s"
    counted = part[part["stage"] != "profile"] if stage.startswith("total") else part
    return {"model": model, "stage": stage, "rows": int(counted["rows"].sum()), "gpu_hours": gpu_h,
            "cpu_hours": cpu_h, "estimated": bool(part["estimated"].any()), "note": note}


def cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Compute spent per model and stage, the sweep total, and what early stopping saved.

    Each row's time is GPU-hours (``gpu_s`` / 3600, i.e. wall time x GPUs) where ``gpu_s`` > 0,
    else CPU-hours (``wall_s`` / 3600: wall-clock hours of a trial that ran on CPU, not
    multiplied by its cores). Stages:

    - ``profile``: the distance-table pass (``profile_s`` of the baseline row, on its device).
    - ``baseline``: evaluation of the unpruned model.
    - ``unhealed``: evaluation of each pruned model before healing.
    - ``healed``: finished cells: load, prune, heal and evaluate (a healed row's ``wall_s`` covers
      the whole trial, so the unhealed evaluation that trial ran is subtracted; it is the earliest
      finished cell of its pruned model, which is exact unless that cell was stopped or failed).
    - ``stopped (est.)``: cells ASHA stopped record no time; ESTIMATED as steps_done / heal_steps x
      the mean heal time (``heal_s``, else ``wall_s``) of finished cells of the same model with the
      same heal settings (rank, steps, batch size, sequence length, quantization; the learning rate,
      which does not change the time per step, may differ). Not estimated (blank) where there is none.
    - ``failed``: rows counted, time not recorded.
    - ``total (measured)``: profile + baseline + unhealed + healed (no estimates).
    - ``total incl. stopped (est.)``: that plus the estimated time of the stopped cells (only where
      there are stopped cells).
    - ``saved by early stopping (est.)``: ESTIMATE of the heal time the stopped cells would still
      have needed: (heal_steps - steps_done) / heal_steps x that same mean heal time.

    Rows per model, then the same stages for ``(all models)``. Columns: model, stage, rows,
    gpu_hours, cpu_hours, estimated, note.
    """
    df = conformed(df)
    wall = pd.to_numeric(df["wall_s"], errors="coerce")
    gpu = pd.to_numeric(df["gpu_s"], errors="coerce").fillna(0.0)
    gpus = (gpu / wall.where(wall > 0)).fillna(0.0)  # GPUs the row's trial held
    failed = df.index[(df["stage"] == "healed") & (df["status"] == "failed")]
    entries = _measured(df, wall, gpus) + _stopped(df, wall, gpus) + [
        _entry(df.at[i, "model"], "failed", 0.0, 0.0) for i in failed]
    if not entries:
        return pd.DataFrame(columns=COST_COLUMNS)
    raw = pd.DataFrame(entries)
    out = []
    for model in sorted(raw["model"].unique()) + ["(all models)"]:
        sub = raw if model == "(all models)" else raw[raw["model"] == model]
        for stage in COST_STAGES:
            part = _stage_part(sub, stage)
            if len(part):
                out.append(_summary_row(model, stage, part))
    return pd.DataFrame(out, columns=COST_COLUMNS)


CALIBRATION_COLUMNS = ["model", "n", "setting", "l_star", "removed", "differs"]


def calibration_differences(tables: Mapping[str, Any]) -> pd.DataFrame:
    """For models profiled under several calibration settings: per n, each setting's l*(n) and the block it
    removes, and whether that block differs from the first setting's (the study that finds the calibration data
    moves the choice more than the rule does asks exactly this)."""
    from ray_prune.core.select import best_start

    by_model: dict[str, list[tuple[str, Any]]] = {}
    for label, table in tables.items():
        by_model.setdefault(table.model_id, []).append((label, table))
    rows = []
    for model, entries in sorted(by_model.items()):
        if len(entries) < 2:
            continue
        first_label, first = entries[0]
        for n in range(1, first.num_layers):
            reference = best_start(first, n)
            for label, table in entries:
                if table.num_layers != first.num_layers:
                    continue
                start = best_start(table, n)
                rows.append({"model": model, "n": n, "setting": label, "l_star": start,
                             "removed": f"{start}-{start + n - 1}", "differs": start != reference})
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)
