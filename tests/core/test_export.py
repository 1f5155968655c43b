"""The mergekit export: slices keep exactly the layers prune_layers keeps, mergekit itself builds the same model,
and ``ray-prune prune --mergekit-config`` writes it for the layers the command removes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import save_tiny_models, tiny_config
from ray_prune.core.export import kept_ranges, mergekit_config, write_mergekit_config
from ray_prune.errors import UserError

MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"
HUB = "org/some-model"  # not cached and HF_HUB_OFFLINE=1: passed through, its config is not read


def _kept(config: dict) -> list[int]:
    """The layers a passthrough config keeps, in output order, read the way mergekit reads layer_range."""
    return [i for s in config["slices"] for src in s["sources"] for i in range(*src["layer_range"])]


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A local 30-layer Llama config directory (no weights: the export reads only the config)."""
    tiny_config("llama", num_layers=30).save_pretrained(tmp_path / "llama30")
    return tmp_path / "llama30"


@pytest.mark.parametrize("removed,ranges", [
    ([13, 14, 15], [(0, 13), (16, 30)]),  # contiguous, in the middle
    ([3, 4, 20, 26], [(0, 3), (5, 20), (21, 26), (27, 30)]),  # non-contiguous
    ([0, 1, 2], [(3, 30)]),  # at the start
    ([27, 28, 29], [(0, 27)]),  # at the end, final layer included
    ([0, 29], [(1, 29)]),  # both ends
    ([], [(0, 30)]),  # nothing removed: one slice of everything
    ([15, 13, 14, 13], [(0, 13), (16, 30)]),  # any order, duplicates
    (list(range(1, 30)), [(0, 1)]),  # all but one
])
def test_kept_ranges(removed, ranges):
    assert kept_ranges(30, removed) == ranges


def test_slices_keep_exactly_the_layers_not_removed():
    rng = random.Random(0)
    for _ in range(300):
        L = rng.randint(1, 40)
        removed = rng.sample(range(L), rng.randint(0, L - 1))
        config = mergekit_config(HUB, L, removed)
        assert _kept(config) == [i for i in range(L) if i not in removed]
        starts_ends = [tuple(s["sources"][0]["layer_range"]) for s in config["slices"]]
        assert all(b < c for (_, b), (c, _) in zip(starts_ends, starts_ends[1:])), "adjacent slices were not merged"


def test_config_shape_and_dtype(tiny_dir):
    config = mergekit_config(str(tiny_dir), 30, [13, 14, 15])
    assert config == {"slices": [{"sources": [{"model": str(tiny_dir.resolve()), "layer_range": [0, 13]}]},
                                 {"sources": [{"model": str(tiny_dir.resolve()), "layer_range": [16, 30]}]}],
                      "merge_method": "passthrough", "dtype": "float32"}
    assert mergekit_config(HUB, 30, [1])["slices"][0]["sources"][0]["model"] == HUB
    assert mergekit_config(HUB, 30, [1], dtype="bf16")["dtype"] == "bfloat16"
    assert mergekit_config(HUB, 30, [1], dtype="float16")["dtype"] == "float16"
    assert "dtype" not in mergekit_config(HUB, 30, [1], dtype="auto")
    assert "dtype" not in mergekit_config(HUB, 30, [1], dtype=None)


def test_mergekit_parses_the_config(tiny_dir):
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(mergekit_config(str(tiny_dir), 30, [3, 4, 20, 26]))
    assert config.merge_method == "passthrough" and config.dtype == "float32"
    assert [s.sources[0].layer_range for s in config.slices] == [(0, 3), (5, 20), (21, 26), (27, 30)]
    assert [str(m) for m in config.referenced_models()] == [str(tiny_dir.resolve())]


@pytest.mark.parametrize("removed,match", [
    ([30], r"layers \[30\] do not exist in a model of 30 layers"),
    ([-1, 3], r"layers \[-1\] do not exist"),
    (list(range(30)), "cannot remove all 30 layers"),
    (["13"], "must be a list of integers"),
    ([1.5], "must be a list of integers"),
    ([True], "must be a list of integers"),
    (13, "must be a list of integers"),
])
def test_bad_layers(removed, match):
    with pytest.raises(UserError, match=match) as e:
        mergekit_config(HUB, 30, removed)
    assert e.value.fix


