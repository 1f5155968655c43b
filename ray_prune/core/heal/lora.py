"""Where the adapters go, how they are attached, and how they are merged for export.

The paper trains LoRA on the FFN projections only (``target="ffn"``): the
family table in ``core.architecture`` names them. ``merge_adapter`` folds an
adapter into unquantized weights, for ``save_pretrained`` of a healed model.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ray_prune.core import dtypes
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.heal.quantize import is_4bit, load_base
from ray_prune.errors import UserError

BASE_ATTR = "_ray_prune_base"  # on the PeftModel: where its unquantized base weights live


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (bnb's Linear4bit is an nn.Linear), minus the LM head."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m is not out_emb and name}
    return sorted(names)


def resolve_targets(model: nn.Module, target: str | Sequence[str]) -> list[str]:
    """LoRA target module names: "ffn" -> the family's FFN linears, "all-linear" -> every linear but the head.

    Explicit names must exist as linear layers; an unknown one is a UserError
    listing the names that do.
    """
    from ray_prune.core.architecture import ffn_modules

    available = linear_names(model)
    if isinstance(target, str):
        if target == "ffn":
            return ffn_modules(model)
        if target == "all-linear":
            return available
        wanted = [target]
    else:
        wanted = list(target)
    missing = [t for t in wanted if t not in available]
    if missing:
        raise UserError(f"LoRA target module(s) {', '.join(missing)} not found in {type(model).__name__}",
                        f"use 'ffn', 'all-linear' or names among its linear layers: {', '.join(available)}")
    return wanted


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing, non-reentrant (the reentrant kind drops the gradients of frozen-base LoRA)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_enabled(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def wrap(model: nn.Module, lora):
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def _take_model(given: nn.Module, config: HealConfig, dtype: torch.dtype, dev: torch.device):
    """An in-memory model ready for adapters, its base directory, and a temp dir to remove with it (or None)."""
    if hasattr(given, "peft_config"):
        raise UserError("the model already carries LoRA adapters",
                        "pass it straight to heal(), or pass the base model / its directory here")
    name = str(getattr(given.config, "_name_or_path", "") or "")
    if config.quantize == "none":
        return given.to(device=dev, dtype=dtype), name, None
    if is_4bit(given):
        return given, name, None
    tmp = tempfile.mkdtemp(prefix="ray_prune_heal_base_")  # bitsandbytes quantizes at load time
    try:
        given.save_pretrained(tmp, safe_serialization=True)
        return load_base(tmp, config.quantize, dtype, dev), tmp, tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_for_healing(model_path_or_model: str | os.PathLike | nn.Module, config: HealConfig,
                        device: str | torch.device | None = None):
    """Load (or take) the model, quantize it per ``config.quantize``, and attach fresh LoRA adapters.

    A saved model directory (or bundled name) is the normal input: it loads
    straight into 4-bit NF4. An in-memory model is used directly for
    ``quantize="none"`` (converted to the compute dtype and wrapped *in place*,
    as peft injects its layers into the model it is given); for ``nf4`` it is
    saved to a temporary directory and reloaded quantized, since bitsandbytes
    quantizes at load time. The directory lives as long as the returned model,
    because ``merge_adapter`` reloads the unquantized base from it.
    """
    from peft import LoraConfig

    from ray_prune.core.models import default_device, resolve

    config.validate()
    dev = torch.device(device) if device is not None else default_device()
    dtype = dtypes.to_torch(config.dtype, dev, "training")
    cleanup: str | None = None
    if isinstance(model_path_or_model, (str, os.PathLike)):
        base_path = resolve(str(model_path_or_model))
        model = load_base(base_path, config.quantize, dtype, dev)
    elif isinstance(model_path_or_model, nn.Module):
        model, base_path, cleanup = _take_model(model_path_or_model, config, dtype, dev)
    else:
        raise TypeError(f"expected a model directory or an nn.Module, got {type(model_path_or_model).__name__}")

    targets = resolve_targets(model, config.target)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    torch.manual_seed(config.seed)  # LoRA A init is random: same seed, same adapter
    peft_model = wrap(model, lora)
    setattr(peft_model, BASE_ATTR, {"path": base_path or str(getattr(model.config, "_name_or_path", "") or ""),
                                    "dtype": str(dtype).removeprefix("torch."),
                                    "quantize": "nf4" if is_4bit(model) else "none"})
    if cleanup is not None:
        weakref.finalize(peft_model, shutil.rmtree, cleanup, True)
    return peft_model


def _full_precision_base(peft_model) -> nn.Module:
    """The unquantized base of a 4-bit PeftModel, in fp32: reloaded from its checkpoint and pruned like it."""
    from transformers import AutoModelForCausalLM

    from ray_prune.core.prune import prune_layers

    info = getattr(peft_model, BASE_ATTR, None) or {}
    base = peft_model.get_base_model()
    path = info.get("path") or str(getattr(base.config, "_name_or_path", "") or "")
    if not path or not (Path(path) / "config.json").is_file():
        raise UserError(f"the unquantized base of this 4-bit model is not on disk (looked for {path!r})",
                        "prepare the model from a saved directory or a bundled name, or save the adapter and apply "
                        "it to the full-precision model yourself")
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    kept = (getattr(base.config, "layer_pruning", None) or {}).get("kept_layers")
    n = plain.config.num_hidden_layers
    if kept is not None and n != len(kept):  # the checkpoint is the original model: prune it the same way
        original = (getattr(plain.config, "layer_pruning", None) or {}).get("kept_layers", list(range(n)))
        prune_layers(plain, [i for i, layer in enumerate(original) if layer not in set(kept)])
    return plain


def merge_adapter(peft_model, inplace: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain transformers model with the adapter folded into its weights, for export (``save_pretrained``).

    The merge is computed in fp32 and cast once to ``dtype`` (default: the dtype the base was healed in).
    Merging into bf16 weights in bf16 (``weight += delta`` on the bf16 grid) drops every part of the
    update below half a bf16 step, which at the paper's learning rates is much or all of it (peft issue
    1388). For an NF4 base the unquantized weights are reloaded in fp32 from the checkpoint and pruned
    like the model: folding the update into 4-bit weights would re-quantize it away. Scores in a sweep are
    taken on the model as trained (the adapter unmerged), not on this copy.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    info = getattr(peft_model, BASE_ATTR, None) or {}
    out_dtype = dtype or getattr(torch, info.get("dtype", "float32"))
    device = next(peft_model.parameters()).device
    if not is_4bit(peft_model.get_base_model()):
        target = peft_model if inplace else copy.deepcopy(peft_model)
        merged = target.float().merge_and_unload()
    else:
        adapter = peft_model.active_adapter
        with torch.random.fork_rng(devices=[]):  # fresh LoRA init must not disturb the caller's RNG stream
            lora = copy.deepcopy(peft_model.peft_config[adapter])
            lora.inference_mode = True
            wrapped = wrap(_full_precision_base(peft_model), lora)
        state = {k: v.float() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()}
        result = set_peft_model_state_dict(wrapped, state)
        bad = [k for k in getattr(result, "missing_keys", []) if "lora_" in k] + list(result.unexpected_keys)
        if bad:
            raise RuntimeError(f"adapter does not fit the reloaded base: {bad[:5]}")
        merged = wrapped.merge_and_unload()
    merged = merged.to(device=device, dtype=out_dtype)
    merged.config.use_cache = True
    return merged.eval()
