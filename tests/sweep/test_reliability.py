"""Sweeps survive SIGKILLs of workers and drivers with no lost, duplicated or partial rows.

Every test ends in ``_assert_complete``: the results dataset holds exactly the
expected (cell, stage) rows, each finished row carries its metrics, and no
temp file of a dead writer is left behind.

Worker kills run in-process on one real local Ray for the module (the fault
hooks of ``tests/faults.py`` reach the workers through the environment Ray
starts them with). Driver kills run the ``ray-prune sweep`` command in a
subprocess with its own embedded Ray, as on a laptop, and SIGKILL it from here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import faults
from faults import FAULT_ENV, KILL_ENV, KILL_ONCE_ENV
from helpers import save_tiny_models, tiny_spec
from ray_prune.ledger.layout import row_path
from ray_prune.ledger.rows import load_results
from ray_prune.sweep.experiment import parse_experiment
from sweep.drivers import Driver, expected_rows

STEPS = 4  # heal steps per cell in tests/tiny.yaml; checkpoints at 2 and 4


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tokenizer):
    names = ["tiny-llama", "tiny-killheal", "tiny-killwrite", "tiny-faulty"]
    return save_tiny_models(tmp_path_factory.mktemp("models"), names, tokenizer)


@pytest.fixture(scope="module")
def ray_kills(tmp_path_factory):
    """Ray whose workers die once at the heal and row-write kill points of the 'killheal'/'killwrite' models."""
    once = tmp_path_factory.mktemp("once")
    for _ in faults.local_ray(**{KILL_ENV: "heal:*killheal,write:healed:finished:*killwrite",
                                 KILL_ONCE_ENV: str(once)}):
        yield once


def _spec(models_dir: Path, name: str, models: list[str], **over) -> dict:
    over.setdefault("fractions", [0.5])
    return tiny_spec(name=name, models=[str(models_dir / m) for m in models], **over)


def _assert_complete(exp, storage: Path):
    """Nothing missing, nothing duplicated, no partial rows, no stray temp files; returns the dataset."""
    df = load_results(str(storage))
    assert df.attrs["corrupt_files"] == []
    got = list(zip(df["cell_id"], df["stage"]))
    assert len(got) == len(set(got)), "duplicated rows"
    want = expected_rows(exp)
    assert set(got) == want, f"missing {want - set(got)}, extra {set(got) - want}"
    finished = df[df["status"] == "finished"]
    for col in ("c4_loss", "boolq_acc", "wall_s", "finished_at"):
        assert finished[col].notna().all(), f"a finished row lacks {col}"
    healed = finished[finished["stage"] == "healed"]
    assert (healed["steps_done"] == STEPS).all() and (healed["tokens_seen"] == STEPS * 2 * 32).all()
    assert all(list(c) == [2, 4] for c in healed["curve_step"]), "every heal curve is whole"
    assert not [p for p in storage.rglob("*.tmp")], "a dead writer's temp file was left behind"
    return df


# ----------------------------------------------------------------------------- worker kills (in-process driver)


def test_worker_killed_mid_heal_or_mid_write_is_retried_from_its_checkpoint(ray_kills, models_dir, tmp_path):
    from ray_prune.sweep.run import run_sweep

    exp = parse_experiment(_spec(models_dir, "worker-kills", ["tiny-killheal", "tiny-killwrite", "tiny-llama"],
                                 strategies=["deepest"]))
    storage = tmp_path / "s"
    run_sweep(exp, storage=str(storage), progress=False)
    kills = sorted(p.read_text() for p in ray_kills.iterdir())
    assert len(kills) == 2, f"each kill point fires once: {kills}"
    # The writer killed before publishing left a hidden temp file; the next run on this storage removes it.
    assert len(list(storage.rglob("*.tmp"))) == 1
    again = run_sweep(exp, storage=str(storage), progress=False)
    df = _assert_complete(exp, storage)
    assert len(again) == len(df)
    healed = df[df["stage"] == "healed"].set_index("model")
    assert set(healed["status"]) == {"finished"}
    # Killed after the step-2 checkpoint: the retry resumed there; killed while writing: resumed at the end.
    assert healed.loc[str(models_dir / "tiny-killheal"), "resumed_from_step"] == 2
    assert healed.loc[str(models_dir / "tiny-killwrite"), "resumed_from_step"] == STEPS
    assert healed.loc[str(models_dir / "tiny-llama"), "resumed_from_step"] == 0


# ----------------------------------------------------------------------------- driver kills (subprocess driver)


def _rows(storage: Path) -> dict[str, int]:
    return {str(p.relative_to(storage)): p.stat().st_mtime_ns for p in storage.glob("results/*/*.parquet")}


def test_driver_killed_in_profiling_then_in_trials_then_rerun_completes(models_dir, tmp_path):
    spec = _spec(models_dir, "driver-kills", ["tiny-llama"], fractions=[0.2, 0.5])  # 4 cells
    exp = parse_experiment(spec)
    storage = tmp_path / "s"

    first = Driver(spec, storage)
    first.kill_when(lambda: "stage 1" in first.output())
    assert (storage / ".sweep.lock").exists(), "a SIGKILLed driver cannot remove its lock"
    assert not list(storage.rglob("*.parquet")), "killed before profiling wrote anything"

    second = Driver(spec, storage)  # takes the dead driver's lock over at once: same host, pid gone
    second.kill_when(lambda: 1 <= sum(1 for p in storage.glob("results/*/*-healed.parquet")) < 4)
    before = _rows(storage)

    third = Driver(spec, storage)
    third.wait_for(lambda: "took over the lock" in third.output())
    # A second command on the same storage while this one runs refuses, naming the running one, and writes nothing.
    rival = Driver(spec, storage).finish(rc=2)
    assert f"another sweep (pid {third.proc.pid} on" in rival and "use another --storage" in rival
    out = third.finish()
    df = _assert_complete(exp, storage)
    assert set(df["status"]) == {"finished"}
    # Rows finished before the kill were not recomputed: their files are untouched.
    after = _rows(storage)
    assert all(after[p] == t for p, t in before.items())
    done = sum(1 for p in before if p.endswith("-healed.parquet"))
    assert f"{done} already done, {4 - done} to run" in out


def test_driver_killed_writing_a_failed_row_then_only_failed_cells_rerun(models_dir, tmp_path):
    spec = _spec(models_dir, "failed-rows", ["tiny-llama", "tiny-faulty"], strategies=["deepest"],
                 resources={"cpus_per_trial": 1, "max_failures": 0})
    exp = parse_experiment(spec)
    storage = tmp_path / "s"
    faulty = str(models_dir / "tiny-faulty")

    Driver(spec, storage, {FAULT_ENV: "faulty:heal"}).finish(rc=1)  # the OOM-like fault: recorded as failed
    df = load_results(str(storage))
    failed = df[(df["stage"] == "healed") & (df["status"] == "failed")]
    assert list(failed["model"]) == [faulty] and "injected fault" in failed["error"].iloc[0]
    before = _rows(storage)

    # Again with the fault, and the driver dies while writing the new failed row: the old row stays whole.
    Driver(spec, storage, {FAULT_ENV: "faulty:heal", KILL_ENV: "write:healed:failed:*"}).kill_when(None)
    assert _rows(storage) == before
    assert len(list(storage.rglob("*.tmp"))) == 1  # the unpublished row

    out = Driver(spec, storage).finish()  # fault gone: only the failed cell runs, and finishes
    assert "1 already done, 1 to run" in out
    df = _assert_complete(exp, storage)
    assert set(df["status"]) == {"finished"}
    after = _rows(storage)
    changed = sorted(p for p in after if after[p] != before.get(p))
    assert changed == [row_path(faulty, failed["cell_id"].iloc[0], "healed")]
