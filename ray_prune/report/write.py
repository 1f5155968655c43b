"""``ray-prune report``: the report folder of a sweep (figures as PNG, tables as CSV, ``index.html``)."""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ray_prune.core.atomic import write_text
from ray_prune.errors import UserError
from ray_prune.ledger.layout import REPORT, slug
from ray_prune.ledger.rows import load_results, read_experiment_record
from ray_prune.ledger.storage import Storage
from ray_prune.report.cells import cell_status, expected_cells, load_tables, missing_cells, remote_code_models
from ray_prune.report.figures.distance import plot_distance
from ray_prune.report.figures.heal_curves import heal_layout, plot_heal_curves
from ray_prune.report.figures.lstar import plot_lstar
from ray_prune.report.figures.scores import loss_layout, plot_loss, plot_metric
from ray_prune.report.frames import available_metrics, has_values, metric_label
from ray_prune.report.compare import method_comparison, method_label, plot_quality_cost
from ray_prune.report.page import is_report, render
from ray_prune.report.status import MEASUREMENT_QUESTIONS, check_provenance, task_sizes
from ray_prune.report.style import DPI, model_colors, model_labels, short_name, style_context
from ray_prune.report.tables import calibration_differences, cost_table, safe_fractions

# Every file a report writes: a rerun into the same folder removes them first, so none goes stale.
FIGURE_FILES = ("distance_*.png", "metric_*.png", "lstar.png", "loss.png", "heal_curves.png", "quality_cost.png")
CSV_FILES = ("cell_status.csv", "missing_cells.csv", "safe_fractions.csv", "cost.csv", "results.csv",
             "provenance.csv")
EXTRA_CSV_FILES = ("methods.csv", "calibration_layers.csv")  # written beside them (a rerun removes them too)


def _clean_previous(out: Path) -> None:
    """Remove the files a previous report wrote (only if ``out`` holds one), so none go stale."""
    index = out / "index.html"
    if not index.is_file() or not is_report(index.read_text(errors="ignore")[:2000]):
        return
    for pattern in FIGURE_FILES + CSV_FILES + EXTRA_CSV_FILES:
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink()


def _save(fig, path: Path) -> None:
    with style_context():
        fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")


def _csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """List and array cells as JSON text, so a CSV round-trips them."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].map(lambda v: json.dumps([x.item() if hasattr(x, "item") else x for x in v])
                                if isinstance(v, (list, tuple, np.ndarray)) else v)
    return out


class _Figures:
    """Draws figures into PNGs of the report folder and keeps (section, file, caption HTML) for the page."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files: list[tuple[str, str, str]] = []

    def add(self, section: str, name: str, caption: str, draw: Callable, figsize=(8.0, 4.8)) -> None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
        with style_context():
            draw(fig)
        _save(fig, self.out_dir / name)
        self.files.append((section, name, caption))


def _distance_figures(figs: _Figures, tables: Mapping[str, Any], labels: Mapping[str, str],
                      colors: Mapping[str, str]) -> None:
    used = set()
    for model in sorted(tables):
        t = tables[model]
        name = f"distance_{slug(labels.get(model, short_name(model)))}"
        while name in used:
            name += "_"
        used.add(name)
        figs.add("distance", f"{name}.png",
                 f"Distance d(x<sup>l</sup>, x<sup>l+n</sup>) of <b>{html.escape(labels.get(model, model))}</b> "
                 f"between the residual stream entering layer l and the one n layers deeper (metric "
                 f"<code>{html.escape(t.metric)}</code>, {t.samples} calibration samples). White dots: l*(n), the "
                 "block the similarity strategy removes; dashed white line: the block the deepest strategy removes.",
                 lambda fig, t=t: plot_distance(t, ax=fig.subplots()), figsize=(7.2, 5.8))
    if tables:
        figs.add("lstar", "lstar.png",
                 "l*(n) for every model, both axes as fractions of the model's depth (x = n/L, y = l*(n)/L) so "
                 "models of different depth are comparable. Dotted: where the deepest strategy starts (L−1−n).",
                 lambda fig: plot_lstar(tables, ax=fig.subplots(), colors=colors))


def _result_figures(figs: _Figures, df: pd.DataFrame, expected: pd.DataFrame | None, metrics: list[str],
                    colors: Mapping[str, str]) -> None:
    for column in metrics:
        figs.add("metrics", f"metric_{slug(column)}.png",
                 f"{html.escape(metric_label(column))} (%) against the fraction of layers dropped, n/L. Colour: "
                 "model; solid/circles: similarity, dashed/squares: deepest; filled: healed, hollow and faint: "
                 "unhealed; bands: ±1 standard error of the healed scores; dotted/dash-dotted grey: random guess / "
                 "always the majority answer. The point at 0 is the unpruned model. An × in the strip at the bottom "
                 "marks an expected fraction with no healed score (not run, failed, or every heal setting stopped "
                 "early): the line breaks there rather than interpolating.",
                 lambda fig, c=column: plot_metric(df, c, ax=fig.subplots(), expected=expected, colors=colors),
                 figsize=(8.6, 4.8))
    if has_values(df["c4_loss_norm"]):
        _, nrows, ncols = loss_layout(df, expected)
        figs.add("loss", "loss.png",
                 "C4 validation loss divided by ln V (V: vocabulary size) against the fraction of layers dropped, one "
                 "panel per model (shared y axis); 1.0 (dotted) is the loss of a uniform guess over the vocabulary. "
                 "Styles as in the accuracy figures; no error bands (the loss has no standard error in the results).",
                 lambda fig: plot_loss(df, fig=fig, expected=expected, colors=colors),
                 figsize=(4.6 * ncols + 2.6, 3.9 * nrows))
    curves, curve_models, curve_strategies = heal_layout(df)
    if len(curves):
        n_models, n_strat = max(1, len(curve_models)), max(1, len(curve_strategies))
        figs.add("heal", "heal_curves.png",
                 "Heal validation loss (nats/token on the held-out heal validation sequences) at each evaluation "
                 "during healing, per model and strategy, over the whole heal budget; colour: the fraction requested "
                 "(the legend gives the n/L each model rounded it to). Faint lines ending in × were stopped early by "
                 "ASHA; lines ending in a dot finished.",
                 lambda fig: plot_heal_curves(df, fig=fig, colors=colors),
                 figsize=(4.8 * n_strat + 2.6, 3.4 * n_models))


