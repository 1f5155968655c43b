"""What a sweep costs before it runs: tokens, FLOPs and device-hours per model and stage, from each config alone.

Nothing here loads weights. A stage's seconds are its FLOPs over a rate, per kind of work (:data:`KINDS`):

* ``train``: a heal step;
* ``forward``: a no-grad forward over packed blocks in the precision rows are scored in (the C4 and heal losses);
* ``score``: lm-eval's questions through ``core.evaluation.loglikelihood``;
* ``table``: the distance table, the decoder without its head in the experiment's full-precision dtype (which, in a
  QLoRA sweep, is not the precision of its other work);
* ``load``: a checkpoint read and placed as a trial loads it, in parameters a second.

The rates are :func:`default_rates` for a GPU type, or measured on a device by ``core.probe.probe``; :class:`Rates`
says which is which.

``flops`` counts what one token costs in each kind of work; ``eval_tokens`` holds the tokens each lm-eval task's
questions run, measured once; ``work`` turns a stage's settings into tokens and FLOPs (:class:`Work`); ``rates``
holds the GPU types and the rates that turn work into seconds, and where each rate comes from; ``plan`` adds up one
model's cells stage by stage (:func:`model_cost`) and ``table`` prints the result (:func:`format_cost_table`).
Callers import from here.
"""

from ray_prune.core.cost.eval_tokens import (
    FALLBACK_TOKENS_PER_SHOT,
    TASK_TOKENS,
    TaskTokens,
    fallback_task_tokens,
    task_tokens,
)
from ray_prune.core.cost.flops import (
    adapter_params,
    attention_flops,
    forward_flops,
    head_flops,
    mean_keys,
    train_flops,
)
from ray_prune.core.cost.plan import HOUR, ModelCost, Stage1Work, StageCost, TrialWork, model_cost
from ray_prune.core.cost.rates import (
    DEFAULT_GPU,
    DEFAULT_RUN,
    GPU_TYPES,
    LLAMA_FACTORY_QLORA,
    LLAMA_FACTORY_UNSLOTH,
    LOAD_BYTES_PER_S,
    GpuType,
    PublishedRun,
    Rates,
    default_rates,
    gpu_type_for,
    published_utilisation,
)
from ray_prune.core.cost.table import format_cost_table
from ray_prune.core.cost.work import (
    KINDS,
    Work,
    evaluation_work,
    greedy_work,
    heal_work,
    load_work,
    profile_work,
    reference_work,
    repair_work,
    validations,
)

__all__ = ["DEFAULT_GPU", "DEFAULT_RUN", "FALLBACK_TOKENS_PER_SHOT", "GPU_TYPES", "HOUR", "KINDS",
           "LLAMA_FACTORY_QLORA", "LLAMA_FACTORY_UNSLOTH", "LOAD_BYTES_PER_S", "TASK_TOKENS", "GpuType", "ModelCost",
           "PublishedRun", "Rates", "Stage1Work", "StageCost", "TaskTokens", "TrialWork", "Work", "adapter_params",
           "attention_flops", "default_rates", "evaluation_work", "fallback_task_tokens", "format_cost_table",
           "forward_flops", "greedy_work", "gpu_type_for", "head_flops", "heal_work", "load_work", "mean_keys",
           "model_cost", "profile_work", "published_utilisation", "reference_work", "repair_work", "task_tokens",
           "train_flops", "validations"]
