"""Linear repair (ReplaceMe): the fold is exact, the fits are what the repaired model computes, the repaired model is
an ordinary one (saves, reloads, decodes with a cache), and it recovers a removed block that is close to linear."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from ray_prune.core.architecture import decoder_layers
from ray_prune.core.data import load_texts
from ray_prune.core.loss import next_token_loss
from ray_prune.core.packing import pack_texts
from ray_prune.core.profile import block_output
from ray_prune.core.prune import prune_layers
from ray_prune.core.repair import check_linear_repair, contiguous_runs, linear_repair
from ray_prune.errors import UserError


@pytest.fixture(scope="module")
def packed(tokenizer, data_dir):
    """40 calibration blocks of 48 tokens (more tokens than the tiny models' 64 channels) and 4 others."""
    blocks = pack_texts(load_texts("calibration", 60, data_dir_path=data_dir), tokenizer, 48, max_blocks=44)
    return blocks[:40], blocks[40:]


def _untied(family: str, num_layers: int = 6):
    """A tiny model whose LM head is its own matrix, so a run at layer 0 can fold into the embedding."""
    config = tiny_config(family, num_layers)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    return model


def _capture(module, ids, model, output=True):
    """The output (or input) of ``module`` when ``model`` runs on ``ids``."""
    seen = []
    if output:
        handle = module.register_forward_hook(lambda m, a, o: seen.append(block_output(o)))
    else:
        handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return seen[0].double()


def test_contiguous_runs():
    assert contiguous_runs([7, 3, 4, 9, 8, 0]) == [(0, 1), (3, 5), (7, 10)]
    assert contiguous_runs([]) == []


CASES = [("llama", "full", [2, 3]), ("gpt_neox", "full", [3]), ("phi3", "full", [1, 2, 3]),
         ("gemma3_text", "diagonal", [2, 3]), ("llama", "diagonal", [4])]


@pytest.mark.parametrize("family,form,remove", CASES)
def test_the_fold_is_exact(family, form, remove, packed):
    """The repaired model's stream after the last kept block equals y + m T, computed explicitly from the original
    model's x^i and m and the fitted T, on blocks the fit never saw."""
    calibration, other = packed
    model = tiny_model(family, num_layers=6)
    repaired = copy.deepcopy(model)
    report = linear_repair(repaired, remove, calibration, batch_size=8, form=form)
    (fit,) = report.runs
    i = remove[0]
    block = decoder_layers(model)[i - 1]
    m_module = model.get_submodule(fit.fold)
    x_i = _capture(block, other, model)
    m = _capture(m_module, other, model)
    T = fit.transform
    want = x_i - m + (m * T if T.ndim == 1 else m @ T)
    got = _capture(decoder_layers(repaired)[i - 1], other, repaired)
    assert not torch.allclose(want, x_i, atol=1e-3)  # T is not the identity: the check has teeth
    torch.testing.assert_close(got, want, atol=2e-5 * float(want.abs().max()), rtol=1e-5)
    assert repaired.config.num_hidden_layers == 6 - len(remove)


def test_a_run_at_layer_zero_folds_into_the_embedding(packed):
    calibration, other = packed
    model = _untied("mistral")
    repaired = copy.deepcopy(model)
    report = linear_repair(repaired, [0, 1], calibration)
    assert report.runs[0].fold == "model.embed_tokens"
    x0 = _capture(decoder_layers(model)[0], other, model, output=False)
    got = _capture(decoder_layers(repaired)[0], other, repaired, output=False)
    torch.testing.assert_close(got, x0 @ report.runs[0].transform, atol=1e-5, rtol=1e-5)
    assert repaired.get_output_embeddings().weight.equal(model.get_output_embeddings().weight)


@pytest.mark.parametrize("family,form,remove", [("llama", "full", [1, 3, 4]), ("llama", "diagonal", [1, 3, 4]),
                                                 ("gemma3_text", "diagonal", [1, 4]),
                                                 ("mistral", "full", [0, 2, 3, 5])])
def test_each_fit_is_the_repaired_models_stream_error(family, form, remove, packed):
    """Runs are fitted shallow to deep on the model already repaired before them: each run's reported error is
    the mean squared distance, over the calibration tokens, between the final repaired model's stream at that cut
    and the full model's x^e."""
    calibration, _ = packed
    model = _untied(family) if 0 in remove else tiny_model(family, num_layers=6)
    repaired = copy.deepcopy(model)
    report = linear_repair(repaired, remove, calibration, batch_size=16, form=form)
    assert [(r.start, r.end) for r in report.runs] == contiguous_runs(remove)
    full_layers, rep_layers = decoder_layers(model), decoder_layers(repaired)
    tokens = calibration.numel()
    assert report.tokens == tokens
    for run in report.runs:
        target = _capture(full_layers[run.end - 1], calibration, model)
        new = run.start - sum(1 for j in remove if j < run.start)  # the repaired block after the cut
        if run.start == 0:
            stream = _capture(rep_layers[0], calibration, repaired, output=False)
        else:
            stream = _capture(rep_layers[new - 1], calibration, repaired)
        err = float(((stream - target) ** 2).sum()) / tokens
        assert err == pytest.approx(run.fit_error, rel=1e-3)
        assert run.fit_error < run.plain_error
    first = report.runs[0]
    if first.start:
        x_i = _capture(full_layers[first.start - 1], calibration, model)
        x_e = _capture(full_layers[first.end - 1], calibration, model)
        assert float(((x_i - x_e) ** 2).sum()) / tokens == pytest.approx(first.plain_error, rel=1e-3)


@pytest.mark.parametrize("family,form,remove", [("llama", "full", [1, 3, 4]), ("gemma3_text", "diagonal", [2, 3]),
                                                 ("gpt_neox", "full", [2]), ("qwen2", "full", [3, 4])])
def test_the_repaired_model_saves_reloads_and_decodes(family, form, remove, packed, tmp_path):
    calibration, other = packed
    model = tiny_model(family, num_layers=6)
    report = linear_repair(model, remove, calibration, form=form)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert back.config.num_hidden_layers == len(decoder_layers(back)) == 6 - len(remove)
    assert back.config.layer_repair == report.to_dict()
    assert back.config.layer_pruning["removed_layers"] == remove
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=other).logits, model(input_ids=other).logits, atol=1e-5, rtol=1e-5)
    # 30-token prompts + 12 new tokens: past gemma3_text's 16-token sliding window, so the cache's layer types count.
    prompt = other[:2, :30]
    cached = back.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = back.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    # The new weights are ordinary tensors a heal can train around.
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(input_ids=other[:1], labels=other[:1]).loss.backward()


