"""Profiles of a model that is not whole in memory: dispatched/offloaded by accelerate, or streamed block by block
from its safetensors shards. Both must give the table of the plain in-memory ``profile()``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import FAMILIES, tiny_config, tiny_model
from ray_prune.core.data import load_texts
from ray_prune.core.models import load_model
from ray_prune.core.profile import profile
from ray_prune.core.profile_streamed import INDEX_FILE, Shards, profile_streamed
from ray_prune.errors import UserError


@pytest.fixture(scope="module")
def texts(data_dir):
    return load_texts("calibration", 8, data_dir_path=data_dir)


def _max_diff(a, b) -> float:
    assert a.distances.shape == b.distances.shape
    return float(np.abs(a.distances - b.distances).max())


def _real(module: torch.nn.Module) -> int:
    """Parameters that hold memory (not on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.device.type != "meta")


def _meta(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.device.type == "meta")


# --- A: a model split across devices, with offloaded blocks -------------------------------------------------------


def _dispatched(kind: str, tmp_path):
    from accelerate import cpu_offload, dispatch_model

    model = tiny_model("llama", num_layers=6)
    if kind == "cpu_offload":
        return cpu_offload(model, execution_device=torch.device("cpu"))
    # Two groups: the embedding and blocks 0-2 stay on the CPU; blocks 3-5, the norm and the head live on disk.
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                  **{f"model.layers.{i}": "cpu" if i < 3 else "disk" for i in range(6)},
                  "model.norm": "disk", "lm_head": "disk"}
    if kind == "disk_embedding":  # the input device must come from the embedding's hook, not its (meta) weight
        device_map["model.embed_tokens"] = "disk"
    return dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"))


@pytest.mark.parametrize("kind", ["disk", "disk_embedding", "cpu_offload"])
@pytest.mark.parametrize("metric", ["angular", "block_influence"])
def test_dispatched_model_gives_the_plain_table(kind, metric, tmp_path, tokenizer, texts):
    plain = profile(tiny_model("llama", num_layers=6), tokenizer, texts, metric=metric, batch_size=3,
                    max_length=48, progress=False)
    split = _dispatched(kind, tmp_path)
    assert _meta(split) > 0  # some weights really are offloaded: only hooks bring them in
    got = profile(split, tokenizer, texts, metric=metric, batch_size=3, max_length=48, progress=False)
    assert _max_diff(got, plain) <= 1e-6
    assert got.samples == plain.samples and got.tokens == plain.tokens
    assert got.extra["device"] == "cpu"


# --- B: layer-streamed profiling from the shards ------------------------------------------------------------------


def _save(model, path, max_shard_size="2MB"):
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_equals_in_memory(family, tmp_path, tokenizer, texts):
    model = tiny_model(family, num_layers=4)
    path = _save(model, tmp_path / family)
    assert (path / INDEX_FILE).is_file() and len(list(path.glob("*.safetensors"))) > 1  # the index is exercised
    want = profile(model, tokenizer, texts, batch_size=3, max_length=48, progress=False)
    got = profile_streamed(str(path), tokenizer, texts, batch_size=3, max_length=48, device="cpu", progress=False)
    assert _max_diff(got, want) <= 1e-5
    assert (got.num_layers, got.samples, got.tokens, got.data_hash) == (4, want.samples, want.tokens, want.data_hash)
    assert got.extra["streamed"] is True


@pytest.mark.parametrize("family,metric", [("llama", "angular_all"), ("gemma3_text", "block_influence"),
                                           ("qwen2", "angular_all"), ("gpt_neox", "block_influence")])
def test_streamed_equals_in_memory_all_token_metrics(family, metric, tmp_path, tokenizer, texts):
    model = tiny_model(family, num_layers=4, seed=1)
    path = _save(model, tmp_path / family)
    want = profile(model, tokenizer, texts, metric=metric, batch_size=4, max_length=40, progress=False)
    got = profile_streamed(str(path), tokenizer, texts, metric=metric, batch_size=4, max_length=40, device="cpu",
                           progress=False)
    assert _max_diff(got, want) <= 1e-5
    assert got.tokens == want.tokens and got.metric == metric


