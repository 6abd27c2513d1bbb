"""A base for analysis results: JSON-ready ``to_dict`` / ``from_dict`` and value equality.

Tensors become nested lists (int64 and float64 survive the round trip exactly), nested results
become dicts, tuples become lists; ``from_dict`` rebuilds them from the field annotations.
Equality compares the ``to_dict`` forms, with NaN equal to NaN, so
``type(r).from_dict(json.loads(json.dumps(r.to_dict()))) == r``.
"""

import dataclasses
import math
import types
import typing
from typing import Any, Self

import numpy as np
import torch


class Result:
    """Mixin for ``@dataclass(eq=False)`` results."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        hints = typing.get_type_hints(cls)
        kwargs = {
            f.name: _decode(hints[f.name], data[f.name])
            for f in dataclasses.fields(cls)
            if f.init and f.name in data
        }
        return cls(**kwargs)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and _same(self.to_dict(), other.to_dict())

    __hash__ = None  # type: ignore[assignment]


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Result):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(tp: Any, value: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value)
    if tp is torch.Tensor:
        return torch.as_tensor(np.asarray(value))
    if isinstance(tp, type) and issubclass(tp, Result):
        return tp.from_dict(value)
    if origin is list:
        return [_decode(args[0], v) for v in value]
    if origin is tuple:
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else args
        return tuple(_decode(k, v) for k, v in zip(kinds, value, strict=True))
    if origin is dict:
        return {k: _decode(args[1], v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b
