"""The report of a sweep: the paper's figures and tables as a self-contained folder.

``ray-prune report STORAGE [--out DIR]`` (:func:`write_report`) reads a sweep's rows
(:func:`ray_prune.results.load_results`) and distance tables (``tables/*.parquet``)
and writes ``index.html``, one PNG per figure and every table as CSV. It works on
a partial sweep: cells the experiment expects (``experiment.json``) but that have
no result are listed, and figures leave gaps there instead of drawing across them.

Every figure and table is also a plain function of a DataFrame from
``load_results`` (and of :class:`~ray_prune.distance.DistanceTable` objects), so a
notebook can draw them one by one::

    from ray_prune import load_results
    from ray_prune import report
    df = load_results("results/smoke")
    report.plot_metric(df, "mmlu")
    report.safe_fractions(df)

Conventions used by every figure
---------------------------------
- x axis: ``fraction_removed`` = n/L, the fraction of the model's layers actually
  dropped (not the requested fraction, which rounds to n). The unpruned baseline
  row is the point at 0 of every line.
- colour = model; line style and marker shape = strategy (similarity: solid, circles;
  deepest: dashed, squares); filled markers = healed, hollow and fainter = unhealed.
- Points are joined only between neighbouring fractions of the grid that both have a
  result: an expected fraction without a result breaks the line and is marked with
  an ``x`` on the x axis in the model's colour.
- When a point has several finished healed rows (a grid of heal settings, or seeds),
  the heal setting with the lowest mean heal validation loss is shown (chosen on the
  heal validation set, never on the metric plotted), averaged over its seeds; the
  standard error of that mean is sqrt(sum se_i^2) / k.

Definitions of the tables are in the docstrings of :func:`safe_fractions` and
:func:`cost_table`. Ray is never imported; this module needs only pandas, numpy,
pyarrow and matplotlib (torch comes in through ``DistanceTable``).
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ray_prune.errors import UserError
from ray_prune.results import load_results, read_experiment_record, slug
from ray_prune.storage import Storage

# ----------------------------------------------------------------------------- style

STYLE: dict[str, Any] = {
    "font.size": 10.5,
    "axes.titlesize": 11.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 10.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "lines.linewidth": 1.8,
    "lines.markersize": 6,
    "xtick.labelsize": 9.5,
    "ytick.labelsize": 9.5,
}
DPI = 130
# Okabe-Ito: distinguishable with every common colour-vision deficiency, and in greyscale by line style.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999933")
STRATEGY_LINE = {"similarity": "-", "deepest": "--", "layers": ":"}
STRATEGY_MARKER = {"similarity": "o", "deepest": "s", "layers": "^"}
REFERENCE_COLOR = "#555555"
HEAL_KEYS = ("heal_lr", "heal_rank", "heal_steps", "heal_batch_size", "heal_seq_len", "heal_quantize")
TASK_ORDER = ("mmlu", "boolq", "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
TASK_LABEL = {"mmlu": "MMLU", "boolq": "BoolQ", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge",
              "hellaswag": "HellaSwag", "piqa": "PIQA", "winogrande": "WinoGrande"}
_ROUND = 10  # fractions are compared after rounding to this many decimals


@contextmanager
def _style():
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def _new_axes(ax, figsize=(8.0, 4.8)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def short_name(model: str) -> str:
    """A model's display name: the last path component of a local directory, the hub id otherwise."""
    text = str(model).rstrip("/")
    if text.startswith(("/", ".", "~")) or os.sep in text and os.path.isdir(text):
        return os.path.basename(text) or text
    return text


def model_labels(models: Iterable[str]) -> dict[str, str]:
    """Short display names, falling back to the full name where two would collide."""
    models = sorted(set(models))
    short = {m: short_name(m) for m in models}
    counts = pd.Series(list(short.values())).value_counts() if short else pd.Series(dtype=int)
    return {m: (s if counts.get(s, 0) == 1 else m) for m, s in short.items()}


def model_colors(models: Iterable[str]) -> dict[str, str]:
    """One colour per model, stable for a given set of models (sorted order)."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(sorted(set(models)))}


# ----------------------------------------------------------------------------- data helpers


def _col(df: pd.DataFrame, name: str, default=np.nan) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(default, index=df.index, dtype=object if default is None
                                                          else float)


def _rows(df: pd.DataFrame, stage: str, status: str | None = "finished") -> pd.DataFrame:
    if df.empty or "stage" not in df.columns:
        return df.iloc[0:0]
    keep = df["stage"] == stage
    if status is not None:
        keep &= _col(df, "status", None) == status
    return df[keep]


def _fkey(x: float) -> float:
    return round(float(x), _ROUND)


def _fraction(df: pd.DataFrame) -> pd.Series:
    """n/L for each row (``fraction_removed``, recomputed where it is absent)."""
    if "fraction_removed" in df.columns:
        f = pd.to_numeric(df["fraction_removed"], errors="coerce")
    else:
        f = pd.Series(np.nan, index=df.index)
    if "n" in df.columns and "num_layers" in df.columns:
        fill = pd.to_numeric(df["n"], errors="coerce") / pd.to_numeric(df["num_layers"], errors="coerce")
        f = f.fillna(fill)
    return f.map(lambda v: _fkey(v) if pd.notna(v) else v)


def task_of(column: str) -> str:
    """``mmlu_acc`` -> ``mmlu``, ``arc_challenge_acc_norm`` -> ``arc_challenge``."""
    for suffix in ("_acc_norm", "_acc"):
        if column.endswith(suffix):
            return column[: -len(suffix)]
    return column


def _task_spec(task: str):
    try:
        from ray_prune.evaluate import TASKS
    except Exception:  # the report must render even where the evaluation stack cannot be imported
        return None
    return TASKS.get(task)


def metric_column(df: pd.DataFrame, metric: str) -> str:
    """The accuracy column of a task name (``mmlu`` -> ``mmlu_acc``; the task's main metric), or ``metric``."""
    if metric in df.columns:
        return metric
    spec = _task_spec(metric)
    candidates = ([f"{metric}_{spec.main_metric}"] if spec else []) + [f"{metric}_acc", f"{metric}_acc_norm"]
    for c in candidates:
        if c in df.columns:
            return c
    raise KeyError(f"no column for metric {metric!r} in the results (columns: {', '.join(map(str, df.columns))})")


def available_metrics(df: pd.DataFrame) -> list[str]:
    """The accuracy column of every QA task that has at least one value, the paper's tasks first."""
    tasks = {task_of(c) for c in df.columns
             if c.endswith("_acc") and pd.to_numeric(df[c], errors="coerce").notna().any()}
    ordered = [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))
    out = []
    for t in ordered:
        col = metric_column(df, t)
        if pd.to_numeric(df[col], errors="coerce").notna().any():
            out.append(col)
        else:
            out.append(f"{t}_acc")
    return out


def metric_label(column: str) -> str:
    task = task_of(column)
    name = TASK_LABEL.get(task, task)
    kind = "accuracy, length-normalised" if column.endswith("_acc_norm") else "accuracy"
    return f"{name} {kind}"


def _order_strategies(strategies: Iterable) -> list[str]:
    """similarity, deepest, then any other strategy alphabetically."""
    known = list(STRATEGY_LINE)
    return sorted({s for s in strategies if isinstance(s, str) and s},
                  key=lambda s: (known.index(s) if s in known else len(known), s))


def _heal_keys(df: pd.DataFrame) -> list[str]:
    return [k for k in HEAL_KEYS if k in df.columns]


