"""ray_prune.core.evaluation: real lm-eval on real (local) data with tiny random models, plus one real model.

The prompt tests rebuild each record in the hub schema independently of
``ray_prune/tasks/hub_schema.py`` and render it with lm-eval's own built-in
task configs (loaded from lm-eval's YAML, data supplied in memory), so our
tasks are checked against lm-eval itself, not against a copy of our code.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import tiny_config, tiny_model

from ray_prune.core.evaluation.harness import _choose_docs, evaluate, evaluate_tasks
from ray_prune.core.evaluation.overlay import load_tasks as _load_tasks
from ray_prune.core.evaluation.tasks import MMLU_SUBJECTS, TASKS, TASKS_DIR, resolve_tasks
from ray_prune.core.loss import c4_loss
from ray_prune.errors import UserError

BUILTIN_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",  # generative; its 5-shot prompts and scores: test_gsm8k.py
}


def builtin_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def yaml_config(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml  # what lm-eval's TaskManager reads YAML with

    cfg = load_yaml(path)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    return cfg


def task_from_yaml(path: Path, rows: list[dict], fewshot_rows: list[dict] | None = None):
    """The task a YAML declares, its dataset replaced by hub-schema ``rows`` (nothing downloaded)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    cfg = yaml_config(path)
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}
    data = datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in splits})
    if cfg.get("fewshot_split"):
        data[cfg["fewshot_split"]] = datasets.Dataset.from_list(fewshot_rows)
    cfg["custom_dataset"] = lambda **_: data
    return ConfigurableTask(config=cfg)


def builtin_task(rel: str, rows: list[dict], fewshot_rows: list[dict] | None = None):
    """lm-eval's built-in task (lm_eval/tasks/<rel>) on the given hub-schema rows."""
    return task_from_yaml(builtin_dir() / rel, rows, fewshot_rows)


def hub_mode_task(name: str, rows: list[dict], fewshot_rows: list[dict] | None = None):
    """Our task as it runs without a data dir (our YAML as is) on the given hub-schema rows."""
    return task_from_yaml(TASKS_DIR / f"{name}.yaml", rows, fewshot_rows)


def local_rows(data_dir: Path, dataset: str, split: str) -> list[dict]:
    df = pd.read_parquet(data_dir / dataset / f"{split}.parquet")
    return [{k: (list(v) if hasattr(v, "tolist") and not isinstance(v, str) else v) for k, v in r.items()}
            for r in df.to_dict("records")]


def hub_record(task: str, row: dict) -> dict:
    """The hub's record for a row of our mirror, written out field by field (hub schemas)."""
    if task == "boolq":  # aps/super_glue boolq
        return {"question": row["question"], "passage": row["passage"], "idx": int(row["idx"]),
                "label": int(row["answer"])}
    if task in ("arc_easy", "arc_challenge"):  # allenai/ai2_arc
        return {"id": row["id"], "question": row["question"],
                "choices": {"text": list(row["choices"]), "label": list(row["choice_labels"])},
                "answerKey": row["answer_key"]}
    if task == "hellaswag":  # Rowan/hellaswag; the mirror keeps ctx_a + " " + ctx_b joined (see below)
        return {"activity_label": row["activity_label"], "ctx_a": row["ctx"], "ctx_b": "",
                "endings": list(row["endings"]), "label": str(int(row["answer"]))}
    if task == "piqa":  # baber/piqa
        return {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(row["answer"])}
    if task == "winogrande":  # allenai/winogrande winogrande_xl
        return {"sentence": row["sentence"], "option1": row["option1"], "option2": row["option2"],
                "answer": str(int(row["answer"]) + 1)}
    if task == "gsm8k":  # openai/gsm8k main: same fields as the mirror
        return {"question": row["question"], "answer": row["answer"]}
    if task == "mmlu":  # cais/mmlu: same fields as the mirror
        return {"question": row["question"], "subject": row["subject"], "choices": list(row["choices"]),
                "answer": int(row["answer"])}
    raise KeyError(task)


