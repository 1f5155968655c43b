"""Peak GPU memory of each stage of a sweep, from a model's config alone, and what fits on which GPUs.

Nothing here loads weights or allocates tensors. ``arch`` reads the facts of a config that memory depends on
(through the family's entry in ``core.families``) and counts parameters; ``terms`` sizes each part of a stage's
peak (weights, activations, the evaluation's scorer, generation and loss, LoRA state) and says where each number
comes from and how accurate it is; ``plan`` adds the terms up per stage (:func:`estimate`), picks what each stage
runs on and, where the experiment's settings do not fit, the memory settings that do (:func:`choose`, its
``ModelPlan.adjustments``), and prints the plan (:func:`format_plan_table`). Callers import from here.
"""

from ray_prune.core.memory.arch import Arch, Linear, ParamCount, dtype_bytes, nf4_bytes, param_count
from ray_prune.core.memory.plan import (
    GPU_COUNTS,
    HEADROOM,
    STAGES,
    TRIAL_STAGES,
    Adjustments,
    Choice,
    ModelPlan,
    Order,
    Stage,
    adjust_heal,
    apply_adjustments,
    batch_candidates,
    choose,
    estimate,
    format_plan_table,
    heal_candidates,
    options,
)
from ray_prune.core.memory.terms import (
    ALLOCATOR_MARGIN,
    CHARS_PER_TOKEN,
    CUDA_CONTEXT_BYTES,
    GIB,
    TASK_LONGEST_CHARS,
    StageEstimate,
    Term,
    Workload,
    lora_params,
    optimizer_state_bytes,
    train_layer_bytes,
    weight_terms,
)

__all__ = ["ALLOCATOR_MARGIN", "CHARS_PER_TOKEN", "CUDA_CONTEXT_BYTES", "GIB", "GPU_COUNTS", "HEADROOM", "STAGES",
           "TASK_LONGEST_CHARS", "TRIAL_STAGES", "Adjustments", "Arch", "Choice", "Linear", "ModelPlan", "Order",
           "ParamCount", "Stage", "StageEstimate", "Term", "Workload", "adjust_heal", "apply_adjustments",
           "batch_candidates", "choose", "dtype_bytes", "estimate", "format_plan_table", "heal_candidates",
           "lora_params", "nf4_bytes", "optimizer_state_bytes", "options", "param_count", "train_layer_bytes",
           "weight_terms"]
