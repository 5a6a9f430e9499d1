"""The device mesh `(replica, fsdp, tensor)` and where every array of a run lives.

  replica  the K models: stacked state `[K, ...]` is split on its leading axis.
  fsdp     inside one replica: the batch `[K, B, T]` is split on B, and the
           parameters' `embed` dimension (and with it Adam's moments) is split
           too (fully sharded data parallel: ZeRO-3 style).
  tensor   inside one replica: heads, MLP and vocabulary dimensions are split
           (Megatron-style tensor parallelism); the batch is not.

The models name their parameters' axes with logical names (Flax sharding
metadata, `psm.models._fields.axes`); `LOGICAL_RULES` (psm.models.logical) is the one table
that maps those names to mesh axes, as MaxText's `logical_axis_rules` do.
Stacked state prepends `replica` to each parameter's spec (MaxText's DiLoCo
does the same with its `diloco` axis). Optimizer state is sharded like its
parameter (Adam's moments are parameter-shaped trees carrying the same
metadata); its scalars (step counts, `[K]` once stacked) only on `replica`.

The axes are `Auto`, so XLA propagates shardings through the vmapped step
without per-op annotations (explicit axes would require resharding every
vmapped input, see anchors-jax.md section 3.4).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from psm.models.logical import LOGICAL_RULES, logical_to_mesh  # noqa: F401 (re-exported)

MESH_AXES = ("replica", "fsdp", "tensor")

# LOGICAL_RULES (logical axis name -> mesh axis) is defined in psm.models.logical,
# where the models also read it for their activation constraints.

def _config_key(axis: str) -> str:
    return f"config.mesh.{axis}"


def mesh_shape(num_devices: int, num_replicas: int, batch_size: int, *, replica: int = -1,
               fsdp: int = 1, tensor: int = 1, fsdp_key: str = "config.mesh.fsdp"
               ) -> tuple[int, int, int]:
    """Resolves `(replica, fsdp, tensor)`, refusing a mesh that does not fit.

    `-1` fills from the device count: `replica = -1` takes the largest divisor
    of K that fits the devices left by the fixed axes; then one of `fsdp` /
    `tensor` may be -1 and takes every device left.

    Raises:
      ValueError naming the config key and the sizes (devices, K, batch).
    """
    sizes = {"replica": replica, "fsdp": fsdp, "tensor": tensor}
    keys = {"replica": _config_key("replica"), "fsdp": fsdp_key,
            "tensor": _config_key("tensor")}
    for axis, size in sizes.items():
        if size == 0 or size < -1 or int(size) != size:
            raise ValueError(f"{keys[axis]} must be a positive integer or -1 (fill from the "
                             f"device count), got {size}")
    fill = [a for a in ("fsdp", "tensor") if sizes[a] == -1]
    if len(fill) > 1:
        raise ValueError("only one of config.mesh.fsdp and config.mesh.tensor may be -1")
    fixed = math.prod(s for a, s in sizes.items() if s != -1)
    if replica == -1:
        r = max(1, min(num_devices // fixed, num_replicas))
        while num_replicas % r:
            r -= 1
        sizes["replica"] = replica = r
    if fill:
        sizes[fill[0]] = max(1, num_devices // (replica * (fsdp if fsdp != -1 else 1)
                                               * (tensor if tensor != -1 else 1)))
    replica, fsdp, tensor = sizes["replica"], sizes["fsdp"], sizes["tensor"]
    if replica * fsdp * tensor > num_devices:
        raise ValueError(
            f"config.mesh asks for {replica} x {fsdp * tensor} devices ({keys['replica']}="
            f"{replica} replica groups of {keys['fsdp']}={fsdp} x {keys['tensor']}={tensor}), "
            f"but only {num_devices} are available")
    if num_replicas % replica:
        raise ValueError(f"{keys['replica']} ({replica}) must divide config.num_replicas "
                         f"({num_replicas})")
    if batch_size % fsdp:
        raise ValueError(f"{keys['fsdp']} ({fsdp}) must divide config.train.batch_size "
                         f"({batch_size}): the batch of each replica is split over it")
    return replica, fsdp, tensor


def make_mesh(num_replicas: int, batch_size: int, *, replica: int = -1, fsdp: int = 1,
              tensor: int = 1, devices: Sequence | None = None,
              fsdp_key: str = "config.mesh.fsdp") -> jax.sharding.Mesh:
    """Builds the `(replica, fsdp, tensor)` mesh (Auto axes) after `mesh_shape`'s checks.

    Args:
      num_replicas: K, which `replica` must divide.
      batch_size: per-replica batch, which `fsdp` must divide.
      replica, fsdp, tensor: axis sizes, -1 to fill (see `mesh_shape`).
      devices: default `jax.devices()`; a TPU topology's devices for AOT compiles.
      fsdp_key: the config key named in errors about the fsdp size.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(len(devices), num_replicas, batch_size, replica=replica, fsdp=fsdp,
                       tensor=tensor, fsdp_key=fsdp_key)
    auto = (AxisType.Auto,) * 3
    if math.prod(shape) == len(devices):  # topology-aware device order (TPU ICI rings)
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
        except NotImplementedError:
            # A mesh axis that is no product of whole torus axes, e.g. (2, 16, 2) on a
            # 4x4x4 v4/v5p slice: jax.make_mesh splits physical axes only on v5e.
            grid = mesh_utils.create_device_mesh(shape, devices,
                                                 allow_split_physical_axes=True)
            return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)
    grid = np.asarray(devices[:math.prod(shape)]).reshape(shape)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def mesh_from_config(config, batch_size: int, devices: Sequence | None = None
                     ) -> jax.sharding.Mesh:
    """`make_mesh` from config.mesh.{replica,fsdp,tensor}.

    config.mesh.data, the batch split of the older `(replica, data)` mesh, is
    accepted as a deprecated alias of config.mesh.fsdp (with a warning).
    """
    m = config.mesh
    fsdp, fsdp_key = m.fsdp, "config.mesh.fsdp"
    data = m.get("data")
    if data is not None:
        warnings.warn("config.mesh.data is deprecated: it is the batch split over the "
                      "'fsdp' mesh axis now; set config.mesh.fsdp instead",
                      FutureWarning, stacklevel=2)
        if fsdp not in (1, data):
            raise ValueError(f"config.mesh.data ({data}, a deprecated alias of "
                             f"config.mesh.fsdp) conflicts with config.mesh.fsdp ({fsdp}); "
                             "set only config.mesh.fsdp")
        fsdp, fsdp_key = data, "config.mesh.data"
    return make_mesh(config.num_replicas, batch_size, replica=m.replica, fsdp=fsdp,
                     tensor=m.get("tensor", 1), devices=devices, fsdp_key=fsdp_key)


