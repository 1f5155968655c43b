"""Every path under a sweep's storage root, and the ids that name files, declared once.

::

    experiment.json                                the experiment that owns this root
    .sweep.lock                                    the running driver's lock (heartbeat)
    tables/<model>-<key>.parquet                   distance tables, named by all that made them (the key)
    orders/<model>-<key>.json                      greedy removal orders (core.greedy), likewise
    results/model_slug=<model>/<cell_id>-<stage>.parquet
                                                   one result row each: a hive-partitioned Parquet dataset
    questions/model_slug=<model>/<cell_id>-<stage>.parquet
                                                   each evaluated row's per-question outputs (ledger.questions)
    mergekit/model_slug=<model>/<cell_id>.yaml     each cell's pruning as a mergekit passthrough config
    adapters/model_slug=<model>/<cell_id>/         each healed cell's LoRA adapter (peft format + ray_prune.json)
    blocks/<role>-<seq_len>x<n>-<key>.npy (+ .json) packed token blocks, made once, shared by the trials; the
                                                   JSON beside each says what it holds and its checksum
    tune/                                          Ray Tune's own trial state (logs, checkpoints)
    report/                                        ``ray-prune report`` output, for local roots

Hidden names (a leading ``.``) are temp files and the lock: dataset readers skip them. The partition
key is ``model_slug``, not ``model``: a hive key that is also a column of the files makes pandas refuse
the dataset and pyarrow and DuckDB overwrite the column with the slug. Sweeps written before the
partition (``results/<model>/...``) still load, and the next sweep on their root moves them in place.
"""

from __future__ import annotations

from typing import Any

from ray_prune.core.fingerprint import digest

EXPERIMENT_RECORD = "experiment.json"
LOCK = ".sweep.lock"
RESULTS = "results"
QUESTIONS = "questions"
TABLES = "tables"
ORDERS = "orders"
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


def questions_path(model: str, cell_id: str, stage: str) -> str:
    return f"{QUESTIONS}/{PARTITION}={slug(model)}/{cell_id}-{stage}{ROW_SUFFIX}"


def is_partitioned(relative: str) -> bool:
    """Whether a row file sits in the hive layout (``results/model_slug=<slug>/...``)."""
    parts = relative.split("/")
    return len(parts) == 3 and parts[0] == RESULTS and parts[1].startswith(f"{PARTITION}=")


def mergekit_path(model: str, cell_id: str) -> str:
    return f"{MERGEKIT}/{PARTITION}={slug(model)}/{cell_id}.yaml"


def adapter_path(model: str, cell_id: str) -> str:
    return f"{ADAPTERS}/{PARTITION}={slug(model)}/{cell_id}"


def blocks_path(key: str, role: str, seq_len: int, count: int) -> str:
    """Packed blocks; ``key`` hashes everything that made them (tokenizer, corpus, the roles' definition...)."""
    return f"{BLOCKS}/{role}-{seq_len}x{count}-{key}.npy"


def table_path(model: str, key: str) -> str:
    """A distance table; ``key`` hashes everything that made it (the weights, the calibration settings and text)."""
    return f"{TABLES}/{slug(model)}-{key}.parquet"


def order_path(model: str, key: str) -> str:
    """A greedy removal order; ``key`` hashes everything that made it."""
    return f"{ORDERS}/{slug(model)}-{key}.json"


def stable_hash(obj: Any) -> str:
    """A short content hash of JSON-able settings: the ids of cells and baselines, the keys of stored files."""
    return digest(obj)
