"""A model's architecture config without its weights: from a local directory, the hub, or the configs shipped here.

Planning a sweep (layer counts, memory estimates, LoRA targets) needs only a
model's ``config.json``. :func:`load_config` finds it in this order:

1. a bundled name (``smollm2-135m``, ``gemma3-270m``): the shipped config of its hub
   checkpoint, so planning never converts a GGUF;
2. a local directory: its ``config.json``;
3. a hub id: ``AutoConfig.from_pretrained`` (the network, or the local hub cache when
   ``HF_HUB_OFFLINE=1``); where that fails (offline and not cached, unreachable, gated
   without a token), the shipped config of the same hub id, if it is a known seed model.

The result says which source was used (:class:`LoadedConfig`), so a plan can say
"estimated from the shipped config" instead of pretending it read the hub.

Shipped configs (``shipped_configs/<org>--<name>.json``) hold architecture fields
only. The eight seed models' were written from the published ``config.json`` values
(building each on the meta device gives the published parameter counts, see
``tests/core/test_memory.py``). The two bundled models' were taken from the configs
of their converted GGUF caches, minus the fields that describe the conversion
(``dtype``, ``transformers_version``...), with ``rms_norm_eps`` restored to the
published 1e-5 (SmolLM2) and 1e-6 (Gemma-3), which GGUF stores as float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ray_prune.core.bundled import BUNDLED
from ray_prune.errors import UserError

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_configs"
Source = Literal["bundled", "local", "hub", "shipped"]
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class LoadedConfig:
    """A transformers config and where it came from."""

    config: Any  # transformers.PretrainedConfig
    source: Source  # bundled: shipped config of a bundled model; shipped: hub fallback to a shipped config
    location: str  # the file, directory or hub id it was read from
    note: str = ""  # why a fallback was taken, if one was


def _shipped_file(hub_id: str) -> Path:
    return SHIPPED_DIR / f"{hub_id.replace('/', '--')}.json"


def shipped_models() -> list[str]:
    """Hub ids with a shipped config (the seed models and the bundled models' checkpoints)."""
    return sorted(p.stem.replace("--", "/", 1) for p in SHIPPED_DIR.glob("*.json"))


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_file(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def model_dir(name: str) -> Path | None:
    """``name`` as a local model directory (absolute), None when no such path exists; a UserError for a path that
    is not a Hugging Face model directory, or that holds only pickled weights (never loaded: unpickling can run
    arbitrary code). The one check of a local model, for configs and weights alike."""
    path = Path(name).expanduser()
    if not path.exists():
        return None
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json)",
                        "pass a directory written by save_pretrained, a hub id, or a bundled name: "
                        + ", ".join(BUNDLED))
    pickles = sorted(p.name for ext in PICKLE_SUFFIXES for p in path.glob(f"*{ext}"))
    if pickles and not any(path.glob("*.safetensors")):
        raise UserError(f"{path} holds only pickled weights ({', '.join(pickles[:3])}); ray-prune never unpickles "
                        "weights, which can run arbitrary code",
                        "convert them once, in an environment you trust, with "
                        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir) (writes safetensors)")
    return path.resolve()


def check_model_name(name: str) -> None:
    """A name that is neither bundled nor a local directory must look like a hub id (org/name)."""
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise UserError(f"unknown model {name!r}: not a bundled name, a local directory or a hub id",
                        f"use one of {', '.join(BUNDLED)}, a path written by save_pretrained, "
                        "or a hub id like org/name")


def load_config(name: str, trust_remote_code: bool = False) -> LoadedConfig:
    """The config of ``name`` (bundled name, local directory or hub id); see the module docstring for the order."""
    if name in BUNDLED:
        path = _shipped_file(BUNDLED[name].hub_id)
        return LoadedConfig(_from_file(path, False), "bundled", str(path))
    local = model_dir(name)
    if local is not None:
        return LoadedConfig(_from_file(local, trust_remote_code), "local", str(local))
    check_model_name(name)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        return LoadedConfig(config, "hub", name)
    except (OSError, ValueError) as e:  # offline and not cached, unreachable, gated, or no such repo
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        shipped = _shipped_file(name)
        if shipped.is_file():
            why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub could not be read"
            return LoadedConfig(_from_file(shipped, False), "shipped", str(shipped),
                                note=f"{why} ({reason}); used the shipped config of {name}")
        raise UserError(f"cannot read the config of model {name!r}: {reason}",
                        "check the hub id, your network or HF_TOKEN for gated models, or pass a local directory "
                        f"(configs ship for: {', '.join(shipped_models())})") from None
