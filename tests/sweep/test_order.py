"""Trials start longest first, by a cost read from the models' configs (no weights load)."""

from __future__ import annotations

from dataclasses import replace

from helpers import REPO
from ray_prune.sweep.experiment import load_experiment
from ray_prune.sweep.grid import expand
from ray_prune.sweep.order import longest_first, trial_cost
from ray_prune.sweep.plan import read_model
from ray_prune.sweep.trial import TrialSpec


MODELS = None


def _models() -> dict:
    global MODELS
    if MODELS is None:
        exp = load_experiment(str(REPO / "experiments" / "study.yaml"))
        MODELS = {m.name: read_model(m) for m in exp.models}
    return MODELS


def _study_specs() -> list[TrialSpec]:
    exp = load_experiment(str(REPO / "experiments" / "study.yaml"))
    cells = expand(exp, {name: m.num_layers for name, m in _models().items()})
    return [TrialSpec(cell=c, storage_uri="unused", data_dir=None, threads=1, baseline_loss=None,
                      reference_loss=None, do_unhealed=c.owns_unhealed) for c in cells]


def test_larger_model_and_fewer_removed_layers_start_first():
    specs = _study_specs()
    models = [s.cell.model for s in specs]
    assert models.index("gemma3-270m") > models.index("smollm2-135m")  # the grid lists SmolLM2 first
    ordered = longest_first(specs, _models())
    names = [s.cell.model for s in ordered]
    # Gemma-3-270M costs about twice SmolLM2-135M per token (its 262k-token LM head): all its cells go first.
    assert names == ["gemma3-270m"] * names.count("gemma3-270m") + ["smollm2-135m"] * names.count("smollm2-135m")
    for model in ("gemma3-270m", "smollm2-135m"):
        ns = [s.cell.n for s in ordered if s.cell.model == model]
        assert ns == sorted(ns), ns
    assert sorted(map(id, ordered)) == sorted(map(id, specs))  # a permutation: nothing dropped or repeated


def test_ties_keep_the_grid_order_and_costs_grow_with_work():
    specs = _study_specs()
    ordered = longest_first(specs, _models())
    for a, b in zip(ordered, ordered[1:]):
        cost_a = trial_cost(a.cell, a.do_unhealed, _models()[a.cell.model])
        if cost_a == trial_cost(b.cell, b.do_unhealed, _models()[b.cell.model]):
            assert specs.index(a) < specs.index(b)
    cell = specs[0].cell
    longer = replace(cell, heal={**cell.heal, "steps": cell.heal["steps"] * 10})
    assert trial_cost(longer, False) > trial_cost(cell, False)
    assert trial_cost(replace(cell, heal={**cell.heal, "enabled": False}), False) == 0.0
    assert trial_cost(cell, True) > trial_cost(cell, False)  # owning the unhealed row adds its evaluation


def test_a_model_whose_config_cannot_be_read_still_orders_by_kept_layers(tmp_path):
    cell = _study_specs()[0].cell
    a = replace(cell, model=str(tmp_path / "missing"), n=0)
    b = replace(a, n=10)
    assert trial_cost(a, False) > trial_cost(b, False) > 0