def select_healed(df: pd.DataFrame) -> pd.DataFrame:
    """The finished healed rows that represent each (model, strategy, n) point.

    Where a point has several heal settings, only the rows of the setting with the lowest
    mean ``heal_val_loss`` are kept (all its seeds); ties and missing losses keep the first
    setting in sorted order.
    """
    healed = _rows(df, "healed")
    if healed.empty:
        return healed
    keys = _heal_keys(healed)
    if not keys:
        return healed
    keep = []
    for _, g in healed.groupby(["model", "strategy", "n"], sort=True, dropna=False):
        settings = g[keys].astype(str).agg("|".join, axis=1)
        if settings.nunique() > 1:
            loss = pd.to_numeric(_col(g, "heal_val_loss"), errors="coerce")
            score = loss.groupby(settings).mean().sort_index()
            best = score.idxmin() if score.notna().any() else score.index[0]
            g = g[settings == best]
        keep.append(g)
    return pd.concat(keep) if keep else healed.iloc[0:0]


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
    se_col = f"{column}_stderr"
    cols = ["model", "strategy", "stage", "n", "num_layers", "fraction_removed", "value", "stderr", "rows"]
    if df.empty or column not in df.columns:
        return pd.DataFrame(columns=cols)
    out = []
    frames = {"baseline": _rows(df, "baseline"), "unhealed": _rows(df, "unhealed"), "healed": select_healed(df)}
    for stage, rows in frames.items():
        if rows.empty:
            continue
        rows = rows.assign(_f=_fraction(rows))
        keys = ["model"] if stage == "baseline" else ["model", "strategy", "n"]
        for key, g in rows.groupby(keys, sort=True, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            value, se = _mean_se(g[column], _col(g, se_col))
            if math.isnan(value):
                continue
            out.append({"model": key[0], "strategy": None if stage == "baseline" else key[1], "stage": stage,
                        "n": 0 if stage == "baseline" else int(key[2]),
                        "num_layers": pd.to_numeric(_col(g, "num_layers"), errors="coerce").max(),
                        "fraction_removed": 0.0 if stage == "baseline" else float(g["_f"].iloc[0]),
                        "value": value, "stderr": se, "rows": len(g)})
    return pd.DataFrame(out, columns=cols)


def expected_grid(df: pd.DataFrame, expected: pd.DataFrame | None = None) -> dict[tuple[str, str], list[float]]:
    """(model, strategy) -> sorted fractions removed (> 0) that the sweep should have: from the
    experiment's cells where given (``expected``), plus every pruned row that exists."""
    grid: dict[tuple[str, str], set[float]] = {}
    sources = []
    if expected is not None and len(expected) and {"model", "strategy"} <= set(expected.columns):
        sources.append(expected)
    pruned = df[df["stage"].isin(["unhealed", "healed"])] if len(df) and "stage" in df.columns else df.iloc[0:0]
    if len(pruned):
        sources.append(pruned)
    for src in sources:
        f = _fraction(src)
        for model, strategy, frac in zip(src["model"], src["strategy"], f):
            if pd.notna(frac) and frac > 0 and isinstance(strategy, str):
                grid.setdefault((model, strategy), set()).add(_fkey(frac))
    return {k: sorted(v) for k, v in grid.items()}


# ----------------------------------------------------------------------------- figure 1: distance heatmap


def plot_distance(table, ax=None, title: str | None = None):
    """Heatmap of d(x^l, x^{l+n}) with l (block start) on x and n (block size) on y.

    The most similar block of each size, l*(n) = argmin_l d (``optimal_starts``), is marked
    with white dots; the thin dashed line is where the ``deepest`` strategy starts its block
    (l = L-1-n). Returns the Axes.
    """
    from ray_prune.select import optimal_starts

    L = int(table.num_layers)
    grid = np.full((L, L), np.nan)  # grid[n-1, l]
    for n in range(1, L + 1):
        for l in range(0, L - n + 1):
            grid[n - 1, l] = table.distances[l, l + n]
    with _style():
        ax = _new_axes(ax, figsize=(7.2, 5.8))
        fig = ax.figure
        import matplotlib as mpl

        cmap = mpl.colormaps["viridis"].with_extremes(bad="#f2f2f2")
        im = ax.imshow(np.ma.masked_invalid(grid), origin="lower", cmap=cmap, aspect="auto", interpolation="nearest",
                       extent=(-0.5, L - 0.5, 0.5, L + 0.5), vmin=0.0, vmax=float(np.nanmax(grid)) if L else 1.0)
        bar = fig.colorbar(im, ax=ax, pad=0.02)
        bar.set_label(f"{table.metric} distance d(x$^l$, x$^{{l+n}}$)  (0 = identical, 1 = opposite)")
        stars = optimal_starts(table)
        if stars:
            ns = [s[0] for s in stars]
            ls = [s[1] for s in stars]
            ax.plot(ls, ns, linestyle="none", marker="o", markersize=max(2.5, min(6.5, 110 / L)),
                    markerfacecolor="white", markeredgecolor="black", markeredgewidth=0.7,
                    label="l*(n) = argmin$_l$ d (similarity)")
            deep_n = np.arange(1, L)
            import matplotlib.patheffects as pe

            ax.plot(L - 1 - deep_n, deep_n, linestyle="--", color="white", linewidth=1.3,
                    path_effects=[pe.Stroke(linewidth=2.6, foreground="black", alpha=0.6), pe.Normal()],
                    label="deepest: l = L−1−n")
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylim(0.5, L + 0.5)
        ax.set_xlabel("l: first layer of the block (layer index)")
        ax.set_ylabel("n: block size (layers)")
        ax.grid(False)
        step = max(1, int(math.ceil(L / 15)))
        ax.set_xticks(range(0, L, step))
        ax.set_yticks(range(1, L + 1, step))
        if title is None:
            title = f"{short_name(table.model_id)}: {table.metric} distance, L = {L}, {table.samples} samples"
        ax.set_title(title, loc="left")
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="black",
                          label="l*(n) = argmin$_l$ d (similarity)"),
                   Line2D([], [], linestyle="--", color="white", linewidth=1.3, label="deepest: l = L−1−n")]
        leg = ax.legend(handles=handles, loc="upper right", frameon=True, framealpha=0.9, facecolor="#b0b0b0",
                        edgecolor="none")
        for text in leg.get_texts():
            text.set_color("black")
    return ax


# ----------------------------------------------------------------------------- figure 2/3: score vs fraction


def _style_legend(ax, models: Sequence[str], colors: Mapping[str, str], labels: Mapping[str, str],
                  strategies: Sequence[str], stages: Sequence[str], extra: Sequence = (), missing: bool = False):
    from matplotlib.lines import Line2D

    handles = []
    if len(models) > 0:
        handles.append(Line2D([], [], linestyle="none", label="$\\bf{model}$"))
        handles += [Line2D([], [], color=colors[m], linewidth=3, label=labels[m]) for m in models]
    if strategies:
        handles.append(Line2D([], [], linestyle="none", label="$\\bf{strategy}$"))
        handles += [Line2D([], [], color="black", linestyle=STRATEGY_LINE.get(s, ":"),
                           marker=STRATEGY_MARKER.get(s, "^"), label=s) for s in strategies]
    handles.append(Line2D([], [], linestyle="none", label="$\\bf{stage}$"))
    handles.append(Line2D([], [], color="grey", marker="D", markeredgecolor="black", markeredgewidth=0.8,
                          linestyle="none", label="unpruned model (baseline)"))
    for st in stages:
        if st == "healed":
            handles.append(Line2D([], [], color="black", marker="o", linestyle="-", label="healed"))
        else:
            handles.append(Line2D([], [], color="black", marker="o", linestyle="-", alpha=0.5,
                                  markerfacecolor="white", linewidth=1.2, label="unhealed (no healing)"))
    handles += list(extra)
    if missing:
        handles.append(Line2D([], [], color="black", marker="x", linestyle="none",
                              label="expected, no healed result\n(× in the strip at the bottom)"))
    return ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                     handlelength=2.6)


