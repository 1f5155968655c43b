"""Every path under a sweep's storage root, and the ids that name files, declared once.

::

    experiment.json                                the experiment that owns this root
    .sweep.lock                                    the running driver's lock (heartbeat)
    tables/<model>.parquet                         distance tables, one per model
    results/<model>/<cell_id>-<stage>.parquet      one result row each
    tune/                                          Ray Tune's own trial state (logs, checkpoints)
    report/                                        ``ray-prune report`` output, for local roots

Hidden names (a leading ``.``) are temp files and the lock: dataset readers skip them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

EXPERIMENT_RECORD = "experiment.json"
LOCK = ".sweep.lock"
RESULTS = "results"
TABLES = "tables"
TUNE = "tune"
REPORT = "report"
TMP_PREFIX = "."  # temp files are hidden: listings skip them, so a half-written file is never read as a row
ROW_SUFFIX = ".parquet"


def slug(model: str) -> str:
    """A file-system-safe name for a model id (org/name -> org--name)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in model.replace("/", "--")).strip(".")


def row_path(model: str, cell_id: str, stage: str) -> str:
    return f"{RESULTS}/{slug(model)}/{cell_id}-{stage}{ROW_SUFFIX}"


def table_path(model: str) -> str:
    return f"{TABLES}/{slug(model)}.parquet"


def stable_hash(obj: Any) -> str:
    """A short content hash of JSON-able settings: the ids of cells and baselines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
