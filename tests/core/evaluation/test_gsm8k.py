"""GSM8K, lm-eval's generative task: our YAML against the built-in ``gsm8k`` (its config and its 5-shot prompts on
the mirror and in hub mode), our scores and per-question records against ``lm_eval.simple_evaluate`` with the
built-in task on the same questions, and the cap on generated tokens reaching generation."""

from __future__ import annotations

import collections
import random
import re

import pytest
import torch
from helpers import tiny_config
from test_harness import builtin_dir, local_rows, rendered, task_from_yaml

from ray_prune.core.evaluation.harness import evaluate, evaluate_tasks
from ray_prune.core.evaluation.overlay import load_tasks
from ray_prune.core.evaluation.tasks import TASKS, TASKS_DIR
from ray_prune.errors import UserError

BUILTIN = "gsm8k/gsm8k.yaml"
SEED = 1234  # EvalConfig's default: the questions a limit samples and the exemplars' order


@pytest.fixture(scope="module")
def rows(data_dir):
    """The mirror's test and train splits, which are the hub schema already (question, answer)."""
    return local_rows(data_dir, "gsm8k", "test"), local_rows(data_dir, "gsm8k", "train")


def long_model(seed: int = 7):
    """A tiny random Llama that takes a whole 5-shot GSM8K prompt (~900 tokens) without truncation."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", num_layers=2)
    config.max_position_embeddings = 2048
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def builtin_run(model, tokenizer, rows, picks: list[int], max_gen_toks: int, batch_size: int) -> dict:
    """lm-eval's own run of its built-in gsm8k on the mirror's rows: the questions ``picks``, the same seeds."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    test, train = rows
    return lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
        tasks=[task_from_yaml(builtin_dir() / BUILTIN, test, train)],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        samples={"gsm8k": picks}, gen_kwargs={"max_gen_toks": max_gen_toks}, log_samples=True,
        fewshot_random_seed=SEED, bootstrap_iters=1000)


def assert_same_as_builtin(model, tokenizer, rows, limit: int, max_gen_toks: int, batch_size: int) -> list:
    """Our evaluate_tasks and lm-eval's simple_evaluate agree on every score and every question's output."""
    records: list = []
    ours = evaluate_tasks(model, tokenizer, ["gsm8k"], limit=limit, max_gen_toks=max_gen_toks,
                          batch_size=batch_size, records=records, progress=False)["gsm8k"]
    picks = sorted(random.Random(f"{SEED}:gsm8k").sample(range(len(rows[0])), limit))  # the documented sample
    assert [r["doc_id"] for r in records] == picks and ours["n"] == limit and ours["shots"] == 5
    out = builtin_run(model, tokenizer, rows, picks, max_gen_toks, batch_size)
    theirs, specs = out["results"]["gsm8k"], TASKS["gsm8k"].metric_specs
    for m in specs:  # one score per filter, under lm-eval's key and under ours
        assert ours[m.name] == theirs[m.lm_eval_key], m
        assert ours[f"{m.name}_stderr"] == pytest.approx(theirs[f"{m.metric}_stderr,{m.filter}"], abs=1e-12), m
    logged = {(s["doc_id"], s["filter"]): s for s in out["samples"]["gsm8k"]}
    assert len(logged) == limit * len(specs)
    for r in records:
        for m in specs:
            s = logged[(r["doc_id"], m.filter)]
            assert r["response"] == s["resps"][0][0]
            assert r["extracted"][m.filter] == s["filtered_resps"][0]
            assert r["metrics"][m.name] == s[m.metric]
            assert (r["target"], r["doc_hash"]) == (s["target"], s["doc_hash"])
        assert r["loglikelihoods"] is None and isinstance(r["response"], str)
    return records


# --------------------------------------------------------------------------- the task = lm-eval's built-in


def test_gsm8k_yaml_is_the_builtin_config_and_the_registry_reads_it(rows):
    """Prompt, exemplars, generation settings, filters and metric options: every key of the built-in but its name,
    tag and version is ours verbatim."""
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(TASKS_DIR / "rp_gsm8k.yaml", resolve_func=False)
    theirs = load_yaml(builtin_dir() / BUILTIN, resolve_func=False)
    drop = {"task", "tag", "metadata"}
    assert {k: v for k, v in ours.items() if k not in drop} == {k: v for k, v in theirs.items() if k not in drop}

    spec = TASKS["gsm8k"]
    assert spec.output_type == "generate_until" and spec.generates and spec.shots == 5
    assert (spec.eval_split, spec.fewshot_split, spec.local_dataset) == ("test", "train", "gsm8k")
    # Named from the YAML: lm-eval's metric, and the first word of each filter.
    assert spec.metrics == ("exact_match_strict", "exact_match_flexible")
    assert [m.lm_eval_key for m in spec.metric_specs] == ["exact_match,strict-match", "exact_match,flexible-extract"]
    assert spec.main_metric in spec.metrics and spec.random_acc == 0.0
    assert all(not TASKS[t].generates and TASKS[t].output_type == "multiple_choice" for t in TASKS if t != "gsm8k")
    # Majority answer: always answering the most frequent final number of the test split.
    finals = collections.Counter(re.sub(r"(?s).*#### ", "", r["answer"]).replace(",", "") for r in rows[0])
    assert spec.majority_acc == pytest.approx(finals.most_common(1)[0][1] / len(rows[0]), abs=5e-4)


