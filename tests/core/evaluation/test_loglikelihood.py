"""Continuation scores with the LM head on the scored positions only equal lm-eval's own to float rounding."""

from __future__ import annotations

import pytest
import torch

from ray_prune.core.evaluation.loglikelihood import score_continuations
from helpers import tiny_model

CONTEXTS = ["The capital of France is", "Question: what do bees make?\nAnswer:",
            "A long context that goes on and on about the weather in the mountains in winter, " * 3,
            "Paris"]
CONTINUATIONS = [" A", " B", " C", " D", " honey", " the sea and the sky", " snow falls"]


def _requests(tokenizer) -> list:
    """Every context with every continuation: shared contexts, one- and many-token continuations, and
    (with a short max_length) inputs cut from the left."""
    out = []
    for ctx in CONTEXTS:
        for cont in CONTINUATIONS:
            out.append(((ctx, cont), tokenizer(ctx)["input_ids"], tokenizer(cont)["input_ids"]))
    return out


def _lm_eval(model, tokenizer, requests, max_length: int, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    return lm._loglikelihood_tokens(requests, disable_tqdm=True)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("max_length,batch_size", [(256, 5), (24, 3)])
def test_scores_equal_lm_eval(family, max_length, batch_size, tokenizer):
    model = tiny_model(family)
    model.config.vocab_size = model.get_output_embeddings().weight.shape[0]
    requests = _requests(tokenizer)
    theirs = _lm_eval(model, tokenizer, requests, max_length, batch_size)
    ours = score_continuations(model, requests, max_length, batch_size, torch.device("cpu"))
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-4)
    assert len({round(lp, 3) for lp, _ in ours}) > len(CONTEXTS)  # the scores differ: the test can fail


def test_scores_equal_lm_eval_on_smollm2(smollm2):
    model, tokenizer = smollm2
    requests = _requests(tokenizer)
    theirs = _lm_eval(model, tokenizer, requests, 2048, 8)
    ours = score_continuations(model, requests, 2048, 8, torch.device("cpu"))
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-4)
