"""The memory plan of whole experiment files: every model planned from its config alone (shipped configs offline),
printed by ``ray-prune sweep --check``, refused when nothing fits; each config read once per ``--check``."""

from __future__ import annotations

from helpers import REPO

from ray_prune.core.memory import format_plan_table
from ray_prune.sweep.experiment import load_experiment
from ray_prune.sweep.memory_plan import plan_models
from ray_prune.sweep.plan import read_model

LLAMA_7B = "meta-llama/Llama-2-7b-hf"
LLAMA_70B = "meta-llama/Llama-2-70b-hf"


def _plans(name: str):
    exp = load_experiment(REPO / "experiments" / name)
    return plan_models(exp, {m.name: read_model(m) for m in exp.models}, 80, 8)


def test_plan_of_an_experiment_file_reads_shipped_configs_and_prints_a_table():
    plans = _plans("paper_llama2.yaml")
    assert [p.model for p in plans] == [LLAMA_7B, "meta-llama/Llama-2-13b-hf", LLAMA_70B]
    assert all(p.n_removed == 0 for p in plans)  # fractions start at 0: the unpruned model is the worst cell
    table = format_plan_table(plans)
    header = table.splitlines()[0].split()
    assert header[:4] == ["model", "stage", "precision", "GPUs"] and header[-1] == "fits"
    assert len([line for line in table.splitlines() if line.startswith("meta-llama/")]) == 12
    smoke = _plans("smoke.yaml")
    assert all(p.fits and p.config_source == "bundled" for p in smoke)


def test_check_reads_each_config_once_with_the_hub_unreachable(monkeypatch, tmp_path, capsys):
    """``sweep --check`` of the cross-model grid: one config read per model, none of them from the network."""
    import collections

    import transformers

    from ray_prune.cli import main
    from ray_prune.core import model_configs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_PRUNE_DATA_DIR", raising=False)  # a cluster experiment: hub data, not checked here
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: any hub call would fail
    loads, files = collections.Counter(), []
    real_load, real_read = model_configs.load_config, transformers.AutoConfig.from_pretrained.__func__

    def counting_load(name, *args, **kwargs):
        loads[name] += 1
        return real_load(name, *args, **kwargs)

    def counting_read(cls, name, *args, **kwargs):
        files.append(str(name))
        return real_read(cls, name, *args, **kwargs)

    monkeypatch.setattr(model_configs, "load_config", counting_load)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(counting_read))
    exp = load_experiment(REPO / "experiments" / "cross_model.yaml")
    assert main(["sweep", str(REPO / "experiments" / "cross_model.yaml"), "--check", "--gpu-memory-gb", "80",
                 "--storage", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "(shipped)" in out
    hub_ids = [m.name for m in exp.models]
    assert loads == {m: 1 for m in hub_ids}
    # Each load is one attempt at the (offline) hub cache, then the shipped file: two file reads, nothing more.
    assert sorted(files) == sorted(hub_ids + [str(model_configs.SHIPPED_DIR / f"{m.replace('/', '--')}.json")
                                              for m in hub_ids])


def test_check_of_paper_llama2_at_40gb_prints_the_adjusted_plan_then_refuses_the_70b_heal(monkeypatch, tmp_path,
                                                                                          capsys):
    from ray_prune.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_PRUNE_DATA_DIR", raising=False)
    paper = str(REPO / "experiments" / "paper_llama2.yaml")
    assert main(["sweep", paper, "--check", "--gpu-memory-gb", "40", "--storage", str(tmp_path / "s")]) == 2
    captured = capsys.readouterr()
    memory = captured.out.split("cost plan")[0]
    rows = {tuple(line.split()[:2]): line for line in memory.splitlines() if line.startswith("meta-llama/")}
    assert "heal: {batch_size: 2, grad_accum: 8}" in rows[("meta-llama/Llama-2-13b-hf", "heal")]
    assert "eval: {batch_size:" in rows[(LLAMA_7B, "unhealed")]
    assert "no (+" in rows[(LLAMA_70B, "heal")]
    assert "cost plan" in captured.out and "sweep total:" in captured.out  # printed before the refusal
    assert f"{LLAMA_70B}: the heal stage fits no 40 GB GPU" in captured.err and "GiB more than" in captured.err
    plans = {p.model: p for p in plan_models(load_experiment(paper), {m.name: read_model(m) for m in
                                                                      load_experiment(paper).models}, 40, 8)}
    assert plans["meta-llama/Llama-2-13b-hf"].adjustments["heal"] == {"batch_size": 2, "grad_accum": 8}
    assert not plans[LLAMA_70B].fits and plans[LLAMA_7B].fits


def test_the_plans_adjustments_reach_the_trials_without_renaming_the_cells():
    """At 40 GB the plan heals 13B in micro-batches (same sequences per step) and scores in smaller batches; the
    trial runs with those, the cell keeps its id, and its rows record what ran."""
    from ray_prune.sweep.grid import expand
    from ray_prune.sweep.run import adjusted

    exp = load_experiment(REPO / "experiments" / "paper_llama2.yaml")
    models = {m.name: read_model(m) for m in exp.models}
    plans = {p.model: p for p in plan_models(exp, models, 40, 8)}
    adj = plans["meta-llama/Llama-2-13b-hf"].adjustments
    assert adj["heal"]["batch_size"] < 16 and adj["eval"]["batch_size"] < exp.eval.batch_size
    cell = next(c for c in expand(exp, {k: m.num_layers for k, m in models.items()})
                if c.model == "meta-llama/Llama-2-13b-hf" and c.n > 0)
    ran = adjusted(cell, adj)
    assert ran.cell_id == cell.cell_id
    assert ran.heal["batch_size"] * ran.heal["grad_accum"] == cell.heal["batch_size"] * cell.heal["grad_accum"]
    assert ran.heal["batch_size"] == adj["heal"]["batch_size"] and ran.eval["batch_size"] == adj["eval"]["batch_size"]
    assert adjusted(cell, {}) is cell
