"""Experiment files: every bad input fails before any model loads, names the field and the fix, and writes nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from helpers import REPO, tiny_model
from ray_prune.core.select import n_from_fraction
from ray_prune.errors import UserError
from ray_prune.sweep.experiment import load_experiment, parse_experiment
from ray_prune.sweep.grid import expand

GOOD = {
    "name": "t",
    "models": ["smollm2-135m"],
    "fractions": [0.1, 0.2],
    "strategies": ["similarity", "deepest"],
    "calibration": {"samples": 8, "batch_size": 4},
    "heal": {"steps": 2},
    "eval": {"tasks": {"boolq": {"limit": 2}}},
}


def _with(path: str, value):
    spec = copy.deepcopy(GOOD)
    keys = path.split(".")
    node = spec
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return spec


def _without(key: str):
    spec = copy.deepcopy(GOOD)
    del spec[key]
    return spec


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, tokenizer):
    """A model of an architecture we cannot prune, saved as a real HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("odd")
    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "gpt2-tiny")
    tiny_model("llama", num_layers=4).save_pretrained(root / "llama-tiny")
    tokenizer.save_pretrained(root / "llama-tiny")
    _bad_mirrors(root)
    (root / "pickled").mkdir()
    (root / "pickled" / "config.json").write_bytes((root / "llama-tiny" / "config.json").read_bytes())
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"a pickle that must never be loaded")
    return root


