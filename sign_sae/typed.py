"""Typed configs: values read from YAML or JSON are converted to a dataclass's declared field
types where nothing is lost, and refused otherwise, naming the field, the value and the type.

PyYAML reads ``1e-3`` as a string (YAML 1.1 wants ``1.0e-3``), so a string that spells a number
is accepted for a numeric field: ``lr: 1e-3`` and ``total_steps: '10'`` both work. An integer is
accepted for a float field; a float for an int field only when it is whole (``1e6``, not
``1.5``). Booleans are never numbers and numbers never booleans or strings.
"""

import math
import types
import typing
from dataclasses import fields
from typing import Any

from sign_sae.errors import SignSAEError

_SCALARS = (bool, int, float, str)


def coerce_fields(obj: Any, where: str = "") -> None:
    """Convert every field of dataclass ``obj`` in place to its declared type (see the module);
    errors name the field after ``where`` (e.g. ``"train."``)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        try:
            setattr(obj, f.name, coerce(value, hints[f.name]))
        except _RefusedError as e:
            raise SignSAEError(
                f"{where}{f.name}: expected {_name(e.kind)}, got {e.value!r} "
                f"({type(e.value).__name__})"
                f"{e.where}. Fix the value in the config."
            ) from None


class _RefusedError(Exception):
    """A value that does not convert to ``kind`` (``where``: the list item or mapping key)."""

    def __init__(self, value: Any, kind: Any, where: str = "") -> None:
        self.value, self.kind, self.where = value, kind, where


def coerce(value: Any, kind: Any) -> Any:
    """``value`` as type ``kind`` (a scalar, ``X | None``, ``list[X]``, ``dict[str, X]``; other
    types, such as nested configs and ``Any``, are left to their own checks)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0]) if len(inner) == 1 else value
    if origin is list and args:
        if not isinstance(value, list):
            raise _RefusedError(value, kind)
        return [_item(v, args[0], f" (item {i})") for i, v in enumerate(value)]
    if origin is dict and len(args) == 2:
        if not isinstance(value, dict):
            raise _RefusedError(value, kind)
        return {k: _item(v, args[1], f" (key {k!r})") for k, v in value.items()}
    return _scalar(value, kind) if kind in _SCALARS else value


def _item(value: Any, kind: Any, where: str) -> Any:
    try:
        return coerce(value, kind)
    except _RefusedError as e:
        raise _RefusedError(e.value, e.kind, where) from None


def _scalar(value: Any, kind: type) -> Any:
    """A bool or str field takes only its own type; numbers never are booleans or strings."""
    if kind in (bool, str) or isinstance(value, bool):
        if type(value) is kind:
            return value
        raise _RefusedError(value, kind)
    number = value
    if isinstance(value, str):
        whole = kind is int and value.strip().lstrip("+-").isdigit()
        try:
            number = int(value) if whole else float(value)
        except ValueError:
            raise _RefusedError(value, kind) from None
    if not isinstance(number, int | float):
        raise _RefusedError(value, kind)
    if kind is float:
        return float(number)
    if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
        raise _RefusedError(value, kind)
    return int(number)


def _name(kind: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if kind in names:
        return names[kind]
    plain = getattr(kind, "__name__", None) if typing.get_origin(kind) is None else None
    return f"a value of type {plain or kind}"
