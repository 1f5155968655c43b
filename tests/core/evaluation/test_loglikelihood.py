"""Continuation scores: each shared context and few-shot prefix computed once, the scores those of one row per request.

Two references: lm-eval's own HF path (full logits, one row per request), and
``_score_full_rows``, the scorer before contexts were shared (one row per
distinct context + continuation[:-1], the LM head on scored positions only),
run on the same model and the same requests. The requests are lm-eval's own,
built and tokenized by lm-eval from the local data mirror.

Tolerance against ``_score_full_rows``: ``TOLERANCE`` = 1e-4 absolute on a
request's summed log-probability, greedy flags identical. The two paths add the
same terms in differently shaped matmuls (attention over a cached past, other
batch compositions), so each log-probability differs by fp32 rounding; a
request's score sums one per continuation token (up to ~40 here) and reaches -390 on the random tiny
models (ln 49152 = 10.8 nats a token), where one fp32 ulp is 3.1e-5. Measured:
at most 3.1e-5 on the tiny models (one ulp of their largest scores), 1.5e-5 on
SmolLM2-135M and 1.1e-5 on Gemma-3-270M (scores down to -111), so 1e-4 is about
three ulps of the largest score. A scorer that lets a token see a wrong one (a
pad slot unmasked, a position shifted) is off by 1e-2 and more on these same
models.

Those comparisons run in fp32, where the log-softmax's precision is moot. In
bf16 (the default on a GPU) it is not: lm-eval takes the log-softmax in the
model's dtype and sums in it, keeping 8 significant bits of a score, where the
scorer takes it in fp32 (``logprobs="fp32"``, the default) or, asked to, as
lm-eval does (``logprobs="model"``): ``test_bf16_scores_against_lm_eval``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from ray_prune.core.evaluation.loglikelihood import _score_full_rows, score_continuations

CPU = torch.device("cpu")
TOLERANCE = 1e-4

CONTEXTS = ["The capital of France is", "Question: what do bees make?\nAnswer:",
            "A long context that goes on and on about the weather in the mountains in winter, " * 3,
            "Paris"]
CONTINUATIONS = [" A", " B", " C", " D", " honey", " the sea and the sky", " snow falls", " the sea"]

# lm-eval tasks (our names: shots), and the MMLU subjects to draw from: the first QUESTIONS questions of each
TASK_SHOTS = {"arc_easy": 0, "piqa": 0, "hellaswag": 0, "boolq": 0, "winogrande": 0, "mmlu": 5}
SUBJECTS = ("anatomy", "astronomy")
QUESTIONS = 3


def _requests(tokenizer) -> list:
    """Every context with every continuation: shared contexts, one- and many-token continuations, a continuation
    that is a prefix of another, and (with a short max_length) inputs cut from the left."""
    out = []
    for ctx in CONTEXTS:
        for cont in CONTINUATIONS:
            out.append(((ctx, cont), tokenizer(ctx)["input_ids"], tokenizer(cont)["input_ids"]))
    return out


def lm_eval_instances(tasks: Mapping[str, int], per_task: int, data_dir: Path,
                      subjects: Sequence[str] = SUBJECTS) -> dict[str, list]:
    """lm-eval's loglikelihood instances per task (lm-eval task name), from the local mirror: the first
    ``per_task`` questions of each task (of each MMLU subject listed), prompts built by lm-eval."""
    from ray_prune.core.evaluation.overlay import load_tasks

    _, loaded = load_tasks(tasks, data_dir, {f"rp_mmlu_{s}" for s in subjects})
    out = {}
    for name, task in loaded.items():
        task.set_fewshot_seed(1234)
        task.build_all_requests(limit=per_task, rank=0, world_size=1)
        out[name] = [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return out


def lm_eval_requests(model, tokenizer, instances: Sequence) -> list:
    """The requests lm-eval's HF wrapper hands its ``_loglikelihood_tokens`` for these instances (tokenized by
    lm-eval), what ``harness._HFLM`` passes to ``score_continuations``."""
    from lm_eval.models.huggingface import HFLM

    captured: list = []

    class Capture(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            captured.extend(requests)
            return [(0.0, False)] * len(requests)

    Capture(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(list(instances), disable_tqdm=True)
    return captured


def _lm_eval(model, tokenizer, requests, max_length: int, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    return lm._loglikelihood_tokens(requests, disable_tqdm=True)


def assert_same_scores(ours, reference, tolerance: float = TOLERANCE) -> float:
    """Greedy flags identical, log-probabilities within ``tolerance``; returns the largest difference."""
    assert len(ours) == len(reference)
    assert [g for _, g in ours] == [g for _, g in reference]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in reference], abs=tolerance, rel=0)
    assert len({round(lp, 2) for lp, _ in ours}) > len(ours) // 2  # the scores differ: the test can fail
    return max(abs(a - b) for (a, _), (b, _) in zip(ours, reference))


@pytest.fixture(scope="module")
def instances(data_dir) -> dict[str, list]:
    return lm_eval_instances(TASK_SHOTS, QUESTIONS, data_dir)


@pytest.fixture(scope="module")
def real_requests(instances, tokenizer) -> list:
    """lm-eval's requests for every task, tokenized by SmolLM2's tokenizer (which the tiny models share)."""
    return lm_eval_requests(tiny_model("llama", num_layers=1), tokenizer, [i for v in instances.values() for i in v])


def test_requests_share_contexts_and_mmlu_prefixes(instances, tokenizer):
    """What the scorer is for, checked on lm-eval's requests: several choices per context, and the 5-shot MMLU
    prompts of a subject identical up to the question."""
    model = tiny_model("llama", num_layers=1)
    for name in ("rp_arc_easy", "rp_hellaswag", "rp_piqa", "rp_boolq"):
        contexts = [tuple(ctx) for _, ctx, _ in lm_eval_requests(model, tokenizer, instances[name])]
        assert len(contexts) >= 2 * len(set(contexts)) == 2 * QUESTIONS, name
    for subject in SUBJECTS:
        contexts = sorted({tuple(ctx) for _, ctx, _ in lm_eval_requests(model, tokenizer,
                                                                         instances[f"rp_mmlu_{subject}"])})
        assert len(contexts) == QUESTIONS
        common = min(next(k for k, (x, y) in enumerate(zip(a, b)) if x != y) for a, b in zip(contexts, contexts[1:]))
        assert common > 0.6 * min(map(len, contexts)), subject


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("max_length,batch_size", [(256, 5), (24, 3)])
def test_scores_equal_lm_eval(family, max_length, batch_size, tokenizer):
    model = tiny_model(family)
    model.config.vocab_size = model.get_output_embeddings().weight.shape[0]
    requests = _requests(tokenizer)
    theirs = _lm_eval(model, tokenizer, requests, max_length, batch_size)
    ours = score_continuations(model, requests, max_length, batch_size, CPU)
    assert_same_scores(ours, theirs)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "mistral", "qwen2", "gemma2"])
@pytest.mark.parametrize("max_length,batch_size", [(2048, 4), (256, 3), (2048, 1)])
def test_shared_contexts_score_like_one_row_per_request(family, max_length, batch_size, real_requests, tokenizer):
    """lm-eval's requests for six tasks, MMLU 5-shot included; sliding windows (16 tokens in the tiny Mistral,
    Qwen2, Gemma-2 and Gemma-3), Gemma-2's soft-capping; max_length 256 cuts BoolQ and MMLU prompts."""
    model = tiny_model(family)
    requests = real_requests + _requests(tokenizer)
    assert any(len(c) + len(x) > 256 + 1 for _, c, x in requests)
    reference = _score_full_rows(model, requests, max_length, batch_size, CPU)
    assert_same_scores(score_continuations(model, requests, max_length, batch_size, CPU), reference)
    assert_same_scores(score_continuations(model, requests, max_length, batch_size, CPU, min_shared_prefix=None),
                       reference)


