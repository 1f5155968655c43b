"""A healing checkpoint: the adapter plus exactly what resuming needs, written atomically.

Layout of ``root/checkpoint-NNNNNN``: the adapter files (``adapter_*``, as
peft writes them), ``training_state.pt`` (optimizer, scheduler, RNG) and
``trainer_state.json`` (step, elapsed time, data hash, the settings that shape
the trajectory, and the reports so far). The newest adapter is also copied to
``root`` itself, so ``PeftModel.from_pretrained(model, root)`` always loads it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ray_prune.core.atomic import atomic_path, stale_temporaries, write_bytes, write_text
from ray_prune.core.heal.config import HealConfig
from ray_prune.errors import UserError

ADAPTER_RECORD = "ray_prune.json"  # next to an adapter: the model it was trained on, and how it was scored
CHECKPOINT_PREFIX = "checkpoint-"
STATE_JSON = "trainer_state.json"
STATE_PT = "training_state.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_adapter_files(peft_model, directory: Path) -> None:
    # save_embedding_layers=False: only the LoRA weights, and no hub lookup of the base config.
    peft_model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    readme = directory / "README.md"  # peft's model-card stub says nothing we do not record ourselves
    if readme.is_file():
        readme.unlink()


def write_adapter_record(directory: Path, base_model: str, removed_layers: list[int], original_num_layers: int,
                         quantize: str, dtype: str, eval_precision: str, **extra: Any) -> None:
    """What ``ray-prune eval --adapter`` needs to score an adapter exactly as the sweep did: the base model, the
    layers removed from it, and the precision it was trained and scored in."""
    record = {"base_model": base_model, "removed_layers": list(removed_layers),
              "original_num_layers": original_num_layers, "quantize": quantize, "dtype": dtype,
              "eval_precision": eval_precision, **extra}
    write_text(directory / ADAPTER_RECORD, json.dumps(record, indent=1))


def read_adapter_record(directory: str | os.PathLike) -> dict[str, Any]:
    """The record next to an adapter, or {} for an adapter written by something else."""
    path = Path(directory) / ADAPTER_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def save_checkpoint(root: Path, peft_model, optimizer, scheduler, step: int, state: dict[str, Any]) -> Path:
    """Write ``root/checkpoint-NNNNNN`` atomically (``core.atomic``), copy its adapter to ``root``, then drop older
    checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    with atomic_path(final, directory=True) as tmp:
        save_adapter_files(peft_model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / STATE_PT)
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
        for name in os.listdir(tmp):  # the newest adapter at the top level, file by file
            if name.startswith("adapter_"):
                write_bytes(root / name, (tmp / name).read_bytes())
    for other in root.glob(f"{CHECKPOINT_PREFIX}*"):
        if other.is_dir() and other != final:
            shutil.rmtree(other, ignore_errors=True)
    return final


def remove_stale(root: Path) -> None:
    """Leftovers of a process killed mid-save."""
    for stale in stale_temporaries(root):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint at ``path``, or the newest ``checkpoint-*`` inside it; None if the directory has none."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"checkpoint {p} does not exist", "pass a checkpoint directory written by heal()")
    if (p / STATE_JSON).is_file():
        return p
    found = sorted(c for c in p.glob(f"{CHECKPOINT_PREFIX}*") if (c / STATE_JSON).is_file())
    return found[-1] if found else None


def checkpoint_step(path: str | os.PathLike | None) -> int:
    """The heal step a checkpoint (or a directory of them) holds; 0 for None or an empty directory."""
    checkpoint = find_checkpoint(path) if path else None
    return int(json.loads((checkpoint / STATE_JSON).read_text())["step"]) if checkpoint is not None else 0


def restore(checkpoint: Path, model, optimizer, scheduler, config: HealConfig, data_hash: str) -> dict[str, Any]:
    """Load a checkpoint into model, optimizer, scheduler and RNG; return its state (step, reports...).

    Refuses, naming the difference, a checkpoint written with other trajectory settings or other text.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((checkpoint / STATE_JSON).read_text())
    defaults = HealConfig.defaults()  # a setting added after the checkpoint was written had its default then
    mismatched = {k: (state["config"].get(k, defaults.get(k)), v) for k, v in config.resume_key().items()
                  if state["config"].get(k, defaults.get(k)) != v}
    if mismatched:
        raise UserError(f"checkpoint {checkpoint} was written with other settings: "
                        + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in mismatched.items()),
                        "resume with the settings it was trained with, or start a fresh run")
    if state["data_hash"] != data_hash:
        raise UserError(f"checkpoint {checkpoint} was trained on other text (data hash differs)",
                        "resume with the same training texts and tokenizer, or start a fresh run")
    result = set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise UserError(f"checkpoint {checkpoint} does not fit this model ({result.unexpected_keys[:3]} ...)",
                        "resume onto the model the checkpoint was trained from")
    blob = torch.load(checkpoint / STATE_PT, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return state
