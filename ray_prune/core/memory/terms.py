"""The terms of a stage's peak memory, how they add up on each GPU, and the weights' terms.

Each stage's other terms are sized where its work is: ``inference`` (a no-grad forward, the next-token loss, the
profile pass), ``training`` (a LoRA step and its state), ``evaluation`` (the scorer and ``generate``); ``workload``
holds the settings they read. Each of those modules says where its numbers come from; the weights' and the per-GPU
allowances' sources are here, and so is the accuracy of the sum.

Sources
-------
* Parameter counts: closed forms per family (:func:`param_count`), equal to the
  meta-device build of all ten shipped configs and of a tiny config of every family
  (``tests/core/test_memory.py``).
* NF4 (bitsandbytes 0.50, ``bnb_4bit_use_double_quant``, blocksize 64): 0.5 byte per
  weight + 1 byte (8-bit absmax) per 64 weights + 4 bytes per 256 absmax blocks +
  ~1.1 KB of code books per tensor, measured with ``bitsandbytes.functional.quantize_4bit``.
  transformers quantizes every ``nn.Linear`` but the LM head; embeddings, norms,
  biases and the LM head stay in the compute dtype.
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
stage within ~10% of the GPU as "might not fit" (``memory.plan.HEADROOM``). Units: GiB
(2^30 bytes); an "80 GB" A100/H100 has 80 GiB.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ray_prune.core.memory.arch import Arch, dtype_bytes, nf4_bytes, param_count

GIB = 1 << 30
CUDA_CONTEXT_BYTES = 1 * GIB  # per GPU; assumed (see the module docstring)
ALLOCATOR_MARGIN = 0.05  # of the tensor peak; assumed


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
