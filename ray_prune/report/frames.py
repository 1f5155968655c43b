"""From result rows to the numbers the figures and tables show.

Every public function takes a DataFrame of result rows (``load_results``, or a hand-made
frame with any subset of the columns) and passes it through :func:`conformed` first, so every
column of :data:`~ray_prune.ledger.schema.ROW_SCHEMA` is present from then on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.core.select import STRATEGIES
from ray_prune.ledger.schema import AXIS_COLUMNS, conform_frame, metric_column

_ROUND = 10  # fractions are compared after rounding to this many decimals


def conformed(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """``df`` with every column of the row schema (null where it had none); None stays None."""
    return None if df is None else conform_frame(df)


def has_values(column: pd.Series) -> bool:
    """Whether a column holds at least one number."""
    return bool(pd.to_numeric(column, errors="coerce").notna().any())


def stage_rows(df: pd.DataFrame, stage: str, status: str | None = "finished") -> pd.DataFrame:
    keep = df["stage"] == stage
    if status is not None:
        keep &= df["status"] == status
    return df[keep]


def fraction_key(x: float) -> float:
    return round(float(x), _ROUND)


def fractions_removed(df: pd.DataFrame) -> pd.Series:
    """n/L for each row (``fraction_removed``, recomputed where it is null)."""
    f = pd.to_numeric(df["fraction_removed"], errors="coerce")
    f = f.fillna(pd.to_numeric(df["n"], errors="coerce") / pd.to_numeric(df["num_layers"], errors="coerce"))
    return f.map(lambda v: fraction_key(v) if pd.notna(v) else v)


def as_text(values: pd.Series) -> pd.Series:
    """Each value as ``str()`` writes it, null included ("None", "nan"): a key that compares and sorts."""
    return values.map(str)


def heal_setting_keys(df: pd.DataFrame, keys: Iterable[str] = AXIS_COLUMNS) -> pd.Series:
    """Each row's heal setting (the values of ``keys``) as one text key."""
    return df[list(keys)].map(str).agg("|".join, axis=1)


_SCORES: dict[str, str] = {metric_column(name, m): name for name, spec in TASKS.items() for m in spec.metrics}


def task_of(column: str) -> str:
    """``mmlu_acc`` -> ``mmlu``, ``arc_challenge_acc_norm`` -> ``arc_challenge``, ``gsm8k_exact_match_strict`` ->
    ``gsm8k``: the registry's score columns by name, any other ``*_acc``/``*_acc_norm`` by its suffix."""
    if column in _SCORES:
        return _SCORES[column]
    for suffix in ("_acc_norm", "_acc"):
        if column.endswith(suffix):
            return column[: -len(suffix)]
    return column


def score_column(df: pd.DataFrame, metric: str) -> str:
    """The score column of a task name (``mmlu`` -> ``mmlu_acc``, ``gsm8k`` -> ``gsm8k_exact_match_strict``: the
    task's main metric where it has values, else its other metrics), or ``metric`` itself; a KeyError where none
    of them has a value."""
    df = conformed(df)
    spec = TASKS.get(metric)
    own = [metric_column(metric, m) for m in (spec.main_metric, *spec.metrics)] if spec else []
    candidates = [metric] + own + [f"{metric}_acc", f"{metric}_acc_norm"]
    for c in candidates:
        if c in df.columns and has_values(df[c]):
            return c
    with_values = [c for c in df.columns if (c in _SCORES or c.endswith(("_acc", "_acc_norm"))) and has_values(df[c])]
    raise KeyError(f"no results for metric {metric!r} (metrics with results: {', '.join(with_values) or 'none'})")


def available_metrics(df: pd.DataFrame) -> list[str]:
    """The score column of every task that has at least one value (QA accuracy, GSM8K's exact match), in the
    task registry's order."""
    df = conformed(df)
    tasks = {task_of(c) for c in df.columns if (c in _SCORES or c.endswith("_acc")) and has_values(df[c])}
    ordered = [t for t in TASKS if t in tasks] + sorted(tasks - set(TASKS))
    return [score_column(df, t) for t in ordered]