def _rewrite(path, rename: dict[str, str | None]) -> None:
    """Rename (or, to None, drop) tensors of a single-file checkpoint."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    for old, new in rename.items():
        t = tensors.pop(old)
        if new is not None:
            tensors[new] = t
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_checkpoint_of_the_bare_decoder(tmp_path, tokenizer, texts):
    """Weights saved without the ``model.`` prefix (a LlamaModel, not a LlamaForCausalLM) are found."""
    model = tiny_model("llama", num_layers=3)
    model.model.save_pretrained(tmp_path / "bare")
    keys = load_file(str(tmp_path / "bare" / "model.safetensors")).keys()
    assert "embed_tokens.weight" in keys and not any(k.startswith("model.") for k in keys)
    want = profile(model, tokenizer, texts[:4], max_length=32, progress=False)
    got = profile_streamed(str(tmp_path / "bare"), tokenizer, texts[:4], max_length=32, device="cpu", progress=False)
    assert _max_diff(got, want) <= 1e-5


def test_tied_embedding_stored_as_the_head_and_no_final_norm(tmp_path, tokenizer, texts):
    """A tied checkpoint that stores the embedding only under ``lm_head.weight``, and lacks the final norm
    (which x^L never passes), still gives the table."""
    model = tiny_model("gemma3_text", num_layers=3)
    assert model.config.tie_word_embeddings
    path = _save(model, tmp_path / "tied", max_shard_size="1GB")
    _rewrite(path, {"model.embed_tokens.weight": "lm_head.weight", "model.norm.weight": None})
    want = profile(model, tokenizer, texts[:4], max_length=32, progress=False)
    got = profile_streamed(str(path), tokenizer, texts[:4], max_length=32, device="cpu", progress=False)
    assert _max_diff(got, want) <= 1e-5


def _watch_loads(monkeypatch) -> list:
    """Wrap the real ``Shards.load``: each call logs (module path, real parameters in the model before, after)."""
    log = []
    real_load = Shards.load

    def load(self, net, module_path, *args, **kwargs):
        before = _real(net)
        real_load(self, net, module_path, *args, **kwargs)
        log.append((module_path, before, _real(net)))

    monkeypatch.setattr(Shards, "load", load)
    return log


def test_one_block_in_memory_at_a_time(tmp_path, tokenizer, texts, monkeypatch):
    """Every load of a block finds nothing else materialised, and it is freed before the next one loads."""
    L = 5
    model = tiny_model("qwen3", num_layers=L)
    path = _save(model, tmp_path / "q")
    block_size = sum(p.numel() for p in model.model.layers[0].parameters())
    embedding = model.model.embed_tokens.weight.numel()
    log = _watch_loads(monkeypatch)
    got = profile_streamed(str(path), tokenizer, texts, batch_size=3, max_length=40, device="cpu", progress=False)
    assert _max_diff(got, profile(model, tokenizer, texts, batch_size=3, max_length=40, progress=False)) <= 1e-5
    # First the decoder outside its blocks (the embedding only: not the final norm), then each block in turn.
    assert log[0] == ("model", 0, embedding)
    assert [p for p, _, _ in log[1:]] == [f"model.layers.{l}" for l in range(L)]
    for _, before, after in log[1:]:
        assert before == 0  # the embedding and the previous block were freed
        assert after == block_size


@pytest.mark.slow
@pytest.mark.parametrize("name,num_layers", [("smollm2-135m", 30), ("gemma3-270m", 18)])
def test_streamed_equals_in_memory_on_real_models(name, num_layers, texts):
    model, tok = load_model(name, dtype="fp32", device="cpu")
    want = profile(model, tok, texts, max_length=128, progress=False)
    del model
    got = profile_streamed(name, tok, texts, max_length=128, dtype="fp32", device="cpu", progress=False)
    assert got.num_layers == num_layers
    assert _max_diff(got, want) <= 1e-5
    assert got.model_id == want.model_id and got.data_hash == want.data_hash


def test_bad_input_is_a_user_error_before_any_weight_is_read(tmp_path, tokenizer, texts, monkeypatch):
    # A config of a supported family and no weights at all.
    (tmp_path / "empty").mkdir()
    tiny_config("llama", 2).save_pretrained(tmp_path / "empty")
    with pytest.raises(UserError, match="no safetensors weights"):
        profile_streamed(str(tmp_path / "empty"), tokenizer, texts, device="cpu")
    # An unsupported family: the error comes before the (here unreadable) weights are opened.
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        profile_streamed(str(tmp_path / "gpt2"), tokenizer, texts, device="cpu")
    # A tensor the config needs is not in the checkpoint: found out before any tensor is read.
    path = _save(tiny_model("llama", num_layers=2), tmp_path / "partial", max_shard_size="1GB")
    _rewrite(path, {"model.layers.1.mlp.up_proj.weight": None})
    loads = _watch_loads(monkeypatch)
    with pytest.raises(UserError, match="has no tensor model.layers.1.mlp.up_proj.weight"):
        profile_streamed(str(path), tokenizer, texts, device="cpu", progress=False)
    assert loads == []
    # Not a directory, not bundled, not a hub id; a hub id that cannot be fetched (offline in tests).
    with pytest.raises(UserError, match="unknown model"):
        profile_streamed("./no/such/dir", tokenizer, texts)
    with pytest.raises(UserError, match="could not download"):
        profile_streamed("ray-prune-tests/no-such-model", tokenizer, texts)
    with pytest.raises(UserError, match="unknown metric"):
        profile_streamed(str(path), tokenizer, texts, metric="cosine")
    with pytest.raises(UserError, match="no calibration texts"):
        profile_streamed(str(path), tokenizer, [])
