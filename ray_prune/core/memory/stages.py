"""Each stage's peak GPU memory as a sum of terms (:func:`estimate`), and what a stage may run on (:func:`options`).

Nothing here loads weights or allocates tensors: every number is a closed form
of the config (:class:`Arch`) and the experiment's batch and sequence settings
(:class:`Workload`). :func:`estimate` gives one stage's peak as a list of named
terms at a precision and a number of GPUs; :func:`options` lists the precisions and
GPU counts a plan (``memory.plan.choose``) tries for a stage, in order.

Stages, as the sweep runs them (``sweep.profile_stage``, ``sweep.trial``)
-----------------------------------------------------------------------
``profile``: the unpruned model in the experiment dtype for the distance table
  (decoder without LM head, ``calibration.batch_size`` x ``max_length``); then, loaded
  again in the precision rows are scored in, the unpruned heal validation losses
  (``next_token_loss`` at its default batch of 8) and the baseline evaluation. The
  peak is the larger of the two loads.
``unhealed``: ``load_pruned`` loads the *unpruned* model in the scoring precision and
  prunes it in memory, then evaluates.
``heal``: LoRA adapters and AdamW on the pruned base: NF4 (``heal.quantize: nf4``) or
  the compute dtype.
``healed``: with ``eval.precision: trained`` (scores in the heal precision) the NF4 base
  with the adapter unmerged; with ``full``, ``merge_adapter`` builds a merged copy in the
  experiment dtype while the caller still holds the NF4 model.
Rows are scored in NF4 when ``eval.precision`` is ``trained`` and the cells heal on an
NF4 base (:meth:`Workload.scored_precision`); ``precision="auto"`` means that choice,
and ``memory.plan.choose`` may override it (full precision split across GPUs, or NF4).

Worst cell
----------
Estimates take ``n_removed`` (default 0). The trial stages see a pruned model, so
their worst cell is the smallest n of the grid; ``sweep.memory_plan.plan_models`` passes that n.
The paper's grids start at fraction 0, so n = 0 and the unpruned size *is* the
worst cell. Even for n > 0, ``unhealed`` and ``heal`` keep a term for the unpruned
blocks, because ``load_pruned`` prunes after loading the model onto the GPU (the freed
blocks stay in PyTorch's cache and are reused later, hence ``max(unpruned, pruned + rest)``).

How each term is sized, where its number comes from and how accurate it is: ``memory.terms`` and the modules it
names.
"""

from __future__ import annotations

from typing import Any, Literal

from ray_prune.core.memory.arch import Arch, dtype_bytes, param_count
from ray_prune.core.memory.evaluation import eval_terms
from ray_prune.core.memory.inference import REFERENCE_LOSS_BATCH, next_token_loss_bytes, profile_terms
from ray_prune.core.memory.terms import StageEstimate, Term, total_bytes, weight_terms
from ray_prune.core.memory.training import heal_terms, lora_params
from ray_prune.core.memory.workload import Workload
from ray_prune.errors import UserError

STAGES: tuple[str, ...] = ("profile", "unhealed", "heal", "healed")
TRIAL_STAGES: tuple[str, ...] = ("unhealed", "heal", "healed")
Stage = Literal["profile", "unhealed", "heal", "healed"]
GPU_COUNTS: tuple[int, ...] = (2, 4, 8)
Order = Literal["one_gpu", "full_precision"]


