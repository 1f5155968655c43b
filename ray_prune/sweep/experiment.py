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
import math
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ray_prune.core import dtypes
from ray_prune.core.data import TEXT_SOURCES
from ray_prune.core.select import PLANNED_STRATEGIES
from ray_prune.errors import UserError
from ray_prune.sweep.sections import CalibrationSection, EvalSection, HealSection, check_model_heal

Strict = ConfigDict(extra="forbid", frozen=True)


class _Strict(BaseModel):
    model_config = Strict


def _choice(values) -> Any:
    return Literal[tuple(values)]  # type: ignore[valid-type]


class ModelSpec(_Strict):
    name: str
    heal: dict[str, Any] = Field(default_factory=dict, description="per-model heal settings, e.g. the paper's lr")
    trust_remote_code: bool = False

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

    def values(self) -> list[float]:
        count = math.floor((self.stop - self.start) / self.step + 1e-9) + 1
        return [round(self.start + i * self.step, 10) for i in range(count)]


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str | None = None
    data_dir: str | None = None
    models: list[ModelSpec] = Field(min_length=1)
    calibration: CalibrationSection = CalibrationSection()
    fractions: Union[list[float], FractionRange]
    strategies: list[_choice(PLANNED_STRATEGIES)] = Field(list(PLANNED_STRATEGIES), min_length=1)
    heal: HealSection = HealSection()
    eval: EvalSection = EvalSection()
    seeds: list[int] = Field([0], min_length=1)
    scheduler: Scheduler = Scheduler()
    resources: Resources = Resources()
    dtype: _choice(dtypes.CANONICAL) = "auto"
    texts: dict[_choice(TEXT_SOURCES), TextStream] = Field(
        default_factory=dict, description="corpora streamed from elsewhere than the hub (a data_dir mirror wins)")

    @field_validator("models", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return [{"name": m} if isinstance(m, str) else m for m in (v or [])]

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

    def fraction_values(self) -> list[float]:
        values = self.fractions.values() if isinstance(self.fractions, FractionRange) else list(self.fractions)
        return sorted(set(values))

    def heal_points(self, model: ModelSpec) -> list[dict[str, Any]]:
        return self.heal.points(model.heal)

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


def parse_experiment(data: dict[str, Any], source: str = "experiment") -> Experiment:
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a YAML mapping, got {type(data).__name__}",
                        "see experiments/smoke.yaml for the layout")
    try:
        return Experiment(**data)
    except ValidationError as e:
        raise UserError(_format(e, source), "fix the keys above; see experiments/smoke.yaml for a valid file") from None


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment file {path} does not exist", "pass the path of a YAML file in experiments/")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid YAML: {e}".splitlines()[0], "fix the YAML syntax") from None
    return parse_experiment(data, str(path))
