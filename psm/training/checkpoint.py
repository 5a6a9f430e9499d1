"""Checkpoints of the stacked training state: the only module that imports orbax.

A checkpoint holds the stacked replica state (`params [K, ...]`, optimizer state
`[K, ...]`) and the step. Data orders and per-step randomness are derived from
the step, so nothing else is needed to resume bit-identically. Orbax writes
each step to a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact.

Several processes: every process calls `save` and `restore` (orbax writes each
array's shards from the process that holds them and syncs the processes).
Arrays local to each process (the pre-trained base, made on every process's own
devices) are saved and restored as replicated global arrays.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec


class Checkpointer:
    """Saves every `interval` steps (and on demand), keeps the latest `keep`."""

    def __init__(self, directory: str, *, interval: int, keep: int):
        if interval < 1:
            raise ValueError(f"config.checkpoint.every_steps must be >= 1, got {interval}")
        if keep < 1:
            raise ValueError(f"config.checkpoint.keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        self.interval = interval
        # Synchronous saves: the tiny steps make async gains negligible, and a
        # finished save() then means the checkpoint is on disk.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=1, create=True,
                enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.interval == 0

    def save(self, step: int, state: Any) -> None:
        """Writes `state` (a pytree of arrays) as checkpoint `step`."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(_global(state)))
        self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """Restores checkpoint `step` with the structure, dtypes and shardings of `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _global(like, abstract=True))
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        restored = _local_like(restored, like)
        # Arrays restored by orbax may not be donatable; copy them through jit.
        return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(restored)

    def close(self) -> None:
        self._manager.close()


def _is_local(x) -> bool:
    """A leaf that lives on this process's devices only (several processes)."""
    return jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable


def _global(tree: Any, abstract: bool = False) -> Any:
    """`tree` with its process-local leaves as global arrays replicated on every device
    (every process holds the same value; orbax refuses to save process-local arrays).
    `abstract`: ShapeDtypeStructs instead, for a restore."""
    if jax.process_count() == 1:
        return tree
    everywhere = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)),
                               PartitionSpec())

    def one(x):
        if not _is_local(x):
            return x
        if abstract:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere)
        host = np.asarray(x)
        return jax.make_array_from_callback(x.shape, everywhere, lambda index: host[index])

    return jax.tree.map(one, tree)


def _local_like(restored: Any, like: Any) -> Any:
    """Leaves restored as replicated global arrays back on this process's device."""
    if jax.process_count() == 1:
        return restored
    return jax.tree.map(lambda r, x: jnp.asarray(np.asarray(r)) if _is_local(x) else r,
                        restored, like)


def restore_tree(path: str, like: Any) -> Any:
    """Restores one parameter tree saved with orbax's StandardSave at `path`.

    Args:
      like: a tree of arrays or ShapeDtypeStructs giving structure, dtypes and shardings.
    Raises:
      ValueError: `path` is not an orbax checkpoint of that structure (names the folder).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such orbax checkpoint folder")
    if not os.path.exists(os.path.join(path, "_METADATA")):
        raise ValueError(f"{path} is not an orbax checkpoint: it has no _METADATA file "
                         f"(it holds {sorted(os.listdir(path))[:5]})")
    try:
        return ocp.StandardCheckpointer().restore(path, abstract)
    except (FileNotFoundError, ValueError, KeyError) as e:
        # orbax's message dumps both trees; its first line says what differs.
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: its tree does not match the config's model ({first}); "
                         "pass the config it was saved with") from e
