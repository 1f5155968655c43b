"""``HealConfig``: every setting of a healing run, declared once, each with its default and its reason.

The experiment schema (``ray_prune.sweep.sections``), the ``ray-prune heal`` flags (``ray_prune.cli.flags``) and
the result columns (``ray_prune.ledger.schema``) are derived from these fields; nothing else lists them. Field
metadata (``core.settings``) says what else each setting is: a grid ``axis``; whether a checkpoint ``resume``\\ s
only under the same value; how it enters a cell's ``identity``; its ``source`` when a sweep takes it from
elsewhere than the ``heal`` section (the seed from ``seeds``, the dtype from ``dtype``).

Defaults follow the paper: QLoRA (NF4 base), rank 8 on the FFN, alpha = rank, dropout 0.05, a cosine schedule
with warmup, 5000 steps of 16 x 1024 tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ray_prune.core import dtypes
from ray_prune.core.settings import Settings, is_int, is_number, need, setting

OPTIMIZERS = ("adamw", "paged_adamw_8bit")


def _targets(text: str) -> str | list[str]:
    """``ffn``, ``all-linear`` or comma-separated module names, as a flag writes them."""
    return text if text in ("ffn", "all-linear") else [t for t in text.replace(" ", "").split(",") if t]


@dataclass
class HealConfig(Settings):
    """Everything that determines a healing run."""

    lr: float = setting(3e-4, "peak AdamW learning rate (the paper: 3e-4; 3e-5 for Llama-2-70B)", axis=True)
    rank: int = setting(8, "LoRA rank (the paper: 8)", axis=True)
    alpha: float | None = setting(None, "LoRA alpha; None is alpha = rank, a LoRA scaling of 1 (the paper)",
                                  identity="if_changed")
    dropout: float = setting(0.05, "LoRA dropout on the adapter input (the paper: 0.05)", identity="if_changed")
    target: str | list[str] = setting("ffn", "LoRA targets: ffn (the paper), all-linear, or module names "
                                      "(comma-separated on the command line)", parse=_targets)
    quantize: Literal["nf4", "none"] = setting("nf4", "nf4: QLoRA on a 4-bit base (the paper); none: plain LoRA",
                                               axis=True)
    steps: int = setting(5000, "optimizer steps, each of batch_size x grad_accum sequences (the paper: 5000)",
                         axis=True)
    batch_size: int = setting(16, "sequences per forward/backward micro-batch (the paper: 16)", axis=True)
    grad_accum: int = setting(1, "micro-batches per optimizer step: a larger effective batch in the same memory")
    seq_len: int = setting(1024, "tokens per packed training block (the paper: 1024)", axis=True)
    warmup_steps: int = setting(100, "linear warmup steps (clipped to steps), then cosine decay to 0")
    weight_decay: float = setting(0.0, "AdamW weight decay on the adapter weights", identity="if_changed")
    max_grad_norm: float = setting(1.0, "global gradient-norm clip; 0 disables it", identity="if_changed")
    eval_every: int = setting(100, "steps between validation losses, callbacks and checkpoints", resume=False)
    val_sequences: int = setting(64, "packed validation blocks, fixed for the whole run", resume=False)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, "
                                           "about a third more compute", resume=False, identity="never")
    optimizer: Literal["adamw", "paged_adamw_8bit"] = setting(
        "adamw", "adamw: torch's AdamW with fp32 moments (the paper's); paged_adamw_8bit: bitsandbytes' AdamW with "
        "8-bit moments in paged memory (QLoRA's), 6 fewer bytes per LoRA parameter and no out-of-memory spike on "
        "CUDA; its updates differ slightly, so it names its cells", identity="if_changed", choices=OPTIMIZERS)
    seed: int = setting(0, "LoRA init, dropout and data order", source="seeds")
    dtype: str = setting("auto", "compute dtype; auto is bf16 on GPUs that have it, fp32 elsewhere",
                         resume=False, source="dtype", choices=dtypes.ALIASES, flag=False)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def effective_warmup(self) -> int:
        return min(self.warmup_steps, self.steps)

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @classmethod
    def from_point(cls, point: Mapping[str, Any], **elsewhere: Any) -> HealConfig:
        """The config of one point of an experiment's heal grid (keys that are not settings, like ``enabled``,
        are ignored), with the settings a sweep takes from elsewhere (``seed``, ``dtype``)."""
        return cls.from_dict(point, **elsewhere)

    def resume_key(self) -> dict[str, Any]:
        """The settings a checkpoint must share to resume (lists as lists, for JSON)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k in self.names(resume=True)}

    def validate(self) -> HealConfig:
        """Fail early, with a fix, on values that would crash or silently mis-train later."""
        for name in ("steps", "batch_size", "grad_accum", "rank", "eval_every", "val_sequences"):
            value = getattr(self, name)
            need(is_int(value) and value >= 1, "heal", f"{name} must be > 0, got {value!r}",
                 f"set {name} to a positive integer")
        need(is_int(self.seq_len) and self.seq_len >= 2, "heal", f"seq_len must be >= 2, got {self.seq_len!r}",
             "set seq_len to an integer >= 2 (a block must hold at least one next-token prediction)")
        need(is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0, "heal", f"lr must be > 0, got {self.lr!r}",
             "set lr to a positive number, e.g. 3e-4")
        need(self.alpha is None or (is_number(self.alpha) and self.alpha > 0), "heal",
             f"alpha must be > 0, got {self.alpha!r}", "set alpha to a positive number, or leave it unset for "
             "alpha = rank")
        need(is_number(self.dropout) and 0 <= self.dropout < 1, "heal", f"dropout must be in [0, 1), got "
             f"{self.dropout!r}", "set dropout in [0, 1)")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "heal",
             f"warmup_steps must be >= 0, got {self.warmup_steps!r}", "set warmup_steps to an integer >= 0")
        need(is_number(self.weight_decay) and self.weight_decay >= 0, "heal",
             f"weight_decay must be >= 0, got {self.weight_decay!r}", "set weight_decay >= 0")
        need(is_number(self.max_grad_norm) and self.max_grad_norm >= 0, "heal",
             f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}", "set max_grad_norm >= 0 (0 disables clipping)")
        need(self.optimizer in OPTIMIZERS, "heal", f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
             f"{self.optimizer!r}", "use optimizer: adamw (the paper's) or paged_adamw_8bit (less GPU memory)")
        need(self.quantize in ("nf4", "none"), "heal", f"quantize must be nf4 or none, got {self.quantize!r}",
             "use quantize='nf4' (QLoRA, as in the paper) or 'none' (plain LoRA)")
        need(isinstance(self.gradient_checkpointing, bool), "heal",
             f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}",
             "set gradient_checkpointing: true or false")
        need(self.dtype in dtypes.ALIASES, "heal", f"dtype must be one of {', '.join(dtypes.ALIASES)}, got "
             f"{self.dtype!r}", f"use one of {', '.join(dtypes.ALIASES)}")
        if isinstance(self.target, str):
            need(bool(self.target.strip()), "heal", "target is empty", "use 'ffn', 'all-linear' or a list of module "
                 "names")
        else:
            need(isinstance(self.target, (list, tuple)) and len(self.target) > 0
                 and all(isinstance(t, str) and t for t in self.target), "heal",
                 f"target must name modules, got {self.target!r}",
                 "use 'ffn', 'all-linear' or a non-empty list of module names")
        return self
