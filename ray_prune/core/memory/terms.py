"""The terms of a stage's peak memory: weights, activations, KV caches, logits, LoRA state.

Sources of each term
--------------------
* Parameter counts: closed forms per family (:func:`param_count`), equal to the
  meta-device build of all ten shipped configs and of a tiny config of every family
  (``tests/core/test_memory.py``).
* NF4 (bitsandbytes 0.50, ``bnb_4bit_use_double_quant``, blocksize 64): 0.5 byte per
  weight + 1 byte (8-bit absmax) per 64 weights + 4 bytes per 256 absmax blocks +
  ~1.1 KB of code books per tensor, measured with ``bitsandbytes.functional.quantize_4bit``.
  transformers quantizes every ``nn.Linear`` but the LM head; embeddings, norms,
  biases and the LM head stay in the compute dtype.
* Training activations (:func:`train_layer_bytes`): the tensors autograd saves per
  block, derived op by op and checked *exactly* against
  ``torch.autograd.graph.saved_tensors_hooks`` on tiny models of every family on CPU
  (transformers 5.24, peft 0.21, torch 2.13). Two ops save differently on CUDA, and
  the CUDA variant is used here: dropout saves a bool mask (CPU: an fp32 noise
  tensor) and layer_norm saves fp32 mean/rstd (CPU: compute dtype).
  bitsandbytes' ``MatMul4Bit`` saves no activation (only the packed weight), so an
  NF4 base saves the same tensors as a frozen bf16 one.
* Gradient checkpointing (non-reentrant, per decoder block): one block input
  (``c x H`` per token) per block, plus one block's saved tensors while it is
  recomputed, checked with the same hooks.
* The LM-head loss: transformers upcasts the logits to fp32 (``ForCausalLMLoss``) and
  ``cross_entropy`` saves its fp32 log-softmax; the backward peak holds that, the
  incoming gradient and the result: 12 bytes per logit (+ ``c`` for Gemma-2's saved
  tanh softcap). Not a saved tensor, so *derived*, not measured.
* LoRA state (:func:`optimizer_state_bytes`): fp32 weights and grads, and the moments of
  ``heal.optimizer``: AdamW's two fp32 moments, or bitsandbytes' 8-bit ones (uint8 with an
  fp32 absmax per 256, tensors under 4096 elements kept in fp32), as bitsandbytes 0.50
  allocates them (``tests/core/heal/test_optimizer.py`` checks the 8-bit state's dtype).
* Inference transients (profile, evaluation): the live tensors of one block at its
  widest point (the MLP: 3 intermediates; or attention), derived from the modeling
  code. The C4 loss and the profile pass ``use_cache=False``.
* Evaluation, log-likelihood tasks (:func:`scoring_bytes`): the scorer the harness runs,
  ``core.evaluation.loglikelihood.score_continuations``, not lm-eval's HF path (a KV
  cache and full logits at every position). It runs a prefix that contexts share once and
  the contexts and their continuation rows against its keys and values, so it holds up
  to three caches (the prefixes', the contexts', the rows'; two with one-token answers),
  each at most batch x the task's longest request; the LM head runs on the scored
  positions only, the task's longest continuation per row (one for answer letters and
  " yes" / " no"), and their log-softmax in fp32. Derived from the scorer's code and
  checked against torch's CPU memory profiler (Accuracy).
* Evaluation, generative tasks (:func:`generation_bytes`; the registry's ``output_type:
  generate_until``, GSM8K): lm-eval's own ``generate_until``, which calls ``model.generate``
  with its cache on left-padded contexts cut to ``max_length - max_gen_toks`` tokens: the
  cache ends holding batch x (context + ``max_gen_toks``) tokens of every layer
  (``eval.max_gen_toks``, else lm-eval's 256), on top of the prefill forward and its mask.
* Task lengths: the longest loglikelihood request of each task (context plus
  continuation, with the task's shots) and its longest continuation, measured in
  characters on the local data mirror through lm-eval's own request builder; tokens =
  characters / 3.0, an assumed lower bound on characters per token (measured 3.75-5.0
  with the SmolLM2 and Gemma-3 tokenizers on those requests; Llama-2's 32k vocabulary
  is less efficient than either, hence the margin); capped at lm-eval's ``max_length``
  (``max_position_embeddings``). Unmeasured (task, shots) use that cap, and so does
  GSM8K: its longest 5-shot prompt (5,085 characters) is 1,663 SmolLM2 tokens, 3.06
  characters per token (digits are one token each), too close to the bound to rely on.
* Attention: SDPA (transformers' default) keeps O(T) memory (flash / memory-efficient
  kernels; only the bool mask is T x T), using GQA natively when there is no mask;
  Gemma-2 runs eager attention (``_supports_sdpa = False``), which materialises
  ``B x heads x T x T`` scores (fp32 softmax, compute-dtype scores and probabilities).
* CUDA context and allocator: 1 GiB per GPU (context, cuBLAS workspace, kernels; an
  assumption, not measured here: no GPU) plus 5% of the tensor peak for the caching
  allocator's rounding and fragmentation (assumed).

Accuracy
--------
Weights are exact to the byte for bf16/fp32 and to ~0.01% for NF4. Saved training
activations are exact for the modeling code they were checked on (bf16/fp16 compute;
with fp32 compute the fp32 casts are no-ops that share storage, so fp32 is
over-estimated by up to 4 bytes per LoRA input element). The backward transient of a
block is bounded by that block's saved tensors (an assumption). Against torch's own
CPU memory profiler (peak live tensor bytes, ``tests/core/test_memory.py`` and a
one-off run at this commit) on the bundled models: a SmolLM2 bf16 LoRA step +2%
(no checkpointing) and +4% (checkpointing) over measured; (fp32 inference) the C4 loss
+11% (SmolLM2) and +20% (Gemma-3); the angular profile forward -10% / -17% (the only
terms found *under*, and small next to the weights); the block_influence profile +24%.
The evaluation's scorer (SmolLM2 fp32, batch 4, few-shot prompts whose exemplars two
questions share): +24% with one-token answers, +5% with 64-token endings. It is over
because it adds a full-width forward on top of every cache, which the scorer never
holds together (one block's widest point is 0.55 of a token's keys and values across
SmolLM2's layers, 0.17 on Llama-2-7B), and, where no contexts share a prefix, the
prefixes' cache it reserves is not built (+35% on 192-token contexts with four endings
of 16-64 tokens, one-off). Generation (``model.generate``, batch 2 x 128 context tokens
+ 8 generated): +0%; +12% with 32 generated, as the cache of the generated tokens is
added to the prefill's transient, which peaks before them (one-off). Not measured on
a GPU (none was available): CUDA kernels' workspaces, cuBLAS, and the context are the
1 GiB + 5% assumption, and the evaluation term rests on the longest-prompt estimate. Treat a
stage within ~10% of the GPU as "might not fit" (:data:`HEADROOM`). Units: GiB
(2^30 bytes); an "80 GB" A100/H100 has 80 GiB.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.evaluation.config import EvalConfig
from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.arch import Arch, Linear, dtype_bytes, nf4_bytes, param_count

GIB = 1 << 30
CUDA_CONTEXT_BYTES = 1 * GIB  # per GPU; assumed (see the module docstring)
ALLOCATOR_MARGIN = 0.05  # of the tensor peak; assumed
LOGITS_BUDGET = 1 << 28  # ray_prune.core.loss.LOGITS_BUDGET: the C4 / validation loss caps a batch's logits
REFERENCE_LOSS_BATCH = 8  # next_token_loss's default batch, which the profile stage's reference loss uses
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


# --------------------------------------------------------------------------- the workload


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


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Term:
    """One part of a stage's peak."""

    name: str
    bytes: int
    per_layer: bool  # split across GPUs with the blocks (a pipeline split by layers); else on one GPU
    detail: str = ""


