"""The work of each thing a sweep runs, as tokens and FLOPs (parameters, for a load), one :class:`Work` per kind.

Tokens
------
A distance table: ``calibration.samples x max_length`` (documents padded to the batch's longest, about the cap); a
greedy order (:func:`greedy_work`) and a linear repair (:func:`repair_work`) run on the same calibration tokens.
Heal: ``steps x sequences per step x seq_len`` (the ``tokens_seen`` rows record), and each validation loss
(``steps / eval_every``, and the last step) on ``val_sequences x seq_len``. The C4 loss: ``c4_sequences x seq_len``.
A question: ``eval_tokens.TASK_TOKENS``, measured (its comment says how); tasks without an entry use
``eval_tokens.fallback_task_tokens``. Padding inside a batch is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.cost.eval_tokens import task_tokens
from ray_prune.core.cost.flops import adapter_params, attention_flops, forward_flops, head_flops, train_flops
from ray_prune.core.evaluation.config import EvalConfig
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.arch import Arch, param_count
from ray_prune.core.memory.workload import LM_EVAL_MAX_GEN_TOKS, Workload

KINDS: tuple[str, ...] = ("train", "forward", "score", "table", "load")


@dataclass(frozen=True)
class Work:
    """FLOPs (or, for ``load``, parameters) of one kind, and the tokens they are for."""

    kind: str
    tokens: float
    amount: float  # FLOPs; parameters for "load"
    what: str = ""


def evaluation_work(arch: Arch, kept: int, evaluation: EvalConfig, tasks: bool = True, lora: int = 0) -> list[Work]:
    """``core.evaluation.harness.evaluate`` of a ``kept``-block model: each task's questions (``tasks``), then the C4
    loss; ``lora`` adapter parameters run unmerged (a healed row scored as trained)."""
    out = []
    if tasks and evaluation.tasks:
        limits = evaluation.limits()
        generated = evaluation.max_gen_toks or LM_EVAL_MAX_GEN_TOKS
        for name, shots in evaluation.shots().items():
            tt, measured = task_tokens(name, shots)
            n = tt.questions if limits[name] is None else min(limits[name], tt.questions)
            tokens = tt.tokens(n)
            flops = tokens * forward_flops(arch, kept, tt.length, head=False, lora=lora) + \
                n * tt.scored * head_flops(arch)
            if tt.generated:  # each generated token: one forward with its head, over the prompt and what came before
                flops += n * generated * forward_flops(arch, kept, tt.length + generated / 2, lora=lora)
                tokens += n * generated
            out.append(Work("score", tokens, flops, f"{name} {shots}-shot x {n}" + ("" if measured else
                                                                                   " (fallback tokens)")))
    if evaluation.c4_sequences:
        tokens = evaluation.c4_sequences * evaluation.seq_len
        out.append(Work("forward", tokens, tokens * forward_flops(arch, kept, evaluation.seq_len, lora=lora),
                        f"C4 loss {evaluation.c4_sequences} x {evaluation.seq_len}"))
    return out


def validations(heal: HealConfig) -> int:
    """Heal validation losses a run computes: every ``eval_every`` steps and at the last step (``heal.loop``)."""
    return heal.steps // heal.eval_every + (1 if heal.steps % heal.eval_every else 0)


def heal_work(arch: Arch, kept: int, heal: HealConfig) -> list[Work]:
    """``heal.loop.heal``: the training steps and the validation losses between them."""
    train = heal.steps * heal.sequences_per_step * heal.seq_len
    val = validations(heal) * heal.val_sequences * heal.seq_len
    lora = adapter_params(arch, kept, heal)
    return [Work("train", train, train * train_flops(arch, kept, heal), f"{heal.steps} steps of "
                 f"{heal.sequences_per_step} x {heal.seq_len}"),
            Work("forward", val, val * forward_flops(arch, kept, heal.seq_len, lora=lora),
                 f"{validations(heal)} validation losses of {heal.val_sequences} x {heal.seq_len}")]


def profile_work(arch: Arch, cal: CalibrationConfig) -> list[Work]:
    """A distance table: the decoder without its head over the calibration documents (``core.profile``)."""
    tokens = cal.samples * cal.max_length
    return [Work("table", tokens, tokens * forward_flops(arch, arch.layers, cal.max_length, head=False),
                 f"distance table {cal.samples} x {cal.max_length}")]


def greedy_work(arch: Arch, cal: CalibrationConfig, rounds: int) -> list[Work]:
    """SLEB's greedy order (``core.greedy``) on the packed calibration blocks: a round with K blocks left runs the
    current model once, K(K - 1)/2 blocks and K LM heads over every calibration token."""
    tokens, T = cal.greedy_blocks * cal.max_length, cal.max_length
    per_block = 2.0 * param_count(arch).layer_linear + attention_flops(arch, 1, T)
    flops = sum(tokens * ((K + K * (K - 1) / 2) * per_block + K * head_flops(arch))
                for K in range(arch.layers, arch.layers - rounds, -1))
    return [Work("table", tokens * rounds, flops, f"greedy order {rounds} rounds of {cal.greedy_blocks} x {T}")]


def repair_work(arch: Arch, kept: int, cal: CalibrationConfig) -> list[Work]:
    """A linear repair (``core.repair``, ReplaceMe): the full model's and the pruned model's streams on the
    packed calibration blocks (the least-squares solves are not counted)."""
    tokens, T = cal.samples * cal.max_length, cal.max_length
    flops = tokens * (forward_flops(arch, arch.layers, T, head=False) + forward_flops(arch, kept, T, head=False))
    return [Work("table", tokens * 2, flops, f"repair fit {cal.samples} x {T}")]


def reference_work(arch: Arch, workload: Workload) -> list[Work]:
    """ASHA's references (``sweep.profile_stage``): the unpruned model's heal validation loss for each heal shape."""
    shapes = sorted({(h.seq_len, h.val_sequences) for h in workload.heal}) if workload.heals else []
    return [Work("forward", n * T, n * T * forward_flops(arch, arch.layers, T), f"reference loss {n} x {T}")
            for T, n in shapes]


def load_work(arch: Arch, loads: int = 1) -> list[Work]:
    """``loads`` loads of the whole checkpoint (a pruned cell loads the unpruned model and prunes it in memory)."""
    params = float(param_count(arch).total())
    return [Work("load", 0.0, loads * params, f"{loads} load{'s' if loads > 1 else ''}")]
