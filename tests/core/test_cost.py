"""The cost model: FLOPs and tokens of a tiny config against a hand count, the shared-prefix saving against the scorer's
own tree, the measured task lengths against a fresh measurement, the default rates against their published source,
and the probe on CPU (measured, cached, reused)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import save_tiny_models, tiny_config

from ray_prune.core import cost
from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.evaluation.config import EvalConfig, TaskSettings
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.memory import Arch, Workload

# The tiny Llama (helpers.tiny_config): hidden 64, FFN 128, 4 heads of 16, 2 KV heads, vocabulary 49152, untied head.
H, I, V, Q, KV = 64, 128, 49152, 4 * 16, 2 * 16
BLOCK = H * Q + H * KV + H * KV + Q * H + 3 * H * I  # q, k, v, o, gate, up, down: 36,864 weights
HEAD = V * H


def test_forward_and_training_flops_of_a_tiny_config_against_a_hand_count():
    arch = Arch.from_config(tiny_config("llama", 6))
    k, T = 4, 15
    attention = 4 * Q * (T + 1) / 2 * k  # QK^T and AV over (T + 1) / 2 keys on average, causal
    assert cost.forward_flops(arch, k, T) == 2 * k * BLOCK + attention + 2 * HEAD
    assert cost.forward_flops(arch, k, T, head=False) == 2 * k * BLOCK + attention  # the distance table
    lora = k * 8 * ((H + I) + (H + I) + (I + H))  # rank 8 on gate, up, down (the paper's "ffn")
    assert cost.forward_flops(arch, k, T, lora=lora) == 2 * k * BLOCK + attention + 2 * HEAD + 2 * lora
    heal = HealConfig(seq_len=T, rank=8, target="ffn")
    plain = 4 * k * BLOCK + 4 * HEAD + 3 * attention + 6 * lora  # 4N + 3A + 6P
    assert cost.train_flops(arch, k, heal) == plain
    recompute = 2 * k * BLOCK + attention + 2 * lora  # the blocks' forward again, not the head
    assert cost.train_flops(arch, k, HealConfig(seq_len=T, rank=8, gradient_checkpointing=True)) == plain + recompute


def test_sliding_window_blocks_attend_to_at_most_the_window():
    arch = Arch.from_config(tiny_config("mistral", 6))  # a 16-token window on every block
    assert cost.mean_keys(10) == 5.5 and cost.mean_keys(10, 16) == 5.5
    assert cost.mean_keys(48, 16) == (sum(range(1, 17)) + 32 * 16) / 48
    assert cost.attention_flops(arch, 6, 48) == 4 * Q * cost.mean_keys(48, 16) * 6


def test_tokens_of_each_stage_against_a_hand_count():
    arch = Arch.from_config(tiny_config("llama", 6))
    heal = HealConfig(steps=5, batch_size=2, grad_accum=3, seq_len=32, eval_every=2, val_sequences=4)
    train, val = cost.heal_work(arch, 5, heal)
    assert cost.validations(heal) == 3  # steps 2, 4 and the last, 5
    assert (train.kind, train.tokens) == ("train", 5 * 2 * 3 * 32)  # what the rows' tokens_seen records
    assert (val.kind, val.tokens) == ("forward", 3 * 4 * 32)
    assert train.amount == train.tokens * cost.train_flops(arch, 5, heal)
    cal = CalibrationConfig(samples=8, max_length=32)
    table = cost.profile_work(arch, cal)
    assert [(w.kind, w.tokens) for w in table] == [("table", 8 * 32)]  # in full precision, not the scoring one
    block = 2 * BLOCK + 4 * Q * 33 / 2  # one block's FLOPs per token at 32 tokens
    assert table[0].amount == 8 * 32 * 6 * block  # no LM head
    greedy = cost.greedy_work(arch, cal, 2)  # rounds with 6, then 5 blocks: the model once, K(K-1)/2 blocks, K heads
    assert greedy[0].amount == pytest.approx(8 * 32 * ((6 + 15) * block + 6 * 2 * HEAD + (5 + 10) * block
                                                       + 5 * 2 * HEAD))
    repair = cost.repair_work(arch, 4, cal)  # the full model's streams and the pruned one's
    assert repair[0].amount == pytest.approx(8 * 32 * (6 + 4) * block)
    loss_only = cost.evaluation_work(arch, 5, EvalConfig(tasks={}, c4_sequences=3, seq_len=32))
    assert [(w.kind, w.tokens) for w in loss_only] == [("forward", 96)]
    boolq = cost.TASK_TOKENS[("boolq", 0)]
    qa = cost.evaluation_work(arch, 5, EvalConfig(tasks={"boolq": TaskSettings(limit=10)}, c4_sequences=0))
    assert qa[0].kind == "score" and qa[0].tokens == pytest.approx(boolq.tokens(10))
    assert qa[0].amount == pytest.approx(qa[0].tokens * cost.forward_flops(arch, 5, boolq.length, head=False)
                                         + 10 * boolq.scored * 2 * HEAD)  # the head on the scored positions only
    generative = cost.evaluation_work(arch, 5, EvalConfig(tasks={"gsm8k": TaskSettings(limit=2)}, c4_sequences=0,
                                                          max_gen_toks=8))
    prompt = cost.TASK_TOKENS[("gsm8k", 5)].alone
    assert generative[0].tokens == pytest.approx(2 * (prompt + 8))  # the prompts, then 8 generated tokens each


def test_unmeasured_tasks_get_the_stated_fallback():
    tokens, measured = cost.task_tokens("hellaswag", 10)
    assert not measured and tokens.alone == 11 * cost.FALLBACK_TOKENS_PER_SHOT and tokens.scored == 1
    assert cost.task_tokens("boolq", 0)[1]


def test_shared_prefix_saving_matches_the_scorers_own_tree():
    """``TaskTokens.tokens`` for a sample against what ``_contexts`` and ``_clusters`` make of that sample."""
    from ray_prune.core.evaluation.loglikelihood import MIN_SHARED_PREFIX, _clusters, _contexts

    rng = random.Random(0)
    groups, members, prefix, tail = 12, 25, 40, 10  # 12 subjects of 25 questions sharing 40 tokens of exemplars
    contexts = []
    for _ in range(groups):
        head = [rng.randrange(1000, 50000) for _ in range(prefix)]
        contexts += [head + [rng.randrange(1000, 50000) for _ in range(tail)] for _ in range(members)]
    requests = [((str(i), c), ctx, [c]) for i, ctx in enumerate(contexts) for c in (1, 2, 3, 4)]

    def run(sample: list[int]) -> int:
        ctxs = _contexts([requests[4 * i + c] for i in sample for c in range(4)], range(4 * len(sample)))
        clusters, _ = _clusters(ctxs, MIN_SHARED_PREFIX)
        return sum(len(c.tokens) for c in ctxs) - sum((len(cl.members) - 1) * len(cl.prefix) for cl in clusters)

    n = len(contexts)
    whole = run(list(range(n)))
    tt = cost.TaskTokens(questions=n, contexts=n, alone=prefix + tail, full=whole / n, clusters=groups,
                         clustered=n, scored=1, length=prefix + tail)
    assert tt.tokens(n) == pytest.approx(whole) and tt.tokens(1) == pytest.approx(prefix + tail)
    for size in (5, 20, 60, 150):
        measured = sum(run(rng.sample(range(n), size)) for _ in range(200)) / 200
        assert tt.tokens(size) == pytest.approx(measured, rel=0.03), size
    assert tt.tokens(60) < 60 * (prefix + tail)  # sharing saves, ...
    assert tt.tokens(60) > 60 * whole / n  # ... less than in the whole split


def test_stored_task_tokens_match_a_fresh_measurement(tokenizer, data_dir):
    """WinoGrande (two contexts per question, shared prefixes) measured again as TASK_TOKENS was."""
    from helpers import tiny_model
    from lm_eval.models.huggingface import HFLM

    from ray_prune.core.evaluation.harness import _quiet_lm_eval
    from ray_prune.core.evaluation.loglikelihood import MIN_SHARED_PREFIX, _clusters, _contexts
    from ray_prune.core.evaluation.overlay import load_tasks

    with _quiet_lm_eval():
        _, loaded = load_tasks({"winogrande": 0}, data_dir)
        instances = []
        for task in loaded.values():
            task.set_fewshot_seed(1234)
            task.build_all_requests(limit=None, rank=0, world_size=1)
            instances += task.instances
    captured: list = []

    class Capture(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            captured.extend(requests)
            return [(0.0, False)] * len(requests)

    Capture(pretrained=tiny_model("llama", 1), tokenizer=tokenizer, batch_size=1).loglikelihood(instances,
                                                                                               disable_tqdm=True)
    contexts = _contexts(captured, range(len(captured)))
    clusters, _ = _clusters(contexts, MIN_SHARED_PREFIX)
    questions = len({(i.task_name, i.doc_id) for i in instances})
    alone = sum(len(c.tokens) + sum(len(r.tokens) for r in c.rows) for c in contexts)
    full = alone - sum((len(cl.members) - 1) * len(cl.prefix) for cl in clusters)
    stored = cost.TASK_TOKENS[("winogrande", 0)]
    assert (stored.questions, stored.contexts, stored.clusters) == (questions, len(contexts), len(clusters))
    assert stored.alone == pytest.approx(alone / questions, rel=1e-3)
    assert stored.full == pytest.approx(full / questions, rel=1e-3)


def test_default_rates_derive_from_the_published_run():
    # Llama-2-7B (32 blocks, hidden 4096, FFN 11008, vocabulary 32000) at 1024 tokens, LoRA rank 8 on every linear,
    # gradient checkpointing on
    blocks = 2 * 32 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) / 32
    head = 2 * 32000 * 4096
    attention = 4 * 4096 * 1025 / 2 * 32
    lora = 32 * 8 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    per_token = 2 * (blocks + head) + 3 * attention + 6 * lora + blocks + attention + 2 * lora
    assert cost.published_utilisation() == pytest.approx(2415 * per_token / 312e12, rel=1e-9)
    assert 0.28 < cost.published_utilisation() < 0.35
    a100, h100 = cost.default_rates("a100-80gb"), cost.default_rates("h100")
    assert h100.rates["train"] / a100.rates["train"] == pytest.approx(989 / 312)
    assert a100.rates["load"] == h100.rates["load"] == 0.25e9
    assert "LLaMA-Factory" in a100.sources["train"] and not a100.measured
    assert cost.gpu_type_for(40) == "a100-40gb" and cost.gpu_type_for(80) == "a100-80gb"
    assert cost.gpu_type_for(141) == "h200" and cost.gpu_type_for(24) is None
    with pytest.raises(Exception, match="unknown GPU type"):
        cost.default_rates("v100")


def test_a_model_cost_counts_stages_gpus_and_hours():
    arch = Arch.from_config(tiny_config("llama", 6))
    heal = HealConfig(steps=4, batch_size=2, seq_len=32, eval_every=2, val_sequences=2, quantize="none")
    w = Workload(calibration=CalibrationConfig(samples=8, max_length=32),
                 evaluation=EvalConfig(tasks={"boolq": TaskSettings(limit=3)}, c4_sequences=2, seq_len=32),
                 heal=(heal,), eval_precision="full")
    trials = [cost.TrialWork(6, heal), cost.TrialWork(4, heal, "loss"), cost.TrialWork(4, heal, False, loads=2)]
    rates = cost.default_rates("a100-80gb")
    c = cost.model_cost("tiny", arch, w, trials, rates, profile_gpus=1, trial_gpus=2)
    assert [s.stage for s in c.stages] == ["profile", "baseline", "load", "unhealed", "heal", "healed"]
    assert c.stage("load").runs == 4 and c.stage("unhealed").runs == 1 and c.stage("heal").runs == 3
    assert c.stage("unhealed").kinds == ("forward",)  # eval.unhealed: loss scores the C4 loss only
    assert c.stage("heal").gpus == 2 and c.stage("profile").gpus == 1
    heal_seconds = sum(rates.seconds(x) for k in (6, 4, 4) for x in cost.heal_work(arch, k, heal))
    assert c.stage("heal").seconds(rates) == pytest.approx(heal_seconds)
    assert c.stage("heal").device_hours(rates) == pytest.approx(2 * heal_seconds / 3600)  # GPUs x hours
    assert c.device_hours == pytest.approx(sum(s.device_hours(rates) for s in c.stages))
    text = cost.format_cost_table([c], price_per_gpu_hour=2.0)
    total = float(text.split("sweep total: ")[1].split(" device-hours")[0])
    assert "tiny" in text and total == pytest.approx(c.device_hours, rel=1e-2) and "at 2 per GPU-hour" in text


# --------------------------------------------------------------------------- the probe


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_PRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_workload() -> Workload:
    heal = HealConfig(steps=4, batch_size=2, seq_len=32, eval_every=2, val_sequences=2, quantize="none", dtype="fp32")
    return Workload(dtype="fp32", evaluation=EvalConfig(tasks={"boolq": TaskSettings(limit=3)}, c4_sequences=2,
                                                        seq_len=32, batch_size=2), heal=(heal,))


def test_the_probe_measures_on_cpu_caches_and_is_reused(tmp_path, cache, tokenizer, monkeypatch):
    from ray_prune.core import models, probe

    save_tiny_models(tmp_path, ["tiny-llama"], tokenizer)
    name = str(tmp_path / "tiny-llama")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = probe.probe(name, _tiny_workload(), device="cpu")
    finally:
        torch.set_num_threads(before)
    assert set(first.rates) == set(cost.KINDS) and all(v > 0 for v in first.rates.values())
    assert first.precision == "none+fp32" and first.device.startswith("cpu") and not first.cached
    stored = json.loads(open(first.path).read())
    assert first.path.startswith(str(cache / "probes")) and stored["rates"] == first.rates
    assert 1e6 < first.rates["forward"] < 1e14  # FLOP/s a CPU core can do

    def no_load(*args, **kwargs):
        raise AssertionError("a cached probe loads no model")

    monkeypatch.setattr(models, "load_model", no_load)
    torch.set_num_threads(1)
    try:
        again = probe.probe(name, _tiny_workload(), device="cpu")
    finally:
        torch.set_num_threads(before)
    assert again.cached and again.rates == first.rates and again.measured_at == first.measured_at
    rates = cost.default_rates().with_measured(again.rates, again.device, again.how)
    assert rates.measured == frozenset(cost.KINDS) and rates.source(["train", "forward"]) == "measured"
    assert "measured" in rates.sources["train"]


def test_the_probe_refuses_a_model_whose_weights_are_not_here(cache):
    from ray_prune.core import probe
    from ray_prune.errors import UserError

    assert probe.weights_here("smollm2-135m")  # bundled
    with pytest.raises(UserError, match="not on this machine"):  # never a 13 GB download from a --check
        probe.probe("meta-llama/Llama-2-7b-hf", _tiny_workload(), device="cpu")
