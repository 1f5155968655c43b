"""The distance table d(x^l, x^m) of a model, and the metrics it can hold; numpy only, no torch.

Selecting layers, reporting and saving need the table but not the model, so
this module stays importable where torch is not (the experiment schema reads
``METRICS`` from here). ``ray_prune.core.profile`` computes tables.

Metrics (all in ``[0, 1]``, 0 meaning identical):

- ``angular`` (the paper's, default): arccos(cos)/pi at the last non-padding token.
- ``angular_all``: the same, averaged over every non-padding token.
- ``block_influence``: ShortGPT's 1 - cos, averaged over every non-padding token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ray_prune.errors import UserError

Metric = Literal["angular", "angular_all", "block_influence"]
METRICS: tuple[str, ...] = ("angular", "angular_all", "block_influence")
# The values each metric can take: an angle over pi is in [0, 1]; 1 - cos is in [0, 2] (2: opposite vectors,
# which a block that flips the stream's direction reaches on real models).
METRIC_RANGE: dict[str, tuple[float, float]] = {"angular": (0.0, 1.0), "angular_all": (0.0, 1.0),
                                                "block_influence": (0.0, 2.0)}
METADATA_KEY = "ray_prune.distance"  # the Parquet schema metadata that holds a table's facts


@dataclass
class DistanceTable:
    """``distances[l, m]`` = mean distance between x^l and x^m, for 0 <= l, m <= L."""

    model_id: str
    metric: str
    num_layers: int
    distances: np.ndarray
    samples: int
    tokens: int
    data_hash: str
    max_length: int
    extra: dict = field(default_factory=dict)

    def d(self, l: int, n: int) -> float:
        """d(x^l, x^{l+n}), the paper's notation."""
        if not (n >= 1 and 0 <= l and l + n <= self.num_layers):
            raise IndexError(f"no pair (l={l}, n={n}) in a model of {self.num_layers} layers")
        return float(self.distances[l, l + n])

    def to_frame(self):
        """Long format: one row per (l, n), n >= 1, which is what plots and pandas users want."""
        import pandas as pd

        L = self.num_layers
        rows = [(l, n, self.distances[l, l + n]) for n in range(1, L + 1) for l in range(0, L - n + 1)]
        return pd.DataFrame(rows, columns=["l", "n", "distance"])

    def _metadata(self) -> dict[str, str]:
        meta = {k: getattr(self, k) for k in ("model_id", "metric", "num_layers", "samples", "tokens",
                                               "data_hash", "max_length", "extra")}
        return {METADATA_KEY: json.dumps(meta)}

    def to_arrow(self):
        """The long-format table with the table's facts in the schema metadata: what a Parquet file holds."""
        import pyarrow as pa

        table = pa.Table.from_pandas(self.to_frame(), preserve_index=False)
        return table.replace_schema_metadata({**(table.schema.metadata or {}), **self._metadata()})

    @classmethod
    def from_arrow(cls, table, source: str = "the table") -> "DistanceTable":
        """The inverse of :meth:`to_arrow`; ``source`` names the file in the error of a table not written here."""
        raw = (table.schema.metadata or {}).get(METADATA_KEY.encode())
        if raw is None:
            raise UserError(f"{source} is not a ray-prune distance table (no metadata)",
                            "point at a file written by `ray-prune profile`")
        meta = json.loads(raw)
        L = meta["num_layers"]
        dist = np.zeros((L + 1, L + 1))
        df = table.to_pandas()
        l, n, d = df["l"].to_numpy(), df["n"].to_numpy(), df["distance"].to_numpy()
        dist[l, l + n] = d
        dist[l + n, l] = d
        return cls(distances=dist, **meta)

    def save(self, path: str | Path) -> Path:
        """Write Parquet atomically: a crash never leaves a half-written table."""
        import pyarrow.parquet as pq

        from ray_prune.core.atomic import atomic_path

        with atomic_path(path) as tmp:
            pq.write_table(self.to_arrow(), tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "DistanceTable":
        import pyarrow.parquet as pq

        return cls.from_arrow(pq.read_table(path), str(path))
