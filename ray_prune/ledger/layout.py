"""Every path under a sweep's storage root, and the ids that name files, declared once.

::

    experiment.json                                the experiment that owns this root
    .sweep.lock                                    the running driver's lock (heartbeat)
    tables/<model>.parquet                         distance tables, one per model
    results/model_slug=<model>/<cell_id>-<stage>.parquet
                                                   one result row each: a hive-partitioned Parquet dataset
    mergekit/model_slug=<model>/<cell_id>.yaml     each cell's pruning as a mergekit passthrough config
    adapters/model_slug=<model>/<cell_id>/         each healed cell's LoRA adapter (peft format + ray_prune.json)
    blocks/<tokenizer>/<role>-<seq_len>x<n>.npy    packed token blocks, made once, shared by the trials
    tune/                                          Ray Tune's own trial state (logs, checkpoints)
    report/                                        ``ray-prune report`` output, for local roots

Hidden names (a leading ``.``) are temp files and the lock: dataset readers skip them. The partition
key is ``model_slug``, not ``model``: a hive key that is also a column of the files makes pandas refuse
the dataset and pyarrow and DuckDB overwrite the column with the slug. Sweeps written before the
partition (``results/<model>/...``) still load, and the next sweep on their root moves them in place.
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
MERGEKIT = "mergekit"
ADAPTERS = "adapters"
BLOCKS = "blocks"
REPORT = "report"
ROW_SUFFIX = ".parquet"
PARTITION = "model_slug"  # hive key of the results dataset


def slug(model: str) -> str:
    """A file-system-safe name for a model id (org/name -> org--name)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in model.replace("/", "--")).strip(".")


def row_path(model: str, cell_id: str, stage: str) -> str:
    return f"{RESULTS}/{PARTITION}={slug(model)}/{cell_id}-{stage}{ROW_SUFFIX}"


def is_partitioned(relative: str) -> bool:
    """Whether a row file sits in the hive layout (``results/model_slug=<slug>/...``)."""
    parts = relative.split("/")
    return len(parts) == 3 and parts[0] == RESULTS and parts[1].startswith(f"{PARTITION}=")


def mergekit_path(model: str, cell_id: str) -> str:
    return f"{MERGEKIT}/{PARTITION}={slug(model)}/{cell_id}.yaml"


def adapter_path(model: str, cell_id: str) -> str:
    return f"{ADAPTERS}/{PARTITION}={slug(model)}/{cell_id}"


def blocks_path(tokenizer_key: str, role: str, seq_len: int, count: int) -> str:
    return f"{BLOCKS}/{tokenizer_key}/{role}-{seq_len}x{count}.npy"


def table_path(model: str) -> str:
    return f"{TABLES}/{slug(model)}.parquet"


def stable_hash(obj: Any) -> str:
    """A short content hash of JSON-able settings: the ids of cells and baselines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