def _draw_lines(ax, points: pd.DataFrame, grid: dict[tuple[str, str], list[float]], colors: Mapping[str, str],
                scale: float = 1.0, bands: bool = True, stages: Sequence[str] = ("unhealed", "healed"),
                models: Sequence[str] | None = None) -> list[tuple[float, str]]:
    """Draw score-vs-fraction lines; returns (fraction, colour) of every expected point without a healed
    result, for :func:`_mark_missing` to draw once the axis limits are final."""
    missing: list[tuple[float, str]] = []
    models = sorted(set(points["model"])) if models is None else models
    base = points[points["stage"] == "baseline"].set_index("model")
    for model in models:
        color = colors.get(model, PALETTE[0])
        strategies = sorted({s for (m, s) in grid if m == model})
        for strategy in strategies:
            fractions = grid.get((model, strategy), [])
            xs = np.array([0.0] + list(fractions))
            for stage in stages:
                sel = points[(points["model"] == model) & (points["strategy"] == strategy) & (points["stage"] == stage)]
                by_f = {_fkey(f): (v, e) for f, v, e in zip(sel["fraction_removed"], sel["value"], sel["stderr"])}
                ys = np.full(len(xs), np.nan)
                es = np.full(len(xs), np.nan)
                if model in base.index:
                    ys[0] = base.loc[model, "value"]
                    es[0] = base.loc[model, "stderr"]
                for i, f in enumerate(fractions, start=1):
                    if f in by_f:
                        ys[i], es[i] = by_f[f]
                if np.isnan(ys[1:]).all() and stage == "unhealed":
                    continue  # no unhealed evaluation for this strategy at all: nothing to draw, nothing "missing"
                ys, es = ys * scale, es * scale
                healed = stage == "healed"
                # the baseline (index 0) starts every line but gets its own marker, drawn once below
                ax.plot(xs, ys, color=color, linestyle=STRATEGY_LINE.get(strategy, ":"),
                        marker=STRATEGY_MARKER.get(strategy, "^"), markevery=list(range(1, len(xs))),
                        alpha=1.0 if healed else 0.55,
                        linewidth=1.9 if healed else 1.2, markerfacecolor=color if healed else "white",
                        markeredgecolor=color, markeredgewidth=1.2, zorder=3 if healed else 2)
                if bands and healed and np.isfinite(es).any():
                    lo, hi = ys - es, ys + es
                    ok = np.isfinite(lo) & np.isfinite(hi)
                    ax.fill_between(xs, lo, hi, where=ok, color=color, alpha=0.12, linewidth=0, zorder=1)
                    # a point with no neighbour has no band area: give it an error bar instead
                    for i in np.flatnonzero(ok[1:]) + 1:
                        left = ok[i - 1]
                        right = i + 1 < len(xs) and ok[i + 1]
                        if not left and not right:
                            ax.errorbar(xs[i], ys[i], yerr=es[i], color=color, alpha=0.6, capsize=3, linewidth=1,
                                        zorder=2)
                if healed:
                    missing += [(float(x), color) for x, y in zip(xs[1:], ys[1:]) if np.isnan(y)]
        if model in base.index and pd.notna(base.loc[model, "value"]):
            se = base.loc[model, "stderr"] * scale if bands and pd.notna(base.loc[model, "stderr"]) else None
            ax.errorbar([0.0], [base.loc[model, "value"] * scale], yerr=se, fmt="D", color=color, markersize=7,
                        markeredgecolor="black", markeredgewidth=0.8, capsize=3, elinewidth=1, zorder=5)
    return missing


def _mark_missing(axes: Sequence, marks: Sequence[Sequence[tuple[float, str]]]) -> None:
    """Mark expected fractions without a result with an x in a strip added below the data (so no
    marker sits on a data point). ``axes`` may share their y axis."""
    import matplotlib.transforms as mtransforms

    if not any(marks):
        return
    for ax in axes:
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo - 0.09 * (hi - lo), hi)
        if ax.get_shared_y_axes().get_siblings(ax) != [ax]:
            break  # shared: one change moves them all
    for ax, points in zip(axes, marks):
        bottom = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        for x, color in dict.fromkeys(points):
            ax.plot([x], [0.035], transform=bottom, linestyle="none", marker="x", color=color, markersize=7,
                    markeredgewidth=1.8, zorder=4)


def _fraction_axis(ax, grid: dict[tuple[str, str], list[float]]) -> None:
    from matplotlib.ticker import PercentFormatter

    top = max([max(v) for v in grid.values() if v] + [0.1])
    ax.set_xlim(-0.02, top + 0.03)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("fraction of layers dropped, n / L")


def plot_metric(df: pd.DataFrame, metric: str, ax=None, expected: pd.DataFrame | None = None,
                colors: Mapping[str, str] | None = None, title: str | None = None):
    """Accuracy (%) against the fraction of layers dropped: one colour per model, line style per
    strategy, filled = healed and hollow = unhealed, ±1 standard-error bands, and the task's
    random-guess (and majority-answer) level. ``metric`` is a task (``"mmlu"``) or a column
    (``"arc_challenge_acc_norm"``). Returns the Axes."""
    from matplotlib.lines import Line2D

    column = metric_column(df, metric)
    points = metric_points(df, column)
    grid = expected_grid(df, expected)
    models = sorted(set(points["model"]) | {m for m, _ in grid})
    colors = dict(colors or model_colors(models))
    labels = model_labels(models)
    strategies = _order_strategies(s for _, s in grid)
    with _style():
        ax = _new_axes(ax)
        missing = _draw_lines(ax, points, grid, colors, scale=100.0, models=models)
        extra = [Line2D([], [], linestyle="none", label="$\\bf{reference}$")]
        spec = _task_spec(task_of(column))
        if spec is not None:
            ax.axhline(spec.random_acc * 100, color=REFERENCE_COLOR, linestyle=":", linewidth=1.4, zorder=1)
            extra.append(Line2D([], [], color=REFERENCE_COLOR, linestyle=":", linewidth=1.4,
                                label=f"random guess ({spec.random_acc:.0%})"))
            if abs(spec.majority_acc - spec.random_acc) >= 0.01:
                ax.axhline(spec.majority_acc * 100, color=REFERENCE_COLOR, linestyle="-.", linewidth=1.1, zorder=1)
                extra.append(Line2D([], [], color=REFERENCE_COLOR, linestyle="-.", linewidth=1.1,
                                    label=f"always the majority answer ({spec.majority_acc:.1%})"))
        stages = [s for s in ("healed", "unhealed") if (points["stage"] == s).any()]
        _style_legend(ax, models, colors, labels, strategies, stages or ["healed"], extra if len(extra) > 1 else [],
                      bool(missing))
        _fraction_axis(ax, grid)
        _mark_missing([ax], [missing])
        ax.set_ylabel(f"{metric_label(column)} (%)")
        ax.set_title(title or f"{metric_label(column)} vs fraction of layers dropped", loc="left")
    return ax


def _loss_layout(df: pd.DataFrame, expected: pd.DataFrame | None) -> tuple[list[str], int, int]:
    points = metric_points(df, "c4_loss_norm")
    grid = expected_grid(df, expected)
    models = sorted(set(points["model"]) | {m for m, _ in grid})
    ncols = max(1, min(3, len(models)))
    return models, max(1, math.ceil(len(models) / ncols)), ncols


def plot_loss(df: pd.DataFrame, axes=None, expected: pd.DataFrame | None = None,
              colors: Mapping[str, str] | None = None, fig=None):
    """C4 validation loss / ln V against the fraction of layers dropped, one panel per model
    (shared y axis), healed and unhealed. 1.0 is the loss of a uniform guess over the vocabulary.
    Returns the Figure (``axes``: a sequence of Axes, one per model, to draw into; or ``fig``: a Figure
    to lay the panels out in)."""
    from matplotlib.lines import Line2D

    points = metric_points(df, "c4_loss_norm")
    grid = expected_grid(df, expected)
    models, nrows, ncols = _loss_layout(df, expected)
    colors = dict(colors or model_colors(models))
    labels = model_labels(models)
    with _style():
        if axes is None:
            if fig is None:
                import matplotlib.pyplot as plt

                fig = plt.figure(figsize=(4.6 * ncols + 2.6, 3.9 * nrows), layout="constrained")
            axes = list(fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel())
        fig = axes[0].figure
        for ax in axes[len(models):]:
            ax.set_visible(False)
        marks = []
        for ax, model in zip(axes, models):
            sub = {k: v for k, v in grid.items() if k[0] == model}
            marks.append(_draw_lines(ax, points, sub, colors, bands=False, models=[model]))
            ax.axhline(1.0, color=REFERENCE_COLOR, linestyle=":", linewidth=1.4, zorder=1)
            _fraction_axis(ax, sub or {(model, ""): [0.1]})
            ax.set_title(labels[model], loc="left", color=colors[model])
            ax.set_xlabel("fraction of layers dropped, n / L")
        for ax in axes[: len(models)]:
            if ax.get_subplotspec() is None or ax.get_subplotspec().is_first_col():
                ax.set_ylabel("C4 validation loss / ln V")
        strategies = _order_strategies(s for _, s in grid)
        stages = [s for s in ("healed", "unhealed") if (points["stage"] == s).any()]
        extra = [Line2D([], [], linestyle="none", label="$\\bf{reference}$"),
                 Line2D([], [], color=REFERENCE_COLOR, linestyle=":", linewidth=1.4,
                        label="uniform over the vocabulary\n(loss = ln V)")]
        if models:
            _style_legend(axes[len(models) - 1], [], colors, labels, strategies, stages or ["healed"], extra,
                          any(marks))
            _mark_missing(axes[: len(models)], marks)
        fig.suptitle("C4 validation loss / ln V vs fraction of layers dropped", x=0.01, ha="left",
                     fontweight="bold", fontsize=STYLE["axes.titlesize"])
    return fig