def estimate(config: Any, workload: Workload, stage: Stage, precision: str = "auto", gpus: int = 1,
             n_removed: int = 0) -> StageEstimate:
    """Peak memory per GPU of ``stage`` for a model with ``n_removed`` of its blocks pruned.

    ``precision`` is the weights' storage: ``auto`` (the experiment's: rows scored as
    :meth:`Workload.scored_precision` says, the table in the experiment dtype), ``bf16``/``fp16``/``fp32`` or
    ``nf4``. For ``heal`` it must be ``auto`` or match ``heal.quantize``. ``gpus`` > 1 is a pipeline split by
    layers (e.g. ``device_map="auto"``): each GPU holds its share of the blocks and of every per-block term,
    and the busiest holds every other term too.
    """
    arch = config if isinstance(config, Arch) else Arch.from_config(config)
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}", f"use one of {', '.join(STAGES)}")
    if not 0 <= n_removed < arch.layers:
        raise UserError(f"n_removed={n_removed} for a model of {arch.layers} layers", "use 0 <= n < L")
    if stage == "heal":
        return _heal_estimate(arch, workload, precision, gpus, n_removed)
    compute = "bf16" if workload.dtype == "auto" else workload.dtype
    scored = workload.scored_precision() if precision in ("auto", "streamed") else precision
    store = compute if scored == "auto" else scored  # the weights of the scored (evaluated) model
    if stage == "profile":
        return _profile_estimate(arch, workload, compute, precision, store, gpus)
    kept = arch.layers - n_removed
    c = dtype_bytes(compute)
    notes: list[str] = []
    if stage == "unhealed":
        terms = weight_terms(arch, kept, store, compute) + eval_terms(arch, workload, c, kept)
        _unpruned_load(arch, terms, store, compute, n_removed)
    else:
        terms = _healed_terms(arch, workload, store, kept, notes)
    if store == "nf4":
        terms.append(_dequant_term(arch, c))
        if workload.scored_precision() != "nf4":
            notes.append("scores an NF4 model where the experiment scores in full precision: NF4 scores differ "
                         "(shared/MEASUREMENTS.md: ~0.2 nats of loss on SmolLM2)")
    return StageEstimate(stage, store, gpus, kept, tuple(terms), tuple(notes))


def _dequant_term(arch: Arch, c: int) -> Term:
    return Term("NF4 dequantized weight (transient)", max(param_count(arch).linear_sizes) * c, False,
                "bitsandbytes dequantizes a weight per matmul")


def _unpruned_load(arch: Arch, terms: list[Term], store: str, compute: str, n_removed: int) -> None:
    """``load_pruned`` loads the whole model onto the GPU, then prunes: ``max(unpruned, pruned + the rest)``."""
    extra = total_bytes(weight_terms(arch, arch.layers, store, compute)) - total_bytes(terms)
    if n_removed and extra > 0:
        terms.append(Term("unpruned blocks before prune_layers", extra, True,
                          "load_pruned loads the whole model onto the GPU, then prunes"))


def _heal_estimate(arch: Arch, workload: Workload, precision: str, gpus: int, n_removed: int) -> StageEstimate:
    """The largest heal point of the model's grid."""
    kept = arch.layers - n_removed
    worst: StageEstimate | None = None
    for point in workload.heal:
        hc = "bf16" if point.dtype == "auto" else point.dtype
        store = "nf4" if point.quantize == "nf4" else hc
        if precision not in ("auto", store):
            raise UserError(f"heal runs in {store} (heal.quantize: {point.quantize}), not {precision}",
                            "estimate heal with precision='auto' or change heal.quantize")
        terms = weight_terms(arch, kept, store, hc, "base") + heal_terms(arch, point, kept, dtype_bytes(hc))
        _unpruned_load(arch, terms, store, hc, n_removed)
        est = StageEstimate("heal", store, gpus, kept, tuple(terms), (
            f"batch_size {point.batch_size} x seq_len {point.seq_len}, gradient_checkpointing "
            f"{point.gradient_checkpointing}",))
        if worst is None or est.peak_bytes > worst.peak_bytes:
            worst = est
    assert worst is not None
    return worst


