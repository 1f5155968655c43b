"""``CalibrationConfig``: the text a model is profiled on and how the distances are taken, declared once.

The experiment's ``calibration`` section, the ``ray-prune profile``/``prune`` flags, the memory workload and the
defaults of :func:`~ray_prune.core.profile.profile` and
:func:`~ray_prune.core.profile_streamed.profile_streamed` are derived from these fields. Defaults follow the
paper: C4 text and the angular distance at the last token. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_prune.core.data import TEXT_SOURCES
from ray_prune.core.distance import METRICS
from ray_prune.core.settings import Settings, is_int, need, setting


@dataclass(frozen=True)
class CalibrationConfig(Settings):
    """Everything that determines a distance table, given the model."""

    dataset: str = setting("c4", "text the streams are compared on (the paper: C4)", choices=TEXT_SOURCES)
    samples: int = setting(128, "calibration documents: the table is their mean, so more is less noise")
    max_length: int = setting(1024, "tokens per calibration document (longer ones are cut)")
    batch_size: int = setting(8, "documents per forward pass: memory, not the result")
    metric: str = setting("angular", "distance: angular (the paper's, at the last token), angular_all (every "
                          "token) or block_influence (ShortGPT's 1 - cos)", choices=METRICS)
    greedy_samples: int = setting(0, "packed calibration blocks SLEB's greedy order is scored on (0: all of "
                                  "samples): a round scores every remaining layer, so an order costs tens of "
                                  "profile passes per round, and a CPU study needs a smaller set than the table",
                                  identity="if_changed")

    def validate(self) -> "CalibrationConfig":
        """Fail early, with a fix, on values that would crash or silently mis-profile later."""
        for name in ("samples", "batch_size"):
            value = getattr(self, name)
            need(is_int(value) and value >= 1, "calibration", f"{name} must be > 0, got {value!r}",
                 f"set {name} to a positive integer")
        need(is_int(self.max_length) and self.max_length >= 2, "calibration",
             f"max_length must be >= 2, got {self.max_length!r}", "set max_length to an integer >= 2")
        need(self.metric in METRICS, "calibration", f"unknown metric {self.metric!r}",
             f"use one of {', '.join(METRICS)}")
        need(self.dataset in TEXT_SOURCES, "calibration", f"unknown dataset {self.dataset!r}",
             f"use one of {', '.join(TEXT_SOURCES)}")
        need(is_int(self.greedy_samples) and 0 <= self.greedy_samples <= self.samples, "calibration",
             f"greedy_samples must be between 0 (all samples) and samples ({self.samples}), got "
             f"{self.greedy_samples!r}", "set greedy_samples to at most samples, or 0 for all of them")
        need(self.batch_size <= self.samples, "calibration",
             f"batch_size {self.batch_size} is larger than the calibration set ({self.samples} samples)",
             "lower batch_size or raise samples")
        return self

    @property
    def greedy_blocks(self) -> int:
        """How many packed calibration blocks the greedy order reads."""
        return self.greedy_samples or self.samples


DEFAULT = CalibrationConfig()  # the signature defaults of the profiling functions read this
