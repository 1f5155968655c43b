"""Builders shared by the tests and the benchmarks: tiny random-init models of every family, and the tiny experiment.

One home for each: ``tiny_config``/``tiny_model`` (a family's smallest real config), ``save_tiny_models``
(tiny Llamas as HF directories with SmolLM2's tokenizer), ``tiny_experiment`` (``tests/tiny.yaml`` with
overrides). The benchmarks import this module too (they put ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
TINY_YAML = Path(__file__).resolve().parent / "tiny.yaml"
TINY_VOCAB = 49152  # SmolLM2's vocabulary, so tiny models read real text through its tokenizer
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "phi", "gemma", "gemma2", "gemma3_text", "gpt_neox"]


def tiny_config(model_type: str, num_layers: int = 6):
    """A random-init config of each supported family, small enough to build in milliseconds."""
    from transformers import AutoConfig

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_hidden_layers=num_layers, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    extra: dict = {
        "llama": dict(num_key_value_heads=2),
        "mistral": dict(num_key_value_heads=2, sliding_window=16),
        "qwen2": dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=3),
        "qwen3": dict(num_key_value_heads=2, head_dim=16),
        "phi3": dict(num_key_value_heads=2),
        "phi": dict(num_key_value_heads=4),
        "gemma": dict(num_key_value_heads=1, head_dim=16),
        "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=16),
        "gemma3_text": dict(num_key_value_heads=1, head_dim=16, sliding_window=16,
                            layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention"
                                         for i in range(num_layers)]),
        "gpt_neox": dict(rotary_pct=0.25),
    }[model_type]
    return AutoConfig.for_model(model_type, **{**common, **extra})


def tiny_model(model_type: str = "llama", num_layers: int = 6, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers), dtype=dtype)
    return model.eval()


def save_tiny_models(root: Path, names: list[str], tokenizer=None, num_layers: int = 6) -> Path:
    """Random-init 6-layer Llamas saved as HF directories with SmolLM2's tokenizer: sweeps on them spend their
    time in Ray and our code, not in matmuls. Fault hooks match on the directory names."""
    if tokenizer is None:
        from ray_prune.core.models import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m")
    for name in names:
        model = tiny_model("llama", num_layers=num_layers, seed=3)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def tiny_spec(models: list[str] | None = None, name: str = "tiny", **over) -> dict:
    """``tests/tiny.yaml`` as a dict, with ``models`` (paths) and any top-level key replaced."""
    spec = yaml.safe_load(TINY_YAML.read_text())
    spec["name"] = name
    if models is not None:
        spec["models"] = models
    spec.update(copy.deepcopy(over))
    return spec


def tiny_experiment(models: list[str] | None = None, name: str = "tiny", **over):
    """The tiny experiment, parsed (validated) like any experiment file."""
    from ray_prune.sweep.experiment import parse_experiment

    return parse_experiment(tiny_spec(models, name, **over), str(TINY_YAML))
