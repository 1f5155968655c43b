"""Choose which layers to remove.

- ``similarity``: the paper's rule, l*(n) = argmin_l d(x^l, x^{l+n}); remove l*..l*+n-1.
  Ties go to the shallowest l.
- ``deepest``: the paper's baseline, remove the n layers just before the final
  layer, which is kept: layers L-1-n .. L-2.
- ``layers``: an explicit list, any order, non-contiguous allowed.

A fraction f of L layers becomes n = floor(f * L + 0.5), i.e. round half up
(Python's ``round`` rounds half to even, which would make 0.25 of 30 layers 8
but 0.25 of 18 layers 4; half-up gives 8 and 5, monotone in f).
"""

from __future__ import annotations

import math
import operator
from typing import Literal, Sequence

from ray_prune.core.distance import DistanceTable
from ray_prune.errors import UserError

Strategy = Literal["similarity", "deepest", "layers"]
STRATEGIES: tuple[str, ...] = ("similarity", "deepest", "layers")
PLANNED_STRATEGIES: tuple[str, ...] = ("similarity", "deepest")  # what a sweep grid can name: "layers" needs a list


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


def layers_to_remove(
    strategy: Strategy,
    num_layers: int,
    n: int | None = None,
    table: DistanceTable | None = None,
    layers: Sequence[int] | None = None,
) -> list[int]:
    """Sorted indices of the blocks to remove."""
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
    if table is None:
        raise UserError("strategy 'similarity' needs a distance table", "run `ray-prune profile` first")
    if table.num_layers != num_layers:
        raise UserError(f"the distance table is for {table.num_layers} layers, the model has {num_layers}",
                        "profile the same (unpruned) model you prune")
    start = best_start(table, n)
    return list(range(start, start + n))
