"""Experiment trackers: the ``tracking`` section of an experiment, and the Ray Tune logger callbacks that send
each cell to MLflow or Weights & Biases.

Researchers follow sweeps in their tracker, so a sweep that names one attaches Ray Tune's own integrations
(``MLflowLoggerCallback``, ``WandbLoggerCallback``) the way any Tune user does. What they send is adapted to a
sweep of cells: one run per cell, named by the cell and grouped by experiment; the cell's settings as its
parameters (the cell's fields as a flat dict: ``n``, ``heal/lr``..., never the ``TrialSpec`` the trial config
holds); the heal curve as it is reported (``heal_val_loss`` and the rest at each heal step); and, when the
trial ends, the numbers of the cell's result row as ``final/<column>`` metrics and its provenance (code and
library versions, precision, device...) as MLflow tags or W&B config. The row is read back from storage, the
one home of a cell's results, so the tracker shows exactly what the dataset holds.

Secrets stay out: nothing is taken from the environment. Ray's W&B callback reads ``WANDB_API_KEY`` and
hands it to its logging actors in their ``runtime_env``, which Ray writes in plain text to its session logs;
here the actors get no environment of their own, and W&B finds its credentials where they run (``wandb
login`` or the variable on that node), as MLflow does in the driver (``MLFLOW_TRACKING_TOKEN``...). URIs that
carry credentials are refused: the experiment is recorded in storage.

The schema half of this module is imported with every experiment file (and by Ray workers that re-read one),
so it imports nothing heavy; the callback classes are built on first use, once Ray Tune is loaded anyway.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ray_prune.errors import UserError

if TYPE_CHECKING:  # at run time: grid and experiment import this module's schema, trial imports torch
    from ray_prune.sweep.experiment import Experiment
    from ray_prune.sweep.grid import Cell
    from ray_prune.sweep.trial import TrialSpec

log = logging.getLogger(__name__)
INSTALL_FIX = "pip install 'ray-prune[trackers]'"
_SECRET_WORDS = ("token", "password", "secret", "key", "auth", "credential")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MLflowTracking(_Section):
    uri: str = Field(min_length=1, description="MLflow tracking URI: http(s)://server, databricks, "
                     "sqlite:////abs/mlflow.db, or a file store (file:///abs/path or an absolute path)")
    experiment: str | None = Field(None, min_length=1, description="MLflow experiment (default: the experiment's "
                                   "name)")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        parts = urlsplit(v)
        if "@" in parts.netloc or any(w in k.lower() for k, _ in parse_qsl(parts.query) for w in _SECRET_WORDS):
            raise ValueError(f"the MLflow URI {parts.scheme}://{parts.hostname or ''}/... carries credentials, which "
                             "would be recorded with the experiment (remove them: MLflow reads "
                             "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN from the "
                             "environment; a database password belongs in its own config, e.g. ~/.pgpass)")
        return v


class WandbTracking(_Section):
    project: str = Field(min_length=1, description="W&B project")
    entity: str | None = Field(None, min_length=1, description="W&B team or user (default: the login's)")
    group: str | None = Field(None, min_length=1, description="W&B run group (default: the experiment's name)")
    mode: Literal["online", "offline"] | None = Field(
        None, description="offline: runs stay in files under WANDB_DIR for `wandb sync` (default: W&B's own "
        "setting, WANDB_MODE, else online)")


class Tracking(_Section):
    """Where each cell is tracked; either or both."""

    mlflow: MLflowTracking | None = None
    wandb: WandbTracking | None = None

    @field_validator("mlflow", mode="before")
    @classmethod
    def _uri_shorthand(cls, v: Any) -> Any:
        return {"uri": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_at_least(self) -> Tracking:
        if self.mlflow is None and self.wandb is None:
            raise ValueError("names no tracker: give mlflow: <tracking URI> and/or wandb: {project: ...}")
        return self


# ----------------------------------------------------------------------------- checks on the driver's machine


def _local_path(uri: str) -> str | None:
    """The file an MLflow URI names on the driver's disk (a file store, a SQLite database), else None."""
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite:///")
    if uri.startswith("file:"):
        return urlsplit(uri).path
    return None if "://" in uri or uri.startswith("databricks") else uri


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or _local_path(uri) == uri


def check(tracking: Tracking | None) -> None:
    """What the trackers need where the sweep's driver runs, refused before anything runs (the schema checks
    only the file's form: Ray workers re-read it, and they need no tracker): the packages installed, an MLflow
    store the driver can open, and no relative store path under ``ray job submit``."""
    if tracking is None:
        return
    if tracking.mlflow is not None:
        _check_mlflow(tracking.mlflow.uri)
    if tracking.wandb is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("tracking.wandb is set, but the wandb package is not installed",
                            f"{INSTALL_FIX} (or pip install wandb)") from None