# ----------------------------------------------------------------------------- figure 4: l*(n)


def _tables_dict(tables) -> dict[str, Any]:
    if isinstance(tables, Mapping):
        return dict(tables)
    return {t.model_id: t for t in tables}


def plot_lstar(tables, ax=None, normalize: bool = True, colors: Mapping[str, str] | None = None):
    """l*(n) of every model on one plot.

    With ``normalize`` (default), both axes are fractions of the model's depth: x = n/L,
    y = l*(n)/L, so models of different depths share the axes; otherwise x = n and
    y = l*(n) in layers. The dotted line of each model's colour is where the ``deepest``
    strategy starts (l = L-1-n). Returns the Axes.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    from ray_prune.select import optimal_starts

    tables = _tables_dict(tables)
    models = sorted(tables)
    colors = dict(colors or model_colors(models))
    labels = model_labels(models)
    with _style():
        ax = _new_axes(ax, figsize=(8.0, 5.0))
        handles = []
        for model in models:
            t = tables[model]
            L = int(t.num_layers)
            stars = optimal_starts(t)
            if not stars:
                continue
            n = np.array([s[0] for s in stars], dtype=float)
            l = np.array([s[1] for s in stars], dtype=float)
            deep = L - 1 - n
            scale = float(L) if normalize else 1.0
            ax.plot(n / scale, l / scale, color=colors[model], marker="o", markersize=4, linewidth=1.8)
            ax.plot(n / scale, deep / scale, color=colors[model], linestyle=":", linewidth=1.2, alpha=0.8)
            handles.append(Line2D([], [], color=colors[model], marker="o", markersize=4,
                                  label=f"{labels[model]} (L = {L})"))
        handles.append(Line2D([], [], color="black", linestyle=":", linewidth=1.2,
                              label="deepest strategy's start, L−1−n"))
        if normalize:
            ax.set_xlabel("n / L: block size, fraction of the model's layers")
            ax.set_ylabel("l*(n) / L: start of the most similar block\n(fraction of depth)")
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.set_xlim(0, 1)
            ax.set_ylim(-0.02, 1)
        else:
            ax.set_xlabel("n: block size (layers)")
            ax.set_ylabel("l*(n): first layer of the most similar block")
            ax.set_ylim(bottom=-0.5)
        ax.set_title("Optimal block start l*(n) = argmin$_l$ d(x$^l$, x$^{l+n}$)", loc="left")
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return ax


# ----------------------------------------------------------------------------- figure 5: heal curves


def _pct(f: float) -> str:
    """0.1 -> "10%", 0.125 -> "12.5%"."""
    return f"{f:.0%}" if abs(f * 100 - round(f * 100)) < 1e-9 else f"{f:.1%}"


def _list(v) -> list:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    return list(v)


def _setting_label(row: pd.Series, keys: Sequence[str]) -> str:
    names = {"heal_lr": "lr", "heal_rank": "rank", "heal_steps": "steps", "heal_batch_size": "batch",
             "heal_seq_len": "seq", "heal_quantize": "quant"}
    parts = []
    for k in keys:
        v = row[k]
        if isinstance(v, float) and k == "heal_lr":
            parts.append(f"lr={v:.0e}" if pd.notna(v) else "lr=?")
        else:
            parts.append(f"{names.get(k, k)}={v}")
    return ", ".join(parts)


def _heal_layout(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Healed/stopped rows that have a heal curve, their models (panel rows) and strategies (panel columns)."""
    if len(df) and {"stage", "status", "curve_step"} <= set(df.columns):
        rows = df[(df["stage"] == "healed") & df["status"].isin(["finished", "stopped"])]
        rows = rows[rows["curve_step"].map(lambda v: len(_list(v)) > 0)]
    else:
        rows = df.iloc[0:0]
    rows = rows.assign(_f=_fraction(rows))
    # colour key: the requested fraction, which is the same for every model (n/L differs with L)
    requested = pd.to_numeric(_col(rows, "fraction"), errors="coerce").map(lambda v: _fkey(v) if pd.notna(v) else v)
    rows = rows.assign(_c=requested.fillna(rows["_f"]))
    return rows, sorted(set(rows["model"])), _order_strategies(rows["strategy"]) if len(rows) else ["similarity"]


def plot_heal_curves(df: pd.DataFrame, fig=None, colors: Mapping[str, str] | None = None):
    """Heal validation loss against heal step for every healed or stopped cell: one row of
    panels per model, one panel per strategy, colour = the fraction requested (the same for every
    model; the legend gives the n/L it rounded to). Cells ASHA stopped
    early (status ``stopped``) are faint with an × at their last evaluation; finished ones
    end with a dot. Line style separates heal settings when there are several (seeds share it).
    Returns the Figure."""
    import matplotlib as mpl
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    rows, models, strategies = _heal_layout(df)
    labels = model_labels(models)
    keys = _heal_keys(rows)
    varying = [k for k in keys if rows[k].astype(str).nunique() > 1]
    settings = sorted(rows[varying].astype(str).agg("|".join, axis=1).unique()) if varying else [""]
    dashes = ["-", "--", "-.", ":"]
    fractions = sorted(set(rows["_c"].dropna()))
    cmap = mpl.colormaps["plasma"]
    # plasma from dark purple to orange: its last, pale-yellow tenth is unreadable on white
    fcolor = {f: cmap(0.05 + 0.72 * (i / max(1, len(fractions) - 1))) for i, f in enumerate(fractions)}
    with _style():
        if fig is None:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(4.8 * len(strategies) + 2.6, 3.4 * max(1, len(models))), layout="constrained")
        axs = fig.subplots(max(1, len(models)), len(strategies), squeeze=False)
        for i, model in enumerate(models or [None]):
            for j, strategy in enumerate(strategies):
                ax = axs[i, j]
                sel = rows[(rows["model"] == model) & (rows["strategy"] == strategy)]
                for _, r in sel.sort_values("_f").iterrows():
                    steps = np.asarray(_list(r["curve_step"]), dtype=float)
                    loss = np.asarray(_list(r.get("curve_val_loss")), dtype=float)
                    if len(loss) != len(steps) or not len(steps):
                        continue
                    key = "|".join(str(r[k]) for k in varying) if varying else ""
                    ls = dashes[settings.index(key) % len(dashes)]
                    stopped = r["status"] == "stopped"
                    c = fcolor.get(r["_c"], "grey")
                    ax.plot(steps, loss, color=c, linestyle=ls, linewidth=1.2 if stopped else 1.8,
                            alpha=0.55 if stopped else 1.0)
                    ax.plot(steps[-1:], loss[-1:], linestyle="none", marker="x" if stopped else "o",
                            color=c, markersize=8 if stopped else 5, markeredgewidth=2 if stopped else 1)
                ax.set_title(f"{labels.get(model, model or '')}: {strategy}", loc="left",
                             color=(colors or {}).get(model, "black"))
                ax.set_xlabel("heal step (optimizer steps)")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                # the whole heal budget, so a stopped cell shows how far it got
                budget = pd.to_numeric(_col(sel, "heal_steps"), errors="coerce").max()
                last = max((max(_list(v)) for v in sel["curve_step"] if len(_list(v))), default=1)
                ax.set_xlim(0, max(float(budget) if pd.notna(budget) else 0.0, float(last)) * 1.03)
                if j == 0:
                    ax.set_ylabel("heal validation loss\n(nats / token)")
                if sel.empty:
                    ax.text(0.5, 0.5, "no heal curves", transform=ax.transAxes, ha="center", va="center",
                            color=REFERENCE_COLOR)
        handles = [Line2D([], [], linestyle="none", label="$\\bf{fraction\\ requested}$")]
        for f in fractions:
            actual = sorted(set(rows.loc[rows["_c"] == f, "_f"].dropna()))
            label = _pct(f) + ("" if actual == [f] else f"  (n/L: {', '.join(_pct(a) for a in actual)})")
            handles.append(Line2D([], [], color=fcolor[f], linewidth=3, label=label))
        handles.append(Line2D([], [], linestyle="none", label="$\\bf{outcome}$"))
        handles.append(Line2D([], [], color="black", marker="o", markersize=5, label="finished"))
        handles.append(Line2D([], [], color="black", marker="x", markersize=8, markeredgewidth=2, alpha=0.55,
                              linewidth=1.2, label="stopped early (ASHA)"))
        if varying:
            handles.append(Line2D([], [], linestyle="none", label="$\\bf{heal\\ setting}$"))
            for s, key in enumerate(settings):
                first = rows[rows[varying].astype(str).agg("|".join, axis=1) == key].iloc[0]
                handles.append(Line2D([], [], color="black", linestyle=dashes[s % len(dashes)],
                                      label=_setting_label(first, varying)))
        fig.legend(handles=handles, loc="outside right upper")
        fig.suptitle("Heal curves: validation loss during healing", x=0.01, ha="left", fontweight="bold",
                     fontsize=STYLE["axes.titlesize"])
    return fig


