"""Experiment trackers: a tiny sweep on real local Ray logs each cell to a real MLflow file store and to W&B's real
offline mode, one run per cell named by the cell, with its heal curve, its final metrics and its provenance; read
back through MLflow's client and from W&B's run files. Secrets planted in the environment reach neither.

One sweep (both trackers at once) serves the module's tracker tests; the schema and the up-front checks run
without Ray.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import faults
import pytest
from helpers import save_tiny_models, tiny_spec

from ray_prune.errors import UserError
from ray_prune.sweep.experiment import parse_experiment
from ray_prune.sweep.tracking import Tracking, cell_name, cell_params, check, final_values, trial_params

EXPERIMENT = "tracked"
# Fake credentials that must reach no tracker, and no file the sweep writes or makes Ray or W&B write.
SECRETS = {"HF_TOKEN": "hf_SENTINEL-tracking-not-a-token-81c3", "AWS_ACCESS_KEY_ID": "SENTINELTRACKKEY81C300",
           "AWS_SECRET_ACCESS_KEY": "sentinel/tracking+secret-81c3", "WANDB_API_KEY": "sentinel" + "0" * 32 + "81c3",
           "MLFLOW_TRACKING_TOKEN": "sentinel-mlflow-token-81c3"}


# ----------------------------------------------------------------------------- the schema and the checks


def _tracking(**section) -> dict:
    return tiny_spec(models=["m"], name=EXPERIMENT, tracking=section)


def test_the_tracking_section_takes_a_uri_or_a_mapping_and_names_a_tracker():
    short = parse_experiment(_tracking(mlflow="http://mlflow.internal:5000"))
    assert short.tracking.mlflow.uri == "http://mlflow.internal:5000" and short.tracking.mlflow.experiment is None
    full = parse_experiment(_tracking(mlflow={"uri": "file:///srv/mlruns", "experiment": "pruning"},
                                      wandb={"project": "prune", "entity": "lab", "mode": "offline"}))
    assert (full.tracking.mlflow.experiment, full.tracking.wandb.entity, full.tracking.wandb.mode) == (
        "pruning", "lab", "offline")
    assert parse_experiment(tiny_spec(models=["m"])).tracking is None
    # The section round-trips through the experiment record (Ray workers re-read the experiment from it).
    again = parse_experiment(full.model_dump(mode="json"))
    assert again.tracking == full.tracking


@pytest.mark.parametrize("section, pattern", [
    ({}, "names no tracker"),
    ({"mlflow": {"uri": "http://x:5000", "run": "a"}}, r"tracking\.mlflow\.run: unknown key"),
    ({"wandb": {"project": "p", "mode": "dryrun"}}, r"tracking\.wandb\.mode"),
    ({"wandb": {"entity": "lab"}}, r"tracking\.wandb\.project: required key is missing"),
    ({"mlflow": "https://alice:hunter2@mlflow.example.com"}, "carries credentials"),
    ({"mlflow": "postgresql://mlflow:pw@db/mlflow"}, "carries credentials"),
    ({"mlflow": "https://mlflow.example.com/?access_token=abc"}, "carries credentials"),
])
def test_a_bad_tracking_section_is_refused_naming_the_key(section, pattern):
    with pytest.raises(UserError, match=pattern) as err:
        parse_experiment(_tracking(**section))
    assert "hunter2" not in str(err.value) and ":pw@" not in str(err.value)


def test_checks_refuse_what_the_driver_could_not_track(monkeypatch, tmp_path):
    from ray_prune.sweep.plan import JOB_CONFIG_ENV

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check(Tracking(mlflow=f"file://{tmp_path}/mlruns"))
    check(Tracking(mlflow="http://localhost:5000", wandb={"project": "p"}))
    check(None)

    # A relative store under `ray job submit` would be written in Ray's temporary copy of the working directory.
    monkeypatch.setenv(JOB_CONFIG_ENV, "{}")
    with pytest.raises(UserError, match="relative path, and this sweep runs as a Ray job") as err:
        check(Tracking(mlflow="mlruns"))
    assert "file:///" in err.value.fix
    with pytest.raises(UserError, match="relative path"):
        check(Tracking(mlflow="sqlite:///mlflow.db"))
    check(Tracking(mlflow=f"file://{tmp_path}/mlruns"))
    monkeypatch.delenv(JOB_CONFIG_ENV)
    check(Tracking(mlflow="mlruns"))  # a local sweep: the path is the user's working directory's

    # MLflow 3 refuses file stores unless they are opted into: said before the sweep starts, with the fix.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    with pytest.raises(UserError, match="file store") as err:
        check(Tracking(mlflow=str(tmp_path / "mlruns")))
    assert "MLFLOW_ALLOW_FILE_STORE=true" in err.value.fix
    check(Tracking(mlflow="http://localhost:5000"))

    # A tracker whose package is missing: refused, naming the install line.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="wandb package is not installed") as err:
        check(Tracking(wandb={"project": "p"}))
    assert "ray-prune[trackers]" in err.value.fix


def test_a_run_holds_the_cells_settings_and_what_its_row_measured():
    from dataclasses import replace

    from ray_prune.sweep.grid import expand
    from ray_prune.sweep.rows import cell_row, curve_columns
    from ray_prune.sweep.trial import TrialSpec

    cells = expand(parse_experiment(tiny_spec(models=["org/m"], name=EXPERIMENT)), {"org/m": 6})
    deep = next(c for c in cells if c.strategy == "deepest")
    params = cell_params(deep)
    assert (params["n"], params["heal/steps"], params["eval/tasks/boolq/limit"]) == (deep.n, 4, 3)
    assert not any(k.startswith("calibration/") for k in params)  # deepest: no calibration chose its layers
    similar = replace(next(c for c in cells if c.strategy == "similarity"), table_key="k1")
    assert cell_params(similar)["calibration/samples"] == 8
    assert cell_name(deep) == f"m n={deep.n} deepest {deep.cell_id}"

    # Cells that share a trial (identical computations) are named on the run that computed them.
    spec = TrialSpec(cell=deep, storage_uri="unused", data_dir=None, threads=1, baseline_loss=None,
                     reference_loss=None, do_unhealed=False, twins=[similar])
    assert trial_params(spec)["twins"] == [similar.cell_id]
    assert "twins" not in trial_params(replace(spec, twins=[]))

    # A row's measurements are the metrics; its provenance and text the tags; its settings and curve neither.
    row = cell_row(deep, "healed", "finished", c4_loss=2.5, boolq_acc=0.5, boolq_n=3, wall_s=1.25,
                   eval_precision="fp32", device="cpu", family="llama", **curve_columns([(2, 3.0, 3.1)]))
    metrics, provenance = final_values(deep, row)
    assert metrics == {"c4_loss": 2.5, "boolq_acc": 0.5, "boolq_n": 3.0, "wall_s": 1.25}
    assert {"device": "cpu", "family": "llama", "eval_precision": "fp32"}.items() <= provenance.items()
    assert provenance["code_version"] == row["code_version"] and provenance["boolq_shots"] == str(row["boolq_shots"])
    assert not {"n", "heal_lr", "cell_id", "curve_step"} & (set(provenance) | set(metrics))


# ----------------------------------------------------------------------------- a tracked sweep


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tracking")
    return {"mlflow": root / "mlruns", "wandb": root / "wandb-dir", "storage": root / "store"}


@pytest.fixture(scope="module")
def ray_tracked(places):
    places["wandb"].mkdir()
    # W&B's logging actors and MLflow's client read these where they run: Ray's processes inherit them.
    yield from faults.local_ray(WANDB_MODE="offline", WANDB_DIR=str(places["wandb"]), WANDB_SILENT="true",
                                MLFLOW_ALLOW_FILE_STORE="true", **SECRETS)


@pytest.fixture(scope="module")
def swept(ray_tracked, places, tmp_path_factory, tokenizer):
    """The tiny sweep (two cells), tracked in an MLflow file store and in W&B offline; its rows."""
    from ray_prune.sweep.run import run_sweep

    models = save_tiny_models(tmp_path_factory.mktemp("models"), ["tiny-llama"], tokenizer)
    exp = parse_experiment(tiny_spec(models=[str(models / "tiny-llama")], name=EXPERIMENT, fractions=[0.2, 0.5],
                                     strategies=["deepest"],
                                     tracking={"mlflow": places["mlflow"].as_uri(),
                                               "wandb": {"project": "ray-prune-tests"}}))
    df = run_sweep(exp, storage=str(places["storage"]), progress=False)
    healed = df[df["stage"] == "healed"]
    assert len(healed) == 2 and set(healed["status"]) == {"finished"}
    return healed.set_index("cell_id")


def _expected_name(row) -> str:
    return f"{Path(row['model']).name} n={row['n']} {row['strategy']} {row.name}"


def test_mlflow_holds_one_run_per_cell_with_its_curve_final_metrics_and_provenance(swept, places):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=places["mlflow"].as_uri())
    experiment = client.get_experiment_by_name(EXPERIMENT)  # grouped by the experiment's name
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(_expected_name(row) for _, row in swept.iterrows())
    for run in runs:
        row = swept.loc[run.data.params["cell_id"]]
        assert run.info.run_name == _expected_name(row) == cell_name(_cell_of(row))
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert (params["n"], params["strategy"], params["model"]) == (str(row["n"]), "deepest", row["model"])
        assert params["heal/steps"] == str(int(row["heal_steps"])) and params["eval/tasks/boolq/limit"] == "3"
        assert not any("TrialSpec" in v or "storage" in k for k, v in params.items())  # settings, not the object
        # The heal curve: heal_val_loss at each heal step, as the row's curve holds it.
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "heal_val_loss"))
        assert history == list(zip(row["curve_step"], row["curve_val_loss"]))
        assert [s for s, _ in history] == [2, 4]
        # The final metrics are the row's, and its provenance comes with them.
        metrics = run.data.metrics
        for column in ("c4_loss", "boolq_acc", "loss_ratio", "tokens_seen", "wall_s"):
            assert metrics[f"final/{column}"] == pytest.approx(float(row[column])), column
        tags = run.data.tags
        for column in ("code_version", "torch_version", "eval_precision", "device", "adapter"):
            assert tags[column] == str(row[column]), column
        assert tags["ray_prune.experiment"] == EXPERIMENT and "final/code_version" not in metrics


def _cell_of(row):
    from ray_prune.sweep.grid import Cell

    return Cell(experiment=EXPERIMENT, model=row["model"], trust_remote_code=False, num_layers=6,
                fraction=row["fraction"], n=int(row["n"]), strategy=row["strategy"], seed=0, heal={},
                calibration={}, eval={}, dtype="fp32", cell_id=row.name)


def _wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header (``:W&B``, a magic number, a version),
    then LevelDB's log format, 32 KiB blocks of chunks (checksum, length, type: full, first, middle, last), each
    record one ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def _wandb_run(run_file: Path) -> dict:
    """What a W&B offline run holds: its run record, its config and its history rows (``{key: value}``)."""
    out: dict = {"config": {}, "history": []}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            out["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in record.history.item})
    return out


def test_wandb_offline_holds_one_run_per_cell_with_its_curve_final_metrics_and_provenance(swept, places):
    run_files = sorted((places["wandb"] / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = [_wandb_run(f) for f in run_files]
    assert sorted(r["run"].display_name for r in runs) == sorted(_expected_name(row) for _, row in swept.iterrows())
    for run in runs:
        row = swept.loc[run["config"]["cell_id"]]
        assert run["run"].project == "ray-prune-tests" and run["run"].run_group == EXPERIMENT
        assert run["config"]["n"] == row["n"] and run["config"]["heal/steps"] == int(row["heal_steps"])
        # settings, not the TrialSpec (Ray adds trial_log_path, the trial's folder, which Tune names by its config)
        assert not any("TrialSpec" in str(v) for k, v in run["config"].items() if k != "trial_log_path")
        curve = [(h["heal_step"], h["heal_val_loss"]) for h in run["history"] if "heal_val_loss" in h]
        assert curve == list(zip(row["curve_step"], row["curve_val_loss"]))
        final = next(h for h in run["history"] if "final/c4_loss" in h)
        assert final["final/c4_loss"] == pytest.approx(row["c4_loss"])
        assert final["final/boolq_acc"] == pytest.approx(row["boolq_acc"])
        assert run["config"]["provenance/code_version"] == row["code_version"]
        assert run["config"]["provenance/device"] == row["device"]


def test_no_secret_reaches_a_tracker_or_a_log(swept, places):
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path())
    searched = 0
    for root in (places["mlflow"], places["wandb"], places["storage"], logs):
        files = [p for p in root.rglob("*") if p.is_file()]
        assert files, root
        searched += len(files)
        leaked = [(str(p), k) for p in files for k, v in SECRETS.items() if v.encode() in p.read_bytes()]
        assert not leaked, leaked
    # The planted values were there to leak: the driver's environment, and so Ray's processes', held them.
    assert all(os.environ[k] == v for k, v in SECRETS.items()) and searched > 10