def _check_mlflow(uri: str) -> None:
    from importlib.util import find_spec

    from ray_prune.sweep.plan import running_as_ray_job

    if find_spec("mlflow") is None:
        raise UserError("tracking.mlflow is set, but MLflow is not installed", f"{INSTALL_FIX} (or pip install "
                        "mlflow-skinny)")
    path = _local_path(uri)
    if path is not None and running_as_ray_job() and not os.path.isabs(os.path.expanduser(path)):
        raise UserError(f"the MLflow store {uri!r} is a relative path, and this sweep runs as a Ray job: it would "
                        "be written inside Ray's temporary copy of the job's working directory and vanish with "
                        "the session", "give an absolute path (file:///mnt/shared/mlruns) or a tracking server "
                        "(http://host:5000)")
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme in ("sqlite", "postgresql", "mysql", "mssql") and (find_spec("sqlalchemy") is None
                                                                  or find_spec("alembic") is None):
        raise UserError(f"the MLflow store {uri!r} is a database, which needs the full MLflow package",
                        "pip install mlflow (or log to a tracking server: http://host:5000)")
    if _is_file_store(uri):
        from mlflow import environment_variables

        allow = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
        if allow is not None and not allow.get():
            raise UserError(f"the MLflow store {uri!r} is a file store, which this MLflow version refuses unless "
                            "MLFLOW_ALLOW_FILE_STORE=true",
                            "set MLFLOW_ALLOW_FILE_STORE=true where the sweep runs, or use sqlite:////abs/mlflow.db "
                            "(pip install mlflow) or a tracking server")


# ----------------------------------------------------------------------------- what a run holds


def cell_name(cell: Cell) -> str:
    """A run's name: what a researcher scans a run list by (model, layers removed, strategy), then the id that
    tells apart cells that differ only in a heal setting or seed."""
    model = str(cell.model).rstrip("/").rsplit("/", 1)[-1]
    return f"{model} n={cell.n} {cell.strategy} {cell.cell_id}"


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}/{k}" if prefix else k, v, out)
    elif value is not None:
        out[prefix] = list(value) if isinstance(value, tuple) else value


def cell_params(cell: Cell) -> dict[str, Any]:
    """A cell's settings as a flat dict of plain values (``heal/lr``, ``eval/tasks/boolq/limit``): the cell as
    the driver planned it, nothing of the machine it ran on (that is the row's provenance). Calibration settings
    only where they chose the layers, as in rows."""
    settings = cell.to_dict()
    if not cell.table_key:
        settings.pop("calibration")
    params: dict[str, Any] = {}
    _flat("", settings, params)
    return params


def trial_params(spec: TrialSpec) -> dict[str, Any]:
    """A run's parameters: its cell's settings, and the cells that share its trial (identical computations,
    ``trial.fold_identical``), which get the same rows and no run of their own."""
    params = cell_params(spec.cell)
    if spec.twins:
        params["twins"] = [c.cell_id for c in spec.twins]
    return params


def cell_result(spec: TrialSpec) -> dict[str, Any] | None:
    """The row that holds a cell's result (healed, or unhealed for a cell that does not heal), read from storage;
    None if the trial wrote none (ASHA stopped it: the driver writes that row after Tune), or if it cannot be read
    now: the run then lacks its final values, and the sweep's own outcome names the row."""
    from ray_prune.ledger.layout import row_path
    from ray_prune.ledger.storage import Storage

    cell = spec.cell
    path = row_path(cell.model, cell.cell_id, "healed") if cell.heals else row_path(cell.model, cell.unhealed_id,
                                                                                     "unhealed")
    try:
        storage = Storage(spec.storage_uri)
        return storage.read_table(path).to_pylist()[0] if storage.exists(path) else None
    except (OSError, ValueError) as e:  # pyarrow's errors are these too
        log.warning("tracking: the result row of cell %s was not read (%s)", cell.cell_id, e)
        return None


