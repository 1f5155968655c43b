"""``ray-prune prune`` runs every strategy a sweep runs, and the linear repair: the layers it removes are those the
core functions choose on the same calibration text, and the repaired model it saves is the core's repaired model."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_models
from transformers import AutoConfig, AutoModelForCausalLM

from ray_prune.cli import main
from ray_prune.core.data import load_texts
from ray_prune.core.greedy import greedy_order
from ray_prune.core.models import load_model
from ray_prune.core.packing import pack_texts, scored_bos
from ray_prune.core.profile import profile
from ray_prune.core.repair import linear_repair
from ray_prune.core.select import layers_to_remove

CALIBRATION = ["--samples", "8", "--max-length", "64", "--batch-size", "4"]
FLAGS = ["--dtype", "fp32", "--device", "cpu", "--quiet", *CALIBRATION]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("models"), ["tiny"], tokenizer) / "tiny"


def _removed(out) -> list[int]:
    return AutoConfig.from_pretrained(out).layer_pruning["removed_layers"]


def test_block_influence_and_greedy_choose_what_the_core_chooses(tiny, data_dir, tmp_path):
    model, tok = load_model(str(tiny), dtype="fp32", device="cpu")
    texts = load_texts("calibration", 8)
    table = profile(model, tok, texts, metric="block_influence", batch_size=4, max_length=64, progress=False)
    blocks = pack_texts(texts, tok, 64, max_blocks=8)
    order = greedy_order(model, blocks, bos=scored_bos(tok), batch_size=4, max_remove=2).order
    want = {"block_influence": layers_to_remove("block_influence", 6, n=2, table=table),
            "greedy": layers_to_remove("greedy", 6, n=2, order=order)}
    for strategy, layers in want.items():
        out = tmp_path / strategy
        assert main(["prune", str(tiny), "--strategy", strategy, "--n", "2", "--out", str(out), *FLAGS]) == 0
        assert _removed(out) == layers, strategy


def test_a_block_influence_table_from_profile_is_read_back(tiny, data_dir, tmp_path):
    table = tmp_path / "bi.parquet"
    assert main(["profile", str(tiny), "--out", str(table), "--metric", "block_influence", *FLAGS]) == 0
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny), "--strategy", "block_influence", "--n", "2", "--table", str(table),
                 "--out", str(out), *FLAGS]) == 0
    assert main(["prune", str(tiny), "--strategy", "block_influence", "--n", "2", "--out", str(tmp_path / "again"),
                 *FLAGS]) == 0
    assert _removed(out) == _removed(tmp_path / "again")


def test_the_linear_repair_saves_the_cores_repaired_model(tiny, data_dir, tmp_path):
    out = tmp_path / "repaired"
    assert main(["prune", str(tiny), "--strategy", "deepest", "--n", "2", "--repair", "linear", "--out", str(out),
                 *FLAGS]) == 0
    model, tok = load_model(str(tiny), dtype="fp32", device="cpu")
    blocks = pack_texts(load_texts("calibration", 8), tok, 64, max_blocks=8)
    linear_repair(model, layers_to_remove("deepest", 6, n=2), blocks, batch_size=4, form="full")
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = blocks[:2]
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, model(ids).logits)
    plain = tmp_path / "plain"
    assert main(["prune", str(tiny), "--strategy", "deepest", "--n", "2", "--out", str(plain), *FLAGS]) == 0
    with torch.no_grad():  # the repair changed the weights: a repaired model is not the plainly pruned one
        assert not torch.equal(AutoModelForCausalLM.from_pretrained(plain)(ids).logits, saved(ids).logits)
    assert saved.config.layer_repair and _removed(out) == [3, 4]


def test_refusals_come_before_any_load(tiny, tmp_path, capsys):
    assert main(["prune", str(tiny), "--strategy", "deepest", "--n", "2", "--repair", "linear",
                 "--mergekit-config", str(tmp_path / "m.yaml")]) == 2
    assert "a mergekit slicing config cannot express" in capsys.readouterr().err
    assert main(["prune", str(tiny), "--strategy", "greedy", "--n", "2", "--table", str(tmp_path / "t.parquet"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "drop --table" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_greedy_samples_scores_the_order_on_the_first_blocks_only(tiny, data_dir, tmp_path):
    """``--greedy-samples 1`` scores SLEB's rounds on the first packed block, as the sweep's stage 1 does: the
    removed layers are the core's order on that block, which is not the order on all eight."""
    model, tok = load_model(str(tiny), dtype="fp32", device="cpu")
    blocks = pack_texts(load_texts("calibration", 8), tok, 64, max_blocks=8)
    one = greedy_order(model, blocks[:1], bos=scored_bos(tok), batch_size=1, max_remove=5).order
    every = greedy_order(model, blocks, bos=scored_bos(tok), batch_size=4, max_remove=5).order
    n = next(k for k in range(1, 6) if sorted(one[:k]) != sorted(every[:k]))  # the two sets differ at some size
    out = tmp_path / "greedy-one"
    assert main(["prune", str(tiny), "--strategy", "greedy", "--n", str(n), "--greedy-samples", "1",
                 "--out", str(out), *FLAGS]) == 0
    assert _removed(out) == layers_to_remove("greedy", 6, n=n, order=one)
