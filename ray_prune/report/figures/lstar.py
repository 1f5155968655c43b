"""l*(n), the start of the most similar block of each size, for every model on one plot."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ray_prune.core.select import optimal_starts
from ray_prune.report.style import new_axes, style_context, model_colors, model_labels


def _tables_dict(tables) -> dict[str, Any]:
    if isinstance(tables, Mapping):
        return dict(tables)
    return {t.model_id: t for t in tables}


def _label_axes(ax, normalize: bool) -> None:
    from matplotlib.ticker import PercentFormatter

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


def plot_lstar(tables, ax=None, normalize: bool = True, colors: Mapping[str, str] | None = None):
    """l*(n) of every model on one plot.

    With ``normalize`` (default), both axes are fractions of the model's depth: x = n/L,
    y = l*(n)/L, so models of different depths share the axes; otherwise x = n and
    y = l*(n) in layers. The dotted line of each model's colour is where the ``deepest``
    strategy starts (l = L-1-n). Returns the Axes.
    """
    from matplotlib.lines import Line2D

    tables = _tables_dict(tables)
    models = sorted(tables)
    colors = dict(colors or model_colors(models))
    labels = model_labels(models)
    with style_context():
        ax = new_axes(ax, figsize=(8.0, 5.0))
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
        _label_axes(ax, normalize)
        ax.set_title("Optimal block start l*(n) = argmin$_l$ d(x$^l$, x$^{l+n}$)", loc="left")
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return ax
