"""Precision names and the two "auto" policies, in one place and importable without torch.

Inference and training want different defaults on the same hardware, for
measured reasons:

* **inference** (profiling, evaluation): bf16 wherever the hardware runs it
  natively, fp16 on GPUs without bf16, fp32 on CPUs without bf16 units. On an
  AVX2-only AMD EPYC a SmolLM2 forward ran 4x *slower* in bf16 than in fp32.
* **training** (healing): bf16 on GPUs that have it (the QLoRA recipe), fp32
  everywhere else. fp16 is never chosen automatically (LoRA in fp16 needs loss
  scaling), and on CPUs bf16 backward GEMMs measured 25x slower than fp32 on
  an AVX2 EPYC, so CPU training stays fp32 even where bf16 units exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ray_prune.errors import UserError

if TYPE_CHECKING:
    import torch

# The names experiments use (the short ones), and every alias the CLI and the Python API accept.
CANONICAL: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
ALIASES: dict[str, str | None] = {"auto": None, "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                                  "float16": "float16", "fp32": "float32", "float32": "float32"}
Purpose = Literal["inference", "training"]


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def check(name: str) -> str:
    """The name itself, or a UserError listing the names there are."""
    if name not in ALIASES:
        raise UserError(f"unknown dtype {name!r}", f"use one of {', '.join(ALIASES)}")
    return name


def auto_dtype(device: "torch.device", purpose: Purpose = "inference") -> "torch.dtype":
    """The "auto" policy of the module docstring."""
    import torch

    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if purpose == "inference" else torch.float32
    if purpose == "training":
        return torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def to_torch(dtype: "str | torch.dtype | None", device: "torch.device",
             purpose: Purpose = "inference") -> "torch.dtype":
    """A dtype name (or None for auto, or a torch.dtype passed through) as a torch.dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    attr = ALIASES[check(dtype or "auto")]
    return auto_dtype(device, purpose) if attr is None else getattr(torch, attr)


def short_name(dtype: "torch.dtype") -> str:
    """fp32 / bf16 / fp16 for a torch dtype: how rows name the precision they were scored in."""
    name = str(dtype).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)
