"""The ``heal`` section of an experiment, derived field by field from ``HealConfig``.

Every :class:`~ray_prune.core.heal.config.HealConfig` setting can be set here,
globally or per model (``models: [{name: ..., heal: {...}}]``); the settings
whose metadata says ``axis`` may also be lists, which become grid axes. Values
are checked by ``HealConfig.validate`` itself, so the rules live in one place.
The one key of the section's own is ``enabled: false``: evaluate each pruned
model unhealed and skip healing.
"""

from __future__ import annotations

import itertools
import typing
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, create_model, model_validator

from ray_prune.core.heal.config import HealConfig
from ray_prune.errors import UserError

AXES: tuple[str, ...] = HealConfig.names(axis=True, source="heal")


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


class _HealSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _check(self) -> "_HealSection":
        for key in AXES:
            if isinstance(getattr(self, key), list) and not getattr(self, key):
                raise ValueError(f"{key} is an empty list")
        for point in self.points():
            settings = {k: v for k, v in point.items() if k != "enabled"}
            try:
                HealConfig(**settings).validate()
            except UserError as e:
                raise ValueError(f"{e.problem.removeprefix('heal config: ')} ({e.fix})") from None
        return self

    def points(self, override: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The Cartesian product of the list-valued axes, with the fixed settings copied into each point."""
        base = self.model_dump()
        base.update(override or {})
        axes = [[(k, v) for v in _as_list(base[k])] for k in AXES]
        fixed = {k: v for k, v in base.items() if k not in AXES}
        return [{**fixed, **dict(combo)} for combo in itertools.product(*axes)]


def _section_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(HealConfig)
    fields: dict[str, Any] = {}
    for f in HealConfig.settings():
        kind = hints[f.name]
        fields[f.name] = (Union[kind, list[kind]] if f.name in AXES else kind, f.default)
    fields["enabled"] = (bool, True)
    return fields


HealGrid = create_model("HealGrid", __base__=_HealSection, **_section_fields())


def check_model_heal(settings: dict[str, Any]) -> dict[str, Any]:
    """A model's own heal settings: known keys, valid values (checked against the defaults for the rest)."""
    unknown = set(settings) - set(HealGrid.model_fields)
    if unknown:
        raise ValueError(f"unknown heal keys {sorted(unknown)}; known: {sorted(HealGrid.model_fields)}")
    HealGrid(**settings)
    return settings
