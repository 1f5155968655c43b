"""After the Tune grid: the rows of cells whose trial ended without writing its own healed row.

A trial writes its healed row itself when it finishes. A trial that failed
for good (after its retries) or that ASHA stopped cannot, so the driver writes
a ``failed`` row (with the error and the attempts) or a ``stopped`` row (with
the heal curve so far) for it here. Anything else that ended without its row
was cut off (Ctrl-C, ``ray job stop``) and gets no row, so the next run runs it:
``stopped`` means ASHA's decision and nothing else.
"""

from __future__ import annotations

from ray_prune.ledger.layout import row_path
from ray_prune.ledger.rows import write_row
from ray_prune.ledger.storage import Storage
from ray_prune.sweep.rows import curve_columns, failure_row


def _row_status(store: Storage, rel: str) -> str | None:
    try:
        return store.read_table(rel).column("status")[0].as_py()
    except (OSError, ValueError, KeyError, IndexError):
        return None  # missing or unreadable: written anew


def _curve(result) -> list[tuple]:
    history = result.metrics_dataframe
    if history is None or "heal_step" not in history:
        return []
    return [(h["heal_step"], h.get("heal_val_loss"), h.get("heal_train_loss"))
            for _, h in history.dropna(subset=["heal_step"]).iterrows()]


def record_outcomes(grid, store: Storage, view, stopped_by_scheduler: set[str], interrupts) -> int:
    """Rows for cells that ended without their healed row: failed for good before any interrupt, or stopped
    by ASHA. Returns the number of cells with a finished or stopped healed row."""
    done = 0
    for result in grid:
        if result.config is None:  # never started: an interrupt came first
            continue
        cell = result.config["run"].cell
        metrics = result.metrics or {}
        if _row_status(store, row_path(cell.model, cell.cell_id, "healed")) == "finished":
            done += 1
            continue  # the trial wrote its own row; a failed row of an earlier run is replaced below
        if result.error is not None and interrupts.before(view.failed_at.get(cell.cell_id)):
            row = failure_row(cell, "failed", result.error, metrics)
        elif cell.cell_id in stopped_by_scheduler and not metrics.get("completed"):
            row = failure_row(cell, "stopped", None, metrics)
            done += 1
        else:
            continue  # cut off by an interrupt: no row, so the next run runs it
        write_row(store, {**row, **curve_columns(_curve(result)),
                          "attempts": 1 + view.retries.get(cell.cell_id, 0)})
    return done
