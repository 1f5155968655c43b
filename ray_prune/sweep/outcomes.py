"""After the Tune grid: the rows of cells whose trial ended without writing its own healed row.

A trial writes its healed row itself when it finishes. A trial that failed
for good (after its retries) or that ASHA stopped cannot, so the driver writes
a ``failed`` row (with the error and the attempts) or a ``stopped`` row (with
the heal curve so far) for it here.
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


def record_outcomes(grid, store: Storage, retries: dict[str, int]) -> None:
    """Rows for cells that ended without their healed row: failed for good, or stopped by ASHA."""
    for result in grid:
        cell = result.config["run"].cell
        metrics = result.metrics or {}
        if _row_status(store, row_path(cell.model, cell.cell_id, "healed")) == "finished":
            continue  # the trial wrote its own row; a failed row of an earlier run is replaced below
        if result.error is not None:
            row = failure_row(cell, "failed", result.error, metrics)
        elif not metrics.get("completed"):
            row = failure_row(cell, "stopped", None, metrics)
        else:
            continue
        write_row(store, {**row, **curve_columns(_curve(result)), "attempts": 1 + retries.get(cell.cell_id, 0)})