def rendered(task, doc, shots: int):
    """Everything lm-eval sends to the model for one doc, and the gold answer."""
    ctx = task.fewshot_context(doc=doc, num_fewshot=shots)
    requests = task.construct_requests(doc=doc, ctx=ctx, metadata=("t", 0, 1))
    if not isinstance(requests, list):  # generate_until: one request per doc
        requests = [requests]
    return [r.arguments for r in requests], task.doc_to_target(doc)


def metric_setup(task):
    return {m: (task._aggregation_list[m], task._higher_is_better[m]) for m in task._metric_fn_list}


# --------------------------------------------------------------------------- input checks (no model)


def test_unknown_task_is_a_user_error_before_any_model_work():
    with pytest.raises(UserError) as err:
        evaluate_tasks(object(), object(), ["mmlu", "trivia"])  # not a model: nothing may touch it
    assert "trivia" in str(err.value)
    assert all(name in str(err.value) for name in TASKS)
    with pytest.raises(UserError):
        evaluate(object(), object(), tasks={"boolq": 0, "mmlu_5shot": 5})
    with pytest.raises(UserError):
        evaluate_tasks(object(), object(), {"boolq": -1})
    with pytest.raises(UserError):
        evaluate_tasks(object(), object(), ["boolq"], limit=0)
    with pytest.raises(UserError, match="logprobs must be one of fp32, model"):
        evaluate_tasks(object(), object(), ["boolq"], logprobs="bf16")
    with pytest.raises(UserError, match="logprobs must be one of fp32, model") as err:
        evaluate(object(), object(), tasks=["boolq"], logprobs="float32")
    assert "lm-eval" in err.value.fix


def test_shots_default_per_task_and_local_mirror_refuses_exemplars_it_lacks(data_dir):
    assert resolve_tasks(["mmlu", "boolq"]) == {"mmlu": 5, "boolq": 0}
    assert resolve_tasks({"mmlu": 0, "arc_easy": 25}, local=True) == {"mmlu": 0, "arc_easy": 25}
    assert resolve_tasks({"boolq": 5}) == {"boolq": 5}  # the hub has a training split
    with pytest.raises(UserError, match="no split to draw exemplars"):
        evaluate_tasks(object(), object(), {"boolq": 5}, data_dir=data_dir)


# --------------------------------------------------------------------------- prompts = lm-eval's built-ins


@pytest.fixture(scope="module")
def local_tasks(data_dir):
    """Our tasks on the local mirror, as evaluate_tasks builds them (default shots)."""
    _, loaded = _load_tasks({name: spec.shots for name, spec in TASKS.items()}, data_dir)
    return loaded