def _names(x) -> tuple | None:
    """The logical names in a Variable's metadata, or None."""
    return x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None


def _shape(x) -> tuple:
    return tuple((x.get_value() if isinstance(x, nnx.Variable) else x).shape)


def spec_of(x, *, stacked: bool = True, rules=LOGICAL_RULES, path: str = "?") -> P:
    """PartitionSpec of one leaf (a Variable carrying logical names, or an array).

    Args:
      x: an `nnx.Variable` (its value `[K, ...]` when `stacked`) or an array.
      stacked: the leaf has a leading K axis, split over `replica`.
      path: the leaf's path, for errors.
    """
    shape = _shape(x)
    inner = len(shape) - int(stacked)
    names = _names(x)
    if names is None:  # step counts and other metadata-free leaves
        mapped = (None,) * inner
    else:
        if len(names) != inner:
            raise ValueError(f"leaf {path}: logical axes {tuple(names)} name {len(names)} "
                             f"dimensions but the parameter has shape {shape[int(stacked):]}")
        mapped = logical_to_mesh(names, rules)
    spec = (("replica",) if stacked else ()) + mapped
    while spec and spec[-1] is None:  # P('replica') rather than P('replica', None, None)
        spec = spec[:-1]
    return P(*spec)


def _check_divides(path: str, x, spec: P, mesh) -> None:
    shape, names = _shape(x), _names(x)
    offset = len(shape) - len(names) if names else 0
    for dim, axis in enumerate(spec):
        if axis is None:
            continue
        n = mesh.shape[axis]
        if shape[dim] % n:
            what = (f"'{names[dim - offset]}'" if names and dim >= offset else "K")
            raise ValueError(
                f"{_config_key(axis)} ({n}) does not divide dimension {dim} ({what}, size "
                f"{shape[dim]}) of {path} {shape}; pick a mesh size that divides it")


def state_shardings(tree: Any, mesh, *, stacked: bool = True, rules=LOGICAL_RULES) -> Any:
    """`NamedSharding`s for every leaf of params / optimizer state (concrete or abstract).

    Args:
      tree: nnx.State / optax state whose Variables carry logical names; leaves
        `[K, ...]` when `stacked`.
    Returns:
      The same tree with each leaf's value replaced by its NamedSharding (a
      valid `in_shardings` / `out_shardings` for jit).
    Raises:
      ValueError: a mesh axis that does not divide the dimension it splits
        (names the config key, the leaf and the sizes), before anything compiles.
    """

    def one(path, x):
        where = jax.tree_util.keystr(path, simple=True, separator="/")
        if not hasattr(x, "shape") and not isinstance(x, nnx.Variable):
            return x
        spec = spec_of(x, stacked=stacked, rules=rules, path=where)
        _check_divides(where, x, spec, mesh)
        sh = NamedSharding(mesh, spec)
        return x.replace(sh) if isinstance(x, nnx.Variable) else sh

    return jax.tree_util.tree_map_with_path(
        one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replica_sharding(mesh) -> NamedSharding:
    """For `[K, ...]` leaves split over `replica` only (per-replica metrics)."""
    return NamedSharding(mesh, P("replica"))


def batch_sharding(mesh) -> NamedSharding:
    """For `[K, B, ...]` batches: K over `replica`, B over `fsdp`."""
    return NamedSharding(mesh, P("replica", "fsdp"))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def unstacked(stacked: NamedSharding) -> NamedSharding:
    """The sharding of one replica of a stacked `[K, ...]` leaf: its spec without the
    leading (`replica`) entry, on the same mesh. Merged models, single replicas and
    the base are laid out so: split inside every replica group."""
    return NamedSharding(stacked.mesh, P(*tuple(stacked.spec)[1:]))
