"""The order Tune starts trials in: longest first.

Tune starts a grid's trials in list order as slots free up. In grid order a cross-model sweep runs the small
model's cells first and ends with the large model's, the last of them alone on an otherwise idle cluster.
Starting the longest trials first (the classic longest-processing-time rule) leaves the short ones to fill the
gaps at the end. On the bundled study (2 slots, Gemma-3's cells about twice SmolLM2's) the grid order left one
slot idle for most of a Gemma-3 cell; longest first, the two slots finished 38 s apart. Tune hands a worker
freed by one trial (``reuse_actors``) to a pending trial with the same resource request, so with mixed GPU
requests the order holds within each request size.

A trial's cost is estimated from the model's config alone: forward cost per token (the kept blocks' linear
weights plus the LM head) times the tokens the cell pushes through (heal steps at about 3x a forward, the C4
loss and the QA prompts). It only ranks trials; it is not a time prediction. The order changes no number of a
finished cell (every cell's seed is its own); under ASHA it can change which heal settings reach a rung first,
and so which are stopped. A model whose config cannot be read is ranked by its kept share of blocks alone, which
puts its cells last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from ray_prune.sweep.grid import Cell
    from ray_prune.sweep.plan import ModelRecord
    from ray_prune.sweep.trial import TrialSpec

QUESTION_TOKENS = 256  # a rough length of one QA prompt with its choices; only the ranking uses it


def _per_token(record: ModelRecord | None) -> tuple[int, int] | None:
    """(one block's linear weights, LM head weights) of a model, or None when the memory model cannot read it."""
    from ray_prune.core.memory import param_count
    from ray_prune.errors import UserError

    if record is None:
        return None
    try:
        p = param_count(record.arch)
    except (UserError, ValueError, AttributeError):
        return None
    return p.layer_linear, p.embedding if not p.lm_head else p.lm_head


def _eval_tokens(ev: dict, with_qa: bool) -> int:
    from ray_prune.core.evaluation.config import EvalConfig

    qa = 0
    if with_qa:
        config = EvalConfig.from_dict(ev)
        limits = config.limits()
        for name, shots in config.shots().items():
            qa += (limits[name] or 1000) * (shots + 1) * QUESTION_TOKENS
    return qa + (ev.get("c4_sequences") or 0) * (ev.get("seq_len") or 0)


def trial_cost(cell: Cell, does_unhealed: bool, record: ModelRecord | None = None) -> float:
    """A relative cost of ``cell``'s trial: forward weights per token times tokens."""
    kept = cell.num_layers - cell.n
    shape = _per_token(record)
    per_token = kept / max(1, cell.num_layers) if shape is None else kept * shape[0] + shape[1]
    tokens = 0
    if does_unhealed:
        tokens += _eval_tokens(cell.eval, cell.eval["unhealed"] is True)
    if cell.heals:
        h = cell.heal_config()
        validations = h.steps // max(1, h.eval_every) + 1
        tokens += (3 * h.steps * h.sequences_per_step + validations * h.val_sequences) * h.seq_len
        tokens += _eval_tokens(cell.eval, True)
    return float(per_token) * tokens


def longest_first(specs: list[TrialSpec], models: Mapping[str, ModelRecord] | None = None) -> list[TrialSpec]:
    """``specs`` sorted by estimated cost, the costliest first (ties keep the grid order). ``models``: the plan's
    record of each model, whose config sizes its blocks."""
    models = models or {}
    return sorted(specs, key=lambda s: -trial_cost(s.cell, s.do_unhealed, models.get(s.cell.model)))