def final_values(cell: Cell, row: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """A result row as (metrics, provenance). What the trial measured is what the row holds beyond the columns
    ``rows.cell_row`` fills from the cell: its numbers (scores, loss ratio, tokens, cost) are the metrics, its
    text (device, family, adapter, when) joins the provenance columns the ledger declares (code version,
    library versions, precision, task configs). Lists (the curve: the run's history already) are left out."""
    from ray_prune.ledger.schema import PROVENANCE_COLUMNS, TASK_PROVENANCE_COLUMNS
    from ray_prune.sweep.rows import cell_row

    planned = set(cell_row(cell, str(row["stage"]), str(row["status"])))
    declared = set(PROVENANCE_COLUMNS).union(*TASK_PROVENANCE_COLUMNS.values())
    metrics, provenance = {}, {}
    for k, v in row.items():
        if v is None or isinstance(v, (list, dict)):
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if k in declared or (k not in planned and not number):
            provenance[k] = str(v)
        elif k not in planned:
            metrics[k] = float(v)
    return metrics, provenance


# ----------------------------------------------------------------------------- the callbacks


def callbacks(exp: Experiment) -> list:
    """The Tune callbacks of the experiment's trackers (none without a ``tracking`` section)."""
    t = exp.tracking
    if t is None:
        return []
    check(t)
    out = []
    if t.mlflow is not None:
        out.append(mlflow_callback_class()(tracking_uri=t.mlflow.uri, experiment_name=t.mlflow.experiment or exp.name,
                                           tags={"ray_prune.experiment": exp.name}))
    if t.wandb is not None:
        kwargs = {k: v for k, v in (("entity", t.wandb.entity), ("mode", t.wandb.mode)) if v is not None}
        out.append(wandb_callback_class()(project=t.wandb.project, group=t.wandb.group or exp.name, **kwargs))
    return out


def _closing_report(result: dict[str, Any]) -> bool:
    """The trial's last report (``completed``) repeats its last heal evaluation; its news, the scores, come from
    the row when the trial ends."""
    return bool(result.get("completed"))


@functools.cache
def mlflow_callback_class() -> type:
    """Ray's MLflow callback, for cells (built on first use: importing it loads Ray Tune and MLflow)."""
    from mlflow.tracking import MlflowClient
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class MLflowCellLogger(MLflowLoggerCallback):
        """One MLflow run per cell: named by the cell, its settings as parameters, the heal curve by heal step,
        the result row's numbers as ``final/*`` metrics and its text as tags."""

        def log_trial_start(self, trial) -> None:
            if trial in self._trial_runs:  # a retry: the same run goes on
                return
            spec = trial.config["run"]
            run = self.mlflow_util.start_run(run_name=cell_name(spec.cell), tags={
                **self.tags, "trial_name": str(trial), "cell_id": spec.cell.cell_id})
            self._trial_runs[trial] = run.info.run_id
            self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=trial_params(spec))

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            if trial not in self._trial_runs:
                self.log_trial_start(trial)
            if _closing_report(result):
                return
            metrics = {k: v for k, v in result.items() if k != "config"}
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics,
                                         step=int(result.get("heal_step", iteration)))

        def log_trial_end(self, trial, failed: bool = False) -> None:
            if trial not in self._trial_runs:
                self.log_trial_start(trial)
            spec = trial.config["run"]
            row = None if failed else cell_result(spec)
            if row is not None:
                metrics, provenance = final_values(spec.cell, row)
                run_id = self._trial_runs[trial]
                step = int((trial.last_result or {}).get("heal_step", 0))
                self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log={"final": metrics}, step=step)
                client = MlflowClient(tracking_uri=self.tracking_uri)
                for k, v in provenance.items():
                    client.set_tag(run_id, k, v)
            super().log_trial_end(trial, failed)

    return MLflowCellLogger


@functools.cache
def wandb_callback_class() -> type:
    """Ray's W&B callback, for cells (built on first use: importing it loads Ray Tune and W&B)."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    class WandbCellLogger(WandbLoggerCallback):
        """One W&B run per cell: named by the cell, its settings as config, the heal curve as history, the
        result row's numbers as ``final/*`` and its text in the config under ``provenance/``."""

        AUTO_CONFIG_KEYS = [*WandbLoggerCallback.AUTO_CONFIG_KEYS, "provenance"]

        def setup(self, *args, **kwargs) -> None:
            """Not Ray's setup: that one reads ``WANDB_API_KEY`` and passes it to the logging actors in their
            ``runtime_env``, which Ray logs in plain text. The actors run on the driver's node (they write in
            the trial's local folder) with no environment of their own; W&B finds its login there."""
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._remote_logger_class = ray.remote(num_cpus=0, scheduling_strategy=here, max_restarts=-1,
                                                   max_task_retries=-1)(self._logger_actor_cls)

        def log_trial_start(self, trial) -> None:
            spec = trial.config["run"]
            exclude = [*self._exclude_results, *self.excludes, "config"]
            # git off: a remote's URL may carry a token, and the row's code version is the provenance; console
            # off: the logging actor prints nothing of the trial's
            settings = {"disable_git": True, "console": "off"}
            self._start_logging_actor(trial, exclude, id=trial.trial_id, name=cell_name(spec.cell), group=self.group,
                                      project=self.project, config=trial_params(spec), resume=False,
                                      allow_val_change=True, settings=settings, **self.kwargs)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            # Ray's logging actor copies a result's "config" (here the TrialSpec) into the run's config
            if not _closing_report(result):
                super().log_trial_result(iteration, trial, {k: v for k, v in result.items() if k != "config"})

        def log_trial_end(self, trial, failed: bool = False) -> None:
            spec = trial.config["run"]
            row = None if failed or trial not in self._trial_logging_actors else cell_result(spec)
            if row is not None:
                metrics, provenance = final_values(spec.cell, row)
                super().log_trial_result(0, trial, {"final": metrics, "provenance": provenance})
            super().log_trial_end(trial, failed)

    return WandbCellLogger
