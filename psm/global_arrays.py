"""Host reads of (possibly multi-process) global arrays, identical in every process.

Several JAX processes run one program on one mesh (multi-controller): an array
split over devices of other processes cannot be read with `np.asarray` in any
of them. Work on parameters stays on device (jitted computations that every
process runs); only small results (losses, counts, per-example scores) come to
the host, through `to_numpy`, which every process must call in the same order
with the same arrays when they span processes (it is then a collective).

With one process, or for arrays a process holds whole, nothing is gathered:
`to_numpy` is `np.asarray`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def spans_processes(x) -> bool:
    """True for a `jax.Array` whose value is not held whole by this process's devices
    (the same answer in every process: it depends on the sharding alone)."""
    return (isinstance(x, jax.Array) and not x.is_fully_addressable
            and not x.is_fully_replicated)


def to_numpy(x) -> np.ndarray:
    """The whole value of `x` as numpy, in every process.

    For small results only (the array is copied to every host). A `jax.Array`
    split over several processes is gathered (`multihost_utils.process_allgather`,
    a collective: every process must call this with the same array).
    """
    if spans_processes(x):
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def tree_to_numpy(tree: Any) -> Any:
    """`to_numpy` of every leaf of a tree (one gather per leaf that spans processes)."""
    return jax.tree.map(to_numpy, tree)


def replicated(x):
    """A sharding that replicates a result on every device of `x`'s mesh, or None
    when `x` is not split by a `NamedSharding` (let JAX place it, as before).

    Small results of jitted reductions over global arrays are put there, so that
    every process can read them without a gather.
    """
    sh = getattr(x, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
    return None


def in_order(x):
    """`x`, waited for when several processes run on CPU devices; else `x` at once.

    The CPU runtime may start two independent dispatched programs in a different
    order on different devices; with collectives across processes (gloo) that
    can hang, so there each program that may hold a collective (a merge kernel, a
    slice or stack across the `replica` axis) is finished before the next one is
    dispatched. Accelerators execute in dispatch order: nothing waits there.
    """
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        jax.block_until_ready(x)
    return x
