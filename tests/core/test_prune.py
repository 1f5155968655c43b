"""Pruning every supported family: the model is the original minus the removed blocks, the KV cache works, and it
saves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import FAMILIES, tiny_model
from ray_prune.core.architecture import decoder_layers, ffn_modules
from ray_prune.errors import UserError
from ray_prune.core.prune import prune_layers

REMOVE = [1, 2, 4]  # non-contiguous on purpose


def _ids(seed=0, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (2, length), generator=g)


def _skip_hooks(model, remove):
    """Make the removed blocks identities in the unpruned model: the reference for the pruned one."""
    def identity(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    return [decoder_layers(model)[i].register_forward_hook(identity, with_kwargs=True) for i in remove]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_equals_original_without_those_blocks(family):
    original = tiny_model(family, num_layers=6)
    pruned = prune_layers(original, REMOVE, inplace=False)
    ids = _ids()
    handles = _skip_hooks(original, REMOVE)
    with torch.no_grad():
        want = original(ids).logits
        got = pruned(ids).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert len(decoder_layers(pruned)) == 3 and len(decoder_layers(original)) == 6
    assert pruned.config.num_hidden_layers == 3
    assert pruned.config.layer_pruning["kept_layers"] == [0, 3, 5]
    assert pruned.config.layer_pruning["removed_layers"] == REMOVE
    for i, layer in enumerate(decoder_layers(pruned)):
        idx = {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")}
        assert idx == {i}, f"{family} block {i} keeps layer_idx {idx}"


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_generation_matches_recompute(family):
    model = prune_layers(tiny_model(family, num_layers=6, seed=1), REMOVE)
    ids = _ids(seed=2, length=20)  # longer than the tiny sliding window of 16
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, min_new_tokens=10)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        recomputed = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)


def test_per_layer_config_lists_follow_the_kept_layers():
    model = tiny_model("gemma3_text", num_layers=6)
    types = list(model.config.layer_types)
    prune_layers(model, [0, 2, 5])
    assert model.config.layer_types == [types[i] for i in (1, 3, 4)]
    assert [layer.self_attn.layer_type for layer in decoder_layers(model)] == model.config.layer_types
    qwen = tiny_model("qwen2", num_layers=6)  # max_window_layers=3 in the tiny config
    qtypes = list(qwen.config.layer_types)
    prune_layers(qwen, [1, 4])
    assert qwen.config.max_window_layers == 2  # kept layers 0, 2 lie below the old threshold
    assert qwen.config.layer_types == [qtypes[i] for i in (0, 2, 3, 5)]


def test_pruning_twice_composes_original_indices():
    model = tiny_model("llama", num_layers=8)
    prune_layers(model, [2, 3])  # keeps 0 1 4 5 6 7
    prune_layers(model, [0, 4])  # drops original 0 and 6
    assert model.config.layer_pruning == {"original_num_layers": 8, "kept_layers": [1, 4, 5, 7],
                                          "removed_layers": [0, 2, 3, 6]}


def test_saved_model_loads_in_plain_transformers(tmp_path):
    """Each family round-trips through save_pretrained in a fresh interpreter that never imports ray_prune."""
    expected = {}
    for family in FAMILIES:
        model = prune_layers(tiny_model(family, num_layers=6), REMOVE)
        model.save_pretrained(tmp_path / family)
        with torch.no_grad():
            expected[family] = model(_ids()).logits[0, -1, :5].tolist()
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, 500, (2, 12), generator=g)
out = {{}}
for fam in {FAMILIES!r}:
    m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + fam).eval()
    with torch.no_grad():
        out[fam] = [m(ids).logits[0, -1, :5].tolist(), m.config.num_hidden_layers, m.config.layer_pruning]
assert "ray_prune" not in sys.modules
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    for family in FAMILIES:
        logits, n, record = loaded[family]
        assert n == 3
        assert record["kept_layers"] == [0, 3, 5]
        assert logits == pytest.approx(expected[family], abs=1e-5), family


def test_bad_prune_requests():
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(UserError, match="do not exist"):
        prune_layers(model, [4])
    with pytest.raises(UserError, match="cannot remove all"):
        prune_layers(model, [0, 1, 2, 3])
    assert model.config.num_hidden_layers == 4  # nothing changed on error


def test_unsupported_architecture_is_named():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=100)
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        prune_layers(AutoModelForCausalLM.from_config(cfg), [0])


@pytest.mark.parametrize("family,names", [("llama", ["gate_proj", "up_proj", "down_proj"]),
                                          ("phi3", ["gate_up_proj", "down_proj"]),
                                          ("gpt_neox", ["dense_h_to_4h", "dense_4h_to_h"]),
                                          ("phi", ["fc1", "fc2"])])
def test_ffn_module_names_exist(family, names):
    model = tiny_model(family, num_layers=2)
    assert ffn_modules(model) == names
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(names) <= present
