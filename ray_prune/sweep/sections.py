"""The experiment sections that hold a core settings object (``calibration``, ``eval``, ``heal``), derived from it.

Each section is a pydantic model built field by field from a settings dataclass (``core.settings``): the same
names, types, defaults and reasons, choices read from their owners, and the values checked by the dataclass's
own ``validate``, so every rule lives in one place. A section may add keys of the sweep's own (``eval.unhealed``,
``heal.enabled``) and may let the settings whose metadata says ``axis`` be lists, which become grid axes.
"""

from __future__ import annotations

import itertools
import typing
from dataclasses import MISSING, Field
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, create_model, model_validator
from pydantic import Field as PydanticField

from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.evaluation.config import EvalConfig
from ray_prune.core.heal.config import HealConfig
from ray_prune.errors import UserError


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def _problem(e: UserError, owner: str) -> str:
    """A UserError as the one line pydantic shows under the section's name."""
    problem = e.problem.removeprefix(f"{owner}: ")
    return f"{problem} ({e.fix})" if e.fix else problem


class Section(BaseModel):
    """A section of an experiment file that holds one settings object (or, with axes, a grid of them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _settings: typing.ClassVar[Any] = None  # the settings dataclass
    _owner: typing.ClassVar[str] = ""  # the section's name in messages
    _axes: typing.ClassVar[tuple[str, ...]] = ()  # settings that may be lists
    _not_settings: typing.ClassVar[tuple[str, ...]] = ()  # the section's own keys that are not part of a point

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, data: Any) -> Any:
        coerce = getattr(cls._settings, "coerce", None)
        if coerce is None or not isinstance(data, dict):
            return data
        try:
            return coerce(data)
        except UserError as e:
            raise ValueError(_problem(e, cls._owner)) from None

    @model_validator(mode="after")
    def _check(self) -> "Section":
        for key in self._axes:
            if isinstance(getattr(self, key), list) and not getattr(self, key):
                raise ValueError(f"{key} is an empty list")
        for point in self.points():
            try:
                self._settings.from_dict(point).validate()
            except UserError as e:
                raise ValueError(_problem(e, self._owner)) from None
        return self

    def values(self) -> dict[str, Any]:
        """The section as plain values, settings dataclasses kept as they are (``model_dump`` makes them dicts)."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def points(self, override: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The Cartesian product of the list-valued axes, with the fixed values copied into each point (JSON-able
        values: what cells store and hash)."""
        base = self.model_dump(exclude=set(self._not_settings))
        base.update(override or {})
        axes = [[(k, v) for v in _as_list(base[k])] for k in self._axes]
        fixed = {k: v for k, v in base.items() if k not in self._axes}
        return [{**fixed, **dict(combo)} for combo in itertools.product(*axes)]

    def config(self, **elsewhere: Any):
        """The settings object of a section without axes (``elsewhere``: settings that come from elsewhere)."""
        return self._settings.from_dict(self.values(), **elsewhere)


def _field(f: Field, kind: Any) -> tuple[Any, Any]:
    why = f.metadata.get("why") or None
    if f.default_factory is not MISSING:
        return kind, PydanticField(default_factory=f.default_factory, description=why)
    return kind, PydanticField(f.default, description=why)


def section_model(name: str, settings: type, *, owner: str, axes: tuple[str, ...] = (),
                  extra: dict[str, tuple[Any, Any]] | None = None) -> type[Section]:
    """A :class:`Section` model for ``settings``: one field per setting (``choices`` as a Literal, an axis as a
    value or a list of values), plus the section's own ``extra`` fields (``{name: (type, default)}``)."""
    hints = typing.get_type_hints(settings)
    fields: dict[str, Any] = {}
    for f in settings.settings():
        kind = hints[f.name]
        choices = f.metadata.get("choices")
        if choices:
            kind = Literal[tuple(choices)]  # type: ignore[valid-type]
        if f.name in axes:
            kind = Union[kind, list[kind]]  # type: ignore[valid-type]
        fields[f.name] = _field(f, kind)
    fields.update(extra or {})
    model = create_model(name, __base__=Section, **fields)
    model._settings, model._owner, model._axes = settings, owner, tuple(axes)
    return model


# --------------------------------------------------------------------------- the three sections

CalibrationSection = section_model("CalibrationSection", CalibrationConfig, owner="calibration")

EvalSection = section_model("EvalSection", EvalConfig, owner="eval", extra={
    "unhealed": (Union[bool, Literal["loss"]], PydanticField(
        True, description="true: each pruned model is also scored before healing, on every task; loss: before "
        "healing only the C4 loss (the paper's before-healing comparison is that loss curve; this halves the QA "
        "cost of a sweep); false: no unhealed rows")),
    "precision": (Literal["trained", "full"], PydanticField(
        "trained", description="trained: every row of a cell is scored in the precision the cell heals in (an NF4 "
        "base for QLoRA; the adapter unmerged, as the paper scored it); full: the experiment's dtype, with the "
        "adapter merged in fp32 arithmetic")),
})

HEAL_AXES: tuple[str, ...] = HealConfig.names(axis=True, source=None)


def _fraction_heal_model() -> type[BaseModel]:
    """One entry of ``heal.by_fraction``: the heal settings of the cells whose fraction is at most ``up_to`` (and
    above the previous entry's), each a single value (a grid axis stays in the section itself)."""
    hints = typing.get_type_hints(HealConfig)
    fields: dict[str, Any] = {"up_to": (float, PydanticField(gt=0, le=1, description="the largest fraction the "
                                                             "entry covers"))}
    for f in HealConfig.settings():
        fields[f.name] = (typing.Optional[hints[f.name]], PydanticField(None, description=f.metadata["why"]))
    return create_model("FractionHeal", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


FractionHeal = _fraction_heal_model()
HealSection = section_model("HealSection", HealConfig, owner="heal", axes=HEAL_AXES, extra={
    "enabled": (bool, PydanticField(True, description="false: evaluate each pruned model unhealed, skip healing")),
    "by_fraction": (list[FractionHeal], PydanticField(
        default_factory=list, description="heal settings by fraction removed, for example longer heals at a "
        "higher rank and a lower learning rate as more layers go: entries in increasing up_to; a cell takes the "
        "first entry whose up_to is at least its fraction, over the settings above")),
})
HealSection._not_settings = ("by_fraction",)


def fraction_settings(section: Any, fraction: float) -> dict[str, Any]:
    """The ``by_fraction`` settings a cell of ``fraction`` takes (empty where no entry covers it)."""
    for entry in section.by_fraction:
        if fraction <= entry.up_to + 1e-12:
            return {k: v for k, v in entry.model_dump().items() if k != "up_to" and v is not None}
    return {}


def check_model_heal(settings: dict[str, Any]) -> dict[str, Any]:
    """A model's own heal settings: known keys, valid values (checked against the defaults for the rest)."""
    unknown = set(settings) - set(HealSection.model_fields) | ({"by_fraction"} & set(settings))
    if unknown:
        raise ValueError(f"unknown heal keys {sorted(unknown)}; known: {sorted(HealSection.model_fields)}")
    HealSection(**settings)
    return settings
