"""Experiment files: a typed schema, validated in full before any model loads.

An experiment is a grid: models x fractions x strategies x heal settings x
seeds. Each point of the grid is a *cell* (``grid.py``) with a stable hash of
everything that determines its result, which is how a rerun knows what is
already done.

The schema declares only what is the sweep's own (fractions, storage,
resources...). The ``calibration``, ``eval`` and ``heal`` sections are derived
from the core settings objects (``sections.py``); strategies, dtypes and text
datasets come from the core modules that define them.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_prune.core import dtypes
from ray_prune.core.data import TEXT_SOURCES
from ray_prune.core.select import DEFAULT_STRATEGIES, PLANNED_STRATEGIES, REPAIRS
from ray_prune.errors import UserError
from ray_prune.sweep.sections import (CalibrationSection, EvalSection, HealSection, check_model_heal,
                                     fraction_settings)
from ray_prune.sweep.tracking import Tracking

Strict = ConfigDict(extra="forbid", frozen=True)
MAX_FILE_BYTES = 1 << 20  # the largest shipped experiment is under 2 KB; a megabyte is a grid no one typed
MAX_VALUES = 100_000  # values in a parsed file, counted through YAML aliases, which share what they repeat
MAX_CELLS = 10_000  # cells a sweep may have unless --max-cells raises it; checked before any cell is built


class _Strict(BaseModel):
    model_config = Strict


def _choice(values) -> Any:
    return Literal[tuple(values)]  # type: ignore[valid-type]


class ModelSpec(_Strict):
    name: str
    heal: dict[str, Any] = Field(default_factory=dict, description="per-model heal settings, e.g. the paper's lr")
    trust_remote_code: bool = False
    fractions: list[float] | None = Field(None, min_length=1, description="this model's own fractions, in place "
                                          "of the experiment's (e.g. fewer cells for a larger model)")
    strategies: list[_choice(PLANNED_STRATEGIES)] | None = Field(None, min_length=1, description="this model's "
                                                                 "own strategies, in place of the experiment's")
    repairs: list[_choice(REPAIRS)] | None = Field(None, min_length=1, description="this model's own repairs, in "
                                                   "place of the experiment's")

    @field_validator("fractions")
    @classmethod
    def _own_fractions(cls, v: list[float] | None) -> list[float] | None:
        bad = [f for f in v or [] if not 0.0 <= f < 1.0]
        if bad:
            raise ValueError(f"fractions {bad} are outside [0, 1)")
        return v

    @field_validator("heal")
    @classmethod
    def _heal_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_model_heal(v)


class TextStream(_Strict):
    """Where a corpus streams from instead of the hub default: a private mirror, or a local folder of files."""

    path: str = Field(description="what datasets.load_dataset(path, name, split=..., streaming=True) reads")
    name: str | None = None
    split: str = "train"
    text_field: str = "text"


class Scheduler(_Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, gt=0, description="heal steps before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1)


class Resources(_Strict):
    gpus_per_trial: Union[Literal["auto"], float] = "auto"
    cpus_per_trial: Union[Literal["auto"], int] = "auto"
    max_concurrent: int | None = Field(None, gt=0)
    max_failures: int = Field(2, ge=0, description="retries of a failing trial before it is recorded as failed")
    autoscaling: bool = Field(False, description="GPU nodes join on demand: do not refuse while none are up yet")
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of one GPU of the cluster, for the memory "
                                        "plan (--check plans with it before any GPU is up; else read from a GPU)")
    gpus_per_node: int = Field(8, gt=0, description="GPUs one trial may span at most: a node's")


class FractionRange(_Strict):
    start: float
    stop: float
    step: float = Field(gt=0)

    def count(self) -> int:
        """How many values the range holds, computed without listing them."""
        return max(0, math.floor((self.stop - self.start) / self.step + 1e-9) + 1)

    def values(self) -> list[float]:
        if self.count() > MAX_CELLS:
            raise ValueError(f"the fraction range holds {self.count():,} values; a layer count of L gives at most L "
                             "distinct cells: use a larger step")
        return [round(self.start + i * self.step, 10) for i in range(self.count())]


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str | None = None
    data_dir: str | None = None
    models: list[ModelSpec] = Field(min_length=1)
    calibration: Union[CalibrationSection, list[CalibrationSection]] = Field(
        CalibrationSection(), description="one calibration setting, or a list of them: each model is profiled once "
        "per setting, and the setting is part of the identity of every cell whose layers it chooses")
    fractions: Union[list[float], FractionRange]
    strategies: list[_choice(PLANNED_STRATEGIES)] = Field(list(DEFAULT_STRATEGIES), min_length=1)
    repairs: list[_choice(REPAIRS)] = Field(["none"], min_length=1, description="training-free repairs applied "
                                            "right after pruning (a grid axis): none, or linear (ReplaceMe's "
                                            "least-squares stand-in for each removed run, folded into weights)")
    heal: HealSection = HealSection()
    eval: EvalSection = EvalSection()
    seeds: list[int] = Field([0], min_length=1)
    scheduler: Scheduler = Scheduler()
    resources: Resources = Resources()
    dtype: _choice(dtypes.CANONICAL) = "auto"
    texts: dict[_choice(TEXT_SOURCES), TextStream] = Field(
        default_factory=dict, description="corpora streamed from elsewhere than the hub (a data_dir mirror wins)")
    tracking: Tracking | None = Field(None, description="experiment trackers each cell is logged to, one run per "
                                      "cell: mlflow: <tracking URI>, wandb: {project: ...} (tracking.py)")

    @field_validator("models", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return [{"name": m} if isinstance(m, str) else m for m in (v or [])]

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        seen: set[str] = set()
        for m in v:
            if m.name in seen:
                raise ValueError(f"{m.name} is listed twice: a model is profiled once and its cells are one grid; "
                                 "give it one entry, with its own fractions, strategies or repairs there")
            seen.add(m.name)
        return v

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: Union[list[float], FractionRange]) -> Union[list[float], FractionRange]:
        values = v.values() if isinstance(v, FractionRange) else v
        if not values:
            raise ValueError("the fraction grid is empty")
        bad = [f for f in values if not 0.0 <= f < 1.0]
        if bad:
            raise ValueError(f"fractions {bad} are outside [0, 1)")
        return v

    def fraction_values(self, model: ModelSpec | None = None) -> list[float]:
        """The fractions of the grid, sorted: the model's own where it has them, else the experiment's."""
        if model is not None and model.fractions is not None:
            return sorted(set(model.fractions))
        values = self.fractions.values() if isinstance(self.fractions, FractionRange) else list(self.fractions)
        return sorted(set(values))

    def strategy_values(self, model: ModelSpec) -> list[str]:
        """The strategies of ``model``'s cells: its own where it has them, else the experiment's."""
        return list(model.strategies if model.strategies is not None else self.strategies)

    def repair_values(self, model: ModelSpec) -> list[str]:
        """The repairs of ``model``'s cells: its own where it has them, else the experiment's."""
        return list(model.repairs if model.repairs is not None else self.repairs)

    @field_validator("calibration")
    @classmethod
    def _calibrations(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("the list of calibration settings is empty")
            dumps = [c.model_dump() for c in v]
            if len({json.dumps(d, sort_keys=True) for d in dumps}) < len(dumps):
                raise ValueError("two calibration settings are the same")
        return v

    @model_validator(mode="after")
    def _heal_by_fraction(self) -> "Experiment":
        """``heal.by_fraction`` entries in increasing ``up_to``, and every heal point of every fraction valid."""
        from ray_prune.core.heal.config import HealConfig

        ups = [e.up_to for e in self.heal.by_fraction]
        if ups != sorted(set(ups)):
            raise ValueError(f"heal.by_fraction: up_to must increase from entry to entry, got {ups}")
        if not self.heal.by_fraction:
            return self
        for model in self.models:
            for fraction in self.fraction_values(model):
                for point in self.heal_points(model, fraction):
                    try:
                        HealConfig.from_point(point).validate()
                    except UserError as e:
                        raise ValueError(f"heal.by_fraction at fraction {fraction:g} for {model.name}: "
                                         f"{e.problem.removeprefix('heal: ')} ({e.fix})") from None
        return self

    def calibrations(self) -> list[CalibrationSection]:
        """Every calibration setting of the experiment (one, unless it lists several)."""
        return list(self.calibration) if isinstance(self.calibration, list) else [self.calibration]

    def heal_points(self, model: ModelSpec, fraction: float | None = None) -> list[dict[str, Any]]:
        """The heal grid of a model's cells at ``fraction``: the section's settings, the ``by_fraction`` entry that
        covers the fraction over them, and the model's own settings over both. Without a fraction: every point
        of every fraction of the grid, once each (what stage 1 and the memory plan must serve)."""
        if fraction is None:
            seen, out = set(), []
            for f in self.fraction_values(model):
                for point in self.heal_points(model, f):
                    key = json.dumps(point, sort_keys=True, default=str)
                    if key not in seen:
                        seen.add(key)
                        out.append(point)
            return out
        return self.heal.points({**fraction_settings(self.heal, fraction), **model.heal})

    def text_source(self, dataset: str = "c4"):
        """The corpus ``dataset`` as this experiment reads it (``core.data.TextSource``)."""
        base = TEXT_SOURCES[dataset]
        stream = self.texts.get(dataset)
        return base if stream is None else base.streamed_from(stream.path, stream.name, stream.split,
                                                              stream.text_field)

    def precisions(self, model: ModelSpec) -> list[str]:
        """The quantizations a model's rows are scored with: each healed cell's own (eval.precision "trained"),
        else none."""
        if self.eval.precision != "trained":
            return ["none"]
        return sorted({h["quantize"] if h.get("enabled", True) else "none" for h in self.heal_points(model)})


def _closest_key(loc: tuple, raw: Any) -> str:
    """For an unknown key, the nearest known field name at that level."""
    model: Any = Experiment
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return ""
    known = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), known, 1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list[", "union["))))
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key{_closest_key(loc, e.get('input'))}")
        elif e["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return f"{source} is not a valid experiment:\n  " + "\n  ".join(dict.fromkeys(lines))


def _count_values(data: Any, limit: int) -> int:
    """Values in ``data`` (mappings, lists and scalars), counting every use of a shared (aliased) node; stops
    counting past ``limit``."""
    count, stack = 0, [data]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return count


def parse_experiment(data: dict[str, Any], source: str = "experiment", max_cells: int = MAX_CELLS) -> Experiment:
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a YAML mapping, got {type(data).__name__}",
                        "see experiments/smoke.yaml for the layout")
    if _count_values(data, MAX_VALUES) > MAX_VALUES:
        raise UserError(f"{source} holds more than {MAX_VALUES:,} values (YAML aliases counted at every use)",
                        "write the grid with ranges (fractions: {start, stop, step}) and fewer axis values")
    grid_size(data, source, max_cells)  # list-valued axes multiply: refuse a grid too large before anything expands it
    try:
        return Experiment(**data)
    except ValidationError as e:
        raise UserError(_format(e, source), "fix the keys above; see experiments/smoke.yaml for a valid file") from None


def grid_size(data: dict[str, Any], source: str = "experiment", max_cells: int = MAX_CELLS) -> int:
    """An upper bound on the cells of a raw experiment (models x fractions x strategies x heal points x seeds), from
    the lengths of its lists alone; a UserError naming the count, the axes and the fix above ``max_cells``."""
    from ray_prune.sweep.sections import HEAL_AXES

    def length(v: Any) -> int:
        return len(v) if isinstance(v, (list, tuple)) else 1

    fractions = data.get("fractions")
    if isinstance(fractions, dict):
        try:
            n_fractions = FractionRange(**fractions).count()
        except (TypeError, ValueError, ValidationError):
            n_fractions = 1  # the schema reports what is wrong with it
    else:
        n_fractions = length(fractions)
    heal = data.get("heal") if isinstance(data.get("heal"), dict) else {}
    models = data.get("models") if isinstance(data.get("models"), list) else []
    strategies = length(data["strategies"]) if "strategies" in data else len(DEFAULT_STRATEGIES)
    axes = {"fractions": n_fractions, "strategies": strategies, "repairs": length(data.get("repairs")),
            "seeds": length(data.get("seeds"))}
    total = 0

    def own_axis(m: Any, key: str, default: int) -> int:
        """A model's own list for an axis (fractions, strategies, repairs) in place of the experiment's."""
        return length(m[key]) if isinstance(m, dict) and m.get(key) is not None else default

    for m in models or [None]:
        own = m.get("heal", {}) if isinstance(m, dict) and isinstance(m.get("heal"), dict) else {}
        own_fractions = own_axis(m, "fractions", n_fractions)
        points = 1
        for key in HEAL_AXES:
            n = length(own.get(key, heal.get(key)))
            points *= n
            if n > 1:
                axes[f"heal.{key}"] = max(axes.get(f"heal.{key}", 1), n)
        rules = own_axis(m, "strategies", axes["strategies"]) * own_axis(m, "repairs", axes["repairs"])
        total += own_fractions * rules * points * axes["seeds"]
    if total > max_cells:
        multiplied = " x ".join(f"{k} {v}" for k, v in axes.items() if v > 1)
        raise UserError(f"{source} makes up to {total:,} cells ({len(models)} model(s) x {multiplied}), more than "
                        f"the limit of {max_cells:,}",
                        "shrink the axes that multiply, or raise the limit with ray-prune sweep --max-cells N if "
                        "you mean it")
    return total


def load_experiment(path: str | Path, max_cells: int = MAX_CELLS) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment file {path} does not exist", "pass the path of a YAML file in experiments/")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(f"experiment file {path} is {size:,} bytes, more than the {MAX_FILE_BYTES:,} an experiment "
                        "may have", "write the grid with ranges (fractions: {start, stop, step}) instead of long lists")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid YAML: {e}".splitlines()[0], "fix the YAML syntax") from None
    return parse_experiment(data, str(path), max_cells)
