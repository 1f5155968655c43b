"""Scores against the fraction of layers dropped: accuracy per task (:func:`plot_metric`) and the C4 loss
(:func:`plot_loss`), drawn by the same lines, legend and missing-point marks."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.report.frames import (conformed, expected_grid, fraction_key, metric_label, metric_points,
                                     order_strategies, score_column, task_of)
from ray_prune.report.style import (PALETTE, REFERENCE_COLOR, STYLE, model_colors, model_labels, new_axes,
                                    strategy_line, strategy_marker, style_context)

Grid = dict[tuple[str, str], list[float]]


def _style_legend(ax, models: Sequence[str], colors: Mapping[str, str], labels: Mapping[str, str],
                  strategies: Sequence[str], stages: Sequence[str], extra: Sequence = (), missing: bool = False):
    from matplotlib.lines import Line2D

    handles = []
    if len(models) > 0:
        handles.append(Line2D([], [], linestyle="none", label="$\\bf{model}$"))
        handles += [Line2D([], [], color=colors[m], linewidth=3, label=labels[m]) for m in models]
    if strategies:
        handles.append(Line2D([], [], linestyle="none", label="$\\bf{strategy}$"))
        handles += [Line2D([], [], color="black", linestyle=strategy_line(s), marker=strategy_marker(s), label=s)
                    for s in strategies]
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


def _line_values(points: pd.DataFrame, base: pd.DataFrame, model: str, strategy: str, stage: str,
                 fractions: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Values and standard errors at 0 and at each grid fraction; NaN where there is none.

    At 0 a line starts from the unpruned model: healed, where the grid has the fraction 0 (one cell that
    every strategy shares, strategy ``none``), else the baseline."""
    sel = points[(points["model"] == model) & (points["strategy"].isin([strategy, "none"]))
                 & (points["stage"] == stage)]
    by_f = {fraction_key(f): (v, e) for f, v, e in zip(sel["fraction_removed"], sel["value"], sel["stderr"])}
    ys = np.full(len(fractions) + 1, np.nan)
    es = np.full(len(fractions) + 1, np.nan)
    if 0.0 in by_f:
        ys[0], es[0] = by_f[0.0]
    elif model in base.index:
        ys[0] = base.loc[model, "value"]
        es[0] = base.loc[model, "stderr"]
    for i, f in enumerate(fractions, start=1):
        if f in by_f:
            ys[i], es[i] = by_f[f]
    return ys, es


def _band(ax, xs: np.ndarray, ys: np.ndarray, es: np.ndarray, color: str) -> None:
    """±1 standard error around a healed line."""
    lo, hi = ys - es, ys + es
    ok = np.isfinite(lo) & np.isfinite(hi)
    ax.fill_between(xs, lo, hi, where=ok, color=color, alpha=0.12, linewidth=0, zorder=1)
    # a point with no neighbour has no band area: give it an error bar instead
    for i in np.flatnonzero(ok[1:]) + 1:
        left = ok[i - 1]
        right = i + 1 < len(xs) and ok[i + 1]
        if not left and not right:
            ax.errorbar(xs[i], ys[i], yerr=es[i], color=color, alpha=0.6, capsize=3, linewidth=1, zorder=2)


def _draw_lines(ax, points: pd.DataFrame, grid: Grid, colors: Mapping[str, str], scale: float = 1.0,
                bands: bool = True, stages: Sequence[str] = ("unhealed", "healed"),
                models: Sequence[str] | None = None) -> list[tuple[float, str]]:
    """Draw score-vs-fraction lines; returns (fraction, colour) of every expected point without a healed
    result, for :func:`_mark_missing` to draw once the axis limits are final."""
    missing: list[tuple[float, str]] = []
    models = sorted(set(points["model"])) if models is None else models
    base = points[points["stage"] == "baseline"].set_index("model")
    for model in models:
        color = colors.get(model, PALETTE[0])
        for strategy in sorted({s for (m, s) in grid if m == model}):
            fractions = grid.get((model, strategy), [])
            xs = np.array([0.0] + list(fractions))
            for stage in stages:
                ys, es = _line_values(points, base, model, strategy, stage, fractions)
                if np.isnan(ys[1:]).all() and stage == "unhealed":
                    continue  # no unhealed evaluation for this strategy at all: nothing to draw, nothing "missing"
                ys, es = ys * scale, es * scale
                healed = stage == "healed"
                # the baseline (index 0) starts every line but gets its own marker, drawn once below
                ax.plot(xs, ys, color=color, linestyle=strategy_line(strategy), marker=strategy_marker(strategy),
                        markevery=list(range(1, len(xs))), alpha=1.0 if healed else 0.55,
                        linewidth=1.9 if healed else 1.2, markerfacecolor=color if healed else "white",
                        markeredgecolor=color, markeredgewidth=1.2, zorder=3 if healed else 2)
                if bands and healed and np.isfinite(es).any():
                    _band(ax, xs, ys, es, color)
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


