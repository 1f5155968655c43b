"""How every figure looks: matplotlib settings, the palette, line styles per strategy, display names of models."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterable

import pandas as pd

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
STRATEGY_LINE = {"similarity": "-", "deepest": "--", "block_influence": "-.", "greedy": (0, (5, 1, 1, 1, 1, 1)),
                 "layers": ":"}
STRATEGY_MARKER = {"similarity": "o", "deepest": "s", "block_influence": "v", "greedy": "P", "layers": "^"}
REPAIRED_LINE = ":"  # a method with a training-free repair ("greedy + linear"): its strategy's marker, dotted
REFERENCE_COLOR = "#555555"


@contextmanager
def style_context():
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def new_axes(ax, figsize=(8.0, 4.8)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def strategy_line(strategy: str):
    """A method's line: its strategy's, dotted where a repair follows the pruning (``similarity + linear``)."""
    if " + " in strategy:
        return REPAIRED_LINE
    return STRATEGY_LINE.get(strategy, ":")


def strategy_marker(strategy: str) -> str:
    return STRATEGY_MARKER.get(strategy.split(" + ")[0], "^")


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


def percent(f: float) -> str:
    """0.1 -> "10%", 0.125 -> "12.5%"."""
    return f"{f:.0%}" if abs(f * 100 - round(f * 100)) < 1e-9 else f"{f:.1%}"