def _near_linear(family: str, seed: int):
    """A tiny non-gated model whose block 2 is close to linear: identity activation, no attention, and an MLP
    scaled up so that removing it matters; a large LM head makes its next-token distributions peaked."""
    config = tiny_config(family, 4)
    config.hidden_act = "linear"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    block = decoder_layers(model)[2]
    attention = block.attention if family == "gpt_neox" else block.self_attn
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
        attention.dense.weight.zero_()
        attention.dense.bias.zero_()
        (block.mlp.dense_4h_to_h if family == "gpt_neox" else block.mlp.fc2).weight.mul_(5)
    return model


@pytest.mark.parametrize("family", ["gpt_neox", "phi"])
def test_repair_recovers_a_near_linear_block(family):
    """Text sampled from the full model makes the loss measure fidelity to it (the full model's own loss is the
    floor, in expectation). Removing block 2 plainly costs several nats; the linear repair recovers most of it,
    on the calibration blocks and on blocks it never saw."""
    model = _near_linear(family, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        text = model.generate(torch.full((24, 1), 5), do_sample=True, max_new_tokens=47, min_new_tokens=47, top_k=0,
                              top_p=1.0, pad_token_id=0)
    calibration, held_out = text[:16], text[16:]
    plain = prune_layers(copy.deepcopy(model), [2])
    repaired = copy.deepcopy(model)
    linear_repair(repaired, [2], calibration)
    for blocks in (calibration, held_out):
        full, cut, fixed = (next_token_loss(m, blocks) for m in (model, plain, repaired))
        assert cut - full > 3.0
        assert fixed - full < 0.1 * (cut - full)


def test_a_large_ridge_is_plain_removal(packed):
    calibration, other = packed
    model = tiny_model("llama", num_layers=5)
    repaired = copy.deepcopy(model)
    report = linear_repair(repaired, [2], calibration, ridge=1e12)
    torch.testing.assert_close(report.runs[0].transform, torch.eye(64, dtype=torch.float64), atol=1e-6, rtol=0)
    plain = prune_layers(copy.deepcopy(model), [2])
    with torch.no_grad():
        torch.testing.assert_close(repaired(input_ids=other).logits, plain(input_ids=other).logits, atol=1e-4,
                                   rtol=1e-4)


def test_what_cannot_fold_exactly_is_refused(packed):
    calibration, _ = packed
    for family in ("gemma2", "gemma3_text"):
        with pytest.raises(UserError, match=f"cannot fold exactly into {family}.*post_feedforward_layernorm"):
            check_linear_repair(tiny_config(family, 4), "full")
        with pytest.raises(UserError, match="diagonal form"):
            linear_repair(tiny_model(family, 4), [2], calibration, form="full")
    check_linear_repair(tiny_config("gemma3_text", 4), "diagonal")
    tied = tiny_model("gemma3_text", 4)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    with pytest.raises(UserError, match="ties to its LM head"):
        check_linear_repair(tied.config, "diagonal", [0, 1])
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    with pytest.raises(UserError, match="ties to its LM head"):
        linear_repair(tied, [0, 1], calibration, form="diagonal")
    assert tied.config.num_hidden_layers == 4  # refused before anything changed
    assert all(torch.equal(before[k], v) for k, v in tied.state_dict().items())
    with pytest.raises(UserError, match="unknown linear repair form"):
        check_linear_repair(tiny_config("llama", 4), "cosine")
    with pytest.raises(UserError, match="ridge"):
        linear_repair(tiny_model("llama", 4), [2], calibration, ridge=-1.0)
    with pytest.raises(UserError, match="unsupported architecture"):
        check_linear_repair(type("C", (), {"model_type": "bert"})(), "full")


@pytest.mark.slow
@pytest.mark.parametrize("name,form,remove", [("smollm2", "full", [20, 21, 22]), ("gemma3", "diagonal", [10, 11])])
def test_repair_of_a_real_model(name, form, remove, request, data_dir, tmp_path):
    """The bundled models (copies): the repaired model lowers the stream error at the cut, reloads from disk with
    the same logits, and the fold is exact at the cut."""
    model, tok = request.getfixturevalue({"smollm2": "smollm2", "gemma3": "gemma3"}[name])
    texts = load_texts("calibration", 24, data_dir_path=data_dir)
    blocks = pack_texts(texts, tok, 128, max_blocks=10)
    calibration, other = blocks[:8], blocks[8:]
    repaired = copy.deepcopy(model)
    report = linear_repair(repaired, remove, calibration, batch_size=4, form=form)
    (fit,) = report.runs
    assert fit.fit_error < fit.plain_error
    i = remove[0]
    x_i = _capture(decoder_layers(model)[i - 1], other, model)
    m = _capture(model.get_submodule(fit.fold), other, model)
    T = fit.transform
    want = x_i - m + (m * T if T.ndim == 1 else m @ T)
    got = _capture(decoder_layers(repaired)[i - 1], other, repaired)
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)
    repaired.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=other).logits, repaired(input_ids=other).logits, atol=1e-4,
                                   rtol=1e-4)
