"""Stage 2 spends GPU time once per computation and never waits for a stage 1 it does not need: identical cells
share one trial (each still gets its rows), a model's trials start as soon as its own stage 1 ends, and GPU trials
run one process each."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import faults
from faults import SLOW_ENV
from helpers import save_tiny_models, tiny_model, tiny_spec
from ray_prune.sweep.experiment import parse_experiment


@pytest.fixture(scope="module")
def ray_local():
    yield from faults.local_ray(**{SLOW_ENV: "slow-:45,sleepy-:6"})


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tokenizer):
    root = save_tiny_models(tmp_path_factory.mktemp("models"), ["tiny-llama", "slow-llama", "sleepy-llama"],
                            tokenizer)
    # A model whose blocks 3 and 4 add nothing to the residual stream (their attention and FFN outputs are zero):
    # the most similar block of 2 is then 3-4, which is also the deepest block of 2 (the last layer kept). The
    # similarity and deepest cells at n = 2 compute the same thing.
    model = tiny_model("llama", num_layers=6, seed=3)
    with torch.no_grad():
        for i in (3, 4):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    model.save_pretrained(root / "twin-llama")
    tokenizer.save_pretrained(root / "twin-llama")
    return root


def _run(spec: dict, storage, **kw):
    from ray_prune.sweep.run import run_sweep

    return run_sweep(parse_experiment(spec), storage=str(storage), progress=False, **kw)


def test_identical_cells_share_one_trial_and_each_gets_its_rows(ray_local, models_dir, tmp_path):
    spec = tiny_spec([str(models_dir / "twin-llama")], "twins", fractions=[0.34])  # n = 2 of 6
    df = _run(spec, tmp_path / "store")
    healed = df[df["stage"] == "healed"].set_index("strategy")
    assert list(healed.loc["similarity", "removed_layers"]) == list(healed.loc["deepest", "removed_layers"]) == [3, 4]
    assert healed["cell_id"].nunique() == 2 and healed["computed_by"].notna().sum() == 1
    twin = healed[healed["computed_by"].notna()].iloc[0]
    first = healed[healed["computed_by"].isna()].iloc[0]
    assert twin["computed_by"] == first["cell_id"]
    for col in ("boolq_acc", "c4_loss", "heal_val_loss", "tokens_seen", "adapter"):
        assert twin[col] == first[col], col  # the same computation, written twice
    unhealed = df[df["stage"] == "unhealed"]
    assert len(unhealed) == 2 and unhealed["c4_loss"].nunique() == 1 and unhealed["computed_by"].notna().sum() == 1
    # Every evaluated row keeps its questions, the twin's too, and two rows on the same questions pair up.
    from ray_prune.core.evaluation.paired import paired_difference
    from ray_prune.ledger.questions import load_questions, records_of

    questions = load_questions(str(tmp_path / "store"))
    per_row = questions.groupby(["cell_id", "stage"]).size()
    assert {(c, s) for c, s in per_row.index} == set(zip(df["cell_id"], df["stage"]))
    assert set(per_row) == {3}  # boolq, limit 3
    a = records_of(questions[questions["cell_id"] == first["cell_id"]])
    b = records_of(questions[questions["cell_id"] == twin["cell_id"]])
    same = paired_difference(a, b, "boolq", "acc")
    assert (same.n, same.diff, same.disagree) == (3, 0.0, 0)
    assert same.mean_a == first["boolq_acc"]
    trials = list((tmp_path / "store" / "tune").glob("*/trainable_*"))
    assert len(trials) == 1, trials  # one trial ran
    again = _run(spec, tmp_path / "store")  # and a rerun finds both cells done
    assert len(again) == len(df)


def test_a_models_trials_start_before_another_models_stage1_ends(ray_local, models_dir, tmp_path):
    """``slow-llama``'s stage 1 takes 45 s more: ``tiny-llama``'s trial runs meanwhile (its first row, the unhealed
    evaluation, is written before the slow model's baseline)."""
    spec = tiny_spec([str(models_dir / "slow-llama"), str(models_dir / "tiny-llama")], "staged", fractions=[0.5],
                     strategies=["deepest"])
    df = _run(spec, tmp_path / "store")
    finished = pd.to_datetime(df.set_index(["model", "stage"])["finished_at"])
    fast, slow = str(models_dir / "tiny-llama"), str(models_dir / "slow-llama")
    assert finished[(fast, "unhealed")] < finished[(slow, "baseline")], finished
    assert set(df["status"]) == {"finished"} and len(df) == 6


def test_a_long_first_stage_one_with_no_trial_yet_is_waited_for(ray_local, models_dir, tmp_path, monkeypatch):
    """The only model's stage 1 takes 6 s, and Tune is told to give up on a trial list empty for 1 s (its default
    is a minute: a 70B profile takes hours). Tune would take the empty list for a cluster too small for the trials
    and fail on an IndexError; the sweep waits for its stage 1 instead."""
    from ray_prune.sweep.tune_run import INSUFFICIENT_RESOURCE_GUESSES

    for name in INSUFFICIENT_RESOURCE_GUESSES:
        monkeypatch.setenv(name, "1")
    spec = tiny_spec([str(models_dir / "sleepy-llama")], "sleepy", fractions=[0.5], strategies=["deepest"])
    df = _run(spec, tmp_path / "store")
    assert set(df["status"]) == {"finished"} and len(df) == 3


def test_gpu_trials_run_one_process_each_cpu_trials_reuse_theirs():
    from ray.tune.schedulers import FIFOScheduler

    from ray_prune.sweep.tune_run import tune_config

    exp = parse_experiment(tiny_spec(["smollm2-135m"]))
    assert tune_config(exp, None, FIFOScheduler(), gpus=1.0).reuse_actors is False
    assert tune_config(exp, None, FIFOScheduler(), gpus=0.5).reuse_actors is False
    assert tune_config(exp, None, FIFOScheduler(), gpus=0.0).reuse_actors is True


def test_a_gpu_held_by_another_process_fails_the_trial_with_a_clear_message(monkeypatch):
    """No GPU here: CUDA's two answers are stood in for (a GPU with 30 of 80 GiB in use, which never frees)."""
    from ray_prune.sweep import tune_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (50 * 2**30, 80 * 2**30))
    with pytest.raises(RuntimeError, match=r"GPU 0 \(NVIDIA A100-SXM4-80GB\) has 30.0 of 80 GiB in use"):
        tune_run.wait_for_free_gpus(wait_s=0.1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (79 * 2**30, 80 * 2**30))
    tune_run.wait_for_free_gpus(wait_s=0.1)  # 1 GiB in use (a CUDA context): free enough


