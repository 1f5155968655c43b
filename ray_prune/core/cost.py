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

FLOPs (a multiply-add is 2 FLOPs; norms, activations and softmax are not counted)
----------------------------------------------------------------------------------
Per token of a model that keeps ``k`` of its blocks (:func:`forward_flops`):

* block linears: 2 x k x (one block's linear weights, ``core.memory.param_count``);
* the LM head: 2 x vocab x hidden where it runs: every position for the C4 and heal losses and in training; none for
  the distance table (the decoder runs without it); for lm-eval's questions only the scored positions
  (``logits_to_keep``: one per context for answer letters and " yes"/" no", each continuation's tokens otherwise);
* attention scores: 4 x heads x head_dim x the keys a token attends to (QK^T and the weighted sum of V), causal: on
  average (T + 1) / 2 keys in a sequence of T tokens, at most the window in sliding-window blocks;
* LoRA adapters (training, and scoring the healed model unmerged): 2 x the adapter's parameters.

Training a LoRA adapter on a frozen base (:func:`train_flops`): the forward, then a backward that computes gradients
of the activations only (the base gets none): 2x the forward for the linears and the head, 2x the forward's
attention, 3x the adapters' own (activations and weights): **4N + 3A + 6P** per token (N: linears and head, A:
attention, P: adapter parameters). Gradient checkpointing recomputes each block's forward during the backward:
**+2N(blocks) + A + 2P** (the LM head is outside the checkpointed blocks). Generation (GSM8K) counts each generated
token's forward, which understates it: decoding is memory-bound, not FLOP-bound.

Tokens
------
A distance table: ``calibration.samples x max_length`` (documents padded to the batch's longest, about the cap); a
greedy order (:func:`greedy_work`) and a linear repair (:func:`repair_work`) run on the same calibration tokens.
Heal: ``steps x sequences per step x seq_len`` (the ``tokens_seen`` rows record), and each validation loss
(``steps / eval_every``, and the last step) on ``val_sequences x seq_len``. The C4 loss: ``c4_sequences x seq_len``.
A question: :data:`TASK_TOKENS`, measured (its comment says how); tasks without an entry use
:func:`fallback_task_tokens`. Padding inside a batch is not counted.

Default rates and their sources
-------------------------------
* Peak dense bf16 throughput: :data:`GPU_TYPES` (NVIDIA's data sheets; the figures "with sparsity" are twice these).
* Utilisation (executed FLOPs, recompute included, over peak): derived in :func:`published_utilisation` from
  LLaMA-Factory's Llama-2-7B 4-bit QLoRA benchmark on one A100 with plain Hugging Face + bitsandbytes, the stack a
  ray-prune trial runs (``heal.loop`` measured 1.05x HF ``Trainer``): 2,415 tokens/s, LoRA rank 8 on every linear,
  batch 4 x up to 1024 tokens, gradient checkpointing on (LLaMA-Factory's default): 0.31 of the A100's 312 TFLOP/s.
  The same row run with Unsloth's kernels reaches 3,726 tokens/s (0.49): a faster stack, not ray-prune's.
  torchtune's Llama-3.1-405B QLoRA on 8 A100s (653 tokens/s, batch 2 x 2048 packed, compiled, activation
  checkpointing) is 0.42 of peak counting the 4N a LoRA step needs, 0.64 counting its recompute: what a compiled
  FSDP stack reaches, an upper reference, not the default.
* ``forward``, ``score`` and ``table`` use the training step's utilisation: a QLoRA step is three passes of the same
  kernels (forward, backward through the frozen weights, recompute), each a bitsandbytes dequantize and a bf16 matmul
  per linear, at batches of thousands of tokens like an evaluation's; no published forward-only figure for this
  stack was found.
* The same utilisation on H100 and H200 (their peak is 3.2x the A100's; plain HF + bitsandbytes often uses less of
  it, so these are optimistic): ``--probe`` measures it where it matters.
* ``load``: an assumption, 0.5 GB/s of bf16 checkpoint read and placed (NF4 quantization included): no published
  figure; the probe measures it.

A pipeline split across GPUs (``device_map="auto"``) runs one GPU at a time: the same seconds, GPUs x the cost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.evaluation.config import EvalConfig
from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.arch import Arch, param_count
from ray_prune.core.memory.terms import LM_EVAL_MAX_GEN_TOKS, Workload, lora_params
from ray_prune.errors import UserError

KINDS: tuple[str, ...] = ("train", "forward", "score", "table", "load")
HOUR = 3600.0

# --------------------------------------------------------------------------- GPU types


@dataclass(frozen=True)
class GpuType:
    """A GPU a cost plan prices: its memory and its peak dense bf16 throughput, with the source."""

    name: str
    memory_gib: float  # what the memory plan sizes for (an "80 GB" A100 has 80 GiB)
    peak_flops: float  # dense bf16 FLOP/s
    source: str


GPU_TYPES: dict[str, GpuType] = {g.name: g for g in (
    GpuType("a100-40gb", 40, 312e12, "NVIDIA A100 Tensor Core GPU data sheet: 312 TFLOP/s BF16 dense (624 sparse)"),
    GpuType("a100-80gb", 80, 312e12, "NVIDIA A100 Tensor Core GPU data sheet: 312 TFLOP/s BF16 dense (624 sparse)"),
    GpuType("h100", 80, 989e12, "NVIDIA H100 Tensor Core GPU data sheet, SXM: 989 TFLOP/s BF16 dense (1,979 sparse)"),
    GpuType("h200", 141, 989e12, "NVIDIA H200 Tensor Core GPU data sheet, SXM: 989 TFLOP/s BF16 dense (1,979 "
            "sparse), 141 GB"),
)}
DEFAULT_GPU = "a100-80gb"  # the paper_llama2 experiment's GPU; an 80 GB size names it too (an H100 must be named)


def gpu_type_for(memory_gb: float | None) -> str | None:
    """The GPU type a memory size identifies (40 -> a100-40gb, 80 -> a100-80gb, 141 -> h200), None for another size."""
    if memory_gb is None:
        return None
    for name in ("a100-40gb", "a100-80gb", "h200"):
        if abs(GPU_TYPES[name].memory_gib - memory_gb) <= 2:
            return name
    return None


# --------------------------------------------------------------------------- FLOPs


def mean_keys(length: int | float, window: int | None = None) -> float:
    """Keys a token attends to on average in a causal sequence of ``length`` tokens (at most ``window`` each)."""
    T = max(1.0, float(length))
    if window is None or T <= window:
        return (T + 1) / 2
    return (window * (window + 1) / 2 + (T - window) * window) / T


def attention_flops(arch: Arch, kept: int, length: int | float) -> float:
    """Attention-score FLOPs per token of a ``kept``-block model over sequences of ``length`` tokens (sliding-window
    blocks in the share the full model has)."""
    slide = arch.sliding_layers / arch.layers if arch.sliding_window else 0.0
    keys = (1 - slide) * mean_keys(length) + slide * mean_keys(length, arch.sliding_window)
    return 4.0 * arch.heads * arch.head_dim * keys * kept


def head_flops(arch: Arch) -> float:
    """FLOPs of the LM head for one position."""
    return 2.0 * arch.vocab * arch.hidden


def forward_flops(arch: Arch, kept: int, length: int | float, head: bool = True, lora: int = 0) -> float:
    """FLOPs per token of a forward: the kept blocks' linears, attention over ``length``-token sequences, the LM
    head (``head``), and ``lora`` adapter parameters run unmerged."""
    blocks = 2.0 * kept * param_count(arch).layer_linear
    return blocks + attention_flops(arch, kept, length) + (head_flops(arch) if head else 0.0) + 2.0 * lora


def train_flops(arch: Arch, kept: int, heal: HealConfig) -> float:
    """FLOPs per training token of a LoRA step on a frozen base (module docstring): 4N + 3A + 6P, and 2N(blocks) +
    A + 2P more with gradient checkpointing."""
    blocks = 2.0 * kept * param_count(arch).layer_linear
    attention = attention_flops(arch, kept, heal.seq_len)
    adapters = 2.0 * lora_params(arch, kept, heal.rank, arch.targets(heal.target))
    flops = 2 * (blocks + head_flops(arch)) + 3 * attention + 3 * adapters
    if heal.gradient_checkpointing:
        flops += blocks + attention + adapters
    return flops


def adapter_params(arch: Arch, kept: int, heal: HealConfig | None) -> int:
    return 0 if heal is None else lora_params(arch, kept, heal.rank, arch.targets(heal.target))


# --------------------------------------------------------------------------- evaluation tokens


@dataclass(frozen=True)
class TaskTokens:
    """What ``core.evaluation.loglikelihood.score_continuations`` runs for a (task, shots) over its evaluation split,
    per question, in SmolLM2 tokens (see :data:`TASK_TOKENS`)."""

    questions: int  # in the evaluation split
    contexts: int  # distinct contexts (one per question; two for WinoGrande, fewer where questions repeat one)
    alone: float  # tokens run per question where no context shares a prefix with another: context + continuation rows
    full: float  # per question over the whole split: each prefix that contexts share (16+ tokens) run once
    clusters: int  # groups of contexts that share such a prefix (MMLU: its 57 subjects' exemplars)
    clustered: int  # contexts in those groups
    scored: float  # positions the LM head runs per question
    length: float  # mean tokens of a context with its longest continuation: the length attention runs over
    generated: bool = False  # a generate_until task: ``alone`` is the prompt

    def tokens(self, questions: int) -> float:
        """Tokens the scorer runs for a seeded sample of ``questions`` of the split: each question alone, less what
        shared prefixes save, which grows with how many members of a group the sample holds (the expected
        ``members - 1`` of each group, for contexts drawn without replacement)."""
        n = min(questions, self.questions)
        if n <= 0:
            return 0.0
        saved = (self.alone - self.full) * self.questions  # over the whole split
        if not self.clusters or saved <= 0 or self.clustered <= self.clusters:
            return n * self.alone
        size = self.clustered / self.clusters  # contexts per group
        drawn = n * self.contexts / self.questions  # contexts the sample holds
        N = self.contexts
        # P(a group has no member in the sample): hypergeometric, C(N - size, drawn) / C(N, drawn)
        none = 0.0 if drawn > N - size else math.exp(math.lgamma(N - size + 1) - math.lgamma(N - size - drawn + 1)
                                                      - math.lgamma(N + 1) + math.lgamma(N - drawn + 1))
        repeats = drawn * size / N - (1 - none)  # per group: E[members drawn] - P(any) = E[max(0, members drawn - 1)]
        return n * self.alone - saved * min(1.0, max(0.0, repeats / (size - 1)))


# Measured once at this commit on the local data mirror: lm-eval (0.4.13) built every request of each task's whole
# evaluation split (``build_all_requests``, the few-shot seed the harness uses, 1234), its HF wrapper tokenized them
# with SmolLM2-135M's tokenizer, and the scorer's own tree (``loglikelihood._contexts`` and ``_clusters``) counted
# the tokens it runs, with and without shared prefixes, and the positions it scores (GSM8K, generated: its prompts'
# tokens). Gemma-3-270M's tokenizer gives within 4% of these on every task; Llama-2's 32k vocabulary (no local copy
# to measure) spends more tokens per character than SmolLM2's 49k, so its evaluations cost somewhat more than these
# counts say. ``tests/core/test_cost.py`` measures WinoGrande again the same way and compares.
# TaskTokens(questions, contexts, alone, full, clusters, clustered, scored, length)
TASK_TOKENS: dict[tuple[str, int], TaskTokens] = {
    ("mmlu", 5): TaskTokens(14042, 14015, 721.65, 108.36, 57, 14015, 1.00, 723.04),
    ("mmlu", 0): TaskTokens(14042, 14015, 125.70, 106.59, 200, 13757, 1.00, 125.94),
    ("boolq", 0): TaskTokens(3270, 3270, 151.42, 136.79, 267, 637, 1.00, 151.42),
    ("arc_easy", 0): TaskTokens(2376, 2371, 40.44, 40.25, 7, 14, 14.15, 31.55),
    ("arc_easy", 25): TaskTokens(2376, 2376, 876.91, 849.51, 529, 2339, 14.16, 867.95),
    ("arc_challenge", 0): TaskTokens(1172, 1170, 50.60, 50.55, 2, 4, 20.51, 37.17),
    ("arc_challenge", 25): TaskTokens(1172, 1172, 1031.46, 1000.01, 273, 1151, 20.52, 1017.98),
    ("hellaswag", 0): TaskTokens(10042, 10019, 162.85, 161.95, 387, 786, 114.28, 86.34),
    ("piqa", 0): TaskTokens(1838, 1803, 56.66, 56.66, 0, 0, 44.32, 36.62),
    ("winogrande", 0): TaskTokens(1267, 2064, 36.78, 29.36, 465, 956, 10.87, 21.58),
    ("gsm8k", 5): TaskTokens(1319, 1319, 1021.05, 1021.05, 0, 0, 0.00, 1021.05, generated=True),
}
FALLBACK_TOKENS_PER_SHOT = 256  # a task without a measured entry: (shots + 1) x this many tokens, one scored position


def fallback_task_tokens(task: str, shots: int) -> TaskTokens:
    """The stated fallback for an unmeasured (task, shots): ``(shots + 1) x`` :data:`FALLBACK_TOKENS_PER_SHOT` tokens,
    one scored position, no shared prefix, 1,000 questions in the split (a generative task's prompt, generated
    tokens apart)."""
    tokens = (shots + 1) * FALLBACK_TOKENS_PER_SHOT
    return TaskTokens(questions=1000, contexts=1000, alone=tokens, full=tokens, clusters=0, clustered=0,
                      scored=0.0 if TASKS[task].generates else 1.0, length=tokens, generated=TASKS[task].generates)


def task_tokens(task: str, shots: int) -> tuple[TaskTokens, bool]:
    """(the task's tokens, whether they were measured)."""
    hit = TASK_TOKENS.get((task, shots))
    return (hit, True) if hit is not None else (fallback_task_tokens(task, shots), False)


# --------------------------------------------------------------------------- work


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
    tokens, T = cal.samples * cal.max_length, cal.max_length
    per_block = 2.0 * param_count(arch).layer_linear + attention_flops(arch, 1, T)
    flops = sum(tokens * ((K + K * (K - 1) / 2) * per_block + K * head_flops(arch))
                for K in range(arch.layers, arch.layers - rounds, -1))
    return [Work("table", tokens * rounds, flops, f"greedy order {rounds} rounds of {cal.samples} x {T}")]


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


# --------------------------------------------------------------------------- rates


@dataclass(frozen=True)
class Rates:
    """Achieved rates of one device: FLOP/s per kind of work (parameters/s for ``load``), and where each comes from."""

    device: str  # a GPU type (default rates) or the probed device's name
    rates: Mapping[str, float]  # kind -> rate
    sources: Mapping[str, str]  # kind -> "default: ..." or "measured: ..."
    measured: frozenset[str] = frozenset()  # the kinds measured on the device

    def seconds(self, work: Work) -> float:
        return work.amount / self.rates[work.kind]

    def source(self, kinds: Sequence[str]) -> str:
        """``measured``, ``default`` or ``mixed`` for the kinds a stage uses."""
        hit = {k in self.measured for k in kinds}
        return "measured" if hit == {True} else "default" if hit == {False} else "mixed"

    def with_measured(self, measured: Mapping[str, float], device: str, how: Mapping[str, str]) -> Rates:
        """These rates with some kinds replaced by measured ones."""
        return Rates(device, {**self.rates, **measured}, {**self.sources, **{k: f"measured: {how.get(k, '')}".strip()
                                                                             for k in measured}},
                     self.measured | frozenset(measured))


@dataclass(frozen=True)
class PublishedRun:
    """A published fine-tuning throughput that a default rate is derived from."""

    name: str
    tokens_per_s: float  # summed over its GPUs
    model: str  # a hub id with a shipped config (core/shipped_configs)
    gpu: str
    gpus: int
    seq_len: int
    rank: int
    target: str
    checkpointing: bool
    source: str


LLAMA_FACTORY_QLORA = PublishedRun(
    "LLaMA-Factory Llama-2-7B 4-bit QLoRA, plain HF + bitsandbytes", 2415.0, "meta-llama/Llama-2-7b-hf",
    "a100-40gb", 1, 1024, 8, "all-linear", True,
    "https://github.com/hiyouga/LLaMA-Factory/wiki/Performance-comparison (TGS, batch 4, gradient accumulation 2, "
    "LoRA rank 8 on all modules, max length 1024, one A100; gradient checkpointing is LLaMA-Factory's default)")
LLAMA_FACTORY_UNSLOTH = PublishedRun(
    "LLaMA-Factory Llama-2-7B 4-bit QLoRA, Unsloth + FlashAttention-2", 3726.0, "meta-llama/Llama-2-7b-hf",
    "a100-40gb", 1, 1024, 8, "all-linear", True, LLAMA_FACTORY_QLORA.source)
DEFAULT_RUN = LLAMA_FACTORY_QLORA  # ray-prune's stack: HF + bitsandbytes, a hand-written loop (1.05x HF Trainer)
LOAD_BYTES_PER_S = 0.5e9  # assumed: bf16 checkpoint read and placed (NF4 quantization included); no published figure


@functools.cache
def _shipped_arch(hub_id: str) -> Arch:
    """A published run's model, from its config shipped in ``core/shipped_configs`` (read once a process)."""
    import json

    from transformers import AutoConfig

    from ray_prune.core.model_configs import SHIPPED_DIR

    values = json.loads((SHIPPED_DIR / f"{hub_id.replace('/', '--')}.json").read_text())
    return Arch.from_config(AutoConfig.for_model(**values))


def published_utilisation(run: PublishedRun = DEFAULT_RUN) -> float:
    """Executed FLOPs over peak of a published run, its FLOPs counted as :func:`train_flops` counts ours (at its
    maximum sequence length: an upper bound on its attention FLOPs, about 4% of the total for Llama-2-7B)."""
    arch = _shipped_arch(run.model)
    heal = HealConfig(seq_len=run.seq_len, rank=run.rank, target=run.target, gradient_checkpointing=run.checkpointing)
    return run.tokens_per_s * train_flops(arch, arch.layers, heal) / (run.gpus * GPU_TYPES[run.gpu].peak_flops)


def default_rates(gpu: str = DEFAULT_GPU) -> Rates:
    """The published-recipe rates on one GPU of type ``gpu`` (module docstring)."""
    if gpu not in GPU_TYPES:
        raise UserError(f"unknown GPU type {gpu!r}", f"use one of {', '.join(GPU_TYPES)}")
    g = GPU_TYPES[gpu]
    u = published_utilisation(DEFAULT_RUN)
    derived = (f"default: {u:.1%} of {gpu}'s {g.peak_flops / 1e12:.0f} TFLOP/s peak ({g.source.split(':')[0]}), the "
               f"utilisation of {DEFAULT_RUN.tokens_per_s:,.0f} tokens/s in {DEFAULT_RUN.name} on one A100 "
               f"({DEFAULT_RUN.source.split(' (')[0]}); forward-only work assumed at the training step's utilisation")
    rates = {"train": u * g.peak_flops, "forward": u * g.peak_flops, "score": u * g.peak_flops,
             "table": u * g.peak_flops, "load": LOAD_BYTES_PER_S / 2}
    sources = {"train": derived, "forward": derived, "score": derived, "table": derived,
               "load": f"default: assumed {LOAD_BYTES_PER_S / 1e9:g} GB/s of bf16 checkpoint (no published figure)"}
    return Rates(gpu, rates, sources)


# --------------------------------------------------------------------------- the cost of a model's cells


@dataclass(frozen=True)
class TrialWork:
    """What one trial of a model does, as ``sweep.trial.run_cell`` runs it."""

    kept: int  # blocks the pruned model keeps
    heal: HealConfig | None  # None: the cell does not heal
    unhealed: bool | str = False  # True: every task before healing; "loss": the C4 loss only; False: no unhealed row
    loads: int = 1  # checkpoint loads: another where it heals in another precision than it is scored in, and where
    # a repaired QLoRA cell reloads its repaired model in NF4
    repair: CalibrationConfig | None = None  # the calibration a linear repair fits on, None without a repair


@dataclass(frozen=True)
class Stage1Work:
    """One thing a model's profile actor computes for its cells (``sweep.profile_stage``): a distance table or a
    greedy removal order on one calibration setting."""

    kind: str  # "table" or "order"
    calibration: CalibrationConfig
    rounds: int = 0  # a greedy order's rounds: the largest n of its cells


@dataclass(frozen=True)
class StageCost:
    """One stage of one model over all its runs."""

    stage: str  # profile, baseline, unhealed, heal, healed, load
    runs: int
    work: tuple[Work, ...]  # summed over the runs
    gpus: int  # GPUs held while it runs

    @property
    def tokens(self) -> float:
        return sum(w.tokens for w in self.work)

    @property
    def flops(self) -> float:
        return sum(w.amount for w in self.work if w.kind != "load")

    def seconds(self, rates: Rates) -> float:
        """Wall seconds on one of its GPUs (a pipeline split runs one GPU at a time)."""
        return sum(rates.seconds(w) for w in self.work)

    def device_hours(self, rates: Rates) -> float:
        return self.seconds(rates) * self.gpus / HOUR

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(w.kind for w in self.work))


@dataclass(frozen=True)
class ModelCost:
    """Every stage of one model's cells, priced at ``rates``."""

    model: str
    stages: tuple[StageCost, ...]
    rates: Rates
    cells: int

    def stage(self, name: str) -> StageCost | None:
        return next((s for s in self.stages if s.stage == name), None)

    @property
    def device_hours(self) -> float:
        return sum(s.device_hours(self.rates) for s in self.stages)

    @property
    def seconds(self) -> float:
        return sum(s.seconds(self.rates) for s in self.stages)


def _summed(parts: Sequence[Sequence[Work]]) -> tuple[Work, ...]:
    """Works of several runs, summed per kind (the first run's description kept)."""
    out: dict[tuple[str, str], Work] = {}
    for part in parts:
        for w in part:
            key = (w.kind, w.what.split(" ")[0])  # per kind and per what: each task, the C4 loss, the references...
            hit = out.get(key)
            out[key] = w if hit is None else Work(w.kind, hit.tokens + w.tokens, hit.amount + w.amount, hit.what)
    return tuple(out.values())


def model_cost(model: str, arch: Arch, workload: Workload, trials: Sequence[TrialWork], rates: Rates,
               profile_gpus: int = 1, trial_gpus: int = 1, stage1: Sequence[Stage1Work] = (),
               precisions: int = 1) -> ModelCost:
    """The cost of one model's cells. Its profile actor (``sweep.profile_stage``) loads the model once for its
    ``stage1`` work (distance tables, greedy orders) and once per scoring precision (``precisions``), each time
    computing the reference losses and the baseline row; then each trial loads the model (:class:`TrialWork`'s
    ``loads``, with its repair), evaluates it unhealed if it owns that row, heals it and evaluates it healed."""
    actor = int(bool(stage1)) + precisions
    first: list[Work] = []
    for need in stage1:
        first += profile_work(arch, need.calibration) if need.kind == "table" else \
            greedy_work(arch, need.calibration, need.rounds)
    stages = [StageCost("profile", 1, _summed([first, load_work(arch, actor)]), profile_gpus),
              StageCost("baseline", precisions, _summed(
                  [evaluation_work(arch, arch.layers, workload.evaluation) + reference_work(arch, workload)
                   for _ in range(precisions)]), profile_gpus)]
    if trials:  # a trial's load_s: the loads, and the repair fit where the cell repairs
        stages.append(StageCost("load", sum(t.loads for t in trials), _summed(
            [load_work(arch, t.loads) + (repair_work(arch, t.kept, t.repair) if t.repair else []) for t in trials]),
            trial_gpus))
    unhealed = [t for t in trials if t.unhealed]
    if unhealed:
        stages.append(StageCost("unhealed", len(unhealed), _summed(
            [evaluation_work(arch, t.kept, workload.evaluation, tasks=t.unhealed is True) for t in unhealed]),
            trial_gpus))
    healing = [(t, t.heal) for t in trials if t.heal is not None]
    if healing:
        stages.append(StageCost("heal", len(healing), _summed([heal_work(arch, t.kept, h) for t, h in healing]),
                                trial_gpus))
        unmerged = workload.scored_precision() == "nf4"  # scored as trained: the adapter runs beside the NF4 base
        stages.append(StageCost("healed", len(healing), _summed(
            [evaluation_work(arch, t.kept, workload.evaluation, lora=adapter_params(arch, t.kept, h) if unmerged
                             else 0) for t, h in healing]), trial_gpus))
    return ModelCost(model, tuple(stages), rates, len(trials))


# --------------------------------------------------------------------------- printing


def _si(value: float, unit: str = "") -> str:
    """``131k``; with a unit, ``98.1 TFLOP/s``."""
    space = " " if unit else ""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{space}{prefix}{unit}"
    return f"{value:.3g}{space}{unit}"


def _hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def format_cost_table(costs: Sequence[ModelCost], price_per_gpu_hour: float | None = None) -> str:
    """One row per model and stage: runs, tokens, FLOPs, GPUs, device-hours and whether its rates are measured or
    defaults; a total per model and for the sweep, priced when a price per GPU-hour is given; then the rates."""
    rows = [("model", "stage", "runs", "tokens", "FLOPs", "GPUs", "device-h", "rates")]
    for c in costs:
        for s in c.stages:
            rows.append((c.model, s.stage, str(s.runs), _si(s.tokens) if s.tokens else "-",
                         _si(s.flops) if s.flops else "-", str(s.gpus), _hours(s.device_hours(c.rates)),
                         c.rates.source(s.kinds)))
        rows.append((c.model, "total", str(c.cells) + " cells", "", "", "", _hours(c.device_hours), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(widths[i]) if i in (0, 1, 7) else v.rjust(widths[i]) for i, v in enumerate(r))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(c.device_hours for c in costs)
    devices = sorted({c.rates.device for c in costs})
    line = f"sweep total: {_hours(total)} device-hours on {', '.join(devices)}"
    if price_per_gpu_hour is not None:
        line += f", {price_per_gpu_hour * total:,.0f} at {price_per_gpu_hour:g} per GPU-hour"
    lines.append(line)
    seen: set[tuple] = set()
    for c in costs:
        key = (c.rates.device, tuple(sorted(c.rates.rates.items())))
        if key in seen:
            continue
        seen.add(key)
        who = f" ({c.model})" if c.rates.measured else ""
        lines.append(f"rates on {c.rates.device}{who}: " + ", ".join(
            f"{k} {_si(c.rates.rates[k]) + ' parameters/s' if k == 'load' else _si(c.rates.rates[k], 'FLOP/s')}"
            for k in KINDS
            if k in c.rates.rates))
        by_source: dict[str, list[str]] = {}
        for k in KINDS:
            if k in c.rates.sources:
                by_source.setdefault(c.rates.sources[k], []).append(k)
        lines += [f"  {', '.join(kinds)}: {source}" for source, kinds in by_source.items()]
    return "\n".join(lines)
