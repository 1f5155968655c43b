"""The distance heatmap of one model: d(x^l, x^{l+n}) for every block start l and size n."""

from __future__ import annotations

import math

import numpy as np

from ray_prune.core.select import optimal_starts
from ray_prune.report.style import new_axes, style_context, short_name

STAR_LABEL = "l*(n) = argmin$_l$ d (similarity)"
DEEPEST_LABEL = "deepest: l = L−1−n"


def _block_grid(table) -> np.ndarray:
    """grid[n-1, l] = d(x^l, x^{l+n}); NaN where the block would run past the last layer."""
    L = int(table.num_layers)
    grid = np.full((L, L), np.nan)
    for n in range(1, L + 1):
        for l in range(0, L - n + 1):
            grid[n - 1, l] = table.distances[l, l + n]
    return grid


def _mark_blocks(ax, table, L: int) -> None:
    """White dots at l*(n); a dashed white line where the deepest strategy starts its block."""
    import matplotlib.patheffects as pe

    stars = optimal_starts(table)
    if not stars:
        return
    ax.plot([s[1] for s in stars], [s[0] for s in stars], linestyle="none", marker="o",
            markersize=max(2.5, min(6.5, 110 / L)), markerfacecolor="white", markeredgecolor="black",
            markeredgewidth=0.7, label=STAR_LABEL)
    deep_n = np.arange(1, L)
    ax.plot(L - 1 - deep_n, deep_n, linestyle="--", color="white", linewidth=1.3,
            path_effects=[pe.Stroke(linewidth=2.6, foreground="black", alpha=0.6), pe.Normal()], label=DEEPEST_LABEL)


def _legend(ax) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="black",
                      label=STAR_LABEL),
               Line2D([], [], linestyle="--", color="white", linewidth=1.3, label=DEEPEST_LABEL)]
    leg = ax.legend(handles=handles, loc="upper right", frameon=True, framealpha=0.9, facecolor="#b0b0b0",
                    edgecolor="none")
    for text in leg.get_texts():
        text.set_color("black")


def plot_distance(table, ax=None, title: str | None = None):
    """Heatmap of d(x^l, x^{l+n}) with l (block start) on x and n (block size) on y.

    The most similar block of each size, l*(n) = argmin_l d (``optimal_starts``), is marked
    with white dots; the thin dashed line is where the ``deepest`` strategy starts its block
    (l = L-1-n). Returns the Axes.
    """
    import matplotlib as mpl

    L = int(table.num_layers)
    grid = _block_grid(table)
    with style_context():
        ax = new_axes(ax, figsize=(7.2, 5.8))
        cmap = mpl.colormaps["viridis"].with_extremes(bad="#f2f2f2")
        im = ax.imshow(np.ma.masked_invalid(grid), origin="lower", cmap=cmap, aspect="auto", interpolation="nearest",
                       extent=(-0.5, L - 0.5, 0.5, L + 0.5), vmin=0.0, vmax=float(np.nanmax(grid)) if L else 1.0)
        bar = ax.figure.colorbar(im, ax=ax, pad=0.02)
        bar.set_label(f"{table.metric} distance d(x$^l$, x$^{{l+n}}$)  (0 = identical, 1 = opposite)")
        _mark_blocks(ax, table, L)
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
        _legend(ax)
    return ax
