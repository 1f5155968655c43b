"""Shared fixtures: the local data mirror, tiny random-init models of every family, the real bundled models."""

from __future__ import annotations

import os

# OpenMP threads that spin-wait stall badly when another process shares the 2 cores; must precede torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


def pytest_configure(config):
    os.environ.setdefault("RAY_PRUNE_DATA_DIR", str(SHARED_DATA))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["RAY_PRUNE_DATA_DIR"])
    assert (path / "c4" / "train_sample.parquet").is_file(), f"the shared data mirror is missing at {path}"
    return path


TINY_VOCAB = 49152  # SmolLM2's vocabulary, so tiny models read real text through its tokenizer


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


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "phi", "gemma", "gemma2", "gemma3_text", "gpt_neox"]


def tiny_model(model_type: str, num_layers: int = 6, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers), dtype=dtype)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer; tiny models share its vocabulary so they can read real text."""
    from ray_prune.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def save_tiny_models(root: Path, names: list[str], tokenizer, num_layers: int = 6) -> Path:
    """Random-init 6-layer Llamas saved as HF directories with SmolLM2's tokenizer: sweeps on them spend their
    time in Ray and our code, not in matmuls. Fault hooks match on the directory names."""
    for name in names:
        model = tiny_model("llama", num_layers=num_layers, seed=3)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def tiny_sweep_spec(models: list[str], name: str = "grid", **over) -> dict:
    """An experiment that runs in seconds per cell: tiny local models, a few heal steps, tiny evals."""
    spec = {
        "name": name,
        "models": models,
        "calibration": {"samples": 8, "max_length": 32, "batch_size": 4},
        "fractions": [0.2, 0.5],
        "strategies": ["similarity", "deepest"],
        "heal": {"steps": 4, "batch_size": 2, "seq_len": 32, "warmup_steps": 1, "eval_every": 2,
                 "val_sequences": 2, "quantize": "none"},
        "eval": {"tasks": {"boolq": {"limit": 3}}, "c4_sequences": 2, "seq_len": 32, "batch_size": 4},
        "scheduler": {"type": "none"},
        "resources": {"cpus_per_trial": 1, "max_failures": 1},
        "dtype": "fp32",
    }
    spec.update(over)
    return spec


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (30 layers), loaded once per test session."""
    from ray_prune.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M (18 layers, sliding/full layer_types), loaded once per test session."""
    from ray_prune.models import load_model

    return load_model("gemma3-270m")
