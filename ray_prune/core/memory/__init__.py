"""Peak GPU memory of each stage of a sweep, from a model's config alone, and what fits on which GPUs.

Nothing here loads weights or allocates tensors. ``arch`` reads the facts of a config that memory depends on
(through the family's entry in ``core.families``) and counts parameters; ``workload`` holds the settings that size
each stage; ``terms`` defines a stage's peak as named terms added up per GPU (with the weights' terms), and
``inference``, ``training`` and ``evaluation`` size the other parts of a stage's peak (a no-grad forward and the
profile pass; LoRA activations and state; the evaluation's scorer, generation and loss), each saying where its
numbers come from, and ``terms`` how accurate they are; ``stages`` adds the terms up per stage (:func:`estimate`)
and lists what a stage may run on (:func:`options`); ``plan`` picks what each stage runs on (:func:`choose`) and,
where the experiment's settings do not fit, the memory settings that do (``adjustments``: its
``ModelPlan.adjustments``; ``fixes``: what to change where nothing fits); ``table`` prints the plan
(:func:`format_plan_table`). Callers import from here.
"""

from ray_prune.core.memory.adjustments import (
    Adjustments,
    adjust_heal,
    apply_adjustments,
    batch_candidates,
    heal_candidates,
)
from ray_prune.core.memory.arch import Arch, Linear, ParamCount, dtype_bytes, nf4_bytes, param_count
from ray_prune.core.memory.plan import HEADROOM, Choice, ModelPlan, choose
from ray_prune.core.memory.stages import GPU_COUNTS, STAGES, TRIAL_STAGES, Order, Stage, estimate, options
from ray_prune.core.memory.table import format_plan_table
from ray_prune.core.memory.terms import ALLOCATOR_MARGIN, CUDA_CONTEXT_BYTES, GIB, StageEstimate, Term, weight_terms
from ray_prune.core.memory.training import lora_params, optimizer_state_bytes, train_layer_bytes
from ray_prune.core.memory.workload import CHARS_PER_TOKEN, TASK_LONGEST_CHARS, Workload

__all__ = ["ALLOCATOR_MARGIN", "CHARS_PER_TOKEN", "CUDA_CONTEXT_BYTES", "GIB", "GPU_COUNTS", "HEADROOM", "STAGES",
           "TASK_LONGEST_CHARS", "TRIAL_STAGES", "Adjustments", "Arch", "Choice", "Linear", "ModelPlan", "Order",
           "ParamCount", "Stage", "StageEstimate", "Term", "Workload", "adjust_heal", "apply_adjustments",
           "batch_candidates", "choose", "dtype_bytes", "estimate", "format_plan_table", "heal_candidates",
           "lora_params", "nf4_bytes", "optimizer_state_bytes", "options", "param_count", "train_layer_bytes",
           "weight_terms"]