# ----------------------------------------------------------------------------- tables


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
    cols = ["model", "metric", "strategy", "num_layers", "baseline"]
    ks = [float(k) for k in tolerances]
    names = [f"{k:g}pt" for k in ks]
    tol_cols = [c for name in names for c in (f"f_within_{name}", f"n_within_{name}")]
    metrics = list(metrics) if metrics is not None else available_metrics(df)
    grid = expected_grid(df, expected)
    # why a grid point may have no healed score: the statuses of its healed rows
    states: dict[tuple, set] = {}
    healed_rows = df[df["stage"] == "healed"] if len(df) and "stage" in df.columns else df.iloc[0:0]
    for m, st, f, status in zip(healed_rows.get("model", []), healed_rows.get("strategy", []),
                                _fraction(healed_rows), healed_rows.get("status", [])):
        states.setdefault((m, st, f), set()).add(status)
    out = []
    for metric in metrics:
        column = metric_column(df, metric)
        points = metric_points(df, column)
        base = points[points["stage"] == "baseline"].set_index("model")["value"]
        healed = points[points["stage"] == "healed"]
        for (model, strategy), fractions in sorted(grid.items()):
            sel = healed[(healed["model"] == model) & (healed["strategy"] == strategy)]
            if column not in df.columns:
                continue
            values = {_fkey(f): v for f, v in zip(sel["fraction_removed"], sel["value"])}
            nums = pd.to_numeric(_col(df[df["model"] == model], "num_layers"), errors="coerce").dropna()
            if expected is not None and "num_layers" in expected.columns and nums.empty:
                nums = pd.to_numeric(expected.loc[expected["model"] == model, "num_layers"], errors="coerce").dropna()
            L = int(nums.iloc[0]) if len(nums) else None
            b = float(base.get(model, math.nan))
            rec: dict[str, Any] = {"model": model, "metric": column, "strategy": strategy, "num_layers": L,
                                   "baseline": b * 100 if not math.isnan(b) else math.nan,
                                   "fractions": " ".join(f"{f:.3g}" for f in fractions)}
            notes: dict[str, list[str]] = {}  # note -> tolerances it applies to
            if math.isnan(b):
                notes["no baseline row: cannot compare"] = []
            for k, name in zip(ks, names):
                if math.isnan(b):
                    rec[f"f_within_{name}"] = math.nan
                    rec[f"n_within_{name}"] = math.nan
                    continue
                best, stop = 0.0, None
                for f in fractions:
                    v = values.get(f, math.nan)
                    if math.isnan(v):
                        seen = states.get((model, strategy, f), set())
                        why = ("failed" if "failed" in seen else "every heal setting stopped early" if "stopped" in seen
                               else "not evaluated" if "finished" in seen else "not run")
                        stop = f"chain ends at f={f:.3g}: no healed score ({why})"
                        break
                    if v >= b - k / 100.0 - 1e-12:
                        best = f
                    else:
                        stop = "fail"
                        break
                rec[f"f_within_{name}"] = best
                rec[f"n_within_{name}"] = int(round(best * L)) if L else math.nan
                if stop is not None and stop != "fail":
                    notes.setdefault(stop, []).append(f"{k:g}")
                elif stop is None and fractions:
                    notes.setdefault("every grid fraction qualifies (a lower bound)", []).append(f"{k:g}")
            rec["note"] = "; ".join((f"{'/'.join(ks_)} pt: " if ks_ else "") + text for text, ks_ in notes.items())
            out.append(rec)
    return pd.DataFrame(out, columns=cols + ["fractions"] + tol_cols + ["note"])


