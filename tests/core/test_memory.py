"""Memory estimates: parameter counts, NF4 sizes, saved activations (against autograd), the evaluation's scorer and
generation (against torch's CPU memory profiler), choices, configs offline, and a family added in one entry."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import FAMILIES, TINY_VOCAB, tiny_config

from ray_prune.core import families
from ray_prune.core import memory as M
from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.evaluation.config import EvalConfig, TaskSettings
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.model_configs import load_config, shipped_models
from ray_prune.errors import UserError

PUBLISHED = {  # parameter counts of the published checkpoints (model.parameters(), tied weights once)
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "microsoft/phi-2": 2_779_683_840,
    "google/gemma-2-9b": 9_241_705_984,
    "smollm2-135m": 134_515_008,
    "gemma3-270m": 268_098_176,
}
LLAMA_70B, LLAMA_7B = "meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-7b-hf"


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _block_linear_weights(model) -> int:
    from ray_prune.core.architecture import decoder_layers

    return sum(m.weight.numel() for m in decoder_layers(model)[0].modules() if isinstance(m, torch.nn.Linear))


# --------------------------------------------------------------------------- configs


def test_every_seed_and_bundled_model_has_a_shipped_config():
    assert len(shipped_models()) == 10
    for name in PUBLISHED:
        assert load_config(name).source in ("bundled", "shipped", "hub")


def test_offline_hub_ids_fall_back_to_the_shipped_config(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load_config(LLAMA_7B)
    assert loaded.source == "shipped" and "HF_HUB_OFFLINE" in loaded.note
    assert loaded.config.num_hidden_layers == 32 and loaded.config.model_type == "llama"
    with pytest.raises(UserError, match="configs ship for"):
        load_config("nobody/no-such-model")


def test_bundled_names_use_shipped_configs_and_local_dirs_their_own(tmp_path):
    smol = load_config("smollm2-135m")
    assert smol.source == "bundled" and smol.location.endswith("HuggingFaceTB--SmolLM2-135M-Instruct.json")
    assert smol.config.num_hidden_layers == 30 and load_config("gemma3-270m").config.num_hidden_layers == 18
    config = tiny_config("qwen3", 3)
    config.save_pretrained(tmp_path)
    local = load_config(str(tmp_path))
    assert local.source == "local" and local.config.model_type == "qwen3" and local.config.num_hidden_layers == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_config(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- parameters and weights


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_closed_form_counts_equal_published_and_meta_builds(name):
    config = load_config(name).config
    arch = M.Arch.from_config(config)
    pc = M.param_count(arch)
    model = _meta_model(config)
    assert pc.total() == PUBLISHED[name] == sum(p.numel() for p in model.parameters())
    assert pc.layer_linear == _block_linear_weights(model)  # what NF4 quantizes
    assert model.config._attn_implementation == ("eager" if arch.eager else "sdpa")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_closed_form_counts_equal_meta_builds_for_every_family(model_type):
    config = tiny_config(model_type, 3)
    pc = M.param_count(M.Arch.from_config(config))
    model = _meta_model(config)
    assert pc.total() == sum(p.numel() for p in model.parameters())
    assert pc.layer_linear == _block_linear_weights(model)
    assert M.param_count(M.Arch.from_config(config)).total(1) == pc.total() - 2 * (pc.layer_linear + pc.layer_other)


def test_family_table_dimensions_read_sums_of_multiples():
    sizes = {"H": 64, "Q": 96, "K": 32, "I": 128}
    assert [families.dimension(e, sizes) for e in ("H", "Q+2K", "2I", "3Q", " Q + 2 K ")] == [64, 160, 256, 288, 160]
    for bad in ("Q*2", "X", "2", "Q-K", ""):
        with pytest.raises(ValueError, match="bad dimension"):
            families.dimension(bad, sizes)
    for name, fam in families.FAMILIES.items():  # every entry's FFN is among its linears, its dimensions parse
        assert set(fam.ffn_modules) <= {s.name for s in fam.linears}, name
        assert all(families.dimension(d, sizes) > 0 for s in fam.linears for d in (s.fan_in, s.fan_out)), name


def test_a_family_added_in_one_entry_is_counted_and_planned(monkeypatch):
    """Adding a family to the memory plan is one entry of ``FAMILIES``. The made-up family runs Starcoder2's
    modeling code under its own model_type: LayerNorms with biases, a plain MLP named c_fc / c_proj, and every
    bias switched by a config field of its own (``use_bias``, on unless set)."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    from ray_prune.core.families import Family, FromConfig, LinearSpec

    class MadeUpConfig(Starcoder2Config):
        model_type = "madeup"

    bias = FromConfig("use_bias", True)
    monkeypatch.setitem(families.FAMILIES, "madeup", Family(
        "model.layers", ("c_fc", "c_proj"), "model.norm", norm="layer", gated=False,
        linears=(LinearSpec("q_proj", "H", "Q", bias), LinearSpec("k_proj", "H", "K", bias),
                 LinearSpec("v_proj", "H", "K", bias), LinearSpec("o_proj", "Q", "H", bias),
                 LinearSpec("c_fc", "H", "I", bias), LinearSpec("c_proj", "I", "H", bias))))

    for use_bias in (True, False):
        config = MadeUpConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=256, num_attention_heads=4,
                              num_key_value_heads=2, num_hidden_layers=3, use_bias=use_bias)
        with torch.device("meta"):
            model = Starcoder2ForCausalLM(config)
        arch = M.Arch.from_config(config)
        pc = M.param_count(arch)
        assert pc.total() == sum(p.numel() for p in model.parameters())
        assert pc.layer_linear == _block_linear_weights(model)
        assert [t.name for t in arch.targets("ffn")] == ["c_fc", "c_proj"]
        assert (arch.norm, arch.gated, arch.parallel) == ("layer", False, False)
    workload = M.Workload(heal=(HealConfig(target="all-linear", quantize="none"),))
    weights = sum(t.bytes for t in M.weight_terms(arch, 3, "bf16"))
    for stage in M.STAGES:
        est = M.estimate(config, workload, stage)
        assert est.tensor_bytes > weights and est.fits(80)
    plan = M.choose(config, workload, 80, 1, "madeup")
    assert plan.fits and {c.stage for c in plan.choices} == set(M.STAGES)


