"""Shared fixtures: the local data mirror, SmolLM2's tokenizer, the real bundled models.

Builders (tiny models, the tiny experiment) live in ``helpers.py``, which the benchmarks share.
"""

from __future__ import annotations

import os

# OpenMP threads that spin-wait stall badly when another process shares the 2 cores; must precede torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import SHARED_DATA  # noqa: E402


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


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer; tiny models share its vocabulary so they can read real text."""
    from ray_prune.core.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (30 layers), loaded once per test session, in fp32: "auto" is bf16 on CPUs with
    AVX512-BF16 or AMX, where exact comparisons (cached against recomputed decoding, our scores against
    lm-eval's) would test bf16 rounding instead of the code."""
    from ray_prune.core.models import load_model

    return load_model("smollm2-135m", dtype="fp32")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M (18 layers, sliding/full layer_types), loaded once per test session, in fp32 (see
    ``smollm2``)."""
    from ray_prune.core.models import load_model

    return load_model("gemma3-270m", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, tokenizer) -> Path:
    """The storage root of one real tiny sweep on local Ray (its own Ray, stopped before the fixture returns):
    a random-init 6-layer Llama, 2 fractions x 2 strategies, 2 heal steps. Read-only for the tests that use it."""
    import ray

    from helpers import save_tiny_models, tiny_spec
    from ray_prune.sweep.experiment import parse_experiment
    from ray_prune.sweep.run import run_sweep

    root = tmp_path_factory.mktemp("tiny-sweep")
    save_tiny_models(root, ["tiny-llama"], tokenizer)
    exp = parse_experiment(tiny_spec(
        [str(root / "tiny-llama")], name="report",
        heal={"steps": 2, "batch_size": 2, "seq_len": 32, "warmup_steps": 0, "eval_every": 1, "val_sequences": 2,
              "quantize": "none"},
        resources={"cpus_per_trial": 1, "max_failures": 0}))
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        run_sweep(exp, storage=str(root / "store"), progress=False)
    finally:
        ray.shutdown()
    return root / "store"
