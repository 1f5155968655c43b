"""Ctrl-C and ``ray job stop`` on a real sweep: a real SIGINT, then a real SIGTERM, in the middle of trials, then a
rerun.

SIGINT goes to the driver's whole process group, as a terminal's Ctrl-C does (the embedded Ray's own processes
ignore it). SIGTERM goes to the driver alone, as ``kill PID`` does; ``ray job stop`` sends it to the job's process
group, which on a cluster holds the driver alone (on a laptop the group also holds the embedded Ray, which
SIGTERM would take down with it).

Each interrupted run must end within seconds with one line and exit 130 / 143, leave the lock released, and
write no ``stopped`` or ``failed`` row for a cell it cut off; the rerun must complete with every expected row.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import save_tiny_models, tiny_spec
from ray_prune.ledger.layout import LOCK
from ray_prune.ledger.rows import load_results
from ray_prune.sweep.experiment import parse_experiment
from ray_prune.sweep.grid import baseline_id, expand


def _start(spec_path: Path, storage: Path) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ray_prune.cli", "sweep", str(spec_path), "--storage", str(storage)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _warnings(out: str) -> list[str]:
    """Warning lines, but Ray's notice at start-up that token authentication is on (a fact of the cluster)."""
    return [line for line in out.splitlines() if ("WARNING" in line or "Error" in line)
            and "Token authentication is enabled" not in line]


def _healed(storage: Path) -> int:
    return sum(1 for _ in storage.glob("results/*/*-healed.parquet"))


def _interrupt_mid_trials(spec_path: Path, storage: Path, signum: int) -> tuple[int, float, str, int]:
    proc = _start(spec_path, storage)
    start_rows = _healed(storage)
    deadline = time.monotonic() + 300
    while _healed(storage) == start_rows:  # at least one more cell finished: the others are running or queued
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no cell finished"
        time.sleep(0.1)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    t = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, time.monotonic() - t, out, _healed(storage)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("interrupt")
    models = save_tiny_models(root, ["tiny-llama"], tokenizer)
    base = tiny_spec()
    spec = tiny_spec([str(models / "tiny-llama")], "interrupt", fractions=[0.2, 0.5, 0.7],
                     heal={**base["heal"], "steps": 24, "eval_every": 4},
                     scheduler={"type": "asha", "grace_period": 4, "reduction_factor": 2})
    path = root / "interrupt.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, parse_experiment(spec), root / "store"


def test_sigint_then_sigterm_mid_trials_then_a_rerun_completes(experiment):
    path, exp, storage = experiment
    cells = expand(exp, {m.name: 6 for m in exp.models})
    assert len(cells) == 6
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        rc, seconds, out, healed = _interrupt_mid_trials(path, storage, signum)
        name = signal.Signals(signum).name
        assert rc == code, out[-3000:]
        assert seconds < 3, f"{name}: took {seconds:.1f} s to stop (`ray job stop` kills after 3 s)"
        last = out.strip().splitlines()[-1]
        assert last.startswith(f"ray-prune sweep: interrupted by {name}:") and "run the same command again" in last
        assert "Traceback" not in out and not _warnings(out), out[-3000:]  # one line, no Tune warnings
        assert not (storage / LOCK).exists(), f"{name} left the lock behind"
        df = load_results(str(storage))
        rows = df[df["stage"] == "healed"]
        assert set(rows["status"]) <= {"finished"}, rows[["cell_id", "status"]]  # nothing marked stopped or failed
        assert len(rows) == healed < len(cells)
        print(f"{name}: stopped in {seconds:.1f} s with {healed} of {len(cells)} cells healed")
    done = subprocess.run([sys.executable, "-m", "ray_prune.cli", "sweep", str(path), "--storage", str(storage)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    df = load_results(str(storage))
    got = set(zip(df["cell_id"], df["stage"]))
    want = ({(c.cell_id, "healed") for c in cells} | {(c.unhealed_id, "unhealed") for c in cells}
            | {(baseline_id(exp, exp.models[0].name), "baseline")})
    assert got == want and len(df) == len(want)
    assert set(df.loc[df["stage"] == "healed", "status"]) == {"finished"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_profiling_stops_within_seconds(tmp_path, tokenizer, signum):
    """Stage 1 (profiling actors, baseline evaluation) waits on Ray without blocking Python's signal handlers:
    Ctrl-C or SIGTERM there stops the sweep at once, not when the stage ends (here: all of MMLU 5-shot,
    minutes), within the 3 s `ray job stop` gives before it kills."""
    models = save_tiny_models(tmp_path, ["tiny-llama"], tokenizer)
    base = tiny_spec()
    spec = tiny_spec([str(models / "tiny-llama")], "stage1", fractions=[0.5],
                     eval={**base["eval"], "tasks": {"mmlu": {"shots": 5}}})
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = tmp_path / "store"
    proc = _start(path, storage)
    lines = []
    for line in proc.stdout:  # the driver prints this line as stage 1 starts
        lines.append(line)
        if line.startswith("stage 1:"):
            break
    time.sleep(3)
    assert proc.poll() is None, "".join(lines)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    t = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - t
    assert proc.returncode == 128 + signum, "".join(lines) + out[-3000:]
    assert seconds < 3, f"took {seconds:.1f} s to stop"
    assert "Traceback" not in out and not _warnings(out), out[-3000:]
    assert out.strip().splitlines()[-1].startswith(f"ray-prune sweep: interrupted by {signal.Signals(signum).name}")
    assert not (storage / LOCK).exists()
    assert not list(storage.glob("results/*/*-baseline.parquet"))  # the baseline was cut off, not written
