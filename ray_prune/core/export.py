"""Write a pruning as a mergekit ``passthrough`` config, so mergekit users get the same model without ray-prune.

PruneMe-style workflows turn a distance table into a mergekit config by hand,
which is where off-by-one layer ranges creep in. Here the config comes from the
same list of removed layers that ``prune_layers`` uses: every run of kept
layers becomes one slice with a half-open ``layer_range`` (mergekit's
convention, like Python's ``range``). On SmolLM2-135M in fp32, ``mergekit-yaml``
on this config gives exactly the logits of ``ray-prune prune --strategy layers
--dtype fp32`` (tests/core/test_export.py checks it).

mergekit's passthrough only rewrites ``num_hidden_layers``. Configs that also
carry per-layer lists (``layer_types`` of Qwen2/3, Gemma2/3) or layer-index
thresholds (``max_window_layers``) would then disagree with the layer count;
mergekit 0.1.5 with transformers 5 crashes on them after writing the weights.
Such exports are refused here, pointing at ``ray-prune prune --out``, which
rewrites those fields. So is pruning a model that ray-prune already pruned:
mergekit would copy its ``layer_pruning`` record (the original layers kept)
unchanged, and later pruning composes with that record.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Sequence

from ray_prune.core import dtypes
from ray_prune.core.atomic import write_text
from ray_prune.core.bundled import BUNDLED
from ray_prune.core.select import check_layers
from ray_prune.errors import UserError


def kept_ranges(num_layers: int, removed: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` runs of the layers that stay, in order: one mergekit slice each."""
    drop = set(check_layers(removed, num_layers))
    ranges: list[tuple[int, int]] = []
    for i in range(num_layers):
        if i in drop:
            continue
        if ranges and ranges[-1][1] == i:
            ranges[-1] = (ranges[-1][0], i + 1)
        else:
            ranges.append((i, i + 1))
    return ranges


def _source(model: str) -> str:
    """What mergekit loads: a bundled name becomes ray-prune's converted safetensors directory, a local
    directory its absolute path, a hub id stays as it is. mergekit parses ``+`` as "model+LoRA" and ``@`` as
    "model@revision", so a path holding either would load the wrong thing."""
    from ray_prune.core.models import resolve

    source = resolve(model)
    if Path(source).is_dir() and ("+" in source or "@" in source):
        raise UserError(f"mergekit cannot load {source}: it reads '+' as model+LoRA and '@' as model@revision",
                        "move or symlink the model to a path without '+' or '@'")
    return source


def _check_architecture(source: str, num_layers: int, drop: list[int], config=None) -> None:
    """Refuse what mergekit would build wrong or crash on (module docstring); skipped if the config is unreadable
    (a hub id while offline): mergekit reads it again itself when it runs."""
    from transformers import AutoConfig

    from ray_prune.core.architecture import INDEX_THRESHOLD_FIELDS
    from ray_prune.core.prune import _per_layer_fields

    if config is None:
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError):
            return
    declared = getattr(config, "num_hidden_layers", num_layers)
    if declared != num_layers:
        raise UserError(f"{source} has {declared} layers, not num_layers={num_layers}",
                        f"pass num_layers={declared} (indices refer to this model's layers)")
    if not drop:
        return
    fields = _per_layer_fields(config, num_layers) + [
        name for name in INDEX_THRESHOLD_FIELDS
        if isinstance(t := getattr(config, name, None), int) and any(i < t for i in drop)]
    record = getattr(config, "layer_pruning", None)
    if isinstance(record, dict) and "kept_layers" in record:  # prune_layers would compose with a stale record
        original = sorted(set(record.get("removed_layers", [])) | {record["kept_layers"][i] for i in drop})
        raise UserError(f"{source} was pruned by ray-prune and its config.json records which original layers it "
                        "kept (layer_pruning); mergekit would copy that record unchanged, and so wrong",
                        f"export from the original model instead, removing original layers {original}")
    if fields:
        raise UserError(f"{config.model_type} configs carry {', '.join(fields)}, which mergekit's passthrough does "
                        "not rewrite when it drops layers (it only sets num_hidden_layers)",
                        "save the pruned model with `ray-prune prune MODEL --out DIR` instead; it rewrites them")