def test_gsm8k_5shot_prompts_match_lm_eval_builtin(rows, data_dir):
    """Same exemplars (seeded draws from train), same question, same generation settings, same gold: on the local
    mirror (as evaluate_tasks builds it) and in hub mode (our YAML as is)."""
    test, train = rows
    _, loaded = load_tasks({"gsm8k": 5}, data_dir)
    ours = loaded["rp_gsm8k"]
    theirs = task_from_yaml(builtin_dir() / BUILTIN, test, train)
    ours_hub = task_from_yaml(TASKS_DIR / "rp_gsm8k.yaml", test, train)
    assert len(ours.eval_docs) == len(test) == 1319
    for task in (ours, theirs, ours_hub):
        task.set_fewshot_seed(seed=SEED)
    for i in (0, 1, 400, 777, len(test) - 1):  # the same sequence of draws on each task
        expected = rendered(theirs, theirs.eval_docs[i], 5)
        assert rendered(ours, ours.eval_docs[i], 5) == expected, i
        assert rendered(ours_hub, ours_hub.eval_docs[i], 5) == expected, i
    # The literal shape, once: five worked train examples, then the question; generation stops at "Question:".
    [(ctx, gen_kwargs)], target = expected
    assert ctx.count("Question: ") == 6 and ctx.endswith(f"Question: {test[-1]['question']}\nAnswer:")
    exemplars = ctx.split("\n\n")[:5]
    train_text = {f"Question: {r['question']}\nAnswer: {r['answer']}" for r in train}
    assert all(e in train_text for e in exemplars)
    assert gen_kwargs["until"] == ["Question:", "</s>", "<|im_end|>"] and gen_kwargs["do_sample"] is False
    assert target == test[-1]["answer"]


# --------------------------------------------------------------------------- scores = lm-eval's simple_evaluate


def test_gsm8k_on_a_tiny_model_equals_lm_eval_simple_evaluate(tokenizer, rows):
    records = assert_same_as_builtin(long_model(), tokenizer, rows, limit=6, max_gen_toks=24, batch_size=3)
    assert all(r["response"] for r in records)  # a random model never stops early: every answer is compared


@pytest.mark.slow
def test_gsm8k_on_smollm2_equals_lm_eval_simple_evaluate(smollm2, rows):
    """A model that does write arithmetic and ``#### <number>``: the two extractions see real answers."""
    model, tok = smollm2
    records = assert_same_as_builtin(model, tok, rows, limit=2, max_gen_toks=48, batch_size=2)
    assert any(re.search(r"\d", r["extracted"]["flexible-extract"]) for r in records)


def test_max_gen_toks_caps_generation(tokenizer):
    """The cap reaches the model: one forward pass per generated token (the prompt's pass yields the first), for a
    random model that never writes a stop sequence; set through evaluate_tasks and through an EvalConfig."""
    model = long_model(seed=8)
    calls: list = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for cap in (3, 5):
            calls.clear()
            records: list = []
            evaluate_tasks(model, tokenizer, ["gsm8k"], limit=1, max_gen_toks=cap, batch_size=1, records=records,
                           progress=False)
            assert len(calls) == cap
            assert 0 < len(tokenizer(records[0]["response"], add_special_tokens=False)["input_ids"]) <= cap + 1
        calls.clear()
        scores = evaluate(model, tokenizer, tasks=["gsm8k"], limit=1, max_gen_toks=4, batch_size=1, c4_sequences=0,
                          progress=False)
        assert len(calls) == 4 and scores["gsm8k/n"] == 1
    finally:
        hook.remove()
    with pytest.raises(UserError, match="max_gen_toks"):
        evaluate_tasks(object(), object(), ["gsm8k"], max_gen_toks=0)
    with pytest.raises(UserError, match="max_gen_toks"):
        evaluate(object(), object(), tasks=["gsm8k"], max_gen_toks=-1)
