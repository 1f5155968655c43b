"""The cost plan of experiment files: cells counted as the grid runs them, ``sweep --check`` printing device-hours per
model and for the sweep offline, the GPU type and price, and measured rates where ``--probe`` measured them."""

from __future__ import annotations

import re

import pytest
from helpers import REPO, save_tiny_models, tiny_spec

from ray_prune.core import cost
from ray_prune.sweep.cost_plan import plan_costs, trial_work
from ray_prune.sweep.experiment import parse_experiment
from ray_prune.sweep.plan import plan

SMOL = "smollm2-135m"  # 30 layers: fraction 0.1 and 0.11 both remove n = 3


def _plan(tmp_path, **over):
    spec = tiny_spec([SMOL], name="costs", **{"fractions": [0.0, 0.1, 0.11], "strategies": ["similarity", "deepest"],
                                             **over})
    return plan(parse_experiment(spec), str(tmp_path / "store"), check=True)


def test_cells_are_counted_as_the_grid_runs_them(tmp_path):
    p = _plan(tmp_path, eval={"tasks": {"boolq": {"limit": 3}}, "unhealed": "loss", "c4_sequences": 2,
                              "seq_len": 32, "batch_size": 4})
    exp = p.experiment
    assert sorted((c.n, c.strategy) for c in p.cells) == [(0, "none"), (3, "deepest"), (3, "similarity")]
    costs = plan_costs(p, "a100-80gb").costs
    assert len(costs) == 1 and costs[0].cells == 3
    c = costs[0]
    assert c.stage("heal").runs == 3 and c.stage("healed").runs == 3
    assert c.stage("unhealed").runs == 2  # one per pruned model; fraction 0's unhealed row is the baseline
    assert c.stage("unhealed").kinds == ("forward",)  # unhealed: loss, the C4 loss only
    assert c.stage("unhealed").tokens == 2 * 2 * 32
    assert c.stage("baseline").runs == 1 and "score" in c.stage("baseline").kinds
    tables = [w for w in c.stage("profile").work if w.kind == "table"]  # one distance table, for the similarity cell
    assert [w.tokens for w in tables] == [exp.calibration.samples * exp.calibration.max_length]
    arch = p.models[SMOL].arch
    kept = sorted(trial_work(exp, cell).kept for cell in p.cells)
    assert kept == [27, 27, 30]
    heal = p.cells[0].heal_config()
    expected = sum(x.amount for k in kept for x in cost.heal_work(arch, k, heal))
    assert c.stage("heal").flops == pytest.approx(expected)  # each cell with its own kept blocks
    assert c.stage("heal").flops < 3 * sum(x.amount for x in cost.heal_work(arch, 30, heal))
    none = plan_costs(_plan(tmp_path / "b", eval={"tasks": {"boolq": {"limit": 3}}, "unhealed": False}),
                      "a100-80gb").costs[0]
    assert none.stage("unhealed") is None
    every = plan_costs(_plan(tmp_path / "c", eval={"tasks": {"boolq": {"limit": 3}}, "unhealed": True}),
                       "a100-80gb").costs[0]
    assert "score" in every.stage("unhealed").kinds and every.stage("unhealed").runs == 2


def test_stage1_and_repairs_are_counted_as_the_sweep_runs_them(tmp_path):
    from ray_prune.sweep.cost_plan import stage1_work

    p = _plan(tmp_path, strategies=["greedy", "similarity", "deepest"], fractions=[0.0, 0.1, 0.2],
              repairs=["none", "linear"])
    exp = p.experiment
    work = sorted((w.kind, w.rounds) for w in stage1_work(p.cells))
    assert work == [("order", 6), ("table", 0)]  # one greedy order as deep as its deepest cell (0.2 x 30), one table
    repaired = [trial_work(exp, c) for c in p.cells if c.repair != "none"]
    assert repaired and all(t.repair is not None and t.loads == 1 for t in repaired)  # quantize none: no NF4 reload
    c = plan_costs(p, "a100-80gb").costs[0]
    assert any(w.what.startswith("repair") for w in c.stage("load").work)
    assert any(w.what.startswith("greedy") for w in c.stage("profile").work)


def _hours(out: str) -> dict[str, float]:
    """Per model: the device-hours of its total row."""
    found = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+)\s+total\s+\d+ cells\s+([\d.,e+-]+)\s*$", line)
        if m:
            found[m.group(1)] = float(m.group(2).replace(",", ""))
    return found


def test_check_of_paper_llama2_prints_device_hours_per_model_and_in_total_offline(monkeypatch, tmp_path, capsys):
    from ray_prune.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_PRUNE_DATA_DIR", raising=False)  # a hub-data experiment: its data is not checked here
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: any hub call would fail
    paper = str(REPO / "experiments" / "paper_llama2.yaml")
    assert main(["sweep", paper, "--check", "--storage", str(tmp_path / "a"), "--price-per-gpu-hour", "2"]) == 0
    out = capsys.readouterr().out
    hours = _hours(out)
    assert list(hours) == ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf"]
    assert hours["meta-llama/Llama-2-7b-hf"] < hours["meta-llama/Llama-2-13b-hf"] < hours["meta-llama/Llama-2-70b-hf"]
    total = float(re.search(r"sweep total: ([\d.,e+-]+) device-hours on a100-80gb, ([\d,]+) at 2 per GPU-hour",
                            out).group(1).replace(",", ""))
    assert total == pytest.approx(sum(hours.values()), rel=2e-3)
    price = float(re.search(r"device-hours on a100-80gb, ([\d,]+) at 2", out).group(1).replace(",", ""))
    assert price == pytest.approx(2 * total, rel=2e-3)
    assert "LLaMA-Factory" in out and "312 TFLOP/s" in out and "default" in out
    assert "fallback" not in out  # MMLU 5-shot and BoolQ 0-shot have measured lengths

    assert main(["sweep", paper, "--check", "--storage", str(tmp_path / "b"), "--gpu-type", "h100"]) == 0
    h100 = _hours(capsys.readouterr().out)
    for model, h in h100.items():  # 989 against 312 TFLOP/s for the FLOPs; loads take as long
        assert hours[model] * 312 / 989 < h < hours[model] * 0.4


def test_probed_rates_price_the_plan_and_say_so(tmp_path, tokenizer, monkeypatch):
    import torch

    monkeypatch.setenv("RAY_PRUNE_CACHE", str(tmp_path / "cache"))
    save_tiny_models(tmp_path, ["tiny-llama"], tokenizer)
    spec = tiny_spec([str(tmp_path / "tiny-llama")], name="probed")
    p = plan(parse_experiment(spec), str(tmp_path / "store"), check=True)
    threads = torch.get_num_threads()
    measured = plan_costs(p, "a100-80gb", probe=True)
    assert torch.get_num_threads() == threads  # the trials' threads only while probing
    c = measured.costs[0]
    assert c.rates.measured == frozenset(cost.KINDS) and c.rates.device.startswith("cpu")
    assert all(c.rates.source(s.kinds) == "measured" for s in c.stages)
    assert any("measured and cached" in n for n in measured.notes)
    again = plan_costs(p, "a100-80gb", probe=True)
    assert any("read from" in n for n in again.notes) and again.costs[0].rates.rates == c.rates.rates
    default = plan_costs(p, "a100-80gb").costs[0]
    assert default.device_hours < c.device_hours  # a CPU core is slower than an A100
    text = cost.format_cost_table(measured.costs)
    assert "measured" in text and "device-hours on cpu" in text
