"""The device mesh: a `replica` axis for the K models and a `data` axis for the batch.

Stacked state `[K, ...]` is sharded along `replica`; batches `[K, B, T]` along
(`replica`, `data`). The axes are `Auto`, so XLA propagates shardings through
the vmapped step without per-op annotations (explicit axes would require
resharding every vmapped input, see anchors-jax.md section 3.4).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh(replica: int, data: int, num_replicas: int, batch_size: int) -> jax.sharding.Mesh:
    """Builds a `(replica, data)` mesh over the first `replica * data` devices.

    Args:
      replica, data: mesh axis sizes (config.mesh.replica / config.mesh.data);
        `replica = -1` means "all devices left after `data`".
      num_replicas: K, which `replica` must divide.
      batch_size: per-replica batch, which `data` must divide.
    """
    devices = jax.devices()
    if data < 1:
        raise ValueError(f"config.mesh.data must be >= 1, got {data}")
    if replica == -1:
        replica = max(1, min(len(devices) // data, num_replicas))
        while num_replicas % replica:
            replica -= 1
    if replica < 1 or replica * data > len(devices):
        raise ValueError(f"config.mesh asks for {replica} x {data} devices, but only "
                         f"{len(devices)} are available")
    if num_replicas % replica:
        raise ValueError(f"config.mesh.replica ({replica}) must divide config.num_replicas "
                         f"({num_replicas})")
    if batch_size % data:
        raise ValueError(f"config.mesh.data ({data}) must divide config.train.batch_size "
                         f"({batch_size})")
    grid = np.asarray(devices[:replica * data]).reshape(replica, data)
    return jax.sharding.Mesh(grid, ("replica", "data"), axis_types=(AxisType.Auto,) * 2)


def replica_sharding(mesh) -> NamedSharding:
    """For stacked `[K, ...]` leaves: K split over `replica`, the rest replicated."""
    return NamedSharding(mesh, P("replica"))


def batch_sharding(mesh) -> NamedSharding:
    """For `[K, B, ...]` batches."""
    return NamedSharding(mesh, P("replica", "data"))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
