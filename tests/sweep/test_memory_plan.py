"""The memory plan of whole experiment files: every model planned from its config alone (shipped configs offline),
printed by ``ray-prune sweep --check``, refused when nothing fits."""

from __future__ import annotations

from ray_prune.core.memory import format_plan_table
from ray_prune.sweep.memory_plan import plan_models

LLAMA_7B = "meta-llama/Llama-2-7b-hf"
LLAMA_70B = "meta-llama/Llama-2-70b-hf"


def test_plan_of_an_experiment_file_reads_shipped_configs_and_prints_a_table():
    from helpers import REPO
    from ray_prune.sweep.experiment import load_experiment

    plans = plan_models(load_experiment(REPO / "experiments" / "paper_llama2.yaml"), 80, 8)
    assert [p.model for p in plans] == [LLAMA_7B, "meta-llama/Llama-2-13b-hf", LLAMA_70B]
    assert all(p.n_removed == 0 for p in plans)  # fractions start at 0: the unpruned model is the worst cell
    table = format_plan_table(plans)
    header = table.splitlines()[0].split()
    assert header[:4] == ["model", "stage", "precision", "GPUs"] and header[-1] == "fits"
    assert len([line for line in table.splitlines() if line.startswith("meta-llama/")]) == 12
    smoke = plan_models(load_experiment(REPO / "experiments" / "smoke.yaml"), 80, 8)
    assert all(p.fits and p.config_source == "bundled" for p in smoke)
