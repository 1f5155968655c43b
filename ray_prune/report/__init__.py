"""The report of a sweep: the paper's figures and tables as a self-contained folder.

``ray-prune report STORAGE [--out DIR]`` (:func:`write_report`) reads a sweep's rows
(:func:`ray_prune.ledger.rows.load_results`) and distance tables (``tables/*.parquet``)
and writes ``index.html``, one PNG per figure and every table as CSV. It works on
a partial sweep: cells the experiment expects (``experiment.json``) but that have
no result are listed, and figures leave gaps there instead of drawing across them.
``ray-prune status`` (:mod:`~ray_prune.report.status`) prints the same per-model account as text.

Every figure and table is also a plain function of a DataFrame from
``load_results`` (and of :class:`~ray_prune.core.distance.DistanceTable` objects), so a
notebook can draw them one by one::

    from ray_prune import load_results
    from ray_prune import report
    df = load_results("results/smoke")
    report.plot_metric(df, "mmlu")
    report.safe_fractions(df)

A hand-made DataFrame with only some of the columns works too: each function first adds the
missing columns of the row schema (:func:`ray_prune.ledger.schema.conform_frame`).

Modules: ``style`` (colours, line styles, display names), ``frames`` (rows to plotted points),
``figures/`` (one module per figure), ``tables`` (safe fractions, cost), ``cells`` (expected and
missing cells, distance tables), ``page`` + ``template.html`` (index.html), ``write`` (the folder),
``status`` (``ray-prune status``).

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
:func:`cost_table`. Neither Ray nor torch is imported; the report needs only pandas, numpy,
pyarrow, pyyaml and matplotlib (imported when a figure is drawn).
"""

from ray_prune.report.cells import cell_status, expected_cells, load_tables, missing_cells, remote_code_models
from ray_prune.report.figures import plot_distance, plot_heal_curves, plot_loss, plot_lstar, plot_metric
from ray_prune.report.frames import (available_metrics, expected_grid, score_column, metric_label, metric_points,
                                     select_healed, task_of)
from ray_prune.report.style import (DPI, PALETTE, REFERENCE_COLOR, STRATEGY_LINE, STRATEGY_MARKER, STYLE,
                                    model_colors, model_labels, short_name)
from ray_prune.report.tables import COST_STAGES, cost_table, safe_fractions
from ray_prune.report.write import write_report

__all__ = [
    "COST_STAGES", "DPI", "PALETTE", "REFERENCE_COLOR", "STRATEGY_LINE", "STRATEGY_MARKER", "STYLE",
    "available_metrics", "cell_status", "cost_table", "expected_cells", "expected_grid", "load_tables",
    "score_column", "metric_label", "metric_points", "missing_cells", "model_colors", "model_labels",
    "plot_distance", "plot_heal_curves", "plot_loss", "plot_lstar", "plot_metric", "remote_code_models",
    "safe_fractions", "select_healed", "short_name", "task_of", "write_report",
]
