"""Each stage's peak GPU memory as a sum of terms, and what each stage runs on: the plan of one model.

Nothing here loads weights or allocates tensors: every number is a closed form
of the config (:class:`Arch`) and the experiment's batch and sequence settings
(:class:`Workload`). :func:`estimate` gives one stage's peak as a list of named
terms; :func:`choose` picks, per stage, the first of *full precision on one GPU*,
*NF4 on one GPU*, *full precision across k GPUs* (k = 2, 4, 8, within a node)
that fits, or says what to change; with ``adjust``, on each of those it first tries
the settings that change memory but not the method (micro-batches at the same
sequences per step, gradient checkpointing, the 8-bit paged optimizer, smaller
evaluation and calibration batches) and records what it changed
(:attr:`ModelPlan.adjustments`); where nothing fits it says by how much.
:func:`format_plan_table` prints the result.

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
and :func:`choose` may override it (full precision split across GPUs, or NF4).

Worst cell
----------
Estimates take ``n_removed`` (default 0). The trial stages see a pruned model, so
their worst cell is the smallest n of the grid; ``sweep.memory_plan.plan_models`` passes that n.
The paper's grids start at fraction 0, so n = 0 and the unpruned size *is* the
worst cell. Even for n > 0, ``unhealed`` and ``heal`` keep a term for the unpruned
blocks, because ``load_pruned`` prunes after loading the model onto the GPU (the freed
blocks stay in PyTorch's cache and are reused later, hence ``max(unpruned, pruned + rest)``).

How each term is sized, where its number comes from and how accurate it is: ``memory.terms``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.arch import Arch, dtype_bytes, param_count
from ray_prune.core.memory.terms import (
    REFERENCE_LOSS_BATCH,
    StageEstimate,
    Term,
    Workload,
    eval_terms,
    heal_terms,
    lora_params,
    next_token_loss_bytes,
    profile_terms,
    total_bytes,
    weight_terms,
)
from ray_prune.errors import UserError

STAGES: tuple[str, ...] = ("profile", "unhealed", "heal", "healed")
TRIAL_STAGES: tuple[str, ...] = ("unhealed", "heal", "healed")
Stage = Literal["profile", "unhealed", "heal", "healed"]
GPU_COUNTS: tuple[int, ...] = (2, 4, 8)


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


# --------------------------------------------------------------------------- choosing

Order = Literal["one_gpu", "full_precision"]
HEADROOM = 0.10  # the share of a GPU a plan leaves free: the estimates are not exact (memory.terms, Accuracy)
OPTIMIZER_8BIT = "paged_adamw_8bit"  # heal.optimizer's low-memory choice (core.heal.config)
# The settings sections a stage's memory depends on, which an adjustment may change.
SECTIONS: dict[str, tuple[str, ...]] = {"profile": ("eval", "calibration"), "unhealed": ("eval",), "heal": ("heal",),
                                        "healed": ("eval",)}
Adjustments = dict[str, dict[str, Any]]  # section -> {setting: value}, e.g. {"eval": {"batch_size": 4}}


@dataclass(frozen=True)
class Choice:
    """What one stage of one model runs on, and the settings changed so that it fits there."""

    model: str
    stage: str
    estimate: StageEstimate  # the option chosen, or the smallest one tried when none fits
    fits: bool
    fix: str = ""  # when nothing fits: what to change
    adjusted: Adjustments = field(default_factory=dict)  # settings changed from the experiment's, by section
    short_gib: float = 0.0  # when nothing fits: GiB the smallest option needs beyond what the GPU leaves usable
    smallest: Adjustments = field(default_factory=dict)  # when nothing fits: the settings of that smallest option

    @property
    def precision(self) -> str:
        return self.estimate.precision

    @property
    def gpus(self) -> int:
        return self.estimate.gpus

    def settings_text(self) -> str:
        """The changed settings as an experiment file writes them (``heal: {batch_size: 2, grad_accum: 8}``); where
        nothing fits, those of the smallest option tried."""
        settings = self.adjusted if self.fits else self.smallest
        text = "; ".join(f"{section}: {{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in values.items()) + "}"
                         for section, values in settings.items())
        return text if self.fits or not text else f"(smallest) {text}"


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class ModelPlan:
    """Every stage of one model, on GPUs of ``gpu_gib`` with ``gpus_per_node`` per node."""

    model: str
    gpu_gib: float
    gpus_per_node: int
    headroom: float
    n_removed: int  # the n the trial stages were sized for: the smallest of the model's grid
    config_source: str  # where the config came from (model_configs.LoadedConfig.source)
    choices: tuple[Choice, ...]

    @property
    def fits(self) -> bool:
        return all(c.fits for c in self.choices)

    def choice(self, stage: str) -> Choice | None:
        return next((c for c in self.choices if c.stage == stage), None)

    @property
    def profile_gpus(self) -> int:
        c = self.choice("profile")
        return c.gpus if c is not None else 1

    @property
    def trial_gpus(self) -> int:
        """GPUs a trial needs: the most any of its stages needs (one trial runs them all in one process)."""
        return max([c.gpus for c in self.choices if c.stage in TRIAL_STAGES] or [1])

    @property
    def adjustments(self) -> Adjustments:
        """The settings this plan changed so that every stage fits, by section, only what changed: e.g. ``{"heal":
        {"batch_size": 2, "grad_accum": 8, "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit"}, "eval":
        {"batch_size": 4}, "calibration": {"batch_size": 4}}``; empty where the experiment's own settings fit.

        A sweep applies them to the model's cells before it runs them: :func:`adjust_heal` to each heal point (the
        ``batch_size`` there caps the micro-batch, and each point keeps its sequences per step through
        ``grad_accum``), the ``eval`` and ``calibration`` values as they are (:func:`apply_adjustments` does both
        to a :class:`Workload`). Micro-batches, checkpointing and evaluation or calibration batches change what a
        run costs, not what it computes; ``batch_size`` and ``grad_accum`` still enter a cell's id, and the 8-bit
        optimizer changes the updates (it names its cells: ``heal.optimizer``'s identity)."""
        out: Adjustments = {}
        for c in self.choices:
            for section, values in (c.adjusted if c.fits else {}).items():
                mine = out.setdefault(section, {})
                for k, v in values.items():
                    mine[k] = min(mine[k], v) if k == "batch_size" and k in mine else v
        return out


def adjust_heal(heal: HealConfig, values: Mapping[str, Any]) -> HealConfig:
    """``heal`` with a plan's heal adjustments: ``batch_size`` caps the micro-batch and ``grad_accum`` follows, so
    the sequences per step stay the same (the paper's 16 x 1024 tokens); the other values are set as they are."""
    out = replace(heal, **{k: v for k, v in values.items() if k not in ("batch_size", "grad_accum")})
    if "batch_size" in values:
        b = min(int(values["batch_size"]), heal.batch_size)
        total = heal.sequences_per_step
        if total % b:
            raise UserError(f"a micro-batch of {b} does not divide the {total} sequences of a heal step",
                            "use a micro-batch that divides heal.batch_size x heal.grad_accum")
        out = replace(out, batch_size=b, grad_accum=total // b)
    return out


def apply_adjustments(workload: Workload, adjustments: Mapping[str, Mapping[str, Any]]) -> Workload:
    """The workload with a plan's adjustments (:attr:`ModelPlan.adjustments`) applied."""
    if not adjustments:
        return workload
    heal = tuple(adjust_heal(h, adjustments.get("heal", {})) for h in workload.heal)
    return replace(workload, heal=heal, evaluation=replace(workload.evaluation, **adjustments.get("eval", {})),
                   calibration=replace(workload.calibration, **adjustments.get("calibration", {})))


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


def heal_candidates(workload: Workload) -> list[Adjustments]:
    """The heal settings a plan tries when the experiment's do not fit, in order, each keeping the sequences per
    step: smaller micro-batches with gradient accumulation (largest first); then gradient checkpointing (about a
    third more compute), largest micro-batch first; then, with checkpointing, the 8-bit paged optimizer."""
    totals = {h.sequences_per_step for h in workload.heal}
    largest = max(h.batch_size for h in workload.heal)
    sizes = [d for d in range(largest, 0, -1) if all(t % d == 0 for t in totals)]

    def values(b: int, **extra: Any) -> Adjustments:
        out: dict[str, Any] = {}
        if b < largest:
            out["batch_size"] = b
            if len(totals) == 1:
                out["grad_accum"] = next(iter(totals)) // b
        return {"heal": {**out, **extra}}

    out = [values(b) for b in sizes if b < largest]
    checkpointing = {} if all(h.gradient_checkpointing for h in workload.heal) else {"gradient_checkpointing": True}
    if checkpointing:
        out += [values(b, **checkpointing) for b in sizes]
    if not all(h.optimizer == OPTIMIZER_8BIT for h in workload.heal):
        out += [values(b, **checkpointing, optimizer=OPTIMIZER_8BIT) for b in sizes]
    return out


def batch_candidates(workload: Workload, stage: str) -> list[Adjustments]:
    """Smaller evaluation batches (and, for ``profile``, calibration batches), largest first: they change memory and
    speed, not the result."""
    ev, cal = workload.evaluation.batch_size, workload.calibration.batch_size
    out = []
    for be in range(ev, 0, -1):
        for bc in (range(cal, 0, -1) if stage == "profile" else [cal]):
            if (be, bc) != (ev, cal):
                out.append({k: v for k, v in (("eval", {"batch_size": be}), ("calibration", {"batch_size": bc}))
                            if v["batch_size"] != (ev if k == "eval" else cal)})
    return out


def _heal_fix(arch: Arch, workload: Workload, gpu_gib: float, headroom: float, n_removed: int) -> str:
    """Per heal point: the largest micro-batch that fits with the same sequences per step, without and with
    gradient checkpointing (which costs about a third more compute)."""
    def ok(h: HealConfig) -> bool:
        return estimate(arch, replace(workload, heal=(h,)), "heal", "auto", 1, n_removed).fits(gpu_gib, headroom)

    fixes = []
    for h in workload.heal:
        total = h.sequences_per_step
        found = []
        for ckpt in ([True] if h.gradient_checkpointing else [False, True]):
            for b in sorted((d for d in range(1, total + 1) if total % d == 0), reverse=True):
                if ok(replace(h, batch_size=b, grad_accum=total // b, gradient_checkpointing=ckpt)):
                    found.append((b, ckpt))
                    break
        if len(found) == 2 and found[1][0] <= found[0][0]:
            found = found[:1]  # checkpointing buys no larger micro-batch
        if found:
            fixes += [f"heal: {{batch_size: {b}, grad_accum: {total // b}"
                      + (", gradient_checkpointing: true}" if ckpt else "}") for b, ckpt in found]
        elif h.quantize != "nf4" and ok(replace(h, quantize="nf4", batch_size=1, grad_accum=total,
                                                gradient_checkpointing=True)):
            fixes.append("heal: {quantize: nf4} (with a smaller batch_size and gradient_checkpointing)")
        else:
            fixes.append("no micro-batch fits: use GPUs with more memory or a shorter heal.seq_len")
    return " or ".join(dict.fromkeys(fixes))


def _batch_fix(arch: Arch, workload: Workload, stage: str, gpu_gib: float, gpus_per_node: int, headroom: float,
               n_removed: int, order: Order) -> str:
    """Evaluation and profiling: the largest batch sizes (both lowered together for profile) that make it fit."""
    ev, cal = workload.evaluation, workload.calibration
    top = max(ev.batch_size, cal.batch_size if stage == "profile" else 1)
    for b in range(top - 1, 0, -1):
        w = replace(workload, evaluation=replace(ev, batch_size=min(ev.batch_size, b)),
                    calibration=replace(cal, batch_size=min(cal.batch_size, b)) if stage == "profile" else cal)
        for p, g in options(stage, w, gpus_per_node, order):
            if estimate(arch, w, stage, p, g, n_removed).fits(gpu_gib, headroom):  # type: ignore[arg-type]
                changed = [f"calibration.batch_size: {w.calibration.batch_size}"] \
                    if w.calibration.batch_size != cal.batch_size else []
                if w.evaluation.batch_size != ev.batch_size:
                    changed.append(f"eval.batch_size: {w.evaluation.batch_size}")
                where = p if p != "auto" else "full precision"
                return ", ".join(changed) + f" (then {where} on {g} GPU" + ("s)" if g > 1 else ")")
    return "the weights do not fit: use GPUs with more memory, or more of them per node"


def _place(arch: Arch, workload: Workload, stage: str, placements: Sequence[tuple[str, int]],
           settings: Sequence[Adjustments], gpu_gib: float, headroom: float,
           n_removed: int) -> tuple[StageEstimate | None, Adjustments, tuple[str, int],
                                    list[tuple[StageEstimate, Adjustments]]]:
    """For each placement in order, each setting in order: the first estimate that fits, its adjustments, its
    placement, and everything tried (with its adjustments)."""
    tried = []
    for p, g in placements:
        for adj in settings:
            est = estimate(arch, apply_adjustments(workload, adj), stage, p, g, n_removed)  # type: ignore[arg-type]
            tried.append((est, adj))
            if est.fits(gpu_gib, headroom):
                return est, adj, (p, g), tried
    return None, {}, ("auto", 1), tried


def choose(config: Any, workload: Workload, gpu_gib: float, gpus_per_node: int = 8, model: str = "",
           n_removed: int = 0, stages: Sequence[str] = STAGES, order: Order = "one_gpu",
           headroom: float = HEADROOM, config_source: str = "", adjust: bool = False) -> ModelPlan:
    """Per stage, the first option whose estimate leaves ``headroom`` of the GPU free.

    Options, in ``order="one_gpu"``: full precision on 1 GPU, NF4 on 1 GPU, full precision on 2, 4, 8 GPUs
    (up to ``gpus_per_node``); ``order="full_precision"`` tries the splits before NF4, because NF4 changes the
    scores. Heal keeps the experiment's precision (``heal.quantize``; ``none`` may also be split).

    ``adjust``: on each option, before the next one, also try the settings that change memory but not the
    method (:func:`heal_candidates`: micro-batches at the same sequences per step, gradient checkpointing, the
    8-bit paged optimizer; :func:`batch_candidates`: smaller evaluation and calibration batches), in that order,
    and take the first that fits: a smaller batch on one GPU before a split across two, which a trial would hold
    for all its stages. The model's stages share one evaluation batch, the smallest any of them needs. What was
    changed is each choice's ``adjusted`` and the plan's :attr:`ModelPlan.adjustments`. A stage that fits nowhere
    gets ``fits=False``, its smallest estimate, ``short_gib`` (how much more it needs than the GPU leaves usable) and
    a ``fix``.
    """
    arch = config if isinstance(config, Arch) else Arch.from_config(config)
    choices, placed = [], {}
    usable = (1 - headroom) * gpu_gib
    for stage in stages:
        if (stage in ("heal", "healed") and not workload.heals) or (stage == "unhealed" and not workload.unhealed):
            continue
        settings: list[Adjustments] = [{}]
        if adjust:
            settings += heal_candidates(workload) if stage == "heal" else batch_candidates(workload, stage)
        placements = options(stage, workload, gpus_per_node, order)
        fit, adj, placed[stage], tried = _place(arch, workload, stage, placements, settings, gpu_gib, headroom,
                                                n_removed)
        name = model or arch.model_type
        if fit is not None:
            choices.append(Choice(name, stage, fit, True, adjusted=adj))
            continue
        smallest, smallest_adj = min(tried, key=lambda t: t[0].peak_bytes)
        short = smallest.peak_gib - usable
        fix = (_heal_fix(arch, workload, gpu_gib, headroom, n_removed) if stage == "heal" else
               _batch_fix(arch, workload, stage, gpu_gib, gpus_per_node, headroom, n_removed, order))
        tried_what = "with every setting the plan may change, " if adjust else ""
        changed = Choice(name, stage, smallest, True, adjusted=smallest_adj).settings_text()
        fix = (f"{tried_what}the smallest option ({smallest.precision} on {smallest.gpus} GPU"
               f"{'s' if smallest.gpus > 1 else ''}{', ' + changed if changed else ''}) needs "
               f"{smallest.peak_gib:.1f} GiB per GPU, {short:.1f} GiB more than the {usable:.1f} GiB usable "
               f"({headroom:.0%} of {gpu_gib:g} left free); {fix}")
        choices.append(Choice(name, stage, smallest, False, fix, short_gib=short, smallest=smallest_adj))
    return ModelPlan(model or arch.model_type, gpu_gib, gpus_per_node, headroom, n_removed, config_source,
                     tuple(_one_eval_batch(arch, workload, choices, placed, n_removed)))


def _one_eval_batch(arch: Arch, workload: Workload, choices: list[Choice], placed: dict[str, tuple[str, int]],
                    n_removed: int) -> list[Choice]:
    """The model's stages share one evaluation batch: the smallest any stage's choice needs; the others are estimated
    again at it, on the option they chose (a smaller batch never needs more memory)."""
    batches = [c.adjusted["eval"]["batch_size"] for c in choices if "eval" in c.adjusted]
    if not batches:
        return choices
    batch = min(batches)
    out = []
    for c in choices:
        if not c.fits or "eval" not in SECTIONS[c.stage] or c.adjusted.get("eval", {}).get("batch_size") == batch:
            out.append(c)
            continue
        adj = {**c.adjusted, "eval": {"batch_size": batch}}
        p, g = placed[c.stage]
        est = estimate(arch, apply_adjustments(workload, adj), c.stage, p, g, n_removed)  # type: ignore[arg-type]
        out.append(replace(c, estimate=est, adjusted=adj))
    return out


def format_plan_table(plans: Sequence[ModelPlan]) -> str:
    """One row per model and stage: model, stage, precision, GPUs per trial, the settings the plan changed (a column
    only when some plan changed one), estimated peak GiB per GPU, fits; then the fix of every stage that does not
    fit, with how much more memory it needs."""
    adjusted = any(c.settings_text() for plan in plans for c in plan.choices)
    rows = [("model", "stage", "precision", "GPUs") + (("settings changed",) if adjusted else ()) +
            ("est. peak GiB", "fits")]
    fixes = []
    for plan in plans:
        for c in plan.choices:
            rows.append((plan.model, c.stage, c.precision, str(c.gpus)) + ((c.settings_text() or "-",) if adjusted
                                                                           else ()) +
                        (f"{c.estimate.peak_gib:.1f}", "yes" if c.fits else f"no (+{c.short_gib:.1f})"))
            if not c.fits:
                fixes.append(f"  {plan.model} {c.stage}: {c.fix}")
    left = 5 if adjusted else 3  # left-aligned text columns
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(widths[i]) if i < left and i != 3 else v.rjust(widths[i]) for i, v in enumerate(r))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if plans:
        p = plans[0]
        lines.append(f"GPUs of {p.gpu_gib:g} GiB, {p.gpus_per_node} per node, {p.headroom:.0%} left free; trial "
                     "stages sized for the smallest n of each model's grid; GPUs = per profile actor or trial")
    if adjusted:
        lines.append("settings changed: what the plan changed so that the stage fits (ModelPlan.adjustments; the "
                     "sweep must run the model's cells with them); 'no (+X)': X GiB more than the GPU leaves usable")
    if fixes:
        lines += ["fixes:"] + fixes
    return "\n".join(lines)