COST_STAGES = ("profile", "baseline", "unhealed", "healed", "stopped (est.)", "failed", "total (measured)",
               "total incl. stopped (est.)", "saved by early stopping (est.)")


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
    cols = ["model", "stage", "rows", "gpu_hours", "cpu_hours", "estimated", "note"]
    if df.empty or "stage" not in df.columns:
        return pd.DataFrame(columns=cols)
    wall = pd.to_numeric(_col(df, "wall_s"), errors="coerce")
    gpu = pd.to_numeric(_col(df, "gpu_s"), errors="coerce").fillna(0.0)
    gpus = (gpu / wall.where(wall > 0)).fillna(0.0)  # GPUs the row's trial held
    acc: list[dict[str, Any]] = []

    def add(model, stage, seconds, gpu_count, n=1, estimated=False):
        if seconds is None or not np.isfinite(seconds):
            seconds = 0.0 if stage == "failed" else math.nan
        on_gpu = gpu_count > 0
        if math.isnan(seconds):  # unknown: neither kind of hour
            acc.append({"model": model, "stage": stage, "rows": n, "gpu_s": math.nan, "cpu_s": math.nan,
                        "estimated": estimated})
            return
        acc.append({"model": model, "stage": stage, "rows": n, "gpu_s": seconds * gpu_count if on_gpu else 0.0,
                    "cpu_s": 0.0 if on_gpu else seconds, "estimated": estimated})

    stage, status = df["stage"], _col(df, "status", None)
    for i in df.index[(stage == "baseline") & (status == "finished")]:
        add(df.at[i, "model"], "baseline", wall[i], gpus[i])
        if "profile_s" in df.columns and pd.notna(df.at[i, "profile_s"]):
            add(df.at[i, "model"], "profile", float(df.at[i, "profile_s"]), gpus[i])
    unhealed = df[(stage == "unhealed") & (status == "finished")]
    for i in unhealed.index:
        add(df.at[i, "model"], "unhealed", wall[i], gpus[i])
    finished = df[(stage == "healed") & (status == "finished")]
    # A healed row's wall_s covers its whole trial, including the unhealed evaluation if that trial ran it:
    # the earliest finished cell of each pruned model (unhealed_id) is taken to be that trial.
    un_wall = {}
    if "unhealed_id" in df.columns:
        un_wall = {df.at[i, "unhealed_id"]: wall[i] for i in unhealed.index}
    owned: set = set()
    order = finished.sort_values("finished_at", kind="stable") if "finished_at" in finished.columns else finished
    for i in order.index:
        seconds = wall[i]
        uid = df.at[i, "unhealed_id"] if "unhealed_id" in df.columns else None
        if uid in un_wall and uid not in owned:
            owned.add(uid)
            if pd.notna(un_wall[uid]) and pd.notna(seconds):
                seconds = max(0.0, seconds - un_wall[uid])
        add(df.at[i, "model"], "healed", seconds, gpus[i])
    # Early stopping: estimates from finished cells of the same model and heal settings. The learning rate
    # does not change the time a step takes, so cells that differ only in it are compared.
    keys = [k for k in _heal_keys(df) if k != "heal_lr"]
    heal_time = pd.to_numeric(_col(df, "heal_s"), errors="coerce").fillna(wall)
    stopped = df[(stage == "healed") & (status == "stopped")]
    for i in stopped.index:
        model = df.at[i, "model"]
        same = finished[finished["model"] == model]
        for k in keys:
            same = same[same[k].astype(str) == str(df.at[i, k])]
        total_steps = pd.to_numeric(pd.Series([df.at[i, "heal_steps"] if "heal_steps" in df.columns else np.nan]),
                                    errors="coerce").iloc[0]
        done = pd.to_numeric(pd.Series([df.at[i, "steps_done"] if "steps_done" in df.columns else np.nan]),
                             errors="coerce").fillna(0.0).iloc[0]
        if same.empty or not (total_steps > 0):
            add(model, "stopped (est.)", math.nan, 0.0, estimated=True)
            add(model, "saved by early stopping (est.)", math.nan, 0.0, estimated=True)
            continue
        mean_heal = float(heal_time[same.index].mean())
        g = float(gpus[same.index].mean())
        done = min(float(done), float(total_steps))
        add(model, "stopped (est.)", done / total_steps * mean_heal, g, estimated=True)
        add(model, "saved by early stopping (est.)", (total_steps - done) / total_steps * mean_heal, g,
            estimated=True)
    for i in df.index[(stage == "healed") & (status == "failed")]:
        add(df.at[i, "model"], "failed", 0.0, 0.0)
    if not acc:
        return pd.DataFrame(columns=cols)
    raw = pd.DataFrame(acc)
    out = []
    measured = ("profile", "baseline", "unhealed", "healed")
    for model in sorted(raw["model"].unique()) + ["(all models)"]:
        sub = raw if model == "(all models)" else raw[raw["model"] == model]
        for st in COST_STAGES:
            if st == "total (measured)":
                part = sub[sub["stage"].isin(measured)]
            elif st == "total incl. stopped (est.)":
                part = sub[sub["stage"].isin(measured + ("stopped (est.)",))]
                if not (part["stage"] == "stopped (est.)").any():
                    continue
            else:
                part = sub[sub["stage"] == st]
            if part.empty:
                continue
            gpu_h = part["gpu_s"].sum(min_count=1) / 3600
            cpu_h = part["cpu_s"].sum(min_count=1) / 3600
            note = ""
            unknown = int((part["gpu_s"].isna() & part["cpu_s"].isna()).sum())
            if st == "failed":
                gpu_h = cpu_h = math.nan
                note = "time not recorded for failed cells"
            elif unknown and st in ("stopped (est.)", "total incl. stopped (est.)",
                                    "saved by early stopping (est.)"):
                note = (f"{unknown} of {len(part)} stopped cell(s) not estimated: no finished cell of the same model "
                        "and heal settings to take a heal time from")
            elif unknown:
                note = f"{unknown} row(s) without wall_s"
            rows_n = int(part[part["stage"] != "profile"]["rows"].sum()) if st.startswith("total") \
                else int(part["rows"].sum())
            out.append({"model": model, "stage": st, "rows": rows_n,
                        "gpu_hours": gpu_h, "cpu_hours": cpu_h, "estimated": bool(part["estimated"].any()),
                        "note": note})
    return pd.DataFrame(out, columns=cols)


def expected_cells(record: Mapping[str, Any] | None) -> pd.DataFrame | None:
    """The cells the experiment expects (``experiment.json``): cell_id and model, plus strategy, n,
    fraction, num_layers, fraction_removed, heal settings and seed where the grid can be rebuilt."""
    if not record:
        return None
    spec = record.get("spec") or {}
    cells = spec.get("cells")
    if not cells:
        return None
    base = pd.DataFrame(cells)
    try:
        from ray_prune.experiment import Experiment
        from ray_prune.grid import expand

        grid = expand(Experiment(**spec["experiment"]), spec["layers"])
        info = pd.DataFrame([{
            "cell_id": c.cell_id, "strategy": c.strategy, "n": c.n, "fraction": c.fraction,
            "num_layers": c.num_layers, "fraction_removed": _fkey(c.n / c.num_layers), "seed": c.seed,
            "unhealed_id": c.unhealed_id, **{f"heal_{k}": c.heal.get(k) for k in
                                             ("lr", "rank", "steps", "batch_size", "seq_len", "quantize")}}
            for c in grid])
        base = base.merge(info, on="cell_id", how="left")
    except Exception as e:  # an older or newer schema: fall back to ids only
        warnings.warn(f"cannot rebuild the experiment's grid ({type(e).__name__}: {e}); "
                      "missing cells are listed by id only", stacklevel=2)
    return base


def missing_cells(df: pd.DataFrame, expected: pd.DataFrame | None) -> pd.DataFrame:
    """Expected cells with no healed result: ``not run`` (no row at all) or ``failed`` (with the error).
    Cells stopped by ASHA are a result, not missing."""
    cols = ["model", "strategy", "n", "fraction_removed", "state", "cell_id", "heal", "seed", "error"]
    healed = df[df["stage"] == "healed"] if len(df) and "stage" in df.columns else df.iloc[0:0]
    status = dict(zip(healed["cell_id"], healed["status"])) if len(healed) else {}
    errors = dict(zip(healed["cell_id"], _col(healed, "error", None))) if len(healed) else {}
    out = []
    if expected is not None:
        for _, c in expected.iterrows():
            st = status.get(c["cell_id"])
            if st in ("finished", "stopped"):
                continue
            out.append(_missing_row(c, "not run" if st is None else st, errors.get(c["cell_id"])))
    known = set(expected["cell_id"]) if expected is not None else set()
    for _, r in healed[healed["status"] == "failed"].iterrows():  # failures of cells the record does not list
        if r["cell_id"] not in known:
            out.append(_missing_row(r, "failed", r.get("error")))
    res = pd.DataFrame(out, columns=cols)
    return res.sort_values(["model", "strategy", "n", "cell_id"], kind="stable", na_position="last") \
        .reset_index(drop=True) if len(res) else res


def _missing_row(c: pd.Series, state: str, error) -> dict[str, Any]:
    heal = [f"{k.removeprefix('heal_')}={c[k]}" for k in HEAL_KEYS if k in c.index and pd.notna(c[k])]
    n = c.get("n")
    return {"model": c["model"], "strategy": c.get("strategy"), "n": int(n) if pd.notna(n) else None,
            "fraction_removed": c.get("fraction_removed"), "state": state, "cell_id": c["cell_id"],
            "heal": ", ".join(heal), "seed": c.get("seed"),
            "error": (str(error).strip().splitlines() or [""])[-1][:300] if error is not None and pd.notna(error)
            else ""}


