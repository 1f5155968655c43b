"""In which precision a cell's rows are scored: one rule for the baseline, unhealed and healed rows of a cell.

With ``eval.precision: trained`` (the default) every row of a cell is scored in the precision the cell heals
in: a QLoRA cell's base is NF4 computing in the training dtype, and its healed row is that base with the
adapter applied unmerged, which is the model that was trained and the one the paper scored. Its unhealed row
and its model's baseline row are scored on the same NF4 base, so the comparisons within a cell are like for
like (NF4 rounding alone costs about 0.2 nats of C4 loss on SmolLM2-135M, more than short heals gain).
With ``eval.precision: full`` every row is scored in the experiment's dtype, the adapter merged in fp32
arithmetic (``core.heal.lora.merge_adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ray_prune.core import dtypes


@dataclass(frozen=True)
class Scoring:
    quantize: str  # "nf4" or "none": how the base is loaded for scoring
    dtype: torch.dtype  # compute dtype
    label: str  # the rows' eval_precision, e.g. "nf4+fp32"
    merged: bool  # healed rows: the adapter merged (full) or applied as trained


def scoring(exp_dtype: str, scored_as: str, precision: str, heals: bool, device: torch.device) -> Scoring:
    """How to load and score a cell's (or a baseline's) model on ``device``."""
    trained = precision == "trained" and heals
    dtype = dtypes.to_torch(exp_dtype, device, "training" if trained else "inference")
    short = dtypes.short_name(dtype)
    return Scoring(scored_as, dtype, f"nf4+{short}" if scored_as == "nf4" else short, merged=not trained)