def write_report(storage: str, out: str | None = None) -> Path:
    """Write the report of the sweep at ``storage`` into ``out`` and return the path of index.html.

    ``out`` defaults to ``<storage>/report`` for local storage; for s3:// or gs:// it must be given.
    """
    if out is None and "://" in storage and not storage.startswith("file://"):
        raise UserError(f"the results are on {storage}; the report is written to a local folder", "pass --out DIR")
    store = Storage(storage)
    out_dir = Path(out if out is not None else str(store.local_path(REPORT))).expanduser()
    _check_writable(out_dir)
    _clean_previous(out_dir)
    record = read_experiment_record(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt files are listed in the report instead
        df = load_results(store.uri)
    df = with_methods(df)  # a strategy followed by a repair reads, and is drawn, as its own method
    expected = expected_cells(record)
    tables = load_tables(store)
    models = sorted(set(df["model"]) | set(tables) | (set(expected["model"]) if expected is not None else set()))
    colors, labels = model_colors(models), model_labels(models)
    metrics = available_metrics(df)
    figs = _Figures(out_dir)
    _distance_figures(figs, tables, labels, colors)
    _result_figures(figs, df, expected, metrics, colors)

    provenance = check_provenance(df)
    csvs = dict(zip(CSV_FILES, (cell_status(df, expected, tables), missing_cells(df, expected),
                                safe_fractions(df, metrics=metrics, expected=expected), cost_table(df),
                                _csv_frame(df), provenance.table)))
    methods = _methods(figs, df, store, colors)
    calibrations = calibration_differences(tables)
    csvs["methods.csv"], csvs["calibration_layers.csv"] = methods, calibrations
    for name, frame in csvs.items():
        frame.to_csv(out_dir / name, index=False)
    doc = render(title=record["name"] if record else Path(store.root).name, uri=store.uri, n_rows=len(df),
                 has_record=record is not None, remote=remote_code_models(record, df),
                 corrupt=list(df.attrs.get("corrupt_files", [])), foreign=list(df.attrs.get("foreign_files", [])),
                 figures=figs.files,
                 status=csvs["cell_status.csv"], missing=csvs["missing_cells.csv"],
                 safe=csvs["safe_fractions.csv"], cost=csvs["cost.csv"], labels=labels, sizes=task_sizes(df),
                 threshold=MEASUREMENT_QUESTIONS, provenance=provenance,
                 methods=methods if len(methods) and methods["method"].nunique() > 1 else None,
                 calibrations=calibrations)
    return write_text(out_dir / "index.html", doc)


def with_methods(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose pruning a repair followed carry the method (``similarity + linear``) as their strategy, so every
    figure and table draws them as a method of their own."""
    if "repair" not in df.columns or not (df["repair"].fillna("none") != "none").any():
        return df
    out = df.copy()
    out["strategy"] = [method_label(s, r) for s, r in zip(out["strategy"], out["repair"])]
    return out


def _methods(figs: _Figures, df: pd.DataFrame, store: Storage, colors: Mapping[str, str]) -> pd.DataFrame:
    """The methods table (``compare.method_comparison``, paired on the stored per-question outputs) and, where it
    compares more than one method, the quality-against-cost figure."""
    from ray_prune.ledger.questions import load_questions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        questions = load_questions(store.uri)
    base = df.copy()
    if "repair" in base.columns:  # the comparison reads strategy and repair apart
        base["strategy"] = base["strategy"].astype(str).str.split(" + ", regex=False).str[0]
    table = method_comparison(base, questions)
    columns = ["model", "n", "fraction_removed", "method", "stage", "c4_loss_norm", "cost_s"]
    if table.empty:
        return pd.DataFrame(columns=columns)
    if table["method"].nunique() > 1:
        figs.add("methods", "quality_cost.png",
                 "Quality against cost: every (model, fraction, method, stage) row as a point; x = its measured cost "
                 "(log scale), y = its C4 loss / ln V (lower is better). Filled: healed; hollow: before healing. The "
                 "label is the fraction removed.",
                 lambda fig: plot_quality_cost(table, ax=fig.subplots(), colors=colors), figsize=(9.0, 5.2))
    return table


def _check_writable(out_dir: Path) -> None:
    """The report folder exists and takes files, or one line naming it and the fix (before any figure is drawn)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / ".write-probe", "").unlink()
    except OSError as e:
        raise UserError(f"cannot write the report to {out_dir}: {e.strerror or e}",
                        "pass --out DIR, a folder you can write") from None
