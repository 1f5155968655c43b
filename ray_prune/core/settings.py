"""Settings objects: dataclasses whose every field declares its default and the reason for it, once.

``HealConfig``, ``CalibrationConfig`` and ``EvalConfig`` are built this way (nanoGPT: each default once, with its
reason; torchtune: the config is the only source of a setting). Everything else that names a setting is derived
from the field and its metadata: the experiment schema (``sweep.sections``), the command-line flags
(``cli.flags``), the result columns, the memory workload and the defaults of the core functions. Metadata:

- ``why``: the one-line reason, shown as the flag's help and in the schema.
- ``axis``: an experiment may give a list of values, which becomes a grid axis.
- ``identity``: how the setting enters a cell's id: ``always``; ``if_changed`` (only when it differs from its
  default, so a setting added later never invalidates finished cells); ``never`` (it changes how a result is
  computed, not the result, like gradient checkpointing).
- ``resume`` (heal): the setting shapes the training trajectory, so a checkpoint resumes only under the same value.
- ``source``: where a sweep takes the value from, when not from the config's own section (``None``: the section).
- ``choices``: the allowed values, read from the module that owns them (metrics, datasets...).
- ``flag``: whether ``ray-prune`` exposes it as a flag; ``parse``: how a flag's text becomes the value.

Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, field
from typing import Any, Callable, Iterable, Mapping

from ray_prune.errors import UserError

IDENTITY_RULES = ("always", "if_changed", "never")


def setting(default: Any = MISSING, why: str = "", *, factory: Callable[[], Any] | None = None, axis: bool = False,
            identity: str = "always", resume: bool = True, source: str | None = None,
            choices: Iterable[Any] | None = None, flag: bool = True, parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field with its default (or ``factory``), its reason, and what the other layers need to know."""
    if identity not in IDENTITY_RULES:
        raise ValueError(f"identity must be one of {IDENTITY_RULES}, got {identity!r}")
    metadata = {"why": why, "axis": axis, "identity": identity, "resume": resume, "source": source,
                "choices": tuple(choices) if choices is not None else None, "flag": flag, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for fields with a factory)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]


def need(ok: bool, owner: str, problem: str, fix: str) -> None:
    """Raise a ``UserError`` (``owner: problem``, with ``fix``) unless ``ok``."""
    if not ok:
        raise UserError(f"{owner}: {problem}", fix)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Settings:
    """Introspection shared by every settings dataclass (a mixin: the subclasses are plain dataclasses)."""

    @classmethod
    def settings(cls) -> list[dataclasses.Field]:
        """The fields the config's own section sets (those whose ``source`` is elsewhere are left out)."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("source") is None]  # type: ignore[arg-type]

    @classmethod
    def names(cls, **metadata: Any) -> tuple[str, ...]:
        """Field names whose metadata matches, e.g. ``names(axis=True)``."""
        return tuple(f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                     if all(f.metadata.get(k) == v for k, v in metadata.items()))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: default_of(f) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def why(cls, name: str) -> str:
        return next(f.metadata["why"] for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]

    @classmethod
    def identity_of(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The part of a section's values that names a cell: each setting by its ``identity`` rule; keys that are
        not settings of this class (a section's own, like heal's ``enabled``) are kept as they are."""
        out = {k: v for k, v in values.items() if k not in {f.name for f in dataclasses.fields(cls)}}  # type: ignore
        for f in cls.settings():
            rule = f.metadata["identity"]
            value = values.get(f.name, default_of(f))
            if rule == "always" or (rule == "if_changed" and value != default_of(f)):
                out[f.name] = value
        return out

    @classmethod
    def coerce(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Shorthands a file or a caller may write, turned into the fields' types (none by default)."""
        return dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **elsewhere: Any):
        """The config of a section's values (keys that are not its settings, like a sweep's own, are ignored),
        with the settings that come from elsewhere (``source`` metadata) given as keywords."""
        names = {f.name for f in cls.settings()}
        return cls(**cls.coerce({k: v for k, v in values.items() if k in names}), **elsewhere)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]