def metric_label(column: str) -> str:
    task = task_of(column)
    name = TASKS[task].label if task in TASKS else task
    if column.endswith("_acc_norm"):
        kind = "accuracy, length-normalised"
    elif "exact_match" in column:
        kind = "exact match" + (f" ({column.rsplit('_', 1)[-1]})" if column.endswith(("_strict", "_flexible")) else "")
    else:
        kind = "accuracy"
    return f"{name} {kind}"


def order_strategies(strategies: Iterable) -> list[str]:
    """similarity, deepest, then any other strategy alphabetically."""
    known = list(STRATEGIES)
    return sorted({s for s in strategies if isinstance(s, str) and s},
                  key=lambda s: (known.index(s) if s in known else len(known), s))


def select_healed(df: pd.DataFrame) -> pd.DataFrame:
    """The finished healed rows that represent each (model, strategy, n) point.

    Where a point has several heal settings, only the rows of the setting with the lowest
    mean ``heal_val_loss`` are kept (all its seeds); ties and missing losses keep the first
    setting in sorted order.
    """
    healed = stage_rows(conformed(df), "healed")
    if healed.empty:
        return healed
    keep = []
    for _, g in healed.groupby(["model", "strategy", "n"], sort=True, dropna=False):
        settings = heal_setting_keys(g)
        if settings.nunique() > 1:
            loss = pd.to_numeric(g["heal_val_loss"], errors="coerce")
            score = loss.groupby(settings).mean().sort_index()
            best = score.idxmin() if score.notna().any() else score.index[0]
            g = g[settings == best]
        keep.append(g)
    return pd.concat(keep)


def _mean_se(values: pd.Series, errors: pd.Series) -> tuple[float, float]:
    v = pd.to_numeric(values, errors="coerce")
    e = pd.to_numeric(errors, errors="coerce")
    ok = v.notna()
    if not ok.any():
        return math.nan, math.nan
    v, e = v[ok], e[ok]
    se = float(np.sqrt((e ** 2).sum()) / len(e)) if e.notna().all() else math.nan
    return float(v.mean()), se


def metric_points(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per plotted point: model, strategy, stage, n, num_layers, fraction_removed, value, stderr, rows.

    Baseline rows become one point per model with strategy ``None`` at fraction 0.
    """
    df = conformed(df)
    se_col = f"{column}_stderr"  # not every metric has one (the C4 loss has none)
    cols = ["model", "strategy", "stage", "n", "num_layers", "fraction_removed", "value", "stderr", "rows"]
    if df.empty or column not in df.columns:
        return pd.DataFrame(columns=cols)
    out = []
    frames = {"baseline": stage_rows(df, "baseline"), "unhealed": stage_rows(df, "unhealed"),
              "healed": select_healed(df)}
    for stage, sel in frames.items():
        if sel.empty:
            continue
        sel = sel.assign(_f=fractions_removed(sel))
        baseline = stage == "baseline"
        for key, g in sel.groupby(["model"] if baseline else ["model", "strategy", "n"], sort=True, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            value, se = _mean_se(g[column], g[se_col] if se_col in g.columns else pd.Series(np.nan, index=g.index))
            if math.isnan(value):
                continue
            out.append({"model": key[0], "strategy": None if baseline else key[1], "stage": stage,
                        "n": 0 if baseline else int(key[2]),
                        "num_layers": pd.to_numeric(g["num_layers"], errors="coerce").max(),
                        "fraction_removed": 0.0 if baseline else float(g["_f"].iloc[0]),
                        "value": value, "stderr": se, "rows": len(g)})
    return pd.DataFrame(out, columns=cols)


def expected_grid(df: pd.DataFrame, expected: pd.DataFrame | None = None) -> dict[tuple[str, str], list[float]]:
    """(model, strategy) -> sorted fractions removed (> 0) that the sweep should have: from the
    experiment's cells where given (``expected``), plus every pruned row that exists."""
    df, expected = conformed(df), conformed(expected)
    grid: dict[tuple[str, str], set[float]] = {}
    pruned = df[df["stage"].isin(["unhealed", "healed"])]
    for src in [s for s in (expected, pruned) if s is not None and len(s)]:
        for model, strategy, frac in zip(src["model"], src["strategy"], fractions_removed(src)):
            if pd.notna(frac) and frac > 0 and isinstance(strategy, str):
                grid.setdefault((model, strategy), set()).add(fraction_key(frac))
    return {k: sorted(v) for k, v in grid.items()}