@pytest.mark.parametrize("name", list(BUILTIN_YAML))
def test_prompts_and_metrics_match_lm_eval_builtin(name, local_tasks, data_dir):
    """Same requests to the model, same gold, same metrics: on the local mirror and in hub mode."""
    spec = TASKS[name]
    ours = local_tasks[f"rp_{name}"]
    rows = local_rows(data_dir, spec.local_dataset, spec.eval_split)
    assert len(ours.eval_docs) == len(rows)
    picks = [0, 1, len(rows) // 3, len(rows) // 2, len(rows) - 1]
    hub_rows = [hub_record(name, rows[i]) for i in picks]
    theirs = builtin_task(BUILTIN_YAML[name], hub_rows)
    ours_hub = hub_mode_task(f"rp_{name}", hub_rows)
    for k, i in enumerate(picks):
        expected = rendered(theirs, theirs.eval_docs[k], 0)
        assert rendered(ours, ours.eval_docs[i], 0) == expected, (name, i)
        assert rendered(ours_hub, ours_hub.eval_docs[k], 0) == expected, (name, i)
    assert metric_setup(ours) == metric_setup(theirs) == metric_setup(ours_hub)
    assert ours._metric_fn_kwargs == theirs._metric_fn_kwargs == ours_hub._metric_fn_kwargs
    assert spec.output_type == theirs.OUTPUT_TYPE == ours.OUTPUT_TYPE
    # Our scores: each lm-eval metric on each filter lm-eval applies ("none" where the task has no filter_list).
    filters = [f["name"] for f in theirs.config.filter_list or []] or ["none"]
    expected_scores = [(m, f) for f in filters for m in theirs._metric_fn_list]
    assert [(m.metric, m.filter) for m in spec.metric_specs] == expected_scores
    # And lm-eval feeds the model what we think: the built-in prompt format, checked literally once.
    (first_args, gold) = rendered(ours, ours.eval_docs[0], 0)
    if name == "boolq":
        r = rows[0]
        assert first_args == [(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", c) for c in (" no", " yes")]
        assert gold == int(r["answer"])


def test_mmlu_5shot_prompts_match_lm_eval_builtin_for_every_subject(local_tasks, data_dir):
    test = local_rows(data_dir, "mmlu", "test")
    dev = local_rows(data_dir, "mmlu", "dev")
    assert sorted({r["subject"] for r in test}) == list(MMLU_SUBJECTS)
    assert sorted(p.stem[len("mmlu_"):] for p in (builtin_dir() / "mmlu" / "default").glob("mmlu_*.yaml")) \
        == list(MMLU_SUBJECTS)
    for subject in MMLU_SUBJECTS:
        ours = local_tasks[f"rp_mmlu_{subject}"]
        rows = [hub_record("mmlu", r) for r in test if r["subject"] == subject]
        shots = [hub_record("mmlu", r) for r in dev if r["subject"] == subject]
        theirs = builtin_task(f"mmlu/default/mmlu_{subject}.yaml", rows, shots)
        ours_hub = hub_mode_task(f"rp_mmlu_{subject}", rows, shots)
        assert len(ours.eval_docs) == len(rows)
        for i in (0, len(rows) - 1):
            expected = rendered(theirs, theirs.eval_docs[i], 5)
            assert rendered(ours, ours.eval_docs[i], 5) == expected, subject
            assert rendered(ours_hub, ours_hub.eval_docs[i], 5) == expected, subject
        assert metric_setup(ours) == metric_setup(theirs) == metric_setup(ours_hub)
    # The literal shape, once: description, five "Answer: X" exemplars, the question.
    args, _ = rendered(local_tasks["rp_mmlu_anatomy"], local_tasks["rp_mmlu_anatomy"].eval_docs[0], 5)
    ctx, first = args[0][0], next(r for r in test if r["subject"] == "anatomy")
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert ctx.count("\nAnswer:") == 6 and ctx.endswith(f"\nD. {first['choices'][3]}\nAnswer:")
    assert [a[1] for a in args] == [" A", " B", " C", " D"]


def test_hellaswag_mirror_differs_from_the_hub_only_in_ctx_b_capitalisation(local_tasks, data_dir):
    """The first validation item as the hub stores it (Rowan/hellaswag, ind 24): lm-eval
    capitalises ctx_b ("he" -> "He"); the mirror joined ctx_a and ctx_b without doing so."""
    hub = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
           "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                       "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"}
    theirs = builtin_task(BUILTIN_YAML["hellaswag"], [hub])
    ours = local_tasks["rp_hellaswag"]
    (their_args, their_gold), (our_args, our_gold) = rendered(theirs, theirs.eval_docs[0], 0), \
        rendered(ours, ours.eval_docs[0], 0)
    assert their_args[0][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert our_args[0][0] == "Roof shingle removal: A man is sitting on a roof. he"
    hub_mode = hub_mode_task("rp_hellaswag", [hub])
    assert rendered(hub_mode, hub_mode.eval_docs[0], 0) == (their_args, their_gold)  # on the hub: identical
    assert [a[1] for a in our_args] == [a[1] for a in their_args] and our_gold == their_gold == 3


def test_task_templates_read_the_same_hub_data_as_the_builtins():
    """Without a data dir our YAMLs load what lm-eval's built-ins load (dataset, config, splits)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert {f"rp_{n}" for n in BUILTIN_YAML} | {f"rp_mmlu_{s}" for s in MMLU_SUBJECTS} <= set(manager.all_subtasks)
    assert "rp_mmlu" in manager.all_groups
    from lm_eval.tasks._yaml_loader import load_yaml

    keys = ("dataset_path", "dataset_name", "training_split", "validation_split", "test_split", "fewshot_split",
            "fewshot_config", "output_type", "target_delimiter", "fewshot_delimiter", "description")
    pairs = [(f"rp_{n}.yaml", rel) for n, rel in BUILTIN_YAML.items()]
    pairs += [(f"rp_mmlu_{s}.yaml", f"mmlu/default/mmlu_{s}.yaml") for s in MMLU_SUBJECTS]
    for ours, theirs in pairs:
        a, b = load_yaml(TASKS_DIR / ours, resolve_func=False), load_yaml(builtin_dir() / theirs, resolve_func=False)
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, ours


def test_limit_draws_a_seeded_sample_across_mmlu_subjects(local_tasks, data_dir):
    from ray_prune.core.evaluation.overlay import local_subtask_sizes as _local_subtask_sizes

    mmlu = {t: len(task.eval_docs) for t, task in local_tasks.items() if t.startswith("rp_mmlu_")}
    # The fast path counts subjects in the Parquet file instead of building 57 tasks: same numbers.
    assert _local_subtask_sizes({"mmlu": 5}, data_dir) == mmlu
    picked = _choose_docs(mmlu, {"mmlu": 5}, 40, seed=1234)
    assert sum(len(v) for v in picked.values()) == 40
    assert len(picked) >= 25  # spread over subjects, not the first 40 of abstract_algebra
    assert all(list(v) == sorted(set(v)) for v in picked.values())
    assert picked == _choose_docs(mmlu, {"mmlu": 5}, 40, seed=1234)
    assert picked != _choose_docs(mmlu, {"mmlu": 5}, 40, seed=1)
    everything = _choose_docs(mmlu, {"mmlu": 5}, None, seed=1234)
    assert len(everything) == 57 and all(v is None for v in everything.values())


# --------------------------------------------------------------------------- running, tiny random models


def test_every_task_runs_on_a_tiny_model(tokenizer, caplog):
    model = tiny_model("llama", num_layers=2)
    lm_eval_logger = logging.getLogger("lm_eval")
    before = lm_eval_logger.level
    with caplog.at_level(logging.INFO):  # root at INFO: lm-eval's own level must hold its chatter back
        scores = evaluate_tasks(model, tokenizer, list(TASKS), limit=4, max_gen_toks=8, progress=False)
    assert not [r for r in caplog.records if r.name.startswith("lm_eval") and r.levelno < logging.ERROR]
    assert lm_eval_logger.level == before  # quieted only for the call
    assert list(scores) == list(TASKS)
    for name, row in scores.items():
        assert row["n"] == 4 and row["shots"] == TASKS[name].shots
        assert set(row) == {"n", "shots"} | {f"{m}{s}" for m in TASKS[name].metrics for s in ("", "_stderr")}
        for m in TASKS[name].metrics:
            assert 0.0 <= row[m] <= 1.0 and row[m] * 4 == round(row[m] * 4)
            assert row[f"{m}_stderr"] >= 0.0
    assert not model.training


def test_random_model_is_near_chance_on_mmlu_and_boolq(tokenizer):
    """A random model answers about the same way whatever the question: it can score anywhere
    between the least and the most frequent gold answer, never much better."""
    model = tiny_model("llama", num_layers=2, seed=1)
    n = 40  # 0-shot MMLU: a random model ignores the exemplars anyway, and prompts are 4x shorter
    scores = evaluate_tasks(model, tokenizer, {"mmlu": 0, "boolq": 0}, limit=n, progress=False)
    for name, (low, high) in {"mmlu": (0.229, 0.269), "boolq": (0.378, 0.622)}.items():
        acc, noise = scores[name]["acc"], 3 * math.sqrt(0.25 / n)
        assert scores[name]["n"] == n
        assert low - noise <= acc <= high + noise, (name, acc)


def test_boolq_accuracy_equals_scoring_by_hand(tokenizer, data_dir):
    """The same questions scored without lm-eval: sum of log-probs of " no" / " yes" after the prompt."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", num_layers=2)
    config.max_position_embeddings = 2048  # no truncation, by lm-eval or us
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    limit = 12
    rows = local_rows(data_dir, "boolq", "validation")
    picks = sorted(random.Random("1234:boolq").sample(range(len(rows)), limit))  # the documented sample
    correct, margins = [], []
    with torch.no_grad():
        for i in picks:
            r = rows[i]
            prompt = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
            context = tokenizer(prompt)["input_ids"]
            lls = []
            for cont in (" no", " yes"):
                whole = tokenizer(prompt + cont)["input_ids"]
                assert whole[:len(context)] == context
                logits = model(torch.tensor([whole])).logits[0, :-1].float().log_softmax(-1)
                targets = torch.tensor(whole[len(context):])
                lls.append(logits[len(context) - 1:].gather(1, targets[:, None]).sum().item())
            correct.append(float(lls.index(max(lls)) == int(r["answer"])))
            margins.append(abs(lls[0] - lls[1]))
    assert min(margins) > 1e-4  # no near-ties that float noise could flip
    scores = evaluate_tasks(model, tokenizer, ["boolq"], limit=limit, batch_size=4, progress=False)
    assert scores["boolq"]["n"] == limit
    assert scores["boolq"]["acc"] == pytest.approx(sum(correct) / limit, abs=1e-12)


def test_peft_wrapped_model_evaluates_like_its_base(tokenizer):
    """A fresh LoRA adapter (B = 0) changes nothing, so the wrapped model must score exactly the same."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", num_layers=2, seed=2)
    plain = evaluate(base, tokenizer, tasks=["boolq"], limit=6, c4_sequences=2, seq_len=64, progress=False)
    wrapped = get_peft_model(base, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    wrapped.eval()
    peft_scores = evaluate(wrapped, tokenizer, tasks=["boolq"], limit=6, c4_sequences=2, seq_len=64,
                           progress=False)
    assert set(peft_scores) == set(plain)
    assert peft_scores["boolq/acc"] == plain["boolq/acc"]
    assert peft_scores["c4/loss"] == pytest.approx(plain["c4/loss"], rel=1e-6)
    for key in ("boolq/acc", "boolq/acc_stderr", "boolq/n", "c4/loss", "c4/loss_norm", "c4/tokens"):
        assert key in plain


def test_4bit_model_evaluates_on_cpu(tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama", num_layers=2, seed=4).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu").eval()
    scores = evaluate(model, tokenizer, tasks=["boolq"], limit=4, c4_sequences=2, seq_len=64, progress=False)
    assert scores["boolq/n"] == 4 and 0 <= scores["boolq/acc"] <= 1
    assert abs(scores["c4/loss_norm"] - 1) < 0.05


# --------------------------------------------------------------------------- C4 loss


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_scores_are_valid_and_its_c4_loss_far_below_chance(smollm2):
    model, tok = smollm2
    # batch_size=1: with 8 questions, one long professional_law prompt would pad a batch of 8 to 1,700 tokens.
    scores = evaluate(model, tok, tasks={"mmlu": 5, "boolq": 0}, limit=8, c4_sequences=2, seq_len=512,
                      batch_size=1, progress=False)
    for name in ("mmlu", "boolq"):
        assert scores[f"{name}/n"] == 8 and 0 <= scores[f"{name}/acc"] <= 1
        assert 0 <= scores[f"{name}/acc_stderr"] <= 0.5 / math.sqrt(7) + 1e-9
    assert scores["c4/loss_norm"] < 0.45
    random_model = tiny_model("llama", num_layers=2)
    random_loss = c4_loss(random_model, tok, num_sequences=2, seq_len=512)
    assert scores["c4/loss_norm"] < random_loss["loss_norm"] - 0.4