def test_nf4_bytes_match_bitsandbytes_quantization():
    import bitsandbytes.functional as F

    w = torch.randn(1024, 3072, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    tensors = [packed, state.absmax, state.state2.absmax, state.state2.code, state.code]
    measured = sum(t.numel() * t.element_size() for t in tensors)
    assert abs(M.nf4_bytes(w.numel()) - measured) <= 64


def test_llama2_70b_weights_bf16_and_nf4():
    arch = M.Arch.from_config(load_config(LLAMA_70B).config)
    bf16 = sum(t.bytes for t in M.weight_terms(arch, 80, "bf16"))
    nf4 = sum(t.bytes for t in M.weight_terms(arch, 80, "nf4"))
    assert bf16 == 2 * 68_976_648_192
    assert 35e9 <= nf4 <= 40e9  # ~0.516 byte per quantized weight, embeddings and head in bf16
    pruned = sum(t.bytes for t in M.weight_terms(arch, 40, "nf4"))
    assert pruned < 0.55 * nf4  # half the blocks, the same embeddings


# --------------------------------------------------------------------------- saved activations against autograd


def _saved_bytes(model, batch: int, seq_len: int) -> int:
    """Bytes of the distinct storages autograd saves in a training forward, parameters excluded."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 1000, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(v for k, v in storages.items() if k not in params)


def _lora_model(config, dropout: float, target, checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    from ray_prune.core.heal.lora import enable_checkpointing, resolve_targets, wrap

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config.use_cache = False
    if checkpointing:
        enable_checkpointing(model)
    from peft import LoraConfig

    lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=dropout, target_modules=resolve_targets(model, target),
                      task_type="CAUSAL_LM")
    return wrap(model, lora).train()


def _per_block(model_type: str, dropout: float, target, seq_len: int, checkpointing: bool = False, **over):
    """Saved bytes per token of one block: the difference of a 5- and a 3-block model, over two blocks (the
    first block saves less, its input needs no gradient)."""
    saved = {}
    for layers in (3, 5):
        config = tiny_config(model_type, layers)
        for k, v in over.items():
            setattr(config, k, v)
        saved[layers] = _saved_bytes(_lora_model(config, dropout, target, checkpointing), 2, seq_len)
    return (saved[5] - saved[3]) / 2 / (2 * seq_len), M.Arch.from_config(config)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("dropout,target", [(0.0, "ffn"), (0.05, "ffn"), (0.05, "all-linear")])
def test_saved_activations_per_block_match_autograd(model_type, dropout, target):
    # Window longer than the sequence: no mask (the masked case has its own test).
    measured, arch = _per_block(model_type, dropout, target, 48, sliding_window=64)
    estimated = M.train_layer_bytes(arch, 2, 8, dropout, arch.targets(target), 48, device="cpu")
    assert estimated == pytest.approx(measured, rel=0.01)  # Gemma's (1 + weight) norm copy is the 1%


def test_saved_activations_with_a_sliding_window_mask_match_autograd():
    measured, arch = _per_block("mistral", 0.05, "ffn", 48)  # window 16 < 48 tokens: every block is masked
    assert arch.sliding_fraction(48) == 1.0
    assert M.train_layer_bytes(arch, 2, 8, 0.05, arch.targets("ffn"), 48, device="cpu") == pytest.approx(measured)


def test_cuda_variant_differs_only_by_the_dropout_mask():
    arch = M.Arch.from_config(tiny_config("llama"))
    targets = arch.targets("ffn")
    cpu = M.train_layer_bytes(arch, 2, 8, 0.05, targets, 64, device="cpu")
    cuda = M.train_layer_bytes(arch, 2, 8, 0.05, targets, 64, device="cuda")
    assert cpu - cuda == 3 * sum(t.fan_in for t in targets)  # fp32 noise (CPU) vs bool mask (CUDA)
    assert M.train_layer_bytes(arch, 2, 8, 0.0, targets, 64, device="cpu") == \
        M.train_layer_bytes(arch, 2, 8, 0.0, targets, 64, device="cuda")


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi"])
def test_gradient_checkpointing_saves_one_block_input_per_block(model_type):
    measured, arch = _per_block(model_type, 0.05, "ffn", 48, checkpointing=True)
    assert measured == 2 * arch.hidden


# --------------------------------------------------------------------------- stage estimates


def test_heal_estimate_shrinks_with_checkpointing_and_smaller_micro_batches():
    config = load_config(LLAMA_7B).config
    heal = HealConfig(batch_size=16, grad_accum=1)

    def peak(h):
        return M.estimate(config, M.Workload(heal=(h,)), "heal").peak_bytes

    plain = peak(heal)
    assert peak(replace(heal, gradient_checkpointing=True)) < plain / 4
    assert peak(replace(heal, batch_size=8, grad_accum=2)) < 0.6 * plain
    assert peak(replace(heal, batch_size=4, grad_accum=4)) < peak(replace(heal, batch_size=8, grad_accum=2))
    assert peak(replace(heal, batch_size=4, grad_accum=8)) == peak(replace(heal, batch_size=4, grad_accum=4))
    assert peak(replace(heal, quantize="none")) > plain  # a bf16 base instead of NF4


def test_worst_heal_point_of_a_grid_sizes_the_stage():
    config = load_config(LLAMA_7B).config
    small, large = HealConfig(batch_size=2, rank=2), HealConfig(batch_size=8, rank=8)
    both = M.estimate(config, M.Workload(heal=(small, large)), "heal")
    assert both.peak_bytes == M.estimate(config, M.Workload(heal=(large,)), "heal").peak_bytes


def test_pruning_shrinks_evaluation_but_the_unhealed_load_keeps_the_unpruned_model():
    config = load_config(LLAMA_7B).config
    w = M.Workload(eval_precision="full")
    full = M.estimate(config, w, "unhealed", n_removed=0)
    pruned = M.estimate(config, w, "unhealed", n_removed=16)
    healed = M.estimate(config, w, "healed", n_removed=16)
    unpruned_weights = 2 * PUBLISHED[LLAMA_7B]
    assert pruned.tensor_bytes >= unpruned_weights  # load_pruned loads the whole model before pruning
    assert pruned.peak_bytes < full.peak_bytes
    assert healed.layers == 16
    assert M.estimate(config, w, "heal", n_removed=16).tensor_bytes >= sum(
        t.bytes for t in M.weight_terms(M.Arch.from_config(config), 32, "nf4"))


def test_scored_as_trained_evaluates_the_nf4_model():
    config = load_config(LLAMA_7B).config
    trained, full = M.Workload(eval_precision="trained"), M.Workload(eval_precision="full")
    assert trained.scored_precision() == "nf4" and full.scored_precision() == "auto"
    assert M.Workload(eval_precision="trained", heal=(HealConfig(quantize="none"),)).scored_precision() == "auto"
    for stage in ("unhealed", "healed"):
        assert M.estimate(config, trained, stage).precision == "nf4"
        assert M.estimate(config, full, stage).precision == "bf16"
    # full: the merged bf16 copy is scored while the NF4 model is still held
    assert M.estimate(config, full, "healed").peak_bytes - M.estimate(config, full, "unhealed").peak_bytes > 3 * M.GIB
    profile = M.estimate(config, trained, "profile")
    assert profile.precision == "bf16+nf4"  # the table in full precision, then the baseline scored in NF4


def _tasks(**shots: int) -> EvalConfig:
    return EvalConfig(tasks={name: TaskSettings(shots=k) for name, k in shots.items()})


def test_eval_context_is_the_longest_prompt_capped_at_max_length():
    llama = M.Arch.from_config(load_config(LLAMA_7B).config)
    mistral = M.Arch.from_config(load_config("mistralai/Mistral-7B-v0.1").config)
    w = M.Workload(evaluation=_tasks(mmlu=5, boolq=0))
    assert w.eval_context(llama) == 4096  # MMLU 5-shot's longest prompt exceeds Llama-2's 4096 positions
    assert 4096 < w.eval_context(mistral) < 6000
    assert M.Workload(evaluation=_tasks(boolq=0)).eval_context(llama) < 2000
    assert M.Workload(evaluation=_tasks(boolq=3)).eval_context(llama) == 4096  # unmeasured shots: the cap


def test_evaluation_is_sized_per_task_for_the_scorer_and_for_generation():
    config = load_config(LLAMA_7B).config
    arch = M.Arch.from_config(config)

    def eval_bytes(cfg: EvalConfig) -> tuple[int, int]:
        """(per-layer, other) bytes of the evaluation terms of an unhealed bf16 row."""
        terms = [t for t in M.estimate(config, M.Workload(evaluation=cfg, eval_precision="full"), "unhealed").terms
                 if t.name.startswith("eval:")]
        return sum(t.bytes for t in terms if t.per_layer), sum(t.bytes for t in terms if not t.per_layer)

    mmlu = eval_bytes(EvalConfig(tasks={"mmlu": TaskSettings(shots=5)}, c4_sequences=0))
    piqa = eval_bytes(EvalConfig(tasks={"piqa": TaskSettings(shots=0)}, c4_sequences=0))
    cache_token = 2 * arch.layers * arch.kv_heads * arch.head_dim * 2  # one token's keys and values, bf16
    assert mmlu[0] == 2 * 8 * 4096 * cache_token  # one-token answers: the prefixes' and the contexts' caches
    assert piqa[0] == 3 * 8 * M.Workload(evaluation=_tasks(piqa=0)).eval_context(arch) * cache_token  # + the rows'
    gsm8k = EvalConfig(tasks={"gsm8k": TaskSettings(shots=5)}, c4_sequences=0)
    kv, _ = eval_bytes(gsm8k)
    assert kv == 8 * 4096 * cache_token  # unmeasured prompts: cut to max_length - 256, then 256 generated
    assert eval_bytes(replace(gsm8k, batch_size=4))[0] == kv // 2
    c4_only = eval_bytes(EvalConfig(tasks={}, c4_sequences=64))
    assert c4_only[0] == 0 and c4_only[1] > 0


def test_block_influence_profiling_keeps_every_token_stream():
    config = load_config(LLAMA_70B).config
    angular = M.estimate(config, M.Workload(calibration=CalibrationConfig(metric="angular"),
                                            evaluation=EvalConfig(tasks={}, c4_sequences=0)), "profile")
    block = M.estimate(config, M.Workload(calibration=CalibrationConfig(metric="block_influence"),
                                          evaluation=EvalConfig(tasks={}, c4_sequences=0)), "profile")
    assert block.peak_bytes - angular.peak_bytes > 40 * M.GIB  # 81 streams x 8192 tokens x 8192 x fp32, twice


# --------------------------------------------------------------------------- choices


def test_llama2_70b_does_not_fit_one_80gb_gpu_in_bf16_but_heals_in_nf4():
    config = load_config(LLAMA_70B).config
    w = M.Workload(heal=(HealConfig(batch_size=4, grad_accum=4, gradient_checkpointing=True),),
                   eval_precision="full")
    assert not M.estimate(config, w, "profile", "bf16").fits(80)
    plan = M.choose(config, w, 80, 8, "llama-70b")
    profile = plan.choice("profile")
    assert profile.fits and (profile.precision, profile.gpus) == ("nf4", 1)
    heal = plan.choice("heal")
    assert heal.fits and (heal.precision, heal.gpus) == ("nf4", 1)
    split = M.choose(config, w, 80, 8, order="full_precision").choice("profile")
    assert (split.precision, split.gpus) == ("bf16", 4)  # 2 x 80 GB holds the weights but not the evaluation too
    assert plan.trial_gpus == 1 and plan.fits


def test_llama2_70b_heal_at_the_papers_micro_batch_needs_a_fix():
    config = load_config(LLAMA_70B).config
    plan = M.choose(config, M.Workload(heal=(HealConfig(),)), 80, 8)
    heal = plan.choice("heal")
    assert not heal.fits and not plan.fits
    assert "gradient_checkpointing: true" in heal.fix and "grad_accum" in heal.fix
    text = M.format_plan_table([plan])
    assert "heal" in text and "no" in text and heal.fix in text


def test_llama2_7b_fits_bf16_on_one_gpu():
    config = load_config(LLAMA_7B).config
    w = M.Workload(heal=(HealConfig(batch_size=4, grad_accum=4),), eval_precision="full")
    plan = M.choose(config, w, 80, 8, "llama-7b")
    for stage in ("profile", "unhealed", "healed"):
        c = plan.choice(stage)
        assert c.fits and (c.precision, c.gpus) == ("bf16", 1)
    assert plan.fits and plan.trial_gpus == 1


def test_nothing_fits_a_tiny_gpu_and_the_fix_says_so():
    config = load_config(LLAMA_70B).config
    plan = M.choose(config, M.Workload(), 16, 1)
    assert not any(c.fits for c in plan.choices)
    assert "weights do not fit" in plan.choice("profile").fix


def test_eval_batch_fix_is_the_largest_batch_that_fits():
    config = load_config("google/gemma-2-9b").config
    w = M.Workload(evaluation=EvalConfig(batch_size=32))
    plan = M.choose(config, w, 80, 1, stages=("unhealed",))
    c = plan.choice("unhealed")
    assert not c.fits and "eval.batch_size:" in c.fix
    b = int(c.fix.split("eval.batch_size: ")[1].split()[0])

    def fits_somehow(batch):
        smaller = replace(w, evaluation=replace(w.evaluation, batch_size=batch))
        return any(M.estimate(config, smaller, "unhealed", p, g).fits(80, M.HEADROOM)
                   for p, g in M.options("unhealed", w, 1))

    assert 1 < b < 32 and fits_somehow(b) and not fits_somehow(b + 1)


def _first_fitting_candidate(config, w, gb):
    """The first of heal_candidates (in the plan's order) that fits one GPU of ``gb``: what choose must pick."""
    for adj in M.heal_candidates(w):
        if M.estimate(config, M.apply_adjustments(w, adj), "heal").fits(gb, M.HEADROOM):
            return adj
    return None


@pytest.mark.parametrize("model,gb,expect", [
    ("meta-llama/Llama-2-13b-hf", 40, {"batch_size": 2, "grad_accum": 8}),  # a micro-batch is enough
    ("meta-llama/Llama-2-13b-hf", 16, {"gradient_checkpointing": True}),  # no micro-batch fits: checkpointing
    (LLAMA_70B, 46, {"batch_size": 1, "grad_accum": 16, "gradient_checkpointing": True}),
    (LLAMA_70B, 44.7, {"batch_size": 1, "grad_accum": 16, "gradient_checkpointing": True,
                       "optimizer": "paged_adamw_8bit"}),  # only the 8-bit optimizer's 0.4 GiB more makes it fit
])
def test_a_heal_that_does_not_fit_gets_the_first_setting_that_does(model, gb, expect):
    config = load_config(model).config
    w = M.Workload(heal=(HealConfig(batch_size=4, grad_accum=4),))  # the paper's 16 x 1024 as experiments/ write it
    assert not M.estimate(config, w, "heal").fits(gb, M.HEADROOM)
    plan = M.choose(config, w, gb, 1, model, adjust=True)
    heal = plan.choice("heal")
    assert heal.fits and heal.adjusted == {"heal": expect} == {"heal": _first_fitting_candidate(config, w, gb)["heal"]}
    assert plan.adjustments["heal"] == expect
    healed = M.apply_adjustments(w, plan.adjustments).heal[0]
    assert healed.sequences_per_step == 16 and healed.seq_len == 1024  # the paper's effective batch kept
    assert M.estimate(config, M.apply_adjustments(w, plan.adjustments), "heal").peak_bytes == heal.estimate.peak_bytes
    assert not M.choose(config, w, gb, 1, model).choice("heal").fits  # without adjust: the old refusal and fix


def test_the_heal_candidates_keep_each_points_step_and_only_lower_micro_batches():
    w = M.Workload(heal=(HealConfig(batch_size=8, grad_accum=2), HealConfig(batch_size=4, grad_accum=4)))
    order = [c["heal"] for c in M.heal_candidates(w)]
    assert order[:3] == [{"batch_size": 4, "grad_accum": 4}, {"batch_size": 2, "grad_accum": 8},
                         {"batch_size": 1, "grad_accum": 16}]  # smaller micro-batches first, the largest first
    assert order[3] == {"gradient_checkpointing": True}  # then checkpointing, at the largest micro-batch
    assert order[-1] == {"batch_size": 1, "grad_accum": 16, "gradient_checkpointing": True,
                         "optimizer": "paged_adamw_8bit"}
    adjusted = M.apply_adjustments(w, {"heal": {"batch_size": 4, "grad_accum": 4}}).heal
    assert [(h.batch_size, h.grad_accum) for h in adjusted] == [(4, 4), (4, 4)]
    capped = M.adjust_heal(HealConfig(batch_size=2, grad_accum=3), {"batch_size": 4})
    assert (capped.batch_size, capped.grad_accum) == (2, 3)  # a cap never raises a micro-batch


def test_evaluation_stages_share_the_largest_batch_that_fits_one_gpu():
    config = load_config(LLAMA_7B).config
    w = M.Workload(heal=(HealConfig(batch_size=4, grad_accum=4),))
    plan = M.choose(config, w, 40, 8, LLAMA_7B, adjust=True)
    batch = plan.adjustments["eval"]["batch_size"]
    assert 1 <= batch < 8 and "heal" not in plan.adjustments  # 7B heals as set; MMLU 5-shot prompts need less batch
    for stage in ("profile", "unhealed", "healed"):
        c = plan.choice(stage)
        assert c.fits and c.gpus == 1 and c.adjusted["eval"] == {"batch_size": batch}  # one GPU, not a split

    def fits(b: int) -> bool:
        smaller = M.apply_adjustments(w, {"eval": {"batch_size": b}})
        return all(M.estimate(config, smaller, s).fits(40, M.HEADROOM) for s in ("unhealed", "healed"))

    assert fits(batch) and not fits(batch + 1)
    text = M.format_plan_table([plan])
    assert "settings changed" in text and f"eval: {{batch_size: {batch}}}" in text


def test_where_nothing_fits_a_40gb_plan_says_by_how_much():
    config = load_config(LLAMA_70B).config
    w = M.Workload(heal=(HealConfig(batch_size=4, grad_accum=4, gradient_checkpointing=True, lr=3e-5),))
    plan = M.choose(config, w, 40, 8, LLAMA_70B, adjust=True)
    heal = plan.choice("heal")
    assert not heal.fits and not plan.fits
    base = sum(t.bytes for t in M.weight_terms(M.Arch.from_config(config), 80, "nf4")) / M.GIB
    assert 33 < base < 36  # the NF4 70B base alone, the paper's "one 40 GB A100"
    assert heal.estimate.peak_gib > base
    assert heal.short_gib == pytest.approx(heal.estimate.peak_gib - 0.9 * 40)
    assert f"{heal.short_gib:.1f} GiB more than the 36.0 GiB usable" in heal.fix
    assert heal.estimate.peak_gib == pytest.approx(min(
        M.estimate(config, M.apply_adjustments(w, adj), "heal").peak_gib for adj in M.heal_candidates(w)))
    assert f"no (+{heal.short_gib:.1f})" in M.format_plan_table([plan])


# --------------------------------------------------------------------------- against torch's own CPU accounting


def _peak_over_start(fn) -> int:
    """Peak of live CPU tensor bytes while ``fn`` runs, over those alive at its start (torch's memory profiler)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    live = peak = 0
    sizes: dict = {}
    start = None
    for _, action, (key, _version), size in p._memory_profile().timeline:
        if action == Action.PREEXISTING:
            sizes[key] = size
            live += size
            continue
        start = live if start is None else start
        if action == Action.CREATE:
            sizes[key] = size
            live += size
        elif action == Action.DESTROY:
            live -= sizes.pop(key, size)
        peak = max(peak, live)
    return peak - (start or 0)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_heal_step_peak_on_cpu_matches_the_estimate(checkpointing):
    """SmolLM2 (fp32, which every CPU runs at speed; plain LoRA, no dropout so CPU saves what CUDA does): one
    training step's peak over the memory held between steps, as torch's profiler counts it, against the
    estimate's activation terms."""
    from ray_prune.core.heal.loop import _optimizer
    from ray_prune.core.heal.lora import prepare_for_healing

    config = HealConfig(quantize="none", dtype="fp32", batch_size=2, seq_len=128, dropout=0.0,
                        gradient_checkpointing=checkpointing)
    model = prepare_for_healing("smollm2-135m", config, device="cpu").train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = _optimizer(params, config, torch.device("cpu"))
    ids = torch.randint(3, 40000, (2, 128))

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from here on, as between any two steps
    measured = _peak_over_start(step)
    est = M.estimate(load_config("smollm2-135m").config, M.Workload(heal=(config,)), "heal")
    activations = sum(t.bytes for t in est.terms if t.name.startswith("activations"))
    grads = 4 * M.lora_params(M.Arch.from_config(load_config("smollm2-135m").config), 30, 8,
                              M.Arch.from_config(load_config("smollm2-135m").config).targets("ffn"))
    assert activations + grads == pytest.approx(measured, rel=0.10)  # allocator reuse varies a few % with threads


def _scoring_requests(kind: str):
    """Requests as lm-eval builds them for a few-shot task, in token ids: four subjects whose exemplars two
    questions share; MMLU's four one-token answer letters, or two endings of 64 tokens (HellaSwag-like).
    Returns the requests, the longest row (context and continuation, its last token dropped) and the positions
    scored per row."""
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 40000, (n,), generator=gen).tolist()

    answers = [[330], [333], [334], [335]] if kind == "answer letters" else None
    requests = []
    for _ in range(4):
        shots = ids(240)
        for _ in range(2):
            context = shots + ids(16)
            requests += [(("", ""), context, cont) for cont in (answers or [ids(64), ids(64)])]
    return requests, 256 if answers else 256 + 63, 1 if answers else 64


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["answer letters", "longer continuations"])
def test_scoring_peak_on_cpu_matches_the_estimate(kind):
    """The scorer the harness runs (``score_continuations``, SmolLM2 fp32, batch 4): its peak over the weights
    against the evaluation term's. The estimate may not be under, and is over by at most the full-width forward
    it adds on top of every cache (the scorer never holds both; one block's widest point is 0.55 of a token's
    keys and values across SmolLM2's 30 layers, so up to +30% here, +9% on Llama-2-7B). Measured: +24% with
    answer letters, +5% with longer continuations."""
    from ray_prune.core.evaluation.loglikelihood import score_continuations
    from ray_prune.core.memory.evaluation import scoring_bytes
    from ray_prune.core.models import load_model

    model, _ = load_model("smollm2-135m", dtype="fp32", device="cpu")
    requests, row, scored = _scoring_requests(kind)
    measured = _peak_over_start(lambda: score_continuations(model, requests, 2048, 4, torch.device("cpu")))
    arch = M.Arch.from_config(load_config("smollm2-135m").config)
    kv, other, _ = scoring_bytes(arch, 4, arch.layers, 4, row, scored)
    assert measured <= kv + other <= 1.3 * measured


@pytest.mark.slow
def test_generation_peak_on_cpu_matches_the_estimate():
    """lm-eval's ``generate_until`` calls ``model.generate`` on left-padded contexts with an attention mask:
    its peak over the weights (SmolLM2 fp32, batch 2 x 128 context tokens, 8 generated) against the estimate.
    Measured: +0%; the prefill peaks, and the estimate adds the generated tokens' cache to it (+12% with 32)."""
    from ray_prune.core.memory.evaluation import generation_bytes
    from ray_prune.core.models import load_model

    model, _ = load_model("smollm2-135m", dtype="fp32", device="cpu")
    ids = torch.randint(3, 40000, (2, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :16], mask[1, :16] = 0, 0  # the shorter context, padded on the left as lm-eval pads

    def call():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                           pad_token_id=0)

    measured = _peak_over_start(call)
    arch = M.Arch.from_config(load_config("smollm2-135m").config)
    kv, other, _ = generation_bytes(arch, 4, arch.layers, 2, 128, 8)
    assert kv + other == pytest.approx(measured, rel=0.15)
