"""The first hour of a new user: what will run is said before it runs, bad numbers are refused before anything
loads, Ctrl-C is one line everywhere, files get the user's usual permissions, and every flag has help."""

from __future__ import annotations

import argparse
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml

from helpers import REPO, save_tiny_models, tiny_spec
from ray_prune.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_argument_has_help_and_every_command_shows_defaults():
    for name, sub in _subparsers(build_parser()).items():
        assert sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 5, f"ray-prune {name} {action.dest} has no help"
    text = " ".join(_subparsers(build_parser())["eval"].format_help().split())
    assert "(default: mmlu:5,boolq:0)" in text and "(default: 1024)" in text


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_a_bad_limit_is_refused_before_the_model_loads(limit, tmp_path, capsys):
    t = time.perf_counter()
    assert main(["eval", "smollm2-135m", "--tasks", "boolq", "--limit", limit, "--out", str(tmp_path / "s.json")]) == 2
    assert time.perf_counter() - t < 5  # no model was loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and f"limit must be a positive integer, got {limit}" in err[0] and err[1].startswith("  fix:")
    assert not (tmp_path / "s.json").exists()


def test_check_says_which_fractions_share_a_cell_and_leaves_nothing_behind(tmp_path, capsys):
    spec = tiny_spec(["smollm2-135m"], "merged", fractions=[0.1, 0.11, 0.5])
    path = tmp_path / "merged.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = tmp_path / "store"
    assert main(["sweep", str(path), "--check", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m: fraction 0.11 removes n=3 of 30 layers, as fraction 0.1 does: one cell for both" in out
    assert "smollm2-135m (L=30): 4 cells, 4 to run" in out
    assert not storage.exists(), "--check created the storage folder"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tiny_spec(["smollm2-135m"], "bad", fractions=[0.1], heal={"steps": 0})))
    assert main(["sweep", str(bad), "--storage", str(storage)]) == 2
    assert not storage.exists(), "a refused sweep created the storage folder"


def test_a_grid_that_prunes_nothing_skips_the_profile(tmp_path, tokenizer):
    import ray

    from ray_prune.sweep.experiment import parse_experiment
    from ray_prune.sweep.run import run_sweep

    models = save_tiny_models(tmp_path / "m", ["tiny-llama"], tokenizer)
    exp = parse_experiment(tiny_spec([str(models / "tiny-llama")], "none", fractions=[0.0]))
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        df = run_sweep(exp, storage=str(tmp_path / "store"), progress=False)
    finally:
        ray.shutdown()
    assert set(df["stage"]) == {"baseline", "healed"} and len(df) == 2
    assert not list((tmp_path / "store").glob("tables/*")), "a distance table no cell uses was computed"


def test_pruned_models_get_the_users_usual_permissions(tmp_path, tokenizer):
    models = save_tiny_models(tmp_path / "m", ["tiny-llama"], tokenizer)
    old = os.umask(0o022)
    try:
        assert main(["prune", str(models / "tiny-llama"), "--strategy", "deepest", "--n", "2", "--dtype", "fp32",
                     "--out", str(tmp_path / "pruned")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "pruned"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary was left behind"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_step_command_stops_on_a_signal_with_one_line_and_nothing_partial(tmp_path, signum):
    """``ray-prune profile`` of a real model, stopped mid-profile: exit 130 / 143, one line, no output file."""
    out = tmp_path / "table.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "ray_prune.cli", "profile", "smollm2-135m", "--samples", "64",
                             "--batch-size", "2", "--max-length", "512", "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:  # the profile has started once its progress bar writes to stderr
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        line = proc.stderr.readline()
        if "profile" in line:
            break
    os.kill(proc.pid, signum)
    try:  # seconds on a quiet machine; once, on a 2-core machine running a study beside the suite, over a minute
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(f"ray-prune profile: interrupted by {name}")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("questions,banner", [(5, True), (250, False)])
def test_the_report_page_says_how_many_questions_and_when_that_is_too_few(tmp_path, questions, banner):
    from ray_prune.ledger.rows import write_row
    from ray_prune.ledger.storage import Storage
    from ray_prune.report.write import write_report

    s = Storage(str(tmp_path / "store"))
    row = dict(experiment="t", model="m", num_layers=10, status="finished", boolq_n=questions, boolq_acc=0.6,
               boolq_acc_stderr=0.2)
    write_row(s, {**row, "stage": "baseline", "cell_id": "b", "n": 0, "strategy": "none"})
    write_row(s, {**row, "stage": "healed", "cell_id": "h", "n": 2, "strategy": "deepest"})
    text = " ".join(write_report(s.uri, str(tmp_path / "rep")).read_text().split())
    assert f"BoolQ: {questions} questions" in text
    assert ("This run checks the pipeline; it is not a measurement" in text) is banner