def test_every_strategy_and_repair_in_one_grid(ray_local, models_dir, tmp_path):
    """The field's methods in one grid: four ways to choose layers x no repair or the linear one, each scored
    before and after healing; one row per cell and stage, the method in each, nothing run twice on a rerun."""
    spec = tiny_spec([str(models_dir / "tiny-llama")], "methods", fractions=[0.5],
                     strategies=["similarity", "deepest", "block_influence", "greedy"], repairs=["none", "linear"])
    df = _run(spec, tmp_path / "store")
    healed = df[df["stage"] == "healed"]
    assert set(healed["status"]) == {"finished"} and len(healed) == 8
    assert sorted(zip(healed["strategy"], healed["repair"])) == sorted(
        (s, r) for s in ("similarity", "deepest", "block_influence", "greedy") for r in ("none", "linear"))
    unhealed = df[df["stage"] == "unhealed"]
    assert len(unhealed) == 8 and not df.duplicated(["cell_id", "stage"]).any()
    # The linear repair changes what the pruned model computes; no repair leaves it as pruning made it.
    for strategy, g in unhealed.groupby("strategy"):
        losses = g.set_index("repair")["c4_loss"]
        assert losses["linear"] != losses["none"], strategy
    assert healed.loc[healed["repair"] == "linear", "calibration_samples"].notna().all()
    store = tmp_path / "store"
    assert len(list(store.glob("orders/*.json"))) == 1  # the greedy order, once per model
    assert len(list(store.glob("tables/*.parquet"))) == 2  # angular (similarity) and block_influence
    files = sorted((store / "results").rglob("*.parquet"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = _run(spec, store)
    assert len(again) == len(df) and [f.stat().st_mtime_ns for f in files] == stamps