def test_lora_adapter_unmerged_scores_like_one_row_per_request(real_requests):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", seed=5)
    before = score_continuations(base, real_requests, 2048, 4, CPU)
    # init_lora_weights=False: B is random too, so the adapter changes the model
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                            init_lora_weights=False)).eval()
    reference = _score_full_rows(model, real_requests, 2048, 4, CPU)
    assert_same_scores(score_continuations(model, real_requests, 2048, 4, CPU), reference)
    assert max(abs(a - b) for (a, _), (b, _) in zip(before, reference)) > 1e-2  # the adapter took part


def test_nf4_model_scores_like_one_row_per_request(real_requests, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("gemma3_text", seed=4).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu").eval()
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    reference = _score_full_rows(model, real_requests, 2048, 4, CPU)
    assert_same_scores(score_continuations(model, real_requests, 2048, 4, CPU), reference)


def test_each_shared_piece_runs_once():
    """Token positions through the decoder, counted at the embedding: a 40-token prefix shared by three
    questions runs once, each question once, each continuation row once (one that another continuation's
    row already holds, or a one-token one, rides along with it)."""
    prefix = list(range(100, 140))
    questions = [[300 + k] + [50] * (4 + 2 * k) for k in range(3)]  # distinct first tokens, 5, 7, 9 tokens
    continuations = [[201, 202, 203], [211, 212, 213], [221, 222], [201, 202], [230]]
    requests = [(("", ""), prefix + q, c) for q in questions for c in continuations]
    model = tiny_model("llama", num_layers=2)
    seen: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        ours = score_continuations(model, requests, 2048, 1, CPU)
        shared = sum(seen)
        seen.clear()
        no_prefix = score_continuations(model, requests, 2048, 1, CPU, min_shared_prefix=None)
        contexts_only = sum(seen)
        seen.clear()
        reference = _score_full_rows(model, requests, 2048, 1, CPU)
        full_rows = sum(seen)
    finally:
        hook.remove()
    rows = 2 + 2 + 1  # the continuation rows [201, 202] (also serves [201, 202, 203]'s [:-1]), [211, 212], [221]
    assert shared == len(prefix) + sum(len(q) + rows for q in questions)
    assert contexts_only == sum(len(prefix) + len(q) + rows for q in questions)
    assert full_rows == sum(len(prefix) + len(q) + len(c) - 1 for q in questions
                            for c in {tuple(c[:-1]): c for c in continuations}.values())
    assert_same_scores(ours, reference, TOLERANCE)
    assert_same_scores(no_prefix, reference, TOLERANCE)


def test_scores_follow_their_requests_in_any_order(real_requests):
    model = tiny_model("qwen2")
    forward = score_continuations(model, real_requests, 2048, 4, CPU)
    backward = score_continuations(model, real_requests[::-1], 2048, 4, CPU)
    assert [g for _, g in backward[::-1]] == [g for _, g in forward]
    assert [lp for lp, _ in backward[::-1]] == pytest.approx([lp for lp, _ in forward], abs=TOLERANCE, rel=0)


# --------------------------------------------------------------------------- precision: bf16 against lm-eval

# The largest difference between the default (fp32) scores of a bf16 model and lm-eval's, on ``_requests`` (scores
# down to -54.5): measured 0.101 nats on the tiny Llama, 0.164 on the tiny Gemma-3.
BF16_LM_EVAL_GAP = 0.2


def _bf16_step(score: float) -> float:
    """The spacing of bf16 numbers at ``score`` (8 significant bits): what lm-eval's bf16 sum rounds a score to."""
    return 2.0 ** (math.floor(math.log2(abs(score))) - 7) if score else 0.0


def _exact(model, requests: Sequence, max_length: int) -> list[float]:
    """The scores of the model's own logits, rounded no further: one row per request (no batch to pad), the
    log-softmax and the sum in fp64."""
    out = []
    for _, ctx, cont in requests:
        ids = (ctx + cont)[-(max_length + 1):][:-1]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, len(ids) - len(cont):]
        rows = F.log_softmax(logits.double(), dim=-1)
        out.append(float(rows.gather(1, torch.tensor(cont)[:, None]).sum()))
    return out