def _fraction_axis(ax, grid: Grid) -> None:
    from matplotlib.ticker import PercentFormatter

    top = max([max(v) for v in grid.values() if v] + [0.1])
    ax.set_xlim(-0.02, top + 0.03)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("fraction of layers dropped, n / L")


def _stages(points: pd.DataFrame) -> list[str]:
    """The stages the legend lists: those with a point (healed where there is none at all)."""
    return [s for s in ("healed", "unhealed") if (points["stage"] == s).any()] or ["healed"]


def _points_and_grid(df: pd.DataFrame, column: str, expected: pd.DataFrame | None):
    """The points of ``column``, the expected grid and every model either of them names."""
    points = metric_points(df, column)
    grid = expected_grid(df, expected)
    return points, grid, sorted(set(points["model"]) | {m for m, _ in grid})


def _reference_lines(ax, column: str) -> list:
    """The task's random-guess (and, where it differs, majority-answer) accuracy; their legend entries."""
    from matplotlib.lines import Line2D

    spec = TASKS.get(task_of(column))
    if spec is None:
        return []
    extra = [Line2D([], [], linestyle="none", label="$\\bf{reference}$")]
    levels = [(spec.random_acc, ":", 1.4, f"random guess ({spec.random_acc:.0%})")]
    if abs(spec.majority_acc - spec.random_acc) >= 0.01:
        levels.append((spec.majority_acc, "-.", 1.1, f"always the majority answer ({spec.majority_acc:.1%})"))
    for level, style, width, label in levels:
        ax.axhline(level * 100, color=REFERENCE_COLOR, linestyle=style, linewidth=width, zorder=1)
        extra.append(Line2D([], [], color=REFERENCE_COLOR, linestyle=style, linewidth=width, label=label))
    return extra


def plot_metric(df: pd.DataFrame, metric: str, ax=None, expected: pd.DataFrame | None = None,
                colors: Mapping[str, str] | None = None, title: str | None = None):
    """Accuracy (%) against the fraction of layers dropped: one colour per model, line style per
    strategy, filled = healed and hollow = unhealed, ±1 standard-error bands, and the task's
    random-guess (and majority-answer) level. ``metric`` is a task (``"mmlu"``) or a column
    (``"arc_challenge_acc_norm"``). Returns the Axes."""
    df = conformed(df)
    column = score_column(df, metric)
    points, grid, models = _points_and_grid(df, column, expected)
    colors = dict(colors or model_colors(models))
    labels = model_labels(models)
    strategies = order_strategies(s for _, s in grid)
    with style_context():
        ax = new_axes(ax)
        missing = _draw_lines(ax, points, grid, colors, scale=100.0, models=models)
        extra = _reference_lines(ax, column)
        _style_legend(ax, models, colors, labels, strategies, _stages(points), extra, bool(missing))
        _fraction_axis(ax, grid)
        _mark_missing([ax], [missing])
        ax.set_ylabel(f"{metric_label(column)} (%)")
        ax.set_title(title or f"{metric_label(column)} vs fraction of layers dropped", loc="left")
    return ax


def loss_layout(df: pd.DataFrame, expected: pd.DataFrame | None) -> tuple[list[str], int, int]:
    models = _points_and_grid(df, "c4_loss_norm", expected)[2]
    ncols = max(1, min(3, len(models)))
    return models, max(1, math.ceil(len(models) / ncols)), ncols


def plot_loss(df: pd.DataFrame, axes=None, expected: pd.DataFrame | None = None,
              colors: Mapping[str, str] | None = None, fig=None):
    """C4 validation loss / ln V against the fraction of layers dropped, one panel per model
    (shared y axis), healed and unhealed. 1.0 is the loss of a uniform guess over the vocabulary.
    Returns the Figure (``axes``: a sequence of Axes, one per model, to draw into; or ``fig``: a Figure
    to lay the panels out in)."""
    from matplotlib.lines import Line2D

    df = conformed(df)
    points, grid, _ = _points_and_grid(df, "c4_loss_norm", expected)
    models, nrows, ncols = loss_layout(df, expected)
    colors = dict(colors or model_colors(models))
    labels = model_labels(models)
    with style_context():
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
        extra = [Line2D([], [], linestyle="none", label="$\\bf{reference}$"),
                 Line2D([], [], color=REFERENCE_COLOR, linestyle=":", linewidth=1.4,
                        label="uniform over the vocabulary\n(loss = ln V)")]
        if models:
            _style_legend(axes[len(models) - 1], [], colors, labels, order_strategies(s for _, s in grid),
                          _stages(points), extra, any(marks))
            _mark_missing(axes[: len(models)], marks)
        fig.suptitle("C4 validation loss / ln V vs fraction of layers dropped", x=0.01, ha="left",
                     fontweight="bold", fontsize=STYLE["axes.titlesize"])
    return fig
