"""Load the base of a healing run: 4-bit NF4 through bitsandbytes (QLoRA), or full precision.

bitsandbytes quantizes while weights load, so a base that should be NF4 is
read from a saved directory; an in-memory model is saved first (see
``lora.prepare_for_healing``).
"""

from __future__ import annotations

import torch
from torch import nn

from ray_prune.errors import UserError


def bnb_config(compute_dtype: torch.dtype):
    """The paper's QLoRA quantization: NF4 with double quantization, computing in ``compute_dtype``."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise UserError(f"quantize='nf4' needs bitsandbytes ({e})",
                        "pip install bitsandbytes, or heal with quantize='none'") from e
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True)


def is_4bit(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def load_base(path: str, quantize: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model at ``path`` for training: NF4 (``quantize="nf4"``) or in ``dtype``, on ``device``."""
    from transformers import AutoModelForCausalLM

    try:
        if quantize == "nf4":
            return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(dtype), dtype=dtype,
                                                        device_map={"": device}, use_safetensors=True)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
    except OSError as e:
        raise UserError(f"could not load model {path!r} for healing: {e}".splitlines()[0],
                        "pass a directory written by save_pretrained (safetensors), or a bundled name") from e
