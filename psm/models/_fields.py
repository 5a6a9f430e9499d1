"""Building a config dataclass from a dict that may hold unknown keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_fields(cls: type[T], d: Mapping[str, Any]) -> T:
    """cls(**d), refusing keys that are not fields of the dataclass cls by name
    (a ValueError listing the unknown and the known fields)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**d)
