"""What the model configs share: building one from a dict, and dtype names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import jax.numpy as jnp

T = TypeVar("T")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
"""The dtype names a config's `param_dtype` and `dtype` may take."""


def from_fields(cls: type[T], d: Mapping[str, Any]) -> T:
    """cls(**d), refusing keys that are not fields of the dataclass cls by name
    (a ValueError listing the unknown and the known fields)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**d)


def check_dtype_names(config) -> None:
    """ValueError unless config.param_dtype and config.dtype name keys of DTYPES."""
    for name in ("param_dtype", "dtype"):
        value = getattr(config, name)
        if value not in DTYPES:
            raise ValueError(f"{type(config).__name__}.{name} must be one of "
                             f"{sorted(DTYPES)}, got {value!r}")


def axes(*names: str) -> dict:
    """Variable metadata naming a parameter's logical axes, e.g. `("embed", "mlp")`.

    Read by `psm.training.sharding` (LOGICAL_RULES map the names to mesh axes), which
    places the stacked state; `eager_sharding=False` keeps Flax from sharding
    at creation, so a model built outside any mesh stays valid.
    """
    return {"out_sharding": names, "eager_sharding": False}