def _gaps(ours, theirs) -> list[float]:
    return [abs(a - b) for (a, _), (b, _) in zip(ours, theirs)]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("max_length,batch_size", [(256, 5), (24, 3)])
def test_bf16_scores_against_lm_eval(family, max_length, batch_size, tokenizer):
    """A bf16 model, scored by lm-eval's HF path and by ours in either precision.

    ``logprobs="model"`` reproduces lm-eval's numbers: measured bit-identical
    on every request here, greedy flags too. The two paths run differently
    shaped matmuls, so the bf16 logits can differ in their last bits, and
    now and then a token's log-probability rounds the other way: on lm-eval's
    own requests for the six tasks (``real_requests``, scores down to -390)
    3 of 66 scores (Llama) and 1 of 66 (Gemma-3) differ, each by one bf16
    step of the score. So: at most one request in ten may differ, by at most
    one step.

    ``logprobs="fp32"`` (the default) differs from lm-eval's on every request,
    by up to 0.8 of a bf16 step of the score: measured 0.101 nats (Llama) and
    0.164 (Gemma-3) here, 0.64 and 0.66 on ``real_requests``. It is the model's
    own score: within 0.004 nats of the fp64 log-softmax of its bf16 logits
    (``_exact``; the rest is bf16 logits that differ with the batch's shape),
    where lm-eval's is 0.10 to 0.16 from it, some 40 times as far.
    """
    model = tiny_model(family).to(torch.bfloat16)
    model.config.vocab_size = model.get_output_embeddings().weight.shape[0]
    requests = _requests(tokenizer)
    theirs = _lm_eval(model, tokenizer, requests, max_length, batch_size)
    steps = [_bf16_step(lp) for lp, _ in theirs]

    as_lm_eval = score_continuations(model, requests, max_length, batch_size, CPU, logprobs="model")
    assert [g for _, g in as_lm_eval] == [g for _, g in theirs]
    gaps = _gaps(as_lm_eval, theirs)
    assert all(gap <= step for gap, step in zip(gaps, steps))
    assert sum(gap > 0 for gap in gaps) <= len(gaps) // 10

    ours = score_continuations(model, requests, max_length, batch_size, CPU)
    assert [g for _, g in ours] == [g for _, g in theirs]
    gaps = _gaps(ours, theirs)
    assert all(gap <= step for gap, step in zip(gaps, steps)) and max(gaps) <= BF16_LM_EVAL_GAP
    assert sum(gap > 0 for gap in gaps) > len(gaps) // 2  # lm-eval's rounding shows: the precisions differ

    exact = _exact(model, requests, max_length)
    ours_off = max(abs(a - e) for (a, _), e in zip(ours, exact))
    theirs_off = max(abs(b - e) for (b, _), e in zip(theirs, exact))
    assert ours_off <= 0.01 and theirs_off >= 10 * ours_off


