"""Which (cell, stage) rows a storage root already holds: the ledger a rerun consults.

The results dataset itself is the ledger, keyed by cell id: a rerun skips a
cell whose healed row is finished or stopped, and reruns failed and missing
ones. ``Tuner.restore`` is never used for this: it cannot add grid points.
"""

from __future__ import annotations

from ray_prune.ledger.rows import read_rows
from ray_prune.ledger.storage import Storage

DONE = ("finished", "stopped")  # statuses that need no rerun: a stopped heal is a result (ASHA's decision)


def done_ids(storage: Storage) -> dict[tuple[str, str], str]:
    """(cell_id, stage) -> status, for every readable row on storage."""
    ledger: dict[tuple[str, str], str] = {}
    tables, _, _ = read_rows(storage)
    for t in tables:
        for r in t.select(["cell_id", "stage", "status"]).to_pylist():
            ledger[(r["cell_id"], r["stage"])] = r["status"]
    return ledger