def test_bad_inputs(tmp_path, tiny_dir):
    with pytest.raises(UserError, match="num_layers must be a positive integer"):
        mergekit_config(HUB, 0, [])
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        mergekit_config(HUB, 30, [1], dtype="fp8")
    with pytest.raises(UserError, match="has 30 layers, not num_layers=28") as e:
        mergekit_config(str(tiny_dir), 28, [1])
    assert "num_layers=30" in e.value.fix
    with pytest.raises(UserError, match="not a Hugging Face model directory"):
        mergekit_config(str(tmp_path), 30, [1])
    plus = tmp_path / "model+v2"
    tiny_config("llama", num_layers=30).save_pretrained(plus)
    with pytest.raises(UserError, match="reads '\\+' as model\\+LoRA"):
        mergekit_config(str(plus), 30, [1])
    with pytest.raises(UserError, match="is a directory"):
        write_mergekit_config(tmp_path, HUB, 30, [1])


@pytest.mark.parametrize("family", ["gemma3_text", "qwen2"])
def test_refuses_configs_whose_per_layer_fields_mergekit_leaves_stale(tmp_path, family):
    tiny_config(family, num_layers=6).save_pretrained(tmp_path / family)
    with pytest.raises(UserError, match="carry layer_types") as e:
        mergekit_config(str(tmp_path / family), 6, [1])
    assert "--out" in e.value.fix
    assert _kept(mergekit_config(str(tmp_path / family), 6, [])) == list(range(6))  # nothing to rewrite


def test_refuses_a_model_ray_prune_already_pruned(tmp_path):
    from helpers import tiny_model
    from ray_prune.core.prune import prune_layers

    prune_layers(tiny_model("llama", num_layers=6), [1]).config.save_pretrained(tmp_path / "pruned")  # keeps 0 2 3 4 5
    with pytest.raises(UserError, match="records which original layers it kept") as e:
        mergekit_config(str(tmp_path / "pruned"), 5, [2])
    assert "removing original layers [1, 3]" in e.value.fix


def test_written_file_is_the_config_with_a_header(tmp_path, tiny_dir):
    path = write_mergekit_config(tmp_path / "sub" / "prune.yaml", str(tiny_dir), 30, [3, 4, 20, 26], dtype="bf16")
    assert path == tmp_path / "sub" / "prune.yaml"
    text = path.read_text()
    assert yaml.safe_load(text) == mergekit_config(str(tiny_dir), 30, [3, 4, 20, 26], dtype="bf16")
    header = text[:text.index("slices:")].splitlines()
    assert header and all(line.startswith("# ") for line in header)
    assert f"#   mergekit-yaml {path} OUT_DIR" in header
    assert "without layers [3, 4, 20, 26]" in header[0] and "keeping 26 of 30 layers" in header[1]
    assert any("--strategy layers --layers 3,4,20,26 --dtype bfloat16" in line for line in header)
    assert "converted bundled" not in text
    assert sorted(p.name for p in path.parent.iterdir()) == ["prune.yaml"]  # no temp file left behind


def test_bundled_model_is_written_as_its_converted_directory(tmp_path):
    from ray_prune.core.models import resolve

    text = write_mergekit_config(tmp_path / "c.yaml", "smollm2-135m", 30, [13, 14, 15]).read_text()
    assert yaml.safe_load(text)["slices"][0]["sources"][0]["model"] == resolve("smollm2-135m")
    assert "# model is the converted bundled model smollm2-135m" in text
    assert "not the hub checkpoint HuggingFaceTB/SmolLM2-135M-Instruct" in text


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "prune.yaml"
    path.write_text("old\n")

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_mergekit_config(path, HUB, 30, [1])
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["prune.yaml"]
    monkeypatch.undo()
    write_mergekit_config(path, HUB, 30, [1])  # an existing file is replaced
    assert yaml.safe_load(path.read_text()) == mergekit_config(HUB, 30, [1])


# ---- the CLI flag ----

