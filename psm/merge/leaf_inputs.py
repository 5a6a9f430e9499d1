"""Input handling for `psm.merge`: leaf names, structure checks, output assembly.

The merge functions accept K models either as a list/tuple of K trees or, when
the caller passes `stacked=True`, as one tree whose leaves carry a leading model
axis of size K; anything else is refused (a dict of K models and a single
unstacked model look alike, and reading either as a stacked tree merges the
wrong axis). This module flattens
both forms into one record per leaf (`LeafInputs`), checks them against each
other and against the base tree before any arithmetic runs, and rebuilds the
output with the first model's structure, dtypes and sharding.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from psm import global_arrays
from psm.merge import host_staging

# Largest leaf (in elements) whose scalars can be numbered by a uint32 counter.
MAX_LEAF_SIZE = 2**32 - 2


def leaf_name(path: Sequence[Any]) -> str:
    """Canonical name of a leaf from its `jax.tree_util` key path.

    Path entries are joined with "/": dict keys and attribute names as-is
    (`str(key)` for non-string dict keys), sequence indices as decimal integers.
    A final `value` attribute entry, which is how a Flax NNX `Variable` boxes its
    array, is dropped when it is not the only entry. Examples: an NNX State of
    `model.layers[0].attn.q_proj.kernel` gives `layers/0/attn/q_proj/kernel`; a
    flat dict `{"model.layers.0.self_attn.q_proj.weight": a}` gives the tensor
    name itself.

    Args:
        path: a key path as returned by `jax.tree_util.tree_flatten_with_path`.

    Returns:
        The leaf name.
    """
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:
            parts.append(str(entry))
    last = path[-1] if len(path) else None
    if (len(parts) > 1 and isinstance(last, jax.tree_util.GetAttrKey)
            and last.name == "value"):
        parts.pop()
    return "/".join(parts)


def name_words(name: str) -> np.ndarray:
    """The two uint32 words (little-endian) opening sha256(name as UTF-8), `[2]`."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return np.frombuffer(digest[:8], dtype="<u4").astype(np.uint32)


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _is_key(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


@dataclasses.dataclass
class LeafInputs:
    """The K inputs (and base) of one leaf position.

    Attributes:
        name: canonical leaf name (see `leaf_name`).
        xs: the K per-model arrays, each of `shape`, when models came as a list;
            else None.
        stacked: the `[K, *shape]` array when models came stacked; else None.
        base: the base array of `shape`, or None.
        shape: per-model shape.
        dtype: stored dtype (shared by all models and the base).
        out_sharding: sharding for the merged leaf, or None to let JAX choose.
        to_numpy: whether the merged leaf is returned as a numpy array.
    """

    name: str
    xs: tuple | None
    stacked: Any
    base: Any
    shape: tuple
    dtype: np.dtype
    out_sharding: Any
    to_numpy: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_float(self) -> bool:
        return _is_float(self.dtype)

    @property
    def inputs(self):
        """What the kernels take: the K-tuple, or the stacked array."""
        return self.stacked if self.xs is None else self.xs

    @property
    def arrays(self) -> list:
        """Every operand array: the stacked one (or the K inputs), then the base
        if set."""
        out = [self.stacked] if self.xs is None else list(self.xs)
        return out if self.base is None else out + [self.base]

    def model(self, i: int):
        """Model i's array of this leaf (a slice for stacked inputs)."""
        return self.stacked[i] if self.xs is None else self.xs[i]


@dataclasses.dataclass
class Prepared:
    """Flattened, checked inputs of a merge call."""

    k: int
    treedef: Any
    leaves: list  # LeafInputs in the first model's flatten order
    fixed: dict = dataclasses.field(default_factory=dict)  # index -> non-float output

    def unflatten(self, outs: list):
        return jax.tree_util.tree_unflatten(self.treedef, outs)


def _flatten(tree, what: str):
    """Returns (names, leaves, treedef); rejects non-array leaves and name clashes."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names, leaves, seen = [], [], set()
    for path, leaf in pairs:
        name = leaf_name(path)
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise TypeError(
                f"{what}: leaf '{name}' is a {type(leaf).__name__}; every leaf must be a "
                "jax or numpy array")
        if name in seen:
            raise ValueError(
                f"{what}: two leaves share the canonical name '{name}' (path entries "
                "joined with '/'); rename one of them")
        seen.add(name)
        names.append(name)
        leaves.append(leaf)
    return names, leaves, treedef


def _structure_diff(ref_names, names, what: str, ref_what: str) -> str:
    missing = sorted(set(ref_names) - set(names))
    extra = sorted(set(names) - set(ref_names))
    msg = f"{what} does not have the structure of {ref_what}:"
    if missing:
        msg += f" missing leaves {missing[:5]}" + (" ..." if len(missing) > 5 else "")
    if extra:
        msg += f" extra leaves {extra[:5]}" + (" ..." if len(extra) > 5 else "")
    return msg


def _out_sharding(leaf, stacked: bool):
    if not isinstance(leaf, jax.Array):
        return None
    sharding = leaf.sharding
    if not stacked:
        return sharding
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None


def _check_like(name: str, who: str, x, shape: tuple, dtype: np.dtype, ref: str) -> None:
    """ValueError naming the leaf unless x has the given shape and dtype."""
    if tuple(np.shape(x)) != shape:
        raise ValueError(f"leaf '{name}': {who} has shape {tuple(np.shape(x))} but {ref} "
                         f"{shape}")
    if np.dtype(x.dtype) != dtype:
        raise ValueError(f"leaf '{name}': {who} has dtype {np.dtype(x.dtype)} but {ref} "
                         f"{dtype}")


def _describe(models) -> str:
    """A short description of a models argument for error messages."""
    if isinstance(models, dict):
        keys = list(models)
        return (f"a {type(models).__name__} with keys {keys[:5]}"
                + (" ..." if len(keys) > 5 else ""))
    return f"a {type(models).__name__}"


def prepare(models, base=None, *, need_base: bool = False, stacked: bool = False) -> Prepared:
    """Flattens and checks the models (and base) of a merge call.

    Args:
        models: a list/tuple of K trees (stacked=False), or one tree whose leaves
            are `[K, ...]` (stacked=True).
        base: a tree with the structure of one model, or None.
        need_base: raise if base is None.
        stacked: whether `models` is one tree stacked on a leading model axis.

    Returns:
        A `Prepared` record.

    Raises:
        ValueError / TypeError naming the leaf and what differs, or which form
        `models` was read as and what to pass instead.
    """
    if need_base and base is None:
        raise ValueError("this merge method needs `base` (the pre-trained tree)")
    if not isinstance(stacked, (bool, np.bool_)):
        raise TypeError(f"stacked must be True or False; got {stacked!r}")
    is_seq = isinstance(models, (list, tuple))
    if stacked and is_seq:
        # A list is the K-model form; reading it as one stacked tree would take
        # each model's first axis as K and merge rows instead of models.
        raise TypeError(
            f"stacked=True takes one tree whose leaves carry a leading model axis K, but "
            f"models is a {type(models).__name__} of {len(models)} entries (the form for K "
            "separate trees); drop stacked=True to merge them as K models, or put the "
            "stacked leaves in a dict")
    if not stacked and not is_seq:
        # One tree (a dict of K models, an NNX State, a single model...): which of
        # them is meant cannot be told from the tree, so the caller says it.
        raise TypeError(
            f"models is {_describe(models)}, read as ONE tree, not as K models; pass a "
            "list or tuple of K trees (e.g. list(models.values()) for a dict of models), "
            "or stacked=True if the leaves of this one tree carry a leading model axis K")
    if is_seq:
        if len(models) == 0:
            raise ValueError("models is an empty sequence; pass at least one model (K >= 1)")
        k = len(models)
        names0, leaves0, treedef = _flatten(models[0], "models[0]")
        per_model = [dict(zip(names0, leaves0))]
        for i in range(1, k):
            names_i, leaves_i, _ = _flatten(models[i], f"models[{i}]")
            if set(names_i) != set(names0):
                raise ValueError(_structure_diff(names0, names_i, f"models[{i}]", "models[0]"))
            per_model.append(dict(zip(names_i, leaves_i)))
        stacked = False
    else:
        names0, leaves0, treedef = _flatten(models, "models")
        if not leaves0:
            raise ValueError("models has no array leaves")
        k = None
        for name, leaf in zip(names0, leaves0):
            if np.ndim(leaf) == 0:
                raise ValueError(
                    f"models was passed with stacked=True but leaf '{name}' is a scalar; "
                    "stacked leaves need a leading model axis of size K")
            if k is None:
                k = leaf.shape[0]
            elif leaf.shape[0] != k:
                raise ValueError(
                    f"stacked models: leaf '{name}' has leading axis {leaf.shape[0]} but "
                    f"leaf '{names0[0]}' has {k}; every leaf needs the same model axis K")
        if k == 0:
            raise ValueError("stacked models have a leading axis of size 0; need K >= 1")
        stacked = True

    base_map = None
    if base is not None:
        bnames, bleaves, _ = _flatten(base, "base")
        if set(bnames) != set(names0):
            raise ValueError(_structure_diff(names0, bnames, "base", "the models"))
        base_map = dict(zip(bnames, bleaves))

    leaves = []
    for idx, name in enumerate(names0):
        first = leaves0[idx]
        if stacked:
            shape, dtype = tuple(first.shape[1:]), np.dtype(first.dtype)
            xs = None
        else:
            shape, dtype = tuple(np.shape(first)), np.dtype(first.dtype)
            xs = tuple(m[name] for m in per_model)
            for i, x in enumerate(xs[1:], start=1):
                _check_like(name, f"models[{i}]", x, shape, dtype, "models[0] has")
        b = None
        if base_map is not None:
            b = base_map[name]
            _check_like(name, "base", b, shape, dtype, "each model has")
        if _is_float(dtype):
            if jnp.issubdtype(dtype, jnp.complexfloating):
                raise TypeError(f"leaf '{name}': complex dtype {dtype} is not supported")
        elif not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)
                  or _is_key(dtype)):
            raise TypeError(
                f"leaf '{name}': dtype {dtype} is neither floating, integer, bool nor a "
                "PRNG key")
        size = int(np.prod(shape, dtype=np.int64))
        if size > MAX_LEAF_SIZE:
            raise ValueError(
                f"leaf '{name}' has {size} elements; at most {MAX_LEAF_SIZE} are supported "
                "(scalars are numbered by a uint32 counter)")
        to_numpy = not isinstance(first, jax.Array)
        leaves.append(LeafInputs(
            name=name, xs=xs, stacked=first if stacked else None, base=b, shape=shape,
            dtype=dtype, out_sharding=_out_sharding(first, stacked), to_numpy=to_numpy))
    return Prepared(k=k, treedef=treedef, leaves=leaves)


def _host(x):
    if _is_key(x.dtype):
        x = jax.random.key_data(x)
    return np.asarray(x)


@jax.jit
def _models_equal(stacked):
    """`[K]` bools: model i's copy equals model 0's (a stacked leaf `[K, ...]`)."""
    if _is_key(stacked.dtype):
        stacked = jax.random.key_data(stacked)
    flat = jnp.reshape(stacked, (stacked.shape[0], -1))
    return jnp.all(flat == flat[:1], axis=1)


def equal_leaf(leaf: LeafInputs, k: int):
    """Non-float leaf: checks all K copies are equal and returns model 0's copy.

    A stacked leaf split over several processes is compared on its devices
    (only the K answers come to the host).

    Raises:
        ValueError naming the leaf and the first model that differs.
    """
    if leaf.xs is None and global_arrays.spans_processes(leaf.stacked):
        same = global_arrays.to_numpy(_models_equal(leaf.stacked))
        differ = [i for i in range(1, k) if not same[i]]
        if differ:
            raise ValueError(
                f"leaf '{leaf.name}' has dtype {leaf.dtype}, which is not averaged or "
                f"selected, so it must be equal in every model; models[{differ[0]}] differs "
                "from models[0]")
        return leaf.model(0)
    ref = _host(leaf.model(0))
    for i in range(1, k):
        if not np.array_equal(ref, _host(leaf.model(i))):
            raise ValueError(
                f"leaf '{leaf.name}' has dtype {leaf.dtype}, which is not averaged or "
                f"selected, so it must be equal in every model; models[{i}] differs from "
                "models[0]")
    return leaf.model(0)


def all_finite(x) -> bool:
    """True where every element of x is finite (CPU arrays: checked on the host
    through a zero-copy view, see `host_staging.finite`)."""
    if isinstance(x, np.ndarray) or (x.is_fully_addressable
                                     and all(d.platform == "cpu" for d in x.devices())):
        return host_staging.finite(np.asarray(x).reshape(-1))
    # On device; an array of several processes reduces to one replicated bool.
    check = jax.jit(lambda a: jnp.isfinite(a).all(), out_shardings=global_arrays.replicated(x))
    return bool(global_arrays.to_numpy(check(x)))


def nonfinite_error(leaf: LeafInputs, k: int, use_base: bool):
    """The ValueError for a leaf whose inputs hold NaN/inf, or None if all finite."""
    for i in range(k):
        if not all_finite(leaf.model(i)):
            return ValueError(
                f"leaf '{leaf.name}': models[{i}] contains NaN or inf; pass "
                "allow_nonfinite=True to merge it anyway")
    if use_base and leaf.base is not None and not all_finite(leaf.base):
        return ValueError(
            f"leaf '{leaf.name}': base contains NaN or inf; pass allow_nonfinite=True to "
            "merge it anyway")
    return None


def finish_leaf(leaf: LeafInputs, out):
    """Places the merged leaf like model 0's leaf (sharding, numpy-ness)."""
    if leaf.to_numpy:
        return np.asarray(out)
    want = leaf.out_sharding
    if want is not None and isinstance(out, jax.Array):
        try:
            same = out.sharding.is_equivalent_to(want, out.ndim)
        except Exception:  # noqa: BLE001 - incomparable sharding kinds
            same = False
        if not same:
            out = global_arrays.in_order(jax.device_put(out, want))
    return out
