"""Files a sweep reuses are trusted only when they prove they are what the sweep needs, never by name alone.

One clean tiny sweep on real local Ray is the reference. Each test copies its storage, damages or changes one
thing the way a crash, a full disk or a user would, runs the same sweep again, and checks that the damage was
reported in one line naming the file, that the file was made again, and that the rows equal the clean run's.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pytest

import faults
from helpers import save_tiny_models, tiny_spec
from ray_prune.ledger.rows import load_results
from ray_prune.sweep.experiment import parse_experiment

METRICS = ["boolq_acc", "c4_loss", "c4_loss_norm", "heal_val_loss", "removed_layers"]


@pytest.fixture(scope="module")
def ray_local():
    yield from faults.local_ray()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("models"), ["tiny-llama"], tokenizer)


def _exp(models_dir, **over):
    over.setdefault("fractions", [0.5])
    spec = tiny_spec([str(models_dir / "tiny-llama")], "trust", **over)
    return parse_experiment(spec)


def _run(exp, storage, capsys=None, **kw):
    from ray_prune.sweep.run import run_sweep

    df = run_sweep(exp, storage=str(storage), progress=capsys is not None, **kw)
    return df, (capsys.readouterr().out if capsys is not None else "")


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index(["cell_id", "stage"]).sort_index()[METRICS]


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a, b = _rows(a), _rows(b)
    assert list(a.index) == list(b.index)
    for col in METRICS:
        for x, y in zip(a[col], b[col]):
            if isinstance(x, (list, np.ndarray)):
                assert list(x) == list(y), col
            else:
                assert (pd.isna(x) and pd.isna(y)) or x == y, (col, x, y)


@pytest.fixture(scope="module")
def clean(ray_local, models_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("clean") / "store"
    df, _ = _run(_exp(models_dir), storage)
    assert set(df.loc[df["stage"] == "healed", "status"]) == {"finished"}
    return storage, df


def _copy(clean, tmp_path):
    storage, df = clean
    copy = tmp_path / "store"
    shutil.copytree(storage, copy)
    return copy, df


def _rerun_healed(storage) -> None:
    """Delete the healed rows, so the next run recomputes the cells (and reads the stored blocks and table)."""
    for f in (storage / "results").rglob("*-healed.parquet"):
        f.unlink()
    for f in (storage / "results").rglob("*-unhealed.parquet"):
        f.unlink()


def test_a_changed_calibration_makes_a_new_table_and_rows_record_it(clean, models_dir, tmp_path):
    storage, df = _copy(clean, tmp_path)
    first = sorted((storage / "tables").glob("*.parquet"))
    assert len(first) == 1
    sim = df[(df["strategy"] == "similarity") & (df["stage"] == "healed")].iloc[0]
    assert sim["calibration_metric"] == "angular" and sim["table_key"] in first[0].name
    assert pd.isna(df[(df["strategy"] == "deepest") & (df["stage"] == "healed")].iloc[0]["table_key"])
    again, _ = _run(_exp(models_dir, calibration={**tiny_spec()["calibration"], "metric": "angular_all"}), storage)
    tables = sorted((storage / "tables").glob("*.parquet"))
    assert len(tables) == 2  # the old table was not reused for the new settings
    new = again[(again["strategy"] == "similarity") & (again["calibration_metric"] == "angular_all")]
    assert len(new) == 2 and new["table_key"].nunique() == 1 and new["table_key"].iloc[0] != sim["table_key"]


@pytest.mark.parametrize("damage", ["shorter", "truncated", "record"])
def test_damaged_blocks_are_reported_packed_again_and_give_the_clean_rows(clean, models_dir, tmp_path, capsys,
                                                                          damage):
    storage, df = _copy(clean, tmp_path)
    test_blocks = next((storage / "blocks").glob("test-*.npy"))
    if damage == "shorter":  # cut short, but still a valid array: the worst kind, it would score fewer blocks
        array = np.load(test_blocks)
        buffer = io.BytesIO()
        np.save(buffer, array[:1])
        test_blocks.write_bytes(buffer.getvalue())
    elif damage == "truncated":
        test_blocks.write_bytes(test_blocks.read_bytes()[:100])
    else:
        test_blocks.with_suffix(".json").unlink()
    _rerun_healed(storage)
    again, out = _run(_exp(models_dir), storage, capsys)
    lines = [line for line in out.splitlines() if test_blocks.name in line]
    assert len(lines) == 1 and "packing it again" in lines[0], out
    _same_rows(again, df)


def test_a_truncated_table_is_reported_and_rebuilt(clean, models_dir, tmp_path, capsys):
    storage, df = _copy(clean, tmp_path)
    table = next((storage / "tables").glob("*.parquet"))
    table.write_bytes(table.read_bytes()[:200])
    _rerun_healed(storage)
    again, out = _run(_exp(models_dir), storage, capsys)
    lines = [line for line in out.splitlines() if table.name in line]
    assert len(lines) == 1 and "cannot be read" in lines[0] and "computing it again" in lines[0], out
    _same_rows(again, df)


def test_a_truncated_experiment_record(clean, models_dir, tmp_path, capsys):
    from ray_prune.cli import main

    storage, df = _copy(clean, tmp_path)
    record = storage / "experiment.json"
    record.write_bytes(record.read_bytes()[:50])
    assert main(["status", str(storage)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2 and "experiment.json is not readable JSON" in err and "fix:" in err
    again, out = _run(_exp(models_dir), storage, capsys)
    assert "writes it anew" in out
    _same_rows(again, df)
    assert main(["status", str(storage)]) == 0


def test_stray_files_in_results_are_listed_never_rows(clean, models_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_prune.cli import main

    storage, df = _copy(clean, tmp_path)
    (storage / "results" / "notes.txt").write_text("my notes")
    pq.write_table(pa.table({"x": [1, 2, 3]}), storage / "results" / "other.parquet")
    misplaced = next((storage / "results").rglob("*-baseline.parquet"))
    pq.write_table(pq.read_table(misplaced), storage / "results" / "renamed.parquet")
    with pytest.warns(UserWarning):
        loaded = load_results(str(storage))
    assert len(loaded) == len(df)
    assert sorted(p.rsplit("/", 1)[-1] for p in loaded.attrs["foreign_files"]) == ["notes.txt", "other.parquet",
                                                                                   "renamed.parquet"]
    assert main(["status", str(storage)]) == 0
    assert "3 file(s) under results/ that are not result rows" in capsys.readouterr().out
    assert main(["report", str(storage)]) == 0
    assert "notes.txt" in (storage / "report" / "index.html").read_text()
    again, _ = _run(_exp(models_dir), storage)  # and a later sweep on the root is not bothered
    _same_rows(again, df)


def test_load_results_on_a_folder_above_a_root_names_the_root(clean, tmp_path):
    from ray_prune.errors import UserError

    storage, _ = _copy(clean, tmp_path)
    with pytest.raises(UserError, match=rf"holds no results; it holds the storage root {storage}"):
        load_results(str(tmp_path))


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 1 MiB (tmpfs), so that a sweep on it runs out of space; root only."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_naming_it(models_dir, tmp_path, small_disk):
    import os
    import subprocess
    import sys

    import yaml

    spec = tiny_spec([str(models_dir / "tiny-llama")], "full", fractions=[0.2, 0.5, 0.7])
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-m", "ray_prune.cli", "sweep", str(path), "--storage",
                          str(small_disk / "store"), "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    err = run.stderr.strip().splitlines()
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert err[-2].startswith("ray-prune sweep: error: ") and "no space left" in err[-2] and str(small_disk) in err[-2]
    assert err[-1].startswith("  fix: free space there")


def test_a_truncated_safetensors_file_fails_the_check_naming_it(models_dir, tmp_path, capsys):
    from ray_prune.cli import main

    model = tmp_path / "cut"
    shutil.copytree(models_dir / "tiny-llama", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    path = tmp_path / "cut.yaml"
    import yaml

    path.write_text(yaml.safe_dump(tiny_spec([str(model)], "cut")))
    assert main(["sweep", str(path), "--check", "--storage", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and str(weights) in err[0] and "truncated" in err[0] and err[1].startswith("  fix:")


def test_a_report_that_cannot_be_written_is_one_line(clean, tmp_path, capsys):
    from ray_prune.cli import main

    storage, _ = _copy(clean, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["report", str(storage), "--out", str(blocker / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "cannot write the report to" in err[0] and "--out" in err[1]


def test_two_calibrations_profile_twice_and_keep_their_cells_apart(ray_local, models_dir, tmp_path):
    base = tiny_spec()["calibration"]
    exp = _exp(models_dir, strategies=["similarity"],
               calibration=[base, {**base, "dataset": "wikitext2"}, {**base, "metric": "block_influence"}])
    df, _ = _run(exp, tmp_path / "store")
    assert len(list((tmp_path / "store" / "tables").glob("*.parquet"))) == 3  # one profile per setting
    healed = df[df["stage"] == "healed"]
    assert len(healed) == 3 and healed["cell_id"].nunique() == 3 and healed["table_key"].nunique() == 3
    assert sorted(zip(healed["calibration_dataset"], healed["calibration_metric"])) == [
        ("c4", "angular"), ("c4", "block_influence"), ("wikitext2", "angular")]
    unhealed = df[df["stage"] == "unhealed"]
    assert unhealed["cell_id"].nunique() == 3  # each pruned model its own unhealed row


def test_heal_settings_by_fraction_reach_the_trials(ray_local, models_dir, tmp_path):
    heal = {**tiny_spec()["heal"], "steps": 2,
            "by_fraction": [{"up_to": 0.3, "rank": 2}, {"up_to": 1.0, "rank": 4, "steps": 4}]}
    exp = _exp(models_dir, fractions=[0.2, 0.5], strategies=["deepest"], heal=heal)
    df, _ = _run(exp, tmp_path / "store")
    healed = df[df["stage"] == "healed"].sort_values("fraction")
    assert list(healed["heal_rank"]) == [2, 4] and list(healed["heal_steps"]) == [2, 4]
    per_step = exp.heal.batch_size * exp.heal.seq_len
    assert list(healed["tokens_seen"]) == [2 * per_step, 4 * per_step]  # the trials trained as the rows say
    assert [list(c) for c in healed["curve_step"]] == [[2], [2, 4]]  # a validation every 2 steps, as many as run