def _mergekit_dtype(dtype: str | None) -> str | None:
    return None if dtype is None else dtypes.ALIASES[dtypes.check(dtype)]


def _config(source: str, ranges: list[tuple[int, int]], dtype: str | None) -> dict:
    config: dict = {"slices": [{"sources": [{"model": source, "layer_range": [a, b]}]} for a, b in ranges],
                    "merge_method": "passthrough"}
    if dtype is not None:
        config["dtype"] = dtype
    return config


def mergekit_config(model: str, num_layers: int, removed: Sequence[int], dtype: str | None = "float32",
                    config=None) -> dict:
    """The mergekit passthrough config that keeps every layer of ``model`` not in ``removed``.

    ``model`` is a hub id, a local directory or a bundled name (written as its converted local directory);
    ``removed`` indexes the layers of that model. ``dtype`` is float32/bfloat16/float16 or their short names;
    ``"auto"`` or None leave it out, so mergekit copies each tensor in the precision it is stored in.
    ``config``: the model's transformers config where the caller has read it already (else it is read here).
    """
    drop = check_layers(removed, num_layers)
    ranges = kept_ranges(num_layers, drop)
    merge_dtype = _mergekit_dtype(dtype)
    source = _source(model)
    _check_architecture(source, num_layers, drop, config)
    return _config(source, ranges, merge_dtype)


def _header(path: Path, model: str, config: dict, num_layers: int, drop: list[int]) -> str:
    source = config["slices"][0]["sources"][0]["model"]
    kept = sum(b - a for s in config["slices"] for a, b in [s["sources"][0]["layer_range"]])
    lines = [f"mergekit passthrough config written by ray-prune: {model} without layers {drop},",
             f"keeping {kept} of {num_layers} layers (layer_range is half-open: [a, b] keeps layers a..b-1).",
             "Build the pruned model (an ordinary Hugging Face directory) with:",
             f"  mergekit-yaml {shlex.quote(str(path))} OUT_DIR"]
    if model in BUNDLED:
        b = BUNDLED[model]
        lines += [f"model is the converted bundled model {model}: ray-prune's safetensors conversion of the GGUF",
                  f"in the {b.package} package, cached on this machine at {source}.",
                  f"It is not the hub checkpoint {b.hub_id}, whose weights differ."]
    how = f"--strategy layers --layers {','.join(map(str, drop))}" if drop else "--strategy deepest --n 0"
    if "dtype" in config:
        how += f" --dtype {config['dtype']}"
    lines += [f"Same weights as: ray-prune prune {shlex.quote(model)} {how} --out DIR",
              "which also records the kept original layers in its config.json (layer_pruning); mergekit does not."]
    if "dtype" not in config:
        lines.append("No dtype: mergekit keeps every tensor in the precision it is stored in.")
    return "".join(f"# {line}\n" for line in lines)


def mergekit_yaml(path: str | os.PathLike, model: str, num_layers: int, removed: Sequence[int],
                  dtype: str | None = "float32", config=None) -> str:
    """The text of the config file at ``path`` (named in its header): the header comment, then the YAML."""
    import yaml

    merge = mergekit_config(model, num_layers, removed, dtype, config)
    text = _header(Path(path), model, merge, num_layers, check_layers(removed, num_layers))
    return text + yaml.safe_dump(merge, sort_keys=False, default_flow_style=None)


def write_mergekit_config(path: str | os.PathLike, model: str, num_layers: int, removed: Sequence[int],
                          dtype: str | None = "float32") -> Path:
    """Write :func:`mergekit_config` as YAML with a header saying what it is and how to run it; return the path.

    The file goes to a temp file in the same directory and is renamed into place, so a crash never leaves a
    half-written config that mergekit would half-apply. An existing file is replaced.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a directory", "pass a file name for the config, e.g. prune.yaml")
    return write_text(path, mergekit_yaml(path, model, num_layers, removed, dtype))