def cell_status(df: pd.DataFrame, expected: pd.DataFrame | None, tables: Iterable[str] = ()) -> pd.DataFrame:
    """Per model: cells expected, finished, stopped early, failed and not run; baseline and distance table present."""
    healed = df[df["stage"] == "healed"] if len(df) and "stage" in df.columns else df.iloc[0:0]
    models = set(healed["model"]) | set(_rows(df, "baseline", None)["model"] if len(df) else [])
    if expected is not None:
        models |= set(expected["model"])
    tables = set(tables)
    out = []
    for model in sorted(models):
        rows = healed[healed["model"] == model]
        status = dict(zip(rows["cell_id"], rows["status"]))
        want = set(expected.loc[expected["model"] == model, "cell_id"]) if expected is not None else set(status)
        counts = pd.Series([status[c] for c in want if c in status]).value_counts()
        base = _rows(df, "baseline") if len(df) else df
        out.append({"model": model, "expected": len(want), "finished": int(counts.get("finished", 0)),
                    "stopped early": int(counts.get("stopped", 0)), "failed": int(counts.get("failed", 0)),
                    "not run": len(want - set(status)),
                    "baseline": "yes" if len(base) and (base["model"] == model).any() else "no",
                    "distance table": "yes" if model in tables else "no"})
    return pd.DataFrame(out, columns=["model", "expected", "finished", "stopped early", "failed", "not run",
                                      "baseline", "distance table"])


# ----------------------------------------------------------------------------- the report folder


def load_tables(storage: Storage | str) -> dict[str, Any]:
    """Every distance table under ``<storage>/tables/``, keyed by model id."""
    from ray_prune.distance import DistanceTable

    storage = storage if isinstance(storage, Storage) else Storage(storage)
    tables = {}
    for rel in storage.list_files("tables", ".parquet"):
        try:
            local = storage.local_path(rel)
            if local is not None:
                t = DistanceTable.load(local)
            else:
                with tempfile.TemporaryDirectory() as d:
                    p = os.path.join(d, "t.parquet")
                    Path(p).write_bytes(storage.read_bytes(rel))
                    t = DistanceTable.load(p)
        except Exception as e:  # a corrupt table should not sink the whole report
            warnings.warn(f"skipping distance table {storage.path(rel)}: {e}", stacklevel=2)
            continue
        tables[t.model_id] = t
    return tables


def _csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """List and array cells as JSON text, so a CSV round-trips them."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].map(lambda v: json.dumps([x.item() if hasattr(x, "item") else x for x in v])
                                if isinstance(v, (list, tuple, np.ndarray)) else v)
    return out


def _safe_display(safe: pd.DataFrame) -> pd.DataFrame:
    """The safe-fraction table for reading: one column per tolerance, "f (n layers)"."""
    if safe.empty:
        return safe
    view = pd.DataFrame({"model": safe["model"], "metric": safe["metric"].map(metric_label),
                         "strategy": safe["strategy"], "L": safe["num_layers"],
                         "unpruned": safe["baseline"].map(lambda v: "—" if pd.isna(v) else f"{v:.1f}%"),
                         "fractions run (n/L)": safe["fractions"].map(
                             lambda t: ", ".join(_pct(float(x)) for x in str(t).split()))})
    for c in safe.columns:
        if c.startswith("f_within_"):
            k = c.removeprefix("f_within_").removesuffix("pt")
            n_col = f"n_within_{k}pt"
            view[f"within {k} pt"] = [
                "—" if pd.isna(f) else f"{f:.1%}" + ("" if pd.isna(n) else f" ({int(n)})")
                for f, n in zip(safe[c], safe[n_col] if n_col in safe else [math.nan] * len(safe))]
    view["note"] = safe["note"]
    return view


def _fmt_hours(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _html_table(df: pd.DataFrame, formatters: Mapping[str, Any] | None = None, labels: Mapping[str, str] | None = None,
                ) -> str:
    if df.empty:
        return "<p class='empty'>(none)</p>"
    view = df.copy()
    if labels and "model" in view.columns:
        view["model"] = view["model"].map(lambda m: labels.get(m, m))
    fmts = dict(formatters or {})
    for c in view.columns:
        if c not in fmts and pd.api.types.is_float_dtype(view[c]):
            fmts[c] = lambda v: "—" if pd.isna(v) else f"{v:.4g}"
    return view.to_html(index=False, na_rep="—", formatters=fmts, border=0, classes="tbl", escape=True)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #666; } figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: .92em; max-width: 60em; }
table.tbl { border-collapse: collapse; font-size: .88em; margin: .6em 0; }
table.tbl th, table.tbl td { padding: .25em .7em; border-bottom: 1px solid #e4e4e4; text-align: right; }
table.tbl th { background: #f5f5f5; } table.tbl td:first-child, table.tbl th:first-child { text-align: left; }
.empty { color: #888; font-style: italic; } .note { color: #555; font-size: .92em; max-width: 60em; }
.warn { color: #a04000; } code { background: #f4f4f4; padding: 0 .25em; }
nav a { margin-right: 1em; }
"""


def _clean_previous(out: Path) -> None:
    """Remove the files a previous report wrote (only if ``out`` holds one), so none go stale."""
    index = out / "index.html"
    if not index.is_file() or "generated by ray-prune report" not in index.read_text(errors="ignore")[:2000]:
        return
    ours = ("distance_*.png", "metric_*.png", "lstar.png", "loss.png", "heal_curves.png", "cell_status.csv",
            "missing_cells.csv", "safe_fractions.csv", "cost.csv", "results.csv")
    for pattern in ours:
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink()


def _save(fig, path: Path) -> None:
    with _style():
        fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")


def remote_code_models(record: Mapping[str, Any] | None, df: pd.DataFrame) -> list[str]:
    """Models that ran with trust_remote_code, from the experiment record and from the rows themselves."""
    found = set()
    spec = ((record or {}).get("spec") or {}).get("experiment") or {}
    for m in spec.get("models", []):
        if isinstance(m, Mapping) and m.get("trust_remote_code"):
            found.add(str(m.get("name")))
    if len(df) and "trust_remote_code" in df:
        found |= set(df.loc[df["trust_remote_code"].fillna(False).astype(bool), "model"].astype(str))
    return sorted(found)


