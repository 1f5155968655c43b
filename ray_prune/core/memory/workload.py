"""The settings that size each stage (:class:`Workload`), and how long each lm-eval task's requests are.

Sources
-------
* Task lengths: the longest loglikelihood request of each task (context plus
  continuation, with the task's shots) and its longest continuation, measured in
  characters on the local data mirror through lm-eval's own request builder; tokens =
  characters / 3.0, an assumed lower bound on characters per token (measured 3.75-5.0
  with the SmolLM2 and Gemma-3 tokenizers on those requests; Llama-2's 32k vocabulary
  is less efficient than either, hence the margin); capped at lm-eval's ``max_length``
  (``max_position_embeddings``). Unmeasured (task, shots) use that cap, and so does
  GSM8K: its longest 5-shot prompt (5,085 characters) is 1,663 SmolLM2 tokens, 3.06
  characters per token (digits are one token each), too close to the bound to rely on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.evaluation.config import EvalConfig
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.arch import Arch

CHARS_PER_TOKEN = 3.0  # assumed lower bound for the seed tokenizers (see the module docstring)

# Longest lm-eval loglikelihood request (context + continuation), in characters, per (task, shots), built
# by lm-eval from the local data mirror at this commit (SmolLM2 / Gemma-3 tokens in the comments).
TASK_LONGEST_CHARS: dict[tuple[str, int], int] = {
    ("mmlu", 5): 14450,  # 3074 / 3019 tokens
    ("boolq", 0): 4871,  # 1299 / 1260
    ("arc_challenge", 25): 6907,  # 1393 / 1364
    ("arc_easy", 25): 5334,  # 1134 / 1107
    ("hellaswag", 10): 5503,  # 1173 / 1156
    ("winogrande", 5): 790,  # 167 / 160
    ("piqa", 0): 1106,  # 242 / 238
}
# Longest continuation of each task's loglikelihood requests, in characters (SmolLM2 tokens in the comments),
# measured the same way; the scorer computes logits at these positions only. Tasks whose continuations are all
# one token with every seed tokenizer (answer letters, " yes" / " no") score one position per context.
TASK_LONGEST_CONTINUATION_CHARS: dict[str, int] = {
    "arc_challenge": 193,  # 45
    "arc_easy": 138,  # 27
    "hellaswag": 411,  # 77
    "winogrande": 100,  # 17
    "piqa": 1065,  # 231
}
ONE_TOKEN_CONTINUATIONS = frozenset({"mmlu", "boolq"})
LM_EVAL_MAX_GEN_TOKS = 256  # lm-eval's HFLM.max_gen_toks: what a generate_until task without its own cap generates


@dataclass(frozen=True)
class Workload:
    """The settings that size each stage (an experiment's, for one model): its settings objects as they are."""

    dtype: str = "auto"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    heal: tuple[HealConfig, ...] = (HealConfig(),)  # every heal point of the model's grid
    heals: bool = True
    unhealed: bool = True
    eval_precision: str = "trained"  # eval.precision: trained (score in the heal precision) or full (merged)

    @property
    def tasks(self) -> tuple[tuple[str, int], ...]:
        """(task, shots) of every task evaluated."""
        return tuple(self.evaluation.shots().items())

    def scored_precision(self) -> str:
        """How rows are scored: ``nf4`` where cells are scored as trained on an NF4 base, else ``auto``."""
        trained = self.eval_precision == "trained" and self.heals
        return "nf4" if trained and any(h.quantize == "nf4" for h in self.heal) else "auto"

    def request_tokens(self, arch: Arch, task: tuple[str, int]) -> int:
        """Tokens of the longest lm-eval request of one (task, shots), capped at lm-eval's max_length (see the
        module docstring); the cap where that (task, shots) was not measured."""
        chars = TASK_LONGEST_CHARS.get(task)
        return arch.max_length if chars is None else min(math.ceil(chars / CHARS_PER_TOKEN) + 1, arch.max_length)

    def eval_context(self, arch: Arch) -> int:
        """Tokens of the longest lm-eval request of any task evaluated (0 without tasks)."""
        return max((self.request_tokens(arch, task) for task in self.tasks), default=0)


def continuation_tokens(task: str, row: int) -> int:
    """Positions the scorer scores in a row of ``row`` tokens of ``task``: its longest continuation, or the whole
    row where the task's continuations were not measured."""
    if task in ONE_TOKEN_CONTINUATIONS:
        return 1
    chars = TASK_LONGEST_CONTINUATION_CHARS.get(task)
    return row if chars is None else min(math.ceil(chars / CHARS_PER_TOKEN), row)