def test_cli_writes_only_the_config_without_loading_weights(tmp_path, monkeypatch, capsys):
    import ray_prune.core.models as models
    from ray_prune.cli import main

    def no_weights(*a, **k):
        raise AssertionError("config-only prune loaded the model")

    monkeypatch.setattr(models, "load_model", no_weights)
    path = tmp_path / "prune.yaml"
    assert main(["prune", "smollm2-135m", "--strategy", "layers", "--layers", "13,14,15", "--dtype", "fp32",
                 "--mergekit-config", str(path)]) == 0
    config = yaml.safe_load(path.read_text())
    assert config == mergekit_config("smollm2-135m", 30, [13, 14, 15])
    assert f"mergekit-yaml {path} OUT_DIR" in capsys.readouterr().out
    assert main(["prune", "smollm2-135m", "--strategy", "deepest", "--n", "4", "--mergekit-config", str(path)]) == 0
    config = yaml.safe_load(path.read_text())
    assert _kept(config) == [*range(25), 29] and "dtype" not in config  # deepest keeps the final layer; auto


def test_cli_config_matches_the_saved_model(tmp_path, tokenizer, capsys):
    from transformers import AutoConfig

    from ray_prune.cli import main

    save_tiny_models(tmp_path, ["tiny"], tokenizer, num_layers=6)
    out, path = tmp_path / "pruned", tmp_path / "prune.yaml"
    assert main(["prune", str(tmp_path / "tiny"), "--strategy", "deepest", "--n", "2", "--dtype", "fp32",
                 "--device", "cpu", "--out", str(out), "--mergekit-config", str(path)]) == 0
    record = AutoConfig.from_pretrained(out).layer_pruning
    config = yaml.safe_load(path.read_text())
    assert record["removed_layers"] == [3, 4]
    assert _kept(config) == record["kept_layers"] == [0, 1, 2, 5]
    assert config["slices"][0]["sources"][0]["model"] == str((tmp_path / "tiny").resolve())


def test_cli_errors(tmp_path, capsys):
    from ray_prune.cli import main

    assert main(["prune", "smollm2-135m", "--strategy", "layers", "--layers", "1"]) == 2
    assert "pass --out DIR, --mergekit-config FILE, or both" in capsys.readouterr().err
    tiny_config("gemma3_text", num_layers=6).save_pretrained(tmp_path / "gemma")
    path = tmp_path / "prune.yaml"
    assert main(["prune", str(tmp_path / "gemma"), "--strategy", "layers", "--layers", "1",
                 "--mergekit-config", str(path)]) == 2
    assert "carry layer_types" in capsys.readouterr().err and not path.exists()


# ---- mergekit itself builds ray-prune's model ----

@pytest.fixture(scope="module")
def smollm2_fp32():
    from ray_prune.core.models import load_model

    return load_model("smollm2-135m", dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def batch(smollm2_fp32, data_dir):
    from ray_prune.core.data import load_texts

    texts = load_texts("calibration", 4, data_dir_path=data_dir)
    return texts, smollm2_fp32[1](texts, return_tensors="pt", padding=True, truncation=True, max_length=96)


@pytest.mark.slow
@pytest.mark.parametrize("removed", [[13, 14, 15], [3, 4, 20, 26]], ids=["contiguous", "non-contiguous"])
def test_mergekit_builds_the_same_model(tmp_path, smollm2_fp32, batch, removed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_prune.core.prune import prune_layers

    path = write_mergekit_config(tmp_path / "prune.yaml", "smollm2-135m", 30, removed, dtype="fp32")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    # --no-cuda: arithmetic on CPU; safetensors inputs are memory-mapped, so --lazy-unpickle would change nothing.
    # The tokenizer is copied (the default) so the output is a complete model directory.
    res = subprocess.run([str(MERGEKIT_YAML), str(path), str(tmp_path / "merged"), "--no-cuda", "--quiet",
                          "--copy-tokenizer", "--no-write-model-card"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seconds = time.perf_counter() - start

    model, tok = smollm2_fp32
    texts, enc = batch
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.config.num_hidden_layers == 30 - len(removed)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")(texts[0])["input_ids"] == tok(texts[0])["input_ids"]
    reference = prune_layers(model, removed, inplace=False)
    with torch.no_grad():
        got = merged(**enc).logits
        want = reference(**enc).logits
    diff = (got - want).abs().max().item()
    print(f"\nremoved {removed}: mergekit-yaml {seconds:.1f} s, max |logit difference| {diff}")
    assert got.shape == want.shape == (*enc["input_ids"].shape, 49152)
    assert diff == 0.0