def write_report(storage: str, out: str | None = None) -> Path:
    """Write the report of the sweep at ``storage`` into ``out`` and return the path of index.html.

    ``out`` defaults to ``<storage>/report`` for local storage; for s3:// or gs:// it must be given.
    """
    from matplotlib.figure import Figure

    if out is None and "://" in storage and not storage.startswith("file://"):
        raise UserError(f"the results are on {storage}; the report is written to a local folder",
                        "pass --out DIR")
    store = Storage(storage)
    if out is None:
        out = str(store.local_path("report"))
    out_dir = Path(out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_previous(out_dir)
    record = read_experiment_record(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt files are listed in the report instead
        df = load_results(store.uri)
    corrupt = list(df.attrs.get("corrupt_files", []))
    expected = expected_cells(record)
    tables = load_tables(store)
    models = sorted((set(df["model"]) if len(df) else set()) | set(tables)
                    | (set(expected["model"]) if expected is not None else set()))
    colors = model_colors(models)
    labels = model_labels(models)
    files: list[tuple[str, str, str]] = []  # (section, file, caption)

    def figure(section: str, name: str, caption: str, draw, figsize=(8.0, 4.8)) -> None:
        fig = Figure(figsize=figsize, layout="constrained")
        with _style():
            draw(fig)
        _save(fig, out_dir / name)
        files.append((section, name, caption))

    # 1: distance heatmaps
    used = set()
    for model in sorted(tables):
        t = tables[model]
        name = f"distance_{slug(labels.get(model, short_name(model)))}"
        while name in used:
            name += "_"
        used.add(name)
        figure("distance", f"{name}.png",
               f"Distance d(x<sup>l</sup>, x<sup>l+n</sup>) of <b>{html.escape(labels.get(model, model))}</b> "
               f"between the residual stream entering layer l and the one n layers deeper (metric "
               f"<code>{html.escape(t.metric)}</code>, {t.samples} calibration samples). White dots: l*(n), the "
               "block the similarity strategy removes; dashed white line: the block the deepest strategy removes.",
               lambda fig, t=t: plot_distance(t, ax=fig.subplots()), figsize=(7.2, 5.8))
    if tables:
        figure("lstar", "lstar.png",
               "l*(n) for every model, both axes as fractions of the model's depth (x = n/L, y = l*(n)/L) so "
               "models of different depth are comparable. Dotted: where the deepest strategy starts (L−1−n).",
               lambda fig: plot_lstar(tables, ax=fig.subplots(), colors=colors))
    # 2: metrics
    metrics = available_metrics(df) if len(df) else []
    for column in metrics:
        figure("metrics", f"metric_{slug(column)}.png",
               f"{html.escape(metric_label(column))} (%) against the fraction of layers dropped, n/L. Colour: model; "
               "solid/circles: similarity, dashed/squares: deepest; filled: healed, hollow and faint: unhealed; bands: "
               "±1 standard error of the healed scores; dotted/dash-dotted grey: random guess / always the majority "
               "answer. The point at 0 is the unpruned model. An × in the strip at the bottom marks an expected "
               "fraction with no healed score (not run, failed, or every heal setting stopped early): the line "
               "breaks there rather than interpolating.",
               lambda fig, c=column: plot_metric(df, c, ax=fig.subplots(), expected=expected, colors=colors),
               figsize=(8.6, 4.8))
    # 3: loss
    if len(df) and "c4_loss_norm" in df.columns and pd.to_numeric(df["c4_loss_norm"], errors="coerce").notna().any():
        _, nrows, ncols = _loss_layout(df, expected)
        figure("loss", "loss.png",
               "C4 validation loss divided by ln V (V: vocabulary size) against the fraction of layers dropped, one "
               "panel per model (shared y axis); 1.0 (dotted) is the loss of a uniform guess over the vocabulary. "
               "Styles as in the accuracy figures; no error bands (the loss has no standard error in the results).",
               lambda fig: plot_loss(df, fig=fig, expected=expected, colors=colors),
               figsize=(4.6 * ncols + 2.6, 3.9 * nrows))
    # 5: heal curves
    curve_rows, curve_models, curve_strategies = _heal_layout(df)
    if len(curve_rows):
        n_models, n_strat = max(1, len(curve_models)), max(1, len(curve_strategies))
        figure("heal", "heal_curves.png",
               "Heal validation loss (nats/token on the held-out heal validation sequences) at each evaluation during "
               "healing, per model and strategy, over the whole heal budget; colour: the fraction requested (the "
               "legend gives the n/L each model rounded it to). Faint lines ending in × were stopped early by ASHA; "
               "lines ending in a dot finished.",
               lambda fig: plot_heal_curves(df, fig=fig, colors=colors),
               figsize=(4.8 * n_strat + 2.6, 3.4 * n_models))

    # tables
    status = cell_status(df, expected, tables)
    missing = missing_cells(df, expected)
    safe = safe_fractions(df, metrics=metrics, expected=expected)
    cost = cost_table(df)
    csvs = {"cell_status.csv": status, "missing_cells.csv": missing, "safe_fractions.csv": safe, "cost.csv": cost,
            "results.csv": _csv_frame(df)}
    for name, frame in csvs.items():
        frame.to_csv(out_dir / name, index=False)

    title = record["name"] if record else Path(store.root).name
    body = [f"<h1>ray-prune report: {html.escape(str(title))}</h1>",
            f"<p class='meta'>results: <code>{html.escape(store.uri)}</code> · {len(df)} rows · "
            f"generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</p>"]
    if record is None:
        body.append("<p class='warn'>No experiment.json: the expected grid is unknown, so cells that never ran "
                    "cannot be listed.</p>")
    remote = remote_code_models(record, df)
    if remote:
        body.append("<p class='warn'>Remote code ran: these models were loaded with <code>trust_remote_code: "
                    "true</code>, which executes Python from the model repository: "
                    + ", ".join(f"<code>{html.escape(m)}</code>" for m in remote) + "</p>")
    else:
        body.append("<p class='meta'><code>trust_remote_code</code> was off for every model: no code from a model "
                    "repository ran. Weights were read from safetensors only.</p>")
    if corrupt:
        body.append("<p class='warn'>Corrupt result files were skipped (their cells rerun on the next sweep): "
                    + ", ".join(f"<code>{html.escape(p)}</code>" for p in corrupt) + "</p>")
    nav = [("status", "Status"), ("distance", "Distances"), ("lstar", "l*(n)"), ("metrics", "Accuracy"),
           ("loss", "C4 loss"), ("heal", "Heal curves"), ("safe", "Safely removable"), ("cost", "Cost")]
    body.append("<nav>" + "".join(f"<a href='#{k}'>{v}</a>" for k, v in nav) + "</nav>")
    body.append("<h2 id='status'>Status</h2>")
    body.append(_html_table(status, labels=labels) + "<p class='note'><a href='cell_status.csv'>cell_status.csv</a>"
                " · <a href='results.csv'>results.csv</a> (every row)</p>")
    body.append("<h3>Expected cells without a result (not run or failed)</h3>")
    body.append(_html_table(missing.drop(columns=["seed"]), labels=labels)
                + "<p class='note'>Cells of the experiment (<code>experiment.json</code>) with no healed row "
                "(<i>not run</i>) or whose row failed. Cells stopped early by ASHA are a result (their heal curve) "
                "and are counted in the status table instead. Figures leave a gap where a fraction has no healed "
                "score. "
                "<a href='missing_cells.csv'>missing_cells.csv</a></p>")

    def figs(section: str, heading: str, empty: str) -> None:
        body.append(f"<h2 id='{section}'>{heading}</h2>")
        chosen = [f for f in files if f[0] == section]
        if not chosen:
            body.append(f"<p class='empty'>{empty}</p>")
        for _, name, caption in chosen:
            body.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(name)}'>"
                        f"<figcaption>{caption} <a href='{html.escape(name)}'>PNG</a></figcaption></figure>")

    figs("distance", "Distances between layers", "No distance tables yet.")
    figs("lstar", "Optimal block start l*(n)", "No distance tables yet.")
    figs("metrics", "Accuracy vs fraction dropped", "No QA task results yet.")
    figs("loss", "C4 validation loss", "No C4 loss results yet.")
    figs("heal", "Heal curves", "No heal curves yet.")
    body.append("<h2 id='safe'>Safely removable fraction</h2>")
    body.append(_html_table(_safe_display(safe), labels=labels) + (
        "<p class='note'>For each model, metric and strategy: the largest fraction of layers dropped, n/L, at which "
        "the healed accuracy is within k points of the unpruned model's (healed ≥ baseline − k percentage points) "
        "<b>at that fraction and at every smaller fraction of the grid</b> (strict, monotone: the first fraction that "
        "fails, or has no healed result, ends the chain). 0 means even the smallest fraction fails. "
        "In brackets: the number of layers n. The grid limits the answer: where every fraction qualifies "
        "it is a lower bound. Where several heal settings were run, the one with the lowest heal validation loss is "
        "used, averaged over seeds. <a href='safe_fractions.csv'>safe_fractions.csv</a></p>"))
    body.append("<h2 id='cost'>Cost</h2>")
    hours = {c: _fmt_hours for c in ("gpu_hours", "cpu_hours")}
    body.append(_html_table(cost, hours, labels) + (
        "<p class='note'>GPU-hours: <code>gpu_s</code>/3600 (wall time × GPUs) for rows that ran on GPUs; "
        "CPU-hours: <code>wall_s</code>/3600 (wall-clock time, not multiplied by cores) for rows that ran on CPU. "
        "<i>healed</i> is the finished trials' time (load, prune, heal, evaluate) less the unhealed evaluation they "
        "ran, which is under <i>unhealed</i>. Rows marked estimated are <b>estimates</b>: stopped cells record no "
        "time, so their cost is steps done / heal steps × the mean heal time of finished cells of the same model and "
        "heal settings (learning rate aside: it does not change the time per step), and <i>saved by early "
        "stopping</i> is (heal steps − steps done) / heal steps × that mean: "
        "the healing the stopped cells would still have needed had every heal run to the end (not counting their "
        "final evaluation). <i>total (measured)</i> leaves estimates out; <i>total incl. stopped</i> adds the "
        "stopped cells' estimate. <a href='cost.csv'>cost.csv</a></p>"))
    doc = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
           f"<title>ray-prune report: {html.escape(str(title))}</title>\n"
           "<!-- generated by ray-prune report -->\n"
           f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    index = out_dir / "index.html"
    tmp = out_dir / ".index.html.tmp"
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(index)
    return index
