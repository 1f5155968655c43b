"""Command-line flags derived from a settings object (``core.settings``): one flag per setting, its reason as the
help, its default shown, its type and choices the field's. ``ray-prune profile``, ``prune``, ``heal`` and ``eval``
build their flags here, so a setting is declared once, in its config, and the flag follows."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from ray_prune.core.settings import default_of


def _show(value: Any) -> Any:
    """A default as a flag would be written (``{"mmlu": TaskSettings(shots=5)}`` as ``mmlu:5``)."""
    if isinstance(value, dict):
        parts = [name if getattr(s, "shots", None) is None else f"{name}:{s.shots}" for name, s in value.items()]
        return ",".join(parts) or "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return value


def add_settings(parser: argparse.ArgumentParser, settings: type, skip: tuple[str, ...] = ()) -> None:
    """A flag for every setting of ``settings`` whose metadata allows one (``--batch-size`` for ``batch_size``)."""
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = default_of(f)
        kind = hints[f.name]
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["why"]}
        if f.metadata.get("parse") is not None:
            kw.update(type=f.metadata["parse"], default=_show(default))
        elif kind is bool:
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        elif f.metadata.get("choices") or typing.get_origin(kind) is typing.Literal:
            kw.update(choices=list(f.metadata.get("choices") or typing.get_args(kind)), default=default)
        else:
            number = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
            kw.update(type=number[0], default=default, metavar=f.name.upper())
        parser.add_argument(flag, **kw)


def settings_from_args(settings: type, args: argparse.Namespace, **elsewhere: Any):
    """The settings object the parsed flags describe (``elsewhere``: settings without a flag, e.g. the dtype)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings)
              if f.metadata.get("flag", True) and hasattr(args, f.name) and f.name not in elsewhere}
    own = {f.name for f in settings.settings()}
    return settings.from_dict({k: v for k, v in values.items() if k in own},
                              **{k: v for k, v in values.items() if k not in own}, **elsewhere)
