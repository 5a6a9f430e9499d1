"""Placing named external tensors (HF safetensors, GGUF) into an NNX parameter tree.

A model-specific converter describes, for every parameter path of the
canonical (per-layer) layout, which external tensor fills it and how
(`Slot`). `load_params` then checks the whole mapping first - missing,
unexpected and wrongly shaped tensors are reported together, before anything
is read - and afterwards streams tensor by tensor: read, transform, cast to
the parameter dtype, move to the device, drop the host copy.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

Path = tuple[Any, ...]


class TensorSource(Protocol):
    """Named tensors of a checkpoint file or folder."""

    where: str  # file or folder, for error messages

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one parameter comes from.

    Attributes:
      name: the external tensor name.
      transpose: the external tensor is the transpose of the parameter (HF
        linear weights are `[out, in]`, NNX kernels `[in, out]`).
      fix: an optional shape-preserving function applied to the external
        array before transposing (e.g. undoing GGUF's Q/K row permutation).
    """

    name: str
    transpose: bool = False
    fix: Callable[[np.ndarray], np.ndarray] | None = None

    def external_shape(self, param_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(reversed(param_shape)) if self.transpose else tuple(param_shape)

    def read(self, source: TensorSource) -> np.ndarray:
        x = source.get(self.name)
        if self.fix is not None:
            x = self.fix(x)
        return x.T if self.transpose else x


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def flat_shapes(state: nnx.State) -> dict[Path, jax.ShapeDtypeStruct]:
    """`{path: ShapeDtypeStruct}` of an (abstract) state's leaves."""
    out = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, Mapping):
                walk(v, prefix + (k,))
            else:
                out[prefix + (k,)] = v

    walk(nnx.to_pure_dict(state), ())
    return out


def check_mapping(slots: Mapping[Path, Slot], shapes: Mapping[Path, Any], source: TensorSource,
                  *, ignore: Sequence[str] = (), what: str = "model") -> None:
    """Validates a whole mapping before any tensor is read.

    Args:
      slots: canonical parameter path -> Slot.
      shapes: canonical parameter path -> object with `.shape`.
      ignore: regexes of external names that may be present and are skipped.
    Raises:
      ValueError: naming all missing tensors, unexpected tensors and shape
        mismatches at once (tensor name, parameter path, both shapes).
    """
    names = source.names()
    wanted = {s.name for s in slots.values()}
    missing = sorted(wanted - names)
    unexpected = sorted(n for n in names - wanted
                        if not any(re.fullmatch(p, n) for p in ignore))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for path, slot in slots.items():
        if slot.name in names:
            want = slot.external_shape(shapes[path].shape)
            got = tuple(source.shape(slot.name))
            if got != want:
                problems.append(f"tensor {slot.name} has shape {got}, expected {want} "
                                f"(parameter {path_str(path)})")
    if problems:
        raise ValueError(f"checkpoint {source.where} does not fit the {what}: "
                         + "; ".join(problems))


def load_params(abstract_state: nnx.State, slots: Mapping[Path, Slot], source: TensorSource,
                *, stacked_prefix: str | None = None, ignore: Sequence[str] = (),
                what: str = "model") -> nnx.State:
    """Fills an abstract state from a tensor source, one tensor at a time.

    Args:
      abstract_state: state of `nnx.eval_shape(...)` of the target model; its
        layout may be the list layout or, with `stacked_prefix`, have the
        subtrees under that key stacked along a leading layer axis.
      slots: keyed by canonical (list layout) paths, e.g. `("layers", 3, ...)`.
      stacked_prefix: e.g. `"layers"` when the target stacks layers (scan
        layout); each stacked leaf is assembled from its per-layer tensors.
    Returns:
      The filled `nnx.State` (parameters in the abstract state's dtypes) holding
      host NumPy arrays: nothing is put on a device here, so a caller places the
      model as it will be used (split over a mesh, `jax.device_put` with its
      shardings) without any one device ever holding the whole model first.
    """
    target = flat_shapes(abstract_state)
    canon = {}
    for path in slots:
        if stacked_prefix is not None and path[0] == stacked_prefix:
            stacked = target[(path[0],) + path[2:]]
            canon[path] = jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype)
        else:
            canon[path] = target[path]
    check_mapping(slots, canon, source, ignore=ignore, what=what)
    covered = {(p[0],) + p[2:] if stacked_prefix is not None and p[0] == stacked_prefix
               else p for p in slots}
    uncovered = sorted(path_str(p) for p in set(target) - covered)
    if uncovered:
        raise ValueError(f"no source tensor is mapped to parameters {uncovered} ({what})")

    values: dict[Path, np.ndarray] = {}
    groups: dict[Path, list[Path]] = {}
    for path in slots:
        if stacked_prefix is not None and path[0] == stacked_prefix:
            groups.setdefault((path[0],) + path[2:], []).append(path)
        else:
            dtype = target[path].dtype
            values[path] = np.ascontiguousarray(slots[path].read(source), dtype)
    for key, paths in groups.items():
        paths = sorted(paths, key=lambda p: int(p[1]))
        dtype = target[key].dtype
        values[key] = np.stack([np.asarray(slots[p].read(source), dtype) for p in paths])
    pure: dict = {}
    for path, x in values.items():
        node = pure
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = x
    nnx.replace_by_pure_dict(abstract_state, pure)
    return abstract_state
