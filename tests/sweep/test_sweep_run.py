"""Sweeps on real local Ray with a tiny real model: grid, ledger, resume, extension, failures, ASHA.

One Ray instance serves the whole module (ray.init costs ~5 s on 2 cores).
The model is a random-init 6-layer Llama saved as an ordinary HF directory with
SmolLM2's tokenizer, so trials spend their time in Ray and our code, not in
matmuls.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from helpers import save_tiny_models, tiny_spec
from ray_prune.errors import UserError
from ray_prune.sweep.experiment import parse_experiment
import faults
from faults import FAULT_ENV

FAULTY = "faulty"  # any model path containing this raises in the heal stage (tests/faults.py)
SENTINEL = "hf_SENTINEL-not-a-real-token-4f2a9c"  # a fake HF_TOKEN that must never reach storage
# Fake credentials that must reach no file the sweep writes or makes Ray write (Tune hands AWS variables to its
# trainables' runtime environments, which Ray logs, unless the sweep keeps them out).
SECRETS = {"HF_TOKEN": SENTINEL, "AWS_ACCESS_KEY_ID": "SENTINELKEYID4F2A9C00",
           "AWS_SECRET_ACCESS_KEY": "sentinel/secret+not-a-real-key-7d1e", "AWS_SESSION_TOKEN": "sentinel-session-9b3"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("models"), ["tiny-llama", f"tiny-{FAULTY}", "tiny-other"],
                            tokenizer)


@pytest.fixture(scope="module")
def ray_local():
    yield from faults.local_ray(**{FAULT_ENV: f"{FAULTY}:heal", **SECRETS})


def _experiment(models_dir, name="grid", **over):
    over.setdefault("models", [str(models_dir / "tiny-llama")])
    return parse_experiment(tiny_spec(name=name, **over))


def _run(exp, storage, **kw):
    from ray_prune.sweep.run import run_sweep

    return run_sweep(exp, storage=str(storage), progress=False, **kw)


def test_grid_runs_resumes_and_extends(ray_local, models_dir, tmp_path):
    storage = tmp_path / "store"
    df = _run(_experiment(models_dir), storage)
    healed = df[df["stage"] == "healed"]
    assert len(healed) == 4 and set(healed["status"]) == {"finished"}
    assert sorted(zip(healed["strategy"], healed["n"])) == [("deepest", 1), ("deepest", 3),
                                                            ("similarity", 1), ("similarity", 3)]
    assert len(df[df["stage"] == "unhealed"]) == 4 and len(df[df["stage"] == "baseline"]) == 1
    deep3 = healed[(healed["strategy"] == "deepest") & (healed["n"] == 3)].iloc[0]
    assert list(deep3["removed_layers"]) == [2, 3, 4]  # the final layer (5) is kept
    for col in ("boolq_acc", "boolq_acc_stderr", "c4_loss", "c4_loss_norm", "tokens_seen", "wall_s", "loss_ratio"):
        assert healed[col].notna().all(), col
    assert (healed["tokens_seen"] == 4 * 2 * 32).all()
    assert len(list((storage / "tables").glob("*.parquet"))) == 1
    # Each cell's pruning as a mergekit passthrough config: the kept layers are exactly the row's complement.
    import yaml

    configs = sorted((storage / "mergekit").rglob("*.yaml"))
    assert len(configs) == 4
    for _, row in healed.iterrows():
        config = yaml.safe_load(next(p for p in configs if p.stem == row["cell_id"]).read_text())
        kept = [i for s in config["slices"] for i in range(*s["sources"][0]["layer_range"])]
        assert kept == [i for i in range(6) if i not in set(row["removed_layers"])]

    # Round trip through pandas, and a rerun that finds everything done adds nothing.
    files = sorted((storage / "results").rglob("*.parquet"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = _run(_experiment(models_dir), storage)
    assert sorted((storage / "results").rglob("*.parquet")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert len(again) == len(df) and not again.duplicated(["cell_id", "stage"]).any()

    # One more fraction: only its two cells (and their unhealed rows) run.
    more = _run(_experiment(models_dir, fractions=[0.2, 0.5, 0.7]), storage)
    assert len(more[more["stage"] == "healed"]) == 6
    assert sorted(more[more["n"] == 4]["stage"]) == ["healed", "healed", "unhealed", "unhealed"]
    assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing old was rewritten
    assert not more.duplicated(["cell_id", "stage"]).any()

    # The secrets in the environment reach no result, table, Tune state, log or checkpoint, nor Ray's session logs.
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path())
    assert list(logs.rglob("runtime_env*.log")) or list(logs.rglob("*.log")), "no Ray session logs found"
    for root in (storage, logs):
        leaked = [(p, k) for p in root.rglob("*") if p.is_file() for k, v in SECRETS.items()
                  if v.encode() in p.read_bytes()]
        assert not leaked, leaked


def test_failing_trial_is_retried_then_recorded(ray_local, models_dir, tmp_path):
    exp = _experiment(models_dir, name="faults", models=[str(models_dir / "tiny-llama"),
                                                         str(models_dir / f"tiny-{FAULTY}")],
                      fractions=[0.5], strategies=["deepest"])
    df = _run(exp, tmp_path / "s")
    healed = df[df["stage"] == "healed"].set_index("model")
    good = healed.loc[str(models_dir / "tiny-llama")]
    bad = healed.loc[str(models_dir / f"tiny-{FAULTY}")]
    assert good["status"] == "finished"
    assert bad["status"] == "failed" and "injected fault" in bad["error"]
    assert bad["attempts"] == 2  # the first try and max_failures=1 retry
    # The unhealed stage of the failing cell finished before the fault and is kept.
    assert len(df[(df["stage"] == "unhealed") & (df["model"] == str(models_dir / f"tiny-{FAULTY}"))]) == 1


def test_asha_stops_weak_heal_settings(ray_local, models_dir, tmp_path):
    """Four learning rates compete for one pruned model; a second model with one bad setting is never stopped,
    because ASHA ranks heal settings only within the same pruned model."""
    heal = {"steps": 8, "batch_size": 2, "seq_len": 32, "warmup_steps": 0, "eval_every": 1, "val_sequences": 2,
            "quantize": "none", "lr": [3e-2, 1e-9, 2e-9, 3e-9]}
    lone = {"name": str(models_dir / "tiny-other"), "heal": {"lr": 1e-9}}
    exp = _experiment(models_dir, name="asha", fractions=[0.5], strategies=["deepest"], heal=heal,
                      models=[str(models_dir / "tiny-llama"), lone],
                      scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                      eval={"tasks": {}, "c4_sequences": 0, "seq_len": 32, "batch_size": 4, "unhealed": False},
                      resources={"cpus_per_trial": 2, "max_failures": 0})
    df = _run(exp, tmp_path / "s")
    alone = df[(df["stage"] == "healed") & (df["model"] == lone["name"])]
    assert len(alone) == 1 and alone["status"].iloc[0] == "finished"
    healed = df[(df["stage"] == "healed") & (df["model"] == str(models_dir / "tiny-llama"))]
    assert len(healed) == 4
    assert (healed["status"] == "stopped").sum() >= 1
    best = healed.loc[healed["heal_lr"].idxmax()]
    assert best["status"] == "finished"
    stopped = healed[healed["status"] == "stopped"]
    assert (stopped["steps_done"] < 8).all()


def test_gpu_request_on_a_cpu_cluster_is_refused(ray_local, models_dir, tmp_path):
    exp = _experiment(models_dir, name="gpu", resources={"gpus_per_trial": 1})
    with pytest.raises(UserError, match="wait forever"):
        _run(exp, tmp_path / "s")
    assert not list((tmp_path / "s").rglob("*.parquet"))


def test_storage_of_another_experiment_is_refused(ray_local, models_dir, tmp_path):
    from ray_prune.ledger.rows import save_experiment_record
    from ray_prune.ledger.storage import Storage

    save_experiment_record(Storage(str(tmp_path / "s")), "someone-else", {})
    with pytest.raises(UserError, match="holds results of experiment 'someone-else'"):
        _run(_experiment(models_dir), tmp_path / "s")


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_eval_of_a_sweep_adapter_gives_the_sweeps_numbers(ray_local, models_dir, tmp_path, quantize):
    """A QLoRA cell's healed row is the NF4 base with the adapter unmerged; `ray-prune eval --adapter` on the
    adapter the sweep stored, from the unpruned model, rebuilds exactly that model and gives the same scores.

    In full precision they are equal to the last bit. On an NF4 base on a CPU they agree to 1e-5: bitsandbytes'
    CPU 4-bit matmul repacks a weight for inference the first time the layer runs in eval mode, and the trial
    ran its unhealed evaluation and its training before the healed one, the CLI nothing."""
    import json

    from ray_prune.cli import main

    base = tiny_spec()
    exp = _experiment(models_dir, name=f"adapter-{quantize}", fractions=[0.5], strategies=["deepest"],
                      heal={**base["heal"], "quantize": quantize})
    storage = tmp_path / "s"
    df = _run(exp, storage)
    row = df[df["stage"] == "healed"].iloc[0]
    unhealed = df[df["stage"] == "unhealed"].iloc[0]
    baseline = df[df["stage"] == "baseline"].iloc[0]
    label = "nf4+fp32" if quantize == "nf4" else "fp32"
    assert row["status"] == "finished" and row["eval_precision"] == label
    assert unhealed["eval_precision"] == baseline["eval_precision"] == label  # like for like within the cell
    out = tmp_path / "scores.json"
    ev = exp.eval
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial ran: CPU matmuls sum in another order with another thread count
    assert main(["eval", str(models_dir / "tiny-llama"), "--adapter", str(storage / row["adapter"]),
                 "--tasks", "boolq", "--limit", str(ev.tasks["boolq"].limit), "--c4-sequences", str(ev.c4_sequences),
                 "--seq-len", str(ev.seq_len), "--batch-size", str(ev.batch_size), "--out", str(out),
                 "--quiet"]) == 0
    torch.set_num_threads(threads)
    scores = json.loads(out.read_text())
    assert scores["c4/loss"] == pytest.approx(row["c4_loss"], rel=1e-5 if quantize == "nf4" else 1e-12)
    assert scores["boolq/acc"] == row["boolq_acc"]


def test_unhealed_loss_scores_the_pruned_model_on_c4_only(ray_local, models_dir, tmp_path):
    """`eval.unhealed: loss`: the unhealed row carries the C4 loss and no task score; the healed row has both."""
    exp = _experiment(models_dir, name="unhealed-loss", fractions=[0.5], strategies=["deepest"],
                      eval={**tiny_spec()["eval"], "unhealed": "loss"})
    df = _run(exp, tmp_path / "s")
    unhealed = df[df["stage"] == "unhealed"].iloc[0]
    healed = df[df["stage"] == "healed"].iloc[0]
    assert unhealed["status"] == healed["status"] == "finished"
    assert pd.isna(unhealed["boolq_acc"]) and pd.notna(healed["boolq_acc"])
    # The unhealed loss is the pruned model's, computed directly here on the same held-out blocks.
    from ray_prune.core.loss import c4_loss
    from ray_prune.core.models import load_model
    from ray_prune.core.prune import prune_layers

    model, tok = load_model(unhealed["model"], dtype="fp32")
    prune_layers(model, list(unhealed["removed_layers"]))
    ev = exp.eval.config()
    direct = c4_loss(model, tok, num_sequences=ev.c4_sequences, seq_len=ev.seq_len, batch_size=ev.batch_size)
    assert unhealed["c4_loss"] == pytest.approx(direct["loss"], rel=1e-9)
    # The healed accuracy is a share of the questions it was asked.
    assert healed["boolq_n"] == ev.limits()["boolq"]
    assert healed["boolq_acc"] * healed["boolq_n"] == pytest.approx(round(healed["boolq_acc"] * healed["boolq_n"]))