def test_harness_scores_in_the_precision_asked(tokenizer):
    """``evaluate_tasks``' lm-eval wrapper hands ``logprobs`` to the scorer (a bf16 model, where it shows)."""
    from ray_prune.core.evaluation.config import LOGPROBS
    from ray_prune.core.evaluation.harness import _lm

    model = tiny_model("llama", num_layers=2).to(torch.bfloat16)
    model.config.vocab_size = model.get_output_embeddings().weight.shape[0]
    requests = _requests(tokenizer)
    got = {}
    for logprobs in LOGPROBS:
        lm = _lm(model, tokenizer, 4, False, logprobs)
        got[logprobs] = lm._loglikelihood_tokens(requests)
        assert got[logprobs] == score_continuations(model, requests, lm.max_length, 4, CPU, logprobs=logprobs)
    assert got["fp32"] != got["model"]
    with pytest.raises(ValueError, match="logprobs"):
        score_continuations(model, requests, 256, 4, CPU, logprobs="bf16")


# --------------------------------------------------------------------------- the bundled models


@pytest.mark.slow
def test_scores_equal_lm_eval_on_smollm2(smollm2):
    model, tokenizer = smollm2
    requests = _requests(tokenizer)
    theirs = _lm_eval(model, tokenizer, requests, 2048, 8)
    ours = score_continuations(model, requests, 2048, 8, CPU)
    assert_same_scores(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_bundled_models_score_like_one_row_per_request(name, instances, request):
    """The real models in fp32 on lm-eval's requests for the six tasks (Gemma-3: 512-token sliding windows on
    5 of every 6 layers, MMLU prompts longer than that)."""
    model, tokenizer = request.getfixturevalue(name)
    requests = lm_eval_requests(model, tokenizer, [i for v in instances.values() for i in v])
    reference = _score_full_rows(model, requests, 2048, 8, CPU)
    assert_same_scores(score_continuations(model, requests, 2048, 8, CPU), reference)