def _bad_mirrors(root: Path) -> None:
    """Local data mirrors with one defect each; the good parts link to the real mirror."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    real = Path(os.environ["RAY_PRUNE_DATA_DIR"])
    texts = pq.read_table(real / "c4" / "train_sample.parquet").column("text").to_pylist()
    c4 = {
        "non-utf8": pa.table({"text": pa.array([t.encode() for t in texts[:50]] + [b"caf\xe9 au lait"] * 3,
                                               pa.binary())}),
        "empty": pa.table({"text": ["", "   ", "\n"] * 20}),
        "no-text-column": pa.table({"body": texts[:10]}),
    }
    for name, table in c4.items():
        (root / f"data-{name}" / "c4").mkdir(parents=True)
        pq.write_table(table, root / f"data-{name}" / "c4" / "train_sample.parquet")
    (root / "data-corrupt" / "c4").mkdir(parents=True)
    (root / "data-corrupt" / "c4" / "train_sample.parquet").write_bytes(b"PAR1 not really parquet")
    (root / "data-no-c4").mkdir()
    (root / "data-no-boolq").mkdir()
    (root / "data-no-boolq" / "c4").symlink_to(real / "c4")


def _data(name: str):
    return lambda odd: _with("data_dir", str(odd / f"data-{name}"))


# (case id, spec or callable(odd_models) -> spec, pattern the message must contain)
CASES = [
    ("typo-top-level", _with("fractionz", [0.1]), r"fractionz: unknown key \(did you mean 'fractions'\?\)"),
    ("typo-nested", _with("heal.stepz", 3), r"heal.stepz: unknown key \(did you mean 'steps'\?\)"),
    ("typo-calibration", _with("calibration.sample", 8), r"calibration.sample: unknown key"),
    ("fraction-one", _with("fractions", [0.1, 1.0]), r"fractions: fractions \[1.0\] are outside \[0, 1\)"),
    ("fraction-negative", _with("fractions", [-0.1]), r"outside \[0, 1\)"),
    ("fraction-range-empty", _with("fractions", {"start": 0.5, "stop": 0.1, "step": 0.1}), r"fraction grid is empty"),
    ("fractions-empty", _with("fractions", []), r"fraction grid is empty"),
    ("n-equals-L", _with("fractions", [0.99]), r"rounds to n=30.*leaves no layer"),
    ("unknown-strategy", _with("strategies", ["random"]),
     r"strategies.0: Input should be 'similarity', 'deepest', 'block_influence' or 'greedy'"),
    ("no-strategies", _with("strategies", []), r"strategies: List should have at least 1 item"),
    ("unknown-metric", _with("calibration.metric", "cosine"), r"calibration.metric: Input should be"),
    ("unknown-task", _with("eval.tasks", {"mmlu_pro": {}}), r"unknown task 'mmlu_pro' \(did you mean 'mmlu'\?\)"),
    ("local-fewshot-boolq", _with("eval.tasks", {"boolq": {"shots": 3}}), r"boolq"),
    ("greedy-samples-over-samples", _with("calibration", {"samples": 8, "batch_size": 4, "greedy_samples": 9}),
     r"greedy_samples must be between 0 \(all samples\) and samples \(8\), got 9"),
    ("per-model-unknown-strategy", _with("models", [{"name": "smollm2-135m", "strategies": ["random"]}]),
     r"models.0.strategies.0: Input should be"),
    ("model-twice", _with("models", ["smollm2-135m", {"name": "smollm2-135m", "strategies": ["deepest"]}]),
     r"models: smollm2-135m is listed twice: .* give it one entry"),
    ("per-model-unknown-repair", _with("models", [{"name": "smollm2-135m", "repairs": ["lora"]}]),
     r"models.0.repairs.0: Input should be"),
    ("batch-over-samples", _with("calibration", {"samples": 4, "batch_size": 8}),
     r"batch_size 8 is larger than the calibration set"),
    ("negative-lr", _with("heal.lr", -1e-4), r"heal: Value error, lr must be > 0|lr must be > 0"),
    ("empty-lr-grid", _with("heal.lr", []), r"lr is an empty list"),
    ("no-models", _with("models", []), r"models: List should have at least 1 item"),
    ("models-missing", _without("models"), r"models: required key is missing"),
    ("fractions-missing", _without("fractions"), r"fractions: required key is missing"),
    ("bad-name", _with("name", "a/b"), r"name: String should match pattern"),
    ("no-seeds", _with("seeds", []), r"seeds: List should have at least 1 item"),
    ("bad-reduction-factor", _with("scheduler.reduction_factor", 1), r"scheduler.reduction_factor"),
    ("unknown-model", _with("models", ["not-a-model"]), r"unknown model 'not-a-model'"),
    ("missing-data-dir", _with("data_dir", "/nonexistent/data"), r"data dir /nonexistent/data does not exist"),
    ("per-model-heal-typo", _with("models", [{"name": "smollm2-135m", "heal": {"rnak": 4}}]),
     r"unknown heal keys \['rnak'\]"),
    ("unsupported-architecture", lambda odd: _with("models", [str(odd / "gpt2-tiny")]),
     r"unsupported architecture 'gpt2'"),
    ("lora-target-missing", lambda odd: _with("heal.target", ["nope_proj"]) | {"models": [str(odd / "llama-tiny")]},
     r"heal.target .* LoRA target module\(s\) nope_proj not found"),
    ("not-a-directory-model", lambda odd: _with("models", [str(odd)]), r"is not a Hugging Face model directory"),
    ("pickled-weights", lambda odd: _with("models", [str(odd / "pickled")]),
     r"holds only pickled weights \(pytorch_model.bin\); ray-prune never unpickles"),
    ("calibration-larger-than-corpus", _with("calibration", {"samples": 5000, "batch_size": 8}),
     r"holds \d+ usable calibration documents .* 5000 needed"),
    ("non-utf8-text", _data("non-utf8"), r"row 50 of .*c4/train_sample.parquet \('text'\) is not UTF-8 text"),
    ("empty-text", _data("empty"), r"holds 0 usable calibration documents \(60 empty documents skipped\)"),
    ("no-text-column", _data("no-text-column"), r"has no column 'text'"),
    ("corrupt-data-file", _data("corrupt"), r"cannot be read as Parquet"),
    ("missing-data-file", _data("no-c4"), r"data file .*c4/train_sample.parquet is missing"),
    ("missing-task-file", _data("no-boolq"), r"data file .*boolq/validation.parquet is missing"),
]


@pytest.mark.parametrize("case,spec,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_experiment_fails_early_and_writes_nothing(case, spec, pattern, odd_models, tmp_path):
    from ray_prune.sweep.plan import plan

    if callable(spec):
        spec = spec(odd_models)
    storage = tmp_path / "store"
    with pytest.raises(UserError, match=pattern) as err:
        plan(parse_experiment(spec, "exp.yaml"), str(storage))
    assert err.value.fix, "every message carries a fix"
    assert not list(storage.rglob("*.parquet")) and not (storage / "experiment.json").exists()


def test_unwritable_storage(tmp_path):
    from ray_prune.sweep.plan import plan

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="is not writable"):
        plan(parse_experiment(GOOD), str(blocker / "sub"))


def test_yaml_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_experiment(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_experiment(tmp_path / "broken.yaml")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not valid YAML"):
        load_experiment(tmp_path / "latin1.yaml")
    with pytest.raises(UserError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_are_valid(path: Path):
    exp = load_experiment(path)
    layers = {m.name: {"smollm2-135m": 30, "gemma3-270m": 18}.get(m.name, 32) for m in exp.models}
    cells = expand(exp, layers)
    assert cells and len({c.cell_id for c in cells}) == len(cells)
    assert yaml.safe_load(path.read_text())["name"] == exp.name


def test_smoke_grid_shape():
    exp = load_experiment(REPO / "experiments" / "smoke.yaml")
    cells = expand(exp, {"smollm2-135m": 30, "gemma3-270m": 18})
    assert len(cells) == 2 * 3 * 2
    small = load_experiment(REPO / "experiments" / "small_models.yaml")
    assert small.fraction_values()[0] == 0.0 and small.fraction_values()[-1] == pytest.approx(0.7)
    assert len(small.fraction_values()) == 15


def test_cell_hash_is_stable_and_extension_only_adds():
    exp = parse_experiment(GOOD)
    a = {c.cell_id for c in expand(exp, {"smollm2-135m": 30})}
    b = {c.cell_id for c in expand(parse_experiment(_with("fractions", [0.1, 0.2, 0.3])), {"smollm2-135m": 30})}
    assert a < b and len(b - a) == 2
    assert a == {c.cell_id for c in expand(parse_experiment(GOOD), {"smollm2-135m": 30})}


def test_a_model_s_own_strategies_and_repairs_replace_the_experiment_s_for_its_cells_only():
    gemma = {"name": "gemma3-270m", "fractions": [0.25], "strategies": ["similarity"], "repairs": ["none"]}
    spec = _with("repairs", ["none", "linear"]) | {"models": ["smollm2-135m", gemma]}
    cells = expand(parse_experiment(spec), {"smollm2-135m": 30, "gemma3-270m": 18})
    smol = {(c.n, c.strategy, c.repair) for c in cells if c.model == "smollm2-135m"}
    gemma = {(c.n, c.strategy, c.repair) for c in cells if c.model == "gemma3-270m"}
    assert smol == {(n, s, r) for n in (3, 6) for s in ("similarity", "deepest") for r in ("none", "linear")}
    assert gemma == {(n_from_fraction(0.25, 18), "similarity", "none")}
    # the first model's cells are those of the same experiment without the second
    alone = expand(parse_experiment(_with("repairs", ["none", "linear"])), {"smollm2-135m": 30})
    assert {c.cell_id for c in cells if c.model == "smollm2-135m"} == {c.cell_id for c in alone}


def test_the_grid_bound_counts_a_model_s_own_strategies_and_repairs():
    """The bound checked before expansion holds for per-model axes: never below the cells the grid expands to."""
    from ray_prune.sweep.experiment import grid_size

    spec = _with("strategies", ["similarity"]) | {"models": [
        {"name": "smollm2-135m", "strategies": ["similarity", "deepest", "block_influence"],
         "repairs": ["none", "linear"]}]}
    cells = expand(parse_experiment(spec), {"smollm2-135m": 30})
    assert len(cells) == 2 * 3 * 2 and grid_size(spec) >= len(cells)


def test_greedy_samples_names_only_the_cells_it_changes():
    """Left at its default, the setting is not part of any cell's identity (every earlier cell keeps its id);
    set, it makes new calibrated cells and leaves uncalibrated ones (deepest) as they were."""
    base = {c.cell_id: c for c in expand(parse_experiment(GOOD), {"smollm2-135m": 30})}
    same = {c.cell_id for c in expand(parse_experiment(_with("calibration.greedy_samples", 0)), {"smollm2-135m": 30})}
    assert same == set(base)
    changed = {c.cell_id for c in expand(parse_experiment(_with("calibration.greedy_samples", 2)),
                                         {"smollm2-135m": 30})}
    kept = changed & set(base)
    assert kept and {base[i].strategy for i in kept} == {"deepest"}


# --------------------------------------------------------------------------- bounds


def test_a_grid_over_the_cell_limit_is_refused_naming_the_count_the_axes_and_the_flag():
    spec = _with("heal.lr", [1e-4, 2e-4, 3e-4, 4e-4, 5e-4]) | {"seeds": list(range(40)),
                                                              "fractions": {"start": 0.0, "stop": 0.9, "step": 0.01}}
    with pytest.raises(UserError) as err:
        parse_experiment(spec)
    message = str(err.value)
    assert "makes up to 36,400 cells" in message  # 91 fractions x 2 strategies x 5 lr x 40 seeds
    assert "fractions 91" in message and "heal.lr 5" in message and "seeds 40" in message
    assert "--max-cells" in message
    assert len(expand(parse_experiment(spec, max_cells=40_000), {"smollm2-135m": 30})) <= 36_400


def test_an_aliased_yaml_bomb_and_a_huge_file_are_refused_before_parsing_them_out(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(UserError, match="more than 100,000 values"):
        load_experiment(tmp_path / "bomb.yaml")
    (tmp_path / "huge.yaml").write_text("name: t\nfractions: [" + ", ".join(["0.1"] * 300_000) + "]\n")
    with pytest.raises(UserError, match="bytes, more than the 1,048,576"):
        load_experiment(tmp_path / "huge.yaml")


def test_checking_a_ten_thousand_cell_grid_takes_seconds(tmp_path):
    import time

    from ray_prune.sweep.plan import plan

    spec = GOOD | {"fractions": {"start": 0.0, "stop": 0.96, "step": 0.033}, "seeds": list(range(80)),
                   "heal": {"steps": 2, "lr": [1e-4, 3e-4]}}
    t = time.perf_counter()
    p = plan(parse_experiment(spec), str(tmp_path / "store"), check=True)
    seconds = time.perf_counter() - t
    assert 9_000 <= len(p.cells) <= 10_000 and seconds < 30, (len(p.cells), seconds)


# Cell ids are the ledger's keys: a rerun on a storage written by an earlier version skips exactly the cells these
# ids name. They were written by the versions before settings objects and stay the same for a grid that sets
# nothing new; a change here makes every user's finished cells run again.
SMOKE_CELL_IDS = ['018f3baec871bacc', '1db25d5738f24abb', '2a3940964c0c08c5', '5b049d87ab00c6d4', '6390291a87336be1',
                  '63eed184ac0f1033', '64cdb4ccf8774236', '7c7a1697f3ad5a38', '7f34aaf8ac5198ca', '8eb53d08eea99634',
                  'a28e9848e818fd49', 'e9cc4a801b5aff9d']
SMOKE_BASELINE_IDS = {"smollm2-135m": "13b3484eb26d5e18", "gemma3-270m": "0323b80dfadaef28"}


def test_cell_ids_of_the_smoke_grid_are_those_earlier_versions_wrote():
    from ray_prune.sweep.grid import baseline_id

    exp = load_experiment(REPO / "experiments" / "smoke.yaml")
    assert sorted(c.cell_id for c in expand(exp, {"smollm2-135m": 30, "gemma3-270m": 18})) == SMOKE_CELL_IDS
    assert {m.name: baseline_id(exp, m.name, "nf4") for m in exp.models} == SMOKE_BASELINE_IDS


def test_several_calibrations_keep_their_cells_apart():
    two = _with("calibration", [{"samples": 8, "batch_size": 4}, {"dataset": "wikitext2", "samples": 8,
                                                                   "batch_size": 4}])
    cells = expand(parse_experiment(two), {"smollm2-135m": 30})
    one = expand(parse_experiment(GOOD), {"smollm2-135m": 30})
    sim = [c for c in cells if c.strategy == "similarity"]
    assert len(sim) == 2 * len([c for c in one if c.strategy == "similarity"])
    assert len({c.cell_id for c in cells}) == len(cells)
    assert {c.calibration["dataset"] for c in sim} == {"c4", "wikitext2"}
    assert [c for c in cells if c.strategy == "deepest"] == [c for c in one if c.strategy == "deepest"]
    assert {c.cell_id for c in one} <= {c.cell_id for c in cells}  # the first setting keeps its cells' ids


def test_heal_settings_by_fraction_reach_the_cells_that_fraction_covers():
    spec = _with("heal", {"steps": 2, "by_fraction": [{"up_to": 0.15, "rank": 4}, {"up_to": 1.0, "rank": 16,
                                                                                    "lr": 1e-4, "steps": 3}]})
    cells = expand(parse_experiment(spec), {"smollm2-135m": 30})
    by_fraction = {(c.fraction, c.heal["rank"], c.heal["lr"], c.heal["steps"]) for c in cells}
    assert by_fraction == {(0.1, 4, 3e-4, 2), (0.2, 16, 1e-4, 3)}
    plain = {c.cell_id for c in expand(parse_experiment(_with("heal", {"steps": 2})), {"smollm2-135m": 30})}
    assert not {c.cell_id for c in cells} & plain  # what a cell healed with names it
    with pytest.raises(UserError, match="up_to must increase"):
        parse_experiment(_with("heal", {"by_fraction": [{"up_to": 0.5}, {"up_to": 0.2}]}))
    with pytest.raises(UserError, match=r"heal.by_fraction at fraction 0.2 .*rank must be > 0"):
        parse_experiment(_with("heal", {"by_fraction": [{"up_to": 0.1}, {"up_to": 1.0, "rank": 0}]}))
    with pytest.raises(UserError, match="rnak"):
        parse_experiment(_with("heal", {"by_fraction": [{"up_to": 1.0, "rnak": 4}]}))
