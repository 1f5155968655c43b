"""Healing: packing, LoRA placement, training, callbacks, checkpoint/resume, merging, and real QLoRA on SmolLM2."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_model
from safetensors import safe_open

from ray_prune.core.architecture import ffn_modules, num_layers
from ray_prune.core.data import load_texts
from ray_prune.errors import UserError
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.heal.lora import merge_adapter, prepare_for_healing
from ray_prune.core.heal.loop import HealReport, heal
from ray_prune.core.loss import next_token_loss as validation_loss
from ray_prune.core.packing import pack_texts

# Small enough that a tiny model takes well under 0.1 s per step on 2 cores.
FAST = dict(batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, val_sequences=2, quantize="none")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread. Tiny models gain nothing from more; and on a busy shared 2-core machine two
    OpenMP threads ran training steps 8-15x slower than one (each op waits for the descheduled thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def heal_texts(data_dir) -> list[str]:
    return load_texts("heal", 12)


@pytest.fixture(scope="module")
def val_texts(data_dir) -> list[str]:
    return load_texts("selection", 2)


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _run(config: HealConfig, tokenizer, train, val, family: str = "llama", sharp: bool = False, **kw):
    base = tiny_model(family)
    if sharp:  # random init gives near-uniform logits (|logit| < ~1.3); a larger head lets LoRA move the loss
        base.get_output_embeddings().weight.data.mul_(10)
    model = prepare_for_healing(base, config)
    return heal(model, tokenizer, config, train_texts=train, val_texts=val, progress=False, **kw)


# --- LoRA placement -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox"])
def test_lora_lands_exactly_on_the_ffn_linears(family):
    config = HealConfig(quantize="none", rank=8)
    model = prepare_for_healing(tiny_model(family, num_layers=3), config)
    layers = _lora_layers(model)
    expected = ffn_modules(model.get_base_model())
    assert {name.rsplit(".", 1)[-1] for name in layers} == set(expected)
    assert len(layers) == num_layers(model) * len(expected)
    for layer in layers.values():
        assert layer.r["default"] == 8
        assert layer.scaling["default"] == 1.0  # alpha == rank
        assert layer.lora_dropout["default"].p == 0.05
    assert model.peft_config["default"].lora_alpha == 8
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * len(layers)


def test_all_linear_and_explicit_targets():
    model = prepare_for_healing(tiny_model("llama", num_layers=2), HealConfig(quantize="none", target="all-linear"))
    leaves = {n.rsplit(".", 1)[-1] for n in _lora_layers(model)}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head
    model = prepare_for_healing(tiny_model("llama", num_layers=2), HealConfig(quantize="none", target=["q_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in _lora_layers(model)} == {"q_proj"}


def test_unknown_target_module_is_a_user_error_listing_real_names():
    with pytest.raises(UserError) as err:
        prepare_for_healing(tiny_model("llama", num_layers=2), HealConfig(quantize="none", target=["gate_prj"]))
    assert "gate_prj" in err.value.problem
    assert "gate_proj" in err.value.fix and "down_proj" in err.value.fix


@pytest.mark.parametrize("bad", [dict(steps=0), dict(seq_len=1), dict(dropout=1.0), dict(quantize="int8"),
                                 dict(lr=-1.0), dict(target=[]), dict(dtype="fp64")])
def test_bad_config_values_are_user_errors(bad):
    with pytest.raises(UserError):
        HealConfig(**bad).validate()


# --- training -----------------------------------------------------------------------------------------------------


def test_loss_falls_and_callback_runs_at_eval_steps(tokenizer, heal_texts):
    repeated = [heal_texts[0]] * 4  # one document over and over: easy to memorise
    config = HealConfig(steps=22, eval_every=5, **FAST)
    seen: list[HealReport] = []
    with pytest.warns(UserWarning, match="passes over it"):  # 44 sequences from 43 blocks: a second epoch
        _, reports = _run(config, tokenizer, repeated, heal_texts[:1], sharp=True, callback=seen.append)
    assert seen == reports
    assert [r.step for r in reports] == [5, 10, 15, 20, 22]
    assert [r.tokens_seen for r in reports] == [s * 2 * 16 for s in (5, 10, 15, 20, 22)]
    assert all(b.elapsed_s > a.elapsed_s for a, b in zip(reports, reports[1:]))
    assert all(math.isfinite(r.train_loss) and math.isfinite(r.val_loss) for r in reports)
    assert reports[-1].train_loss < reports[0].train_loss - 0.5
    assert reports[-1].val_loss < reports[0].val_loss - 0.5  # the validation text is the repeated document
    assert reports[-1].lr < reports[1].lr < config.lr  # cosine decay after warmup


def test_heal_takes_a_saved_model_dir_and_defaults_to_the_c4_roles(tokenizer, data_dir, tmp_path):
    tiny_model("gpt_neox", num_layers=2).save_pretrained(tmp_path / "pruned")
    config = HealConfig(steps=2, eval_every=1, **{**FAST, "batch_size": 1})
    model, reports = heal(str(tmp_path / "pruned"), tokenizer, config, data_dir=str(data_dir), progress=False)
    assert hasattr(model, "peft_config") and not model.training
    assert [r.step for r in reports] == [1, 2] and all(math.isfinite(r.val_loss) for r in reports)


def test_same_seed_same_losses_other_seed_other_losses(tokenizer, heal_texts, val_texts):
    def losses(seed: int) -> list[float]:
        _, reports = _run(HealConfig(steps=3, eval_every=1, seed=seed, **FAST), tokenizer, heal_texts, val_texts)
        return [r.train_loss for r in reports] + [r.val_loss for r in reports]

    first = losses(0)
    assert losses(0) == first
    assert losses(1) != first


def test_checkpoint_holds_only_the_adapter_and_resume_matches_uninterrupted(tokenizer, heal_texts, val_texts, tmp_path):
    config = HealConfig(steps=6, eval_every=1, grad_accum=2, **FAST)  # dropout on: RNG state must be restored
    _, full = _run(config, tokenizer, heal_texts, val_texts, checkpoint_dir=tmp_path / "full")

    class Killed(Exception):
        pass

    def die_at_3(report: HealReport) -> None:
        if report.step == 3:
            raise Killed

    run = tmp_path / "run"
    with pytest.raises(Killed):  # the callback's exception propagates, after the checkpoint is on disk
        _run(config, tokenizer, heal_texts, val_texts, checkpoint_dir=run, callback=die_at_3)

    checkpoints = sorted(run.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-000003"]  # older ones are pruned
    ckpt = checkpoints[0]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    model_layers = 6 * len(ffn_modules(tiny_model("llama", num_layers=1)))
    assert len(keys) == 2 * model_layers and all("lora_A" in k or "lora_B" in k for k in keys)
    # Nothing in the checkpoint is big enough to hold base weights (the embedding alone is 12.6 MB).
    assert sum(p.stat().st_size for p in ckpt.iterdir()) < 1_000_000
    assert (run / "adapter_model.safetensors").is_file()  # the newest adapter, loadable from the run dir

    _, resumed = _run(config, tokenizer, heal_texts, val_texts, checkpoint_dir=run, resume_from=run)
    assert [r.step for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        assert (a.step, a.train_loss, a.val_loss, a.lr, a.tokens_seen) == \
               (b.step, b.train_loss, b.val_loss, b.lr, b.tokens_seen)

    with pytest.raises(UserError, match="other settings"):
        _run(HealConfig(**{**config.__dict__, "lr": 1e-3}), tokenizer, heal_texts, val_texts, resume_from=run)


# --- merging ------------------------------------------------------------------------------------------------------


def test_merge_adapter_gives_the_peft_models_logits(tokenizer, heal_texts, val_texts):
    model, _ = _run(HealConfig(steps=3, eval_every=3, **FAST), tokenizer, heal_texts, val_texts)
    assert any(m.lora_B["default"].weight.abs().max() > 0 for m in _lora_layers(model).values())
    ids = pack_texts(val_texts, tokenizer, 16)[:2]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = merge_adapter(model)
        after = merged(input_ids=ids).logits
        again = model(input_ids=ids).logits  # the merge worked on a copy
    assert type(merged).__name__ == "LlamaForCausalLM" and not _lora_layers(merged)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, before, rtol=0, atol=0)


def test_nf4_quantizes_base_linears_and_merges_into_full_precision_weights(tokenizer, heal_texts, val_texts):
    import bitsandbytes as bnb

    base = tiny_model("llama", num_layers=2)
    original = base.model.layers[1].mlp.down_proj.weight.detach().clone()
    config = HealConfig(steps=2, eval_every=2, **{**FAST, "quantize": "nf4"})
    model = prepare_for_healing(base, config)
    layer = model.get_base_model().model.layers[1]
    assert isinstance(layer.mlp.down_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)  # frozen, quantized, no adapter
    model, reports = heal(model, tokenizer, config, train_texts=heal_texts, val_texts=val_texts, progress=False)
    assert math.isfinite(reports[-1].val_loss)
    lora = model.get_base_model().model.layers[1].mlp.down_proj
    delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight * lora.scaling["default"]
    assert delta.abs().max() > 0
    merged = merge_adapter(model)
    # Merged into the unquantized weights, not into a dequantized 4-bit copy.
    torch.testing.assert_close(merged.model.layers[1].mlp.down_proj.weight, original + delta, rtol=1e-5, atol=1e-6)


# --- the real model -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_qlora_heals_a_layer_pruned_smollm2(tokenizer, data_dir, tmp_path):
    import bitsandbytes as bnb
    from torch import nn
    from transformers import AutoModelForCausalLM

    from ray_prune.core.models import resolve

    full = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m"), dtype=torch.float32)
    keep = [i for i in range(full.config.num_hidden_layers) if not 20 <= i <= 25]
    full.model.layers = nn.ModuleList(full.model.layers[i] for i in keep)
    full.config.num_hidden_layers = len(keep)
    full.save_pretrained(tmp_path / "pruned")
    del full

    config = HealConfig(steps=5, batch_size=2, seq_len=128, lr=2e-3, warmup_steps=1, eval_every=5, val_sequences=4)
    model = prepare_for_healing(str(tmp_path / "pruned"), config, device="cpu")
    base = model.get_base_model()
    assert num_layers(base) == 24
    mlp, attn = base.model.layers[0].mlp, base.model.layers[0].self_attn
    assert isinstance(mlp.down_proj.base_layer, bnb.nn.Linear4bit) and isinstance(attn.v_proj, bnb.nn.Linear4bit)

    train, val = load_texts("heal", 12), load_texts("selection", 4)
    val_blocks = pack_texts(val, tokenizer, 128)[:4]
    before = validation_loss(model, val_blocks, batch_size=4)
    model, reports = heal(model, tokenizer, config, train_texts=train, val_texts=val, progress=False)
    assert [r.step for r in reports] == [5]
    after = reports[-1].val_loss
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before - 0.1, (before, after)
