"""The rates that turn work into seconds: the GPU types a plan prices, and their default rates with the sources.

The rates are :func:`default_rates` for a GPU type, or measured on a device by ``core.probe.probe``; :class:`Rates`
says which is which.

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
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ray_prune.core.cost.flops import train_flops
from ray_prune.core.cost.work import Work
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory.arch import Arch
from ray_prune.errors import UserError


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
