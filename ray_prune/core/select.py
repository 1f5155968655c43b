"""Choose which layers to remove.

- ``similarity``: the paper's rule, l*(n) = argmin_l d(x^l, x^{l+n}); remove l*..l*+n-1.
  Ties go to the shallowest l.
- ``deepest``: the paper's baseline, remove the n layers just before the final
  layer, which is kept: layers L-1-n .. L-2.
- ``layers``: an explicit list, any order, non-contiguous allowed.
- ``block_influence``: ShortGPT's rule (Men et al., 2024): remove the n layers of
  lowest block influence BI_l = 1 - cos(x^l, x^{l+1}), averaged over every
  non-padding token; not necessarily contiguous. Ties go to the shallowest layer.
  BI_l is d(x^l, x^{l+1}) of a ``block_influence`` distance table, the diagonal
  next to the main one, so the profile pass that gives the table gives BI too.
- ``greedy``: SLEB's rule (Song et al., 2024): a prefix of a removal order,
  each step removing the layer whose removal raises the calibration loss least
  (``ray_prune.core.greedy`` computes the order once per model).

A fraction f of L layers becomes n = floor(f * L + 0.5), i.e. round half up
(Python's ``round`` rounds half to even, which would make 0.25 of 30 layers 8
but 0.25 of 18 layers 4; half-up gives 8 and 5, monotone in f).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ray_prune.core.distance import DistanceTable
from ray_prune.errors import UserError

Strategy = Literal["similarity", "deepest", "layers", "block_influence", "greedy"]
STRATEGIES: tuple[str, ...] = ("similarity", "deepest", "layers", "block_influence", "greedy")
# What a sweep grid can name ("layers" needs a list), and what it runs when it names none: the paper's two.
PLANNED_STRATEGIES: tuple[str, ...] = ("similarity", "deepest", "block_influence", "greedy")
DEFAULT_STRATEGIES: tuple[str, ...] = ("similarity", "deepest")
# Training-free repairs a sweep can apply right after pruning (core.repair): the other half of a method.
REPAIRS: tuple[str, ...] = ("none", "linear")
# The linear repair's transform (core.repair): ReplaceMe's full d x d map, or a per-channel scale.
REPAIR_FORMS: tuple[str, ...] = ("full", "diagonal")
# What each strategy needs from stage 1, computed once per model and calibration setting: a distance table of a
# metric (None: the calibration's own), or a greedy removal order.
STAGE1_NEEDS: dict[str, tuple[str, str | None]] = {"similarity": ("table", None),
                                                   "block_influence": ("table", "block_influence"),
                                                   "greedy": ("order", None)}


def n_from_fraction(fraction: float, num_layers: int) -> int:
    """Number of layers to drop for a fraction in [0, 1), rounding half up."""
    if not (0.0 <= fraction < 1.0) or math.isnan(fraction):
        raise UserError(f"fraction {fraction} is outside [0, 1)", "use a fraction of layers such as 0.25")
    n = math.floor(fraction * num_layers + 0.5)
    check_n(n, num_layers)
    return n


def check_n(n: int, num_layers: int) -> None:
    if not (0 <= n < num_layers):
        raise UserError(f"cannot remove n={n} of {num_layers} layers",
                        f"choose 0 <= n <= {num_layers - 1} (at least one layer must remain)")


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Layer indices to remove, sorted and deduplicated, or a UserError: the one check that they are integers,
    exist in a model of ``num_layers`` layers, and leave at least one (pruning, selection and export share it)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise UserError(f"num_layers must be a positive integer, got {num_layers!r}",
                        "pass the model's config.num_hidden_layers")
    try:
        values = list(layers)
        if any(isinstance(i, bool) for i in values):
            raise TypeError
        chosen = sorted({operator.index(i) for i in values})
    except TypeError:
        raise UserError(f"layers to remove must be a list of integers, got {layers!r}",
                        "pass indices such as [13, 14, 15]") from None
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"layers {bad} do not exist in a model of {num_layers} layers",
                        f"use indices 0..{num_layers - 1}")
    if len(chosen) >= num_layers:
        raise UserError(f"cannot remove all {num_layers} layers", "keep at least one layer")
    return chosen


def best_start(table: DistanceTable, n: int) -> int:
    """l*(n): the start of the most similar block of n layers."""
    check_n(n, table.num_layers)
    if n == 0:
        return 0
    candidates = range(0, table.num_layers - n + 1)
    return min(candidates, key=lambda l: (table.d(l, n), l))


def optimal_starts(table: DistanceTable) -> list[tuple[int, int, float]]:
    """(n, l*(n), d(x^l*, x^{l*+n})) for every n from 1 to L-1: the paper's l*(n) curve."""
    return [(n, (l := best_start(table, n)), table.d(l, n)) for n in range(1, table.num_layers)]


