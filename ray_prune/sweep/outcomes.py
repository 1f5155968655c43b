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


def record_outcomes(store: Storage, view, stopped_by_scheduler: set[str], interrupted_at: float | None) -> int:
    """Rows for the cells whose trial ended without writing its healed row, from what the live view saw: failed
    for good before any interrupt (``interrupted_at``, monotonic), or stopped by ASHA. Returns the number of cells
    with a finished or stopped healed row. The same whether the grid ran out or a signal cut it short, so a fast
    stop loses nothing a slow one would keep."""
    done = 0
    for cell_id, (spec, last, error) in list(view.ended.items()):
        cell = spec.cell
        if _row_status(store, row_path(cell.model, cell.cell_id, "healed")) == "finished":
            done += len(spec.cells("healed"))
            continue  # the trial wrote its own rows; a failed row of an earlier run is replaced below
        failed_at = view.failed_at.get(cell_id)
        if error is not None and (interrupted_at is None or (failed_at is not None and failed_at < interrupted_at)):
            status = "failed"
        elif cell_id in stopped_by_scheduler and not last.get("completed"):
            status = "stopped"
            done += len(spec.cells("healed"))
        else:
            continue  # cut off by an interrupt: no row, so the next run runs it
        for twin in spec.cells("healed"):  # the cell and the identical cells its trial served
            row = failure_row(twin, status, error if status == "failed" else None, last)
            write_row(store, {**row, **curve_columns(view.curves.get(cell_id, [])),
                              "attempts": 1 + view.retries.get(cell_id, 0),
                              "computed_by": None if twin is cell else cell.cell_id})
    return done
