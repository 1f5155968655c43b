"""The report's figures, one module each; every one is a plain function of results or distance tables.

- ``distance``: :func:`plot_distance`, the distance heatmap of one model.
- ``scores``: :func:`plot_metric` (accuracy) and :func:`plot_loss` (C4 loss) against the fraction dropped.
- ``lstar``: :func:`plot_lstar`, l*(n) of every model.
- ``heal_curves``: :func:`plot_heal_curves`, the heal validation loss during healing.
"""

from ray_prune.report.figures.distance import plot_distance
from ray_prune.report.figures.heal_curves import plot_heal_curves
from ray_prune.report.figures.lstar import plot_lstar
from ray_prune.report.figures.scores import plot_loss, plot_metric

__all__ = ["plot_distance", "plot_heal_curves", "plot_loss", "plot_lstar", "plot_metric"]
