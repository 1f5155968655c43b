"""``HealConfig``: every setting of a healing run, declared once, each with its default and its reason.

The experiment schema (``ray_prune.sweep.experiment``), the ``ray-prune heal``
flags (``ray_prune.cli``) and the result columns (``ray_prune.ledger.schema``)
are derived from these fields; nothing else lists them. Field metadata says
what else each setting is:

- ``axis``: an experiment may give a list of values, which becomes a grid axis.
- ``resume``: shapes the training trajectory, so a checkpoint resumes only under the same value.
- ``identity``: how the setting enters a cell's id: ``always``; ``if_changed`` (only when it differs
  from its default, so adding a setting never invalidates finished cells); or ``never`` (it changes
  how a result is computed, not the result, like gradient checkpointing).
- ``source``: where a sweep takes the value from, when not from the ``heal`` section.

Defaults follow the paper: QLoRA (NF4 base), rank 8 on the FFN, alpha = rank,
dropout 0.05, a cosine schedule with warmup, 5000 steps of 16 x 1024 tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ray_prune.core import dtypes
from ray_prune.errors import UserError


def _setting(default: Any, why: str, *, axis: bool = False, resume: bool = True, identity: str = "always",
             source: str = "heal") -> Any:
    return field(default=default, metadata={"why": why, "axis": axis, "resume": resume, "identity": identity,
                                            "source": source})


@dataclass
class HealConfig:
    """Everything that determines a healing run."""

    lr: float = _setting(3e-4, "peak AdamW learning rate (the paper: 3e-4; 3e-5 for Llama-2-70B)", axis=True)
    rank: int = _setting(8, "LoRA rank (the paper: 8)", axis=True)
    alpha: float | None = _setting(None, "LoRA alpha; None is alpha = rank, a LoRA scaling of 1 (the paper)",
                                   identity="if_changed")
    dropout: float = _setting(0.05, "LoRA dropout on the adapter input (the paper: 0.05)", identity="if_changed")
    target: str | list[str] = _setting("ffn", "LoRA targets: ffn (the paper), all-linear, or module names")
    quantize: Literal["nf4", "none"] = _setting("nf4", "nf4: QLoRA on a 4-bit base (the paper); none: plain LoRA",
                                                axis=True)
    steps: int = _setting(5000, "optimizer steps, each of batch_size x grad_accum sequences (the paper: 5000)",
                          axis=True)
    batch_size: int = _setting(16, "sequences per forward/backward micro-batch (the paper: 16)", axis=True)
    grad_accum: int = _setting(1, "micro-batches per optimizer step: a larger effective batch in the same memory")
    seq_len: int = _setting(1024, "tokens per packed training block (the paper: 1024)", axis=True)
    warmup_steps: int = _setting(100, "linear warmup steps (clipped to steps), then cosine decay to 0")
    weight_decay: float = _setting(0.0, "AdamW weight decay on the adapter weights", identity="if_changed")
    max_grad_norm: float = _setting(1.0, "global gradient-norm clip; 0 disables it", identity="if_changed")
    eval_every: int = _setting(100, "steps between validation losses, callbacks and checkpoints", resume=False)
    val_sequences: int = _setting(64, "packed validation blocks, fixed for the whole run", resume=False)
    gradient_checkpointing: bool = _setting(False, "recompute activations in the backward pass: less memory, "
                                            "about a third more compute", resume=False, identity="never")
    seed: int = _setting(0, "LoRA init, dropout and data order", source="seeds")
    dtype: str = _setting("auto", "compute dtype; auto is bf16 on GPUs that have it, fp32 elsewhere",
                          resume=False, source="dtype")

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
    def settings(cls) -> list[dataclasses.Field]:
        """The fields an experiment's ``heal`` section sets (seed and dtype come from elsewhere)."""
        return [f for f in dataclasses.fields(cls) if f.metadata["source"] == "heal"]

    @classmethod
    def names(cls, **metadata: Any) -> tuple[str, ...]:
        """Field names whose metadata matches, e.g. ``names(axis=True)``."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if all(f.metadata.get(k) == v for k, v in metadata.items()))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def resume_key(self) -> dict[str, Any]:
        """The settings a checkpoint must share to resume (lists as lists, for JSON)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k in self.names(resume=True)}

    def validate(self) -> "HealConfig":
        """Fail early, with a fix, on values that would crash or silently mis-train later."""
        for name in ("steps", "batch_size", "grad_accum", "rank", "eval_every", "val_sequences"):
            value = getattr(self, name)
            _need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"{name} must be > 0, got {value!r}", f"set {name} to a positive integer")
        _need(isinstance(self.seq_len, int) and self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len!r}",
              "set seq_len to an integer >= 2 (a block must hold at least one next-token prediction)")
        _need(_number(self.lr) and math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}",
              "set lr to a positive number, e.g. 3e-4")
        _need(self.alpha is None or (_number(self.alpha) and self.alpha > 0), f"alpha must be > 0, got {self.alpha!r}",
              "set alpha to a positive number, or leave it unset for alpha = rank")
        _need(_number(self.dropout) and 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout!r}",
              "set dropout in [0, 1)")
        _need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
              f"warmup_steps must be >= 0, got {self.warmup_steps!r}", "set warmup_steps to an integer >= 0")
        _need(_number(self.weight_decay) and self.weight_decay >= 0,
              f"weight_decay must be >= 0, got {self.weight_decay!r}", "set weight_decay >= 0")
        _need(_number(self.max_grad_norm) and self.max_grad_norm >= 0,
              f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}", "set max_grad_norm >= 0 (0 disables clipping)")
        _need(self.quantize in ("nf4", "none"), f"quantize must be nf4 or none, got {self.quantize!r}",
              "use quantize='nf4' (QLoRA, as in the paper) or 'none' (plain LoRA)")
        _need(isinstance(self.gradient_checkpointing, bool),
              f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}",
              "set gradient_checkpointing: true or false")
        _need(self.dtype in dtypes.ALIASES, f"dtype must be one of {', '.join(dtypes.ALIASES)}, got {self.dtype!r}",
              f"use one of {', '.join(dtypes.ALIASES)}")
        if isinstance(self.target, str):
            _need(bool(self.target.strip()), "target is empty", "use 'ffn', 'all-linear' or a list of module names")
        else:
            _need(isinstance(self.target, (list, tuple)) and len(self.target) > 0
                  and all(isinstance(t, str) and t for t in self.target),
                  f"target must name modules, got {self.target!r}",
                  "use 'ffn', 'all-linear' or a non-empty list of module names")
        return self


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need(ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise UserError(f"heal config: {problem}", fix)
