"""Config values checked against their dataclass types and sizes before any model is built: a string where a
size goes, a negative or float layer count, zero heads, a width the heads do not divide, a NaN epsilon are one
ConfigError naming the field, never a TypeError or ZeroDivisionError from deep inside a module."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from duomo.errors import ConfigError

# Size fields that must be at least 1; every other int field must be at least 0.
POSITIVE = {
    "image_size",
    "patch_size",
    "width",
    "layers",
    "heads",
    "vocab_size",
    "context_length",
    "embed_dim",
    "ffn_dim",
    "in_chans",
    "max_text_positions",
}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_value(section: str, name: str, kind: Any, value: Any) -> None:
    """One field: its value must be of the annotated kind (and a sane size)."""
    where = f"{section}.{name}"
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        low = 1 if name in POSITIVE else 0
        if value < low:
            raise ConfigError(f"{where} must be at least {low}, got {value}")
    elif kind is float:
        if not _number(value) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        if name.endswith("eps") and value <= 0:
            raise ConfigError(f"{where} must be positive, got {value}")
        if name in ("mlp_ratio",) and value <= 0:
            raise ConfigError(f"{where} must be positive, got {value}")
    elif kind is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    elif origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args) or not all(map(_number, value)):
            raise ConfigError(f"{where} must be {len(args)} numbers, got {value!r}")
    elif origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{where} must be a JSON object, got {value!r}")


def check_fields(obj: Any, section: str) -> None:
    """Every field of a config dataclass against its annotation; then width/heads divisibility."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(getattr(obj, f.name)):
            continue  # a nested section checks itself
        check_value(section, f.name, hints[f.name], getattr(obj, f.name))
    width, heads = getattr(obj, "width", None), getattr(obj, "heads", None)
    if isinstance(width, int) and isinstance(heads, int) and heads and width % heads:
        raise ConfigError(f"{section}.width {width} is not divisible by {section}.heads {heads}")


def check_known_fields(data: dict[str, Any], cls: type, section: str) -> None:
    """Refuse a JSON key that is not a field of dataclass `cls`, naming the closest known one."""
    import difflib

    known = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {sorted(known)}"
            raise ConfigError(f"unknown {section} config field {name!r}{hint}")
