"""What each stage of one model runs on, and the settings changed so that it fits: the plan of one model.

Nothing here loads weights or allocates tensors: ``memory.stages.estimate`` gives one
stage's peak as a closed form of the config (:class:`Arch`) and the experiment's
settings (:class:`Workload`). :func:`choose` picks, per stage, the first of *full precision on one GPU*,
*NF4 on one GPU*, *full precision across k GPUs* (k = 2, 4, 8, within a node)
that fits, or says what to change; with ``adjust``, on each of those it first tries
the settings that change memory but not the method (micro-batches at the same
sequences per step, gradient checkpointing, the 8-bit paged optimizer, smaller
evaluation and calibration batches) and records what it changed
(:attr:`ModelPlan.adjustments`); where nothing fits it says by how much.
``memory.fixes`` says what to change where nothing fits, and ``memory.table.format_plan_table`` prints the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ray_prune.core.memory.adjustments import (
    SECTIONS,
    Adjustments,
    apply_adjustments,
    batch_candidates,
    heal_candidates,
)
from ray_prune.core.memory.arch import Arch
from ray_prune.core.memory.fixes import batch_fix, heal_fix
from ray_prune.core.memory.stages import STAGES, TRIAL_STAGES, Order, estimate, options
from ray_prune.core.memory.terms import StageEstimate
from ray_prune.core.memory.workload import Workload

HEADROOM = 0.10  # the share of a GPU a plan leaves free: the estimates are not exact (memory.terms, Accuracy)


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
        fix = (heal_fix(arch, workload, gpu_gib, headroom, n_removed) if stage == "heal" else
               batch_fix(arch, workload, stage, gpu_gib, gpus_per_node, headroom, n_removed, order))
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