def block_influence(table: DistanceTable) -> np.ndarray:
    """BI_l for l = 0..L-1, read from a ``block_influence`` table: d(x^l, x^{l+1}) is exactly ShortGPT's
    1 - cos of a layer's input and output averaged over tokens, so no second pass is needed for it.

    Another metric's table would rank layers by a different quantity (the mean of an arccos is not a function
    of the mean cosine), hence the error rather than a silent conversion.
    """
    if table.metric != "block_influence":
        raise UserError(f"block influence needs a block_influence distance table, got metric {table.metric!r}",
                        "profile with metric block_influence (calibration.metric / --metric block_influence)")
    L = table.num_layers
    return np.array([table.distances[l, l + 1] for l in range(L)], dtype=np.float64)


def lowest_influence(table: DistanceTable, n: int) -> list[int]:
    """The n layers of lowest block influence, sorted; ties go to the shallowest layer."""
    check_n(n, table.num_layers)
    bi = block_influence(table)
    return sorted(sorted(range(len(bi)), key=lambda l: (bi[l], l))[:n])


def greedy_prefix(order: Sequence[int], n: int, num_layers: int) -> list[int]:
    """The first n layers of a greedy removal order (original indices), sorted: one order gives every size."""
    check_n(n, num_layers)
    prefix = list(order)[:n]
    chosen = check_layers(prefix, num_layers) if prefix else []
    if len(chosen) != n:
        raise UserError(f"the greedy order {list(order)} does not hold {n} distinct layers",
                        "compute the order with max_remove >= n (ray_prune.core.greedy.greedy_order)")
    return chosen


def layers_to_remove(
    strategy: Strategy,
    num_layers: int,
    n: int | None = None,
    table: DistanceTable | None = None,
    layers: Sequence[int] | None = None,
    order: Sequence[int] | None = None,
) -> list[int]:
    """Sorted indices of the blocks to remove.

    What each strategy reads: ``similarity`` a distance table of any metric, ``block_influence`` a table of
    metric ``block_influence``, ``greedy`` a removal ``order`` (``core.greedy.greedy_order(...).order``),
    ``layers`` the list ``layers``; ``deepest`` nothing but n.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    if strategy == "layers":
        if not layers:
            raise UserError("strategy 'layers' needs an explicit list of layers", "pass layers, e.g. --layers 20,21,24")
        return check_layers(layers, num_layers)
    if n is None:
        raise UserError(f"strategy {strategy!r} needs n (or a fraction)", "pass --n or --fraction")
    check_n(n, num_layers)
    if n == 0:
        return []
    if strategy == "deepest":
        return list(range(num_layers - 1 - n, num_layers - 1))
    if strategy == "greedy":
        if order is None:
            raise UserError("strategy 'greedy' needs a greedy removal order",
                            "compute it with ray_prune.core.greedy.greedy_order on calibration blocks")
        return greedy_prefix(order, n, num_layers)
    if table is None:
        raise UserError(f"strategy {strategy!r} needs a distance table", "run `ray-prune profile` first")
    if table.num_layers != num_layers:
        raise UserError(f"the distance table is for {table.num_layers} layers, the model has {num_layers}",
                        "profile the same (unpruned) model you prune")
    if strategy == "block_influence":
        return lowest_influence(table, n)
    start = best_start(table, n)
    return list(range(start, start + n))
