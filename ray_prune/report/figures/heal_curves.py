"""Heal curves: the heal validation loss at each evaluation during healing, one panel per model and strategy."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ray_prune.ledger.schema import AXIS_COLUMNS
from ray_prune.report.frames import (as_text, conformed, fraction_key, fractions_removed, heal_setting_keys,
                                     order_strategies)
from ray_prune.report.style import REFERENCE_COLOR, STYLE, percent, style_context, model_labels

DASHES = ["-", "--", "-.", ":"]  # one per heal setting (seeds share it)
SHORT = {"batch_size": "batch", "seq_len": "seq", "quantize": "quant"}  # heal_<name> -> legend name


def _list(v) -> list:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    return list(v)


def _setting_label(row: pd.Series, keys: Sequence[str]) -> str:
    """``lr=3e-04, rank=8``: the heal settings ``keys`` (``heal_*`` columns) of one row."""
    parts = []
    for k in keys:
        name = k.removeprefix("heal_")
        v = row[k]
        if isinstance(v, float) and name == "lr":
            parts.append(f"lr={v:.0e}" if pd.notna(v) else "lr=?")
        else:
            parts.append(f"{SHORT.get(name, name)}={v}")
    return ", ".join(parts)


def heal_layout(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Healed/stopped rows that have a heal curve, their models (panel rows) and strategies (panel columns)."""
    df = conformed(df)
    sel = df[(df["stage"] == "healed") & df["status"].isin(["finished", "stopped"])]
    sel = sel[sel["curve_step"].map(lambda v: len(_list(v)) > 0).astype(bool)]  # bool: rows even when empty
    sel = sel.assign(_f=fractions_removed(sel))
    # colour key: the requested fraction, which is the same for every model (n/L differs with L)
    requested = pd.to_numeric(sel["fraction"], errors="coerce").map(lambda v: fraction_key(v) if pd.notna(v) else v)
    sel = sel.assign(_c=requested.fillna(sel["_f"]))
    return sel, sorted(set(sel["model"])), order_strategies(sel["strategy"]) if len(sel) else ["similarity"]


def _fraction_colors(fractions: Sequence[float]) -> dict:
    import matplotlib as mpl

    cmap = mpl.colormaps["plasma"]
    # plasma from dark purple to orange: its last, pale-yellow tenth is unreadable on white
    return {f: cmap(0.05 + 0.72 * (i / max(1, len(fractions) - 1))) for i, f in enumerate(fractions)}


def _draw_panel(ax, sel: pd.DataFrame, settings: Sequence[str], fcolor: Mapping) -> None:
    """One panel's curves: a line per cell, ending in a dot (finished) or an × (stopped early)."""
    for _, r in sel.sort_values("_f").iterrows():
        steps = np.asarray(_list(r["curve_step"]), dtype=float)
        loss = np.asarray(_list(r["curve_val_loss"]), dtype=float)
        if len(loss) != len(steps) or not len(steps):
            continue
        ls = DASHES[settings.index(r["_s"]) % len(DASHES)]
        stopped = r["status"] == "stopped"
        c = fcolor.get(r["_c"], "grey")
        ax.plot(steps, loss, color=c, linestyle=ls, linewidth=1.2 if stopped else 1.8, alpha=0.55 if stopped else 1.0)
        ax.plot(steps[-1:], loss[-1:], linestyle="none", marker="x" if stopped else "o",
                color=c, markersize=8 if stopped else 5, markeredgewidth=2 if stopped else 1)


def _panel_axes(ax, sel: pd.DataFrame, title: str, color: str, first_column: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, loc="left", color=color)
    ax.set_xlabel("heal step (optimizer steps)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # the whole heal budget, so a stopped cell shows how far it got
    budget = pd.to_numeric(sel["heal_steps"], errors="coerce").max()
    last = max((max(_list(v)) for v in sel["curve_step"] if len(_list(v))), default=1)
    ax.set_xlim(0, max(float(budget) if pd.notna(budget) else 0.0, float(last)) * 1.03)
    if first_column:
        ax.set_ylabel("heal validation loss\n(nats / token)")
    if sel.empty:
        ax.text(0.5, 0.5, "no heal curves", transform=ax.transAxes, ha="center", va="center", color=REFERENCE_COLOR)


def _legend_handles(curves: pd.DataFrame, fcolor: Mapping, varying: Sequence[str], settings: Sequence[str]) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="none", label="$\\bf{fraction\\ requested}$")]
    for f in fcolor:
        actual = sorted(set(curves.loc[curves["_c"] == f, "_f"].dropna()))
        label = percent(f) + ("" if actual == [f] else f"  (n/L: {', '.join(percent(a) for a in actual)})")
        handles.append(Line2D([], [], color=fcolor[f], linewidth=3, label=label))
    handles.append(Line2D([], [], linestyle="none", label="$\\bf{outcome}$"))
    handles.append(Line2D([], [], color="black", marker="o", markersize=5, label="finished"))
    handles.append(Line2D([], [], color="black", marker="x", markersize=8, markeredgewidth=2, alpha=0.55,
                          linewidth=1.2, label="stopped early (ASHA)"))
    if varying:
        handles.append(Line2D([], [], linestyle="none", label="$\\bf{heal\\ setting}$"))
        for s, key in enumerate(settings):
            first = curves[curves["_s"] == key].iloc[0]
            handles.append(Line2D([], [], color="black", linestyle=DASHES[s % len(DASHES)],
                                  label=_setting_label(first, varying)))
    return handles


def plot_heal_curves(df: pd.DataFrame, fig=None, colors: Mapping[str, str] | None = None):
    """Heal validation loss against heal step for every healed or stopped cell: one row of
    panels per model, one panel per strategy, colour = the fraction requested (the same for every
    model; the legend gives the n/L it rounded to). Cells ASHA stopped
    early (status ``stopped``) are faint with an × at their last evaluation; finished ones
    end with a dot. Line style separates heal settings when there are several (seeds share it).
    Returns the Figure."""
    curves, models, strategies = heal_layout(df)
    labels = model_labels(models)
    varying = [k for k in AXIS_COLUMNS if as_text(curves[k]).nunique() > 1]
    curves = curves.assign(_s=heal_setting_keys(curves, varying) if varying else "")  # the line style's key
    settings = sorted(curves["_s"].unique()) if varying else [""]
    fcolor = _fraction_colors(sorted(set(curves["_c"].dropna())))
    with style_context():
        if fig is None:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(4.8 * len(strategies) + 2.6, 3.4 * max(1, len(models))), layout="constrained")
        axs = fig.subplots(max(1, len(models)), len(strategies), squeeze=False)
        for i, model in enumerate(models or [None]):
            for j, strategy in enumerate(strategies):
                sel = curves[(curves["model"] == model) & (curves["strategy"] == strategy)]
                _draw_panel(axs[i, j], sel, settings, fcolor)
                _panel_axes(axs[i, j], sel, f"{labels.get(model, model or '')}: {strategy}",
                            (colors or {}).get(model, "black"), j == 0)
        fig.legend(handles=_legend_handles(curves, fcolor, varying, settings), loc="outside right upper")
        fig.suptitle("Heal curves: validation loss during healing", x=0.01, ha="left", fontweight="bold",
                     fontsize=STYLE["axes.titlesize"])
    return fig