def _profile_estimate(arch: Arch, workload: Workload, compute: str, precision: str, store: str,
                      gpus: int) -> StageEstimate:
    """The distance table on the model in the experiment dtype (or ``precision``), then, loaded again in the
    scoring precision, the unpruned reference losses and the baseline row: the larger of the two loads."""
    c = dtype_bytes(compute)
    table = compute if precision == "auto" else precision
    if table == "streamed":  # core.profile_streamed: one block at a time, every sample's hidden state kept
        held = workload.calibration.samples * workload.calibration.max_length * arch.hidden * c
        first = weight_terms(arch, 1, compute, compute, "one block, embeddings") + [
            Term("streamed profile: every sample's hidden state", held, False,
                 f"{workload.calibration.samples} x {workload.calibration.max_length} tokens")] + \
            profile_terms(arch, workload, c)
    else:
        first = weight_terms(arch, arch.layers, table, compute) + profile_terms(arch, workload, c)
    after = []
    for seq_len in {p.seq_len for p in workload.heal}:
        b, how = next_token_loss_bytes(arch, c, REFERENCE_LOSS_BATCH, seq_len)
        after.append([Term("reference heal validation loss", b, False, how)])
    after.append(eval_terms(arch, workload, c, arch.layers))
    second = weight_terms(arch, arch.layers, store, compute) + max(after, key=total_bytes)
    for part, precision_of in ((first, table), (second, store)):
        if precision_of == "nf4":
            part.append(_dequant_term(arch, c))
    terms = first if total_bytes(first) >= total_bytes(second) else second
    label = table if table == store else f"{table}+{store}"  # the table's precision, then the scoring one
    notes = [f"the peak is the {'distance-table' if terms is first else 'scoring'} load"]
    if table == "nf4":
        notes.append(f"the distance table is computed on the NF4 model, not in {compute}")
    if table == "streamed":
        notes.append(f"the distance table is computed in {compute}, one block at a time (core.profile_streamed)")
    return StageEstimate("profile", label, gpus, arch.layers, tuple(terms), tuple(notes))


def _healed_terms(arch: Arch, workload: Workload, store: str, kept: int, notes: list[str]) -> list[Term]:
    """The healed model as scored: the NF4 base with the adapter unmerged, or a merged full-precision copy."""
    heal = max(workload.heal, key=lambda h: (h.quantize == "nf4", h.rank))
    hc = "bf16" if heal.dtype == "auto" else heal.dtype
    P = lora_params(arch, kept, heal.rank, arch.targets(heal.target))
    if store == "nf4":
        terms = weight_terms(arch, kept, "nf4", hc, "NF4 base") + [Term("LoRA weights (fp32)", 4 * P, True)]
        notes.append("scores the NF4 base with the adapter unmerged (eval.precision: trained)")
    else:
        terms = weight_terms(arch, kept, store, hc, "merged weights")
        if heal.quantize == "nf4":  # the fp32 reload and the merge run on the CPU; the merged copy moves over
            terms += weight_terms(arch, kept, "nf4", hc, "NF4 model still held")
            terms.append(Term("LoRA weights (fp32), trained and reloaded copies", 8 * P, True))
            notes.append("trial.evaluate_healed keeps the NF4 model alive while it scores the merged copy")
    terms += eval_terms(arch, workload, dtype_bytes(hc), kept)
    if store != "nf4" and heal.quantize != "nf4":  # merge_adapter merges in fp32 on the model's device
        extra = total_bytes(weight_terms(arch, kept, "fp32", "fp32")) - total_bytes(terms)
        if extra > 0:
            terms.append(Term("merge: the model in fp32 (transient)", extra, True,
                              "merge_adapter: target.float().merge_and_unload()"))
    return terms


def options(stage: str, workload: Workload, gpus_per_node: int, order: Order = "one_gpu") -> list[tuple[str, int]]:
    """(precision, GPUs) to try, in order. Heal keeps its own precision (``heal.quantize``)."""
    split = [("auto", k) for k in GPU_COUNTS if k <= gpus_per_node]
    if stage == "heal":
        return [("auto", 1)] + (split if all(h.quantize != "nf4" for h in workload.heal) else [])
    # profile: the table in full precision in memory, else streamed one block at a time (exact, core.profile_streamed)
    single = [("auto", 1)] + ([("streamed", 1)] if stage == "profile" else []) + \
        ([("nf4", 1)] if stage == "profile" or workload.scored_precision() != "nf4" else [])
    if order == "full_precision":
        return single[:1] + split + single[1:]
    return single + split