@dataclass(frozen=True)
class StageEstimate:
    """The peak GPU memory of one stage, on each of ``gpus`` GPUs."""

    stage: str
    precision: str
    gpus: int
    layers: int  # blocks the stage's model has
    terms: tuple[Term, ...]
    notes: tuple[str, ...] = ()

    @property
    def tensor_bytes(self) -> int:
        """Tensors on the busiest GPU: per-layer terms for its share of the blocks, every other term in full."""
        share = math.ceil(self.layers / self.gpus) / self.layers if self.layers else 1.0
        return int(sum(t.bytes * (share if t.per_layer else 1.0) for t in self.terms))

    @property
    def peak_bytes(self) -> int:
        """Per GPU: tensors, the allocator margin on them, and the CUDA context."""
        return int(self.tensor_bytes * (1 + ALLOCATOR_MARGIN)) + CUDA_CONTEXT_BYTES

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def fits(self, gpu_gib: float, headroom: float = 0.0) -> bool:
        """Whether the peak leaves ``headroom`` (a share) of a ``gpu_gib`` GPU free."""
        return self.peak_bytes <= (1 - headroom) * gpu_gib * GIB

    def describe(self) -> str:
        lines = [f"{self.stage} {self.precision} x{self.gpus}: {self.peak_gib:.1f} GiB per GPU"]
        lines += [f"  {t.name}: {t.bytes / GIB:.2f} GiB{' (split by layers)' if t.per_layer else ''}"
                  + (f" - {t.detail}" if t.detail else "") for t in self.terms]
        lines += [f"  + {ALLOCATOR_MARGIN:.0%} allocator margin, {CUDA_CONTEXT_BYTES / GIB:.0f} GiB CUDA context"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def weight_terms(arch: Arch, layers: int, precision: str, compute: str = "auto", label: str = "weights") -> list[Term]:
    """Weights of a model with ``layers`` blocks: blocks (split by layers) and embeddings/head/final norm."""
    pc = param_count(arch)
    c = dtype_bytes(compute if precision == "nf4" else precision)
    if precision == "nf4":
        block = sum(nf4_bytes(s) for s in pc.linear_sizes) + pc.layer_other * c
        how = "NF4 linears, norms and biases in the compute dtype"
    else:
        block = (pc.layer_linear + pc.layer_other) * c
        how = f"{precision}"
    return [Term(f"{label}: {layers} blocks", layers * block, True, how),
            Term(f"{label}: embeddings, LM head, final norm", (pc.embedding + pc.lm_head + pc.final_norm) * c, False,
                 "kept in the compute dtype" if precision == "nf4" else "")]


def total_bytes(terms: Iterable[Term]) -> int:
    """Bytes of some terms together, each in full (per-layer terms not split)."""
    return sum(t.bytes for t in terms)


def inference_layer_bytes(arch: Arch, tokens: int, c: int, context: int, masked: bool) -> int:
    """Live tensors of one block at its widest point in a no-grad forward (derived from the modeling code).

    Attention: input, normed input, q/k/v, rotated q/k, output, o_proj output, plus (with a mask and GQA) k/v
    repeated to every head and (eager) the scores, fp32 softmax and probabilities. FFN: input, residual,
    normed input and three intermediates (activation, up projection, their product).
    """
    H, I, q, k = arch.hidden, arch.intermediate, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    attn = 3 * H + (q + 2 * k) + (q + k) + q
    if masked and arch.kv_heads != arch.heads:
        attn += 2 * q
    attn_bytes = attn * c * tokens
    if arch.eager:
        attn_bytes += tokens * arch.heads * context * (2 * c + 4 + (c if arch.attn_softcap else 0))
    ffn_bytes = (3 * H + 3 * I + (H if arch.parallel else 0)) * c * tokens
    return max(attn_bytes, ffn_bytes)


def train_layer_bytes(arch: Arch, c: int, rank: int, dropout: float, targets: Sequence[Linear], context: int,
                      device: str = "cuda") -> float:
    """Bytes autograd saves per token in one decoder block of a LoRA model on a frozen base (no checkpointing).

    Checked exactly against ``saved_tensors_hooks`` on CPU (``device="cpu"``); the CUDA variant differs in the
    two ops the module docstring names. ``context`` is the key length (eager attention saves T x T per head).
    """
    H, I, nh, kv, hd = arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.head_dim
    q, k = nh * hd, kv * hd
    if arch.norm == "rms":  # fp32 copy of the input and the rsqrt
        norm = 4 * H + 4
        norms = arch.norm_inputs_per_layer * norm
    else:  # layer_norm: the input, and mean and rstd (fp32 on CUDA, compute dtype on CPU)
        stats = 8 if device == "cuda" else 2 * c
        norms = arch.norm_inputs_per_layer * c * H + arch.norms_per_layer * stats
    if arch.qk_norm:
        norms += 4 * (q + k) + 4 * (nh + kv) if arch.norm == "rms" else c * (q + k) + 8 * (nh + kv)
    if arch.eager:  # q, k and v repeated to every head; fp32 softmax, probabilities (and the tanh of a softcap)
        attn = 3 * c * q + nh * context * (4 + c + (c if arch.attn_softcap else 0))
    else:  # SDPA: rotated q and k, v (or the fused qkv output it views), output, fp32 logsumexp
        v = (q + 2 * k) if arch.fused_qkv else k
        attn = c * (q + k + v + q) + 4 * nh
        # A block that needs a mask (sliding window shorter than the sequence) repeats k and v to every head
        # (transformers uses SDPA's native GQA only without a mask) and SDPA saves the mask as a float bias.
        extra = (c * (q - k) * (1 if arch.fused_qkv else 2) if kv != nh else 0) + c * context
        attn += arch.sliding_fraction(context) * extra
    ffn = c * I * (arch.act_saves + (2 if arch.gated else 0))
    lora = 0.0
    for lin in targets:  # fp32 LoRA input (after dropout, whose mask is saved too) and lora_A's output
        mask = 0 if dropout == 0 else (1 if device == "cuda" else 4)
        lora += (4 + mask) * lin.fan_in + 4 * rank
    return norms + attn + ffn + lora


def lora_params(arch: Arch, layers: int, rank: int, targets: Sequence[Linear]) -> int:
    return layers * sum(rank * (t.fan_in + t.fan_out) for t in targets)


BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' optimizers keep a tensor's moments in fp32 below this many elements
BNB_BLOCK = 256  # bitsandbytes' 8-bit optimizer state is blockwise: one fp32 absmax per 256 moments


def optimizer_state_bytes(arch: Arch, layers: int, rank: int, targets: Sequence[Linear], optimizer: str) -> int:
    """LoRA weights and grads (fp32) and the optimizer's moments: ``adamw``'s two fp32 moments (16 bytes a
    parameter in all); ``paged_adamw_8bit``'s two uint8 moments with an fp32 absmax per block of 256 (about 10 bytes
    a parameter; tensors under 4096 elements keep fp32 moments), as bitsandbytes 0.50 allocates them. Paged moments
    can be evicted to CPU memory under pressure; the plan still counts them on the GPU (the peak they may hold)."""
    total = 0
    for t in targets:
        for elements in (rank * t.fan_in, t.fan_out * rank):  # lora_A, lora_B
            if optimizer == "paged_adamw_8bit" and elements >= BNB_MIN_8BIT_SIZE:
                moments = 2 * (elements + 4 * math.ceil(elements / BNB_BLOCK))
            else:
                moments = 8 * elements
            total += 8 * elements + moments
    return layers * total


def _loss_batch(batch: int, seq_len: int, vocab: int) -> int:
    """Blocks per forward of ``core.loss.next_token_loss``."""
    return max(1, min(batch, LOGITS_BUDGET // (seq_len * vocab)))


def next_token_loss_bytes(arch: Arch, c: int, batch: int, seq_len: int) -> tuple[int, str]:
    """Peak of ``next_token_loss`` over its weights: a forward, the capped logits and one row's fp32 cross-entropy."""
    b = _loss_batch(batch, seq_len, arch.vocab)
    logits = b * seq_len * arch.vocab * c * (2 if arch.final_softcap else 1)
    fwd = inference_layer_bytes(arch, b * seq_len, c, seq_len, arch.sliding_window is not None
                                and seq_len > arch.sliding_window)
    per_row = 2 * seq_len * arch.vocab * 4
    return max(fwd, logits + per_row), f"{b} x {seq_len} tokens per forward"


def scoring_bytes(arch: Arch, c: int, layers: int, batch: int, row: int, scored: int) -> tuple[int, int, str]:
    """(KV caches, everything else) of ``core.evaluation.loglikelihood.score_continuations`` on one batch of
    ``batch`` rows of up to ``row`` tokens, ``scored`` positions scored per row.

    The scorer runs a prefix that several contexts share once and keeps its cache while those contexts run
    against it; a context with several continuation rows keeps its own cache while the rows run against it
    (each forward gathers its past into a fresh cache). So up to three caches are alive at once, the prefixes',
    the contexts' and the rows', each at most ``batch x row`` tokens of every layer; one-token continuations
    (answer letters) share one row per context, so the third never exists for them. A forward: one block at
    its widest point over ``batch x row`` tokens with an explicit mask (a row that continues a cached past
    attends through one, and SDPA then repeats grouped keys and values to every head), plus that mask. Then the
    LM head on the scored positions only (``logits_to_keep``) and their log-softmax in fp32; continuation rows
    run while the log-probabilities of their context's row are still held.
    """
    tokens = batch * row
    caches = 2 if scored == 1 else 3  # the prefixes', the contexts' and, with several rows per context, the rows'
    kv = caches * layers * 2 * tokens * arch.kv_heads * arch.head_dim * c
    forward = inference_layer_bytes(arch, tokens, c, row, True) + tokens * row * (c if arch.eager else 1)
    positions = batch * scored
    logits = positions * arch.vocab
    head = (tokens + positions) * arch.hidden * c + logits * c * (2 if arch.final_softcap else 1)
    log_softmax = logits * (c + (4 if c != 4 else 0) + 4)  # the logits, their fp32 copy, the log-probabilities
    held = logits * 4 if scored > 1 else 0
    return kv, max(forward, head, held + log_softmax), f"batch {batch} x {row} tokens, {positions} scored, " \
        f"{caches} caches"


def generation_bytes(arch: Arch, c: int, layers: int, batch: int, context: int, generated: int) -> tuple[int, int, str]:
    """(KV cache, everything else) of one lm-eval ``generate_until`` batch: ``model.generate`` with its cache.

    lm-eval cuts each context to ``max_length - generated`` tokens, pads the batch on the left (an attention
    mask) and generates up to ``generated`` tokens, so the cache ends holding ``batch x (context + generated)``
    tokens of every layer. Before it: the prefill forward over the contexts (one block at its widest point, with
    the mask). While decoding, a step's ``torch.cat`` holds one layer's keys and values twice, and ``generate``
    keeps the last position's logits only (``logits_to_keep=1``) with an fp32 copy.
    """
    generated = min(generated, arch.max_length - 1)
    prompt = max(1, min(context, arch.max_length - generated))
    per_token = 2 * arch.kv_heads * arch.head_dim * c  # one layer's key and value
    kv = layers * batch * (prompt + generated) * per_token
    prefill = inference_layer_bytes(arch, batch * prompt, c, prompt, True) + \
        batch * prompt * prompt * (c if arch.eager else 1)
    step = batch * (prompt + generated) * per_token + batch * arch.vocab * (c + 8)
    return kv, max(prefill, step), f"batch {batch} x ({prompt} + {generated} generated) tokens"


def generates(task: str) -> bool:
    """Whether lm-eval runs ``task`` as ``generate_until`` (its registry spec's ``output_type``)."""
    # getattr: TaskSpec.output_type is being added beside this change; a registry without it has no generative task
    return getattr(TASKS[task], "output_type", "multiple_choice") == "generate_until"


def eval_terms(arch: Arch, w: Workload, c: int, layers: int) -> list[Term]:
    """``trial.run_evaluation``: each lm-eval task in turn (scored or generated), then the C4 loss; the largest
    of their peaks (each frees its tensors before the next)."""
    batch = w.evaluation.batch_size
    # getattr: EvalConfig.max_gen_toks is being added beside this change; None (or no such setting): lm-eval's cap
    generated = getattr(w.evaluation, "max_gen_toks", None) or LM_EVAL_MAX_GEN_TOKS
    options: list[list[Term]] = []
    for name, shots in w.tasks:
        row = w.request_tokens(arch, (name, shots))
        if generates(name):
            kv, other, how = generation_bytes(arch, c, layers, batch, row, generated)
            options.append([Term(f"eval: KV cache ({name}, generation)", kv, True, how),
                            Term(f"eval: prefill and decoding ({name})", other, False, how)])
        else:
            kv, other, how = scoring_bytes(arch, c, layers, batch, row, continuation_tokens(name, row))
            options.append([Term(f"eval: KV caches ({name}, shared contexts)", kv, True, how),
                            Term(f"eval: forward and scored logits ({name})", other, False, how)])
    if w.evaluation.c4_sequences:
        loss, how = next_token_loss_bytes(arch, c, batch, w.evaluation.seq_len)
        options.append([Term("eval: C4 loss logits and activations", loss, False, how)])
    return max(options, key=total_bytes) if options else []


def profile_terms(arch: Arch, w: Workload, c: int) -> list[Term]:
    """``core.profile.profile``: a decoder forward plus the captured unit vectors of every stream."""
    B, T, L, H = w.calibration.batch_size, w.calibration.max_length, arch.layers, arch.hidden
    tokens = B * T
    rows = B if w.calibration.metric == "angular" else tokens  # angular: each sample's last token; others: every token
    vectors = (L + 1) * rows * H * 4
    gram = rows * (L + 1) ** 2 * 4
    fwd = inference_layer_bytes(arch, tokens, c, T, True) + B * T * T * (c if arch.eager else 1)
    peak = max(vectors + fwd, 2 * vectors + 2 * gram)
    return [Term("profile: forward and captured streams", peak, False, f"batch {B} x {T}, {w.calibration.metric}: "
                 f"{(vectors + gram) / GIB:.2f} GiB of vectors and Gram products")]


def heal_terms(arch: Arch, config: HealConfig, layers: int, c: int) -> list[Term]:
    """One QLoRA/LoRA training step, and the validation loss between steps (``heal.loop``)."""
    B, T = config.batch_size, config.seq_len
    tokens = B * T
    targets = arch.targets(config.target)
    P = lora_params(arch, layers, config.rank, targets)
    per_layer = train_layer_bytes(arch, c, config.rank, config.dropout, targets, T)
    block = int(per_layer * tokens)
    out = [Term(f"LoRA weights, grads, {config.optimizer} moments", optimizer_state_bytes(arch, layers, config.rank,
                targets, config.optimizer), True, f"{P:,} LoRA parameters, rank {config.rank} on "
                f"{', '.join(t.name for t in targets)}")]
    norm_saved = (4 * arch.hidden + 4) if arch.norm == "rms" else (c * arch.hidden + 8)
    rest = tokens * (norm_saved + 8)  # final norm, labels
    logits = tokens * arch.vocab * (12 + (c if arch.final_softcap else 0))
    if config.gradient_checkpointing:
        saved = layers * tokens * arch.hidden * c
        out.append(Term("activations: block inputs (checkpointed)", saved, True, f"{B} x {T} tokens"))
        transient = max(logits, 2 * block)  # one block recomputed, plus its backward
        what = "max(loss backward, one block recomputed + its backward)"
    else:
        out.append(Term("activations: saved for backward", layers * block, True,
                        f"{B} x {T} tokens, {per_layer / 1024:.0f} KiB per token per block"))
        transient = max(logits, block)
        what = "max(loss backward, one block's backward)"
    out.append(Term("activations: LM-head loss and backward transient", rest + transient, False,
                    f"{what}; logits {tokens * arch.vocab / 1e6:.0f}M"))
    if config.quantize == "nf4":
        largest = max(param_count(arch).linear_sizes)
        out.append(Term("NF4 dequantized weight (transient)", largest * c, False, "the largest linear, compute dtype"))
    val, how = next_token_loss_bytes(arch, c, B, T)
    train_act = total_bytes(out[1:])
    if val - 4 * P > train_act:  # between steps, the grads are freed (zero_grad(set_to_none=True))
        out[1:] = [Term("validation loss (no grad)", val - 4 * P, False, how)]
    return out


