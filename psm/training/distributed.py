"""Several JAX processes (multi-host): start-up, agreement, who writes, global arrays.

A multi-process run is one program run by N processes (one per host, or
several on one host), all on one `(replica, fsdp, tensor)` mesh over every
process's devices. Every process runs the same steps in the same order:

* `initialize` starts JAX's distributed runtime (before any JAX computation);
* `check_same_config` stops every process when they were given different configs,
  `check_same_values` when they loaded different base models;
* each process builds only its own shards of the `[K, B, T]` training batch
  (`global_batch`), so the global batch is the one a single process would build;
* training state, metrics and checkpoints are global arrays; orbax writes and
  restores a checkpoint when every process calls it;
* host copies of global arrays (`psm.global_arrays.to_numpy`) are gathered from
  every process; the work after training (merges, evaluation) runs on the global
  arrays themselves, and only their small results (metrics, losses) are read back;
* only the primary process (process 0) writes the run's files (metrics,
  results, per-sample losses, plots, config.json, exports): `is_primary`.

With one process every function here reduces to its single-process meaning.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)


def check_flags(coordinator: str | None, num_processes: int | None,
                process_id: int | None) -> bool:
    """Checks the three multi-process flags; True when they were given.

    Raises:
      ValueError naming the flag: only some of them given, a count < 1, an id
      outside [0, num_processes), a coordinator that is not host:port.
    """
    given = {"--coordinator": coordinator, "--num_processes": num_processes,
             "--process_id": process_id}
    missing = [name for name, v in given.items() if v is None or v == ""]
    if len(missing) == 3:
        return False
    if missing:
        named = [name for name in given if name not in missing]
        raise ValueError(f"{', '.join(named)} given without {', '.join(missing)}: a "
                         "multi-process run needs all three (--coordinator=host:port "
                         "--num_processes=N --process_id=i), a single-process run none")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--coordinator={coordinator!r} must be host:port (process 0's "
                         "address, e.g. localhost:12355)")
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must lie in [0, {num_processes}) "
                         f"(--num_processes={num_processes})")
    return True


def cluster_detected() -> bool:
    """Whether `jax.distributed.initialize()` can find its settings by itself:
    JAX_COORDINATOR_ADDRESS is set, or JAX recognises the environment (a Cloud
    TPU VM / GKE TPU slice, Slurm, Open MPI, ...)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    try:  # JAX's own detectors; private, so a change in JAX means "not detected"
        from jax._src.clusters import ClusterEnv
        return any(not env.opt_in_only_method and env.is_env_present()
                   for env in ClusterEnv._cluster_types)  # noqa: SLF001
    except Exception:  # noqa: BLE001
        return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts the distributed runtime when asked for (flags) or detected; True if started.

    Must run before any JAX computation (before the first `jax.devices()`).
    CPU collectives use gloo (CPU has none by default; the setting does not
    affect GPU or TPU devices).
    """
    import jax

    explicit = check_flags(coordinator, num_processes, process_id)
    if not explicit and not cluster_detected():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    log.info("process %d of %d; %d local devices, %d in all", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """True in the process that writes the run's files (process 0)."""
    import jax
    return jax.process_index() == 0


def is_multiprocess() -> bool:
    import jax
    return jax.process_count() > 1


def from_primary(tree: Any) -> Any:
    """Process 0's value of a tree of process-local arrays, as numpy in every process.

    For values each process computed itself (the pre-trained base): every process
    then continues from the same bits. One process: a host copy.
    """
    import jax
    if not is_multiprocess():
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.broadcast_one_to_all(tree)


def check_same_values(tree: Any, what: str) -> None:
    """Stops every process, with the same message, unless all hold the same bits.

    For values each process read itself that must agree (the base model loaded
    from a checkpoint on every host): each process hashes its host copy of every
    leaf and only the hashes are gathered, so no device ever receives the whole
    model (as `from_primary` would have it). One process: nothing to check.

    Raises:
      ValueError: naming the leaves and the processes that differ from process 0.
    """
    if not is_multiprocess():
        return
    import hashlib

    import jax
    from jax.experimental import multihost_utils
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    mine = np.array([int.from_bytes(hashlib.blake2b(
        np.ascontiguousarray(jax.device_get(x)).tobytes(), digest_size=4).digest(), "little")
        for _, x in leaves], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(leaves))
    bad = sorted({jax.tree_util.keystr(leaves[j][0]) for j in np.nonzero(
        (every != every[0]).any(axis=0))[0]})
    if bad:
        procs = [int(i) for i in np.nonzero((every != every[0]).any(axis=1))[0]]
        raise ValueError(f"{what} differs between processes: process(es) {procs} hold other "
                         f"values than process 0 in {', '.join(bad[:10])}"
                         f"{' ...' if len(bad) > 10 else ''}; every process must read the "
                         "same checkpoint files")


def global_batch(gather: Callable[[dict, np.ndarray], dict], arrays: dict,
                 indices: np.ndarray, sharding, *, rows: int | None = None) -> dict:
    """The batch of examples `indices` `[K, B]` as global arrays on `sharding`.

    Each process gathers only what the shards its devices hold need, once per
    distinct shard; the global array equals
    `jax.device_put(gather(arrays, indices), sharding)`.

    Args:
      gather: `tasks.gather_batch`-like: (arrays, indices of any shape `[..., B]`)
        -> dict of arrays `[..., rows, ...]`.
      rows: None: one row per example, the arrays are `[K, B, ...]` and a shard
        gathers only its own `indices[k0:k1, b0:b1]`. R: `gather` packs each
        replica's B examples into R rows (`psm.data.packed_batches.gather_packed`),
        the arrays are `[K, R, ...]`, and a shard's rows depend on all B examples
        of its replicas, so it gathers `indices[k0:k1]` and keeps its rows.
      sharding: a NamedSharding whose spec splits at most the first two axes.
    """
    import jax
    indices = np.asarray(indices)
    probe = gather(arrays, indices[:1, :1])
    num_rows = indices.shape[1] if rows is None else rows
    cache: dict = {}

    def block(index: tuple) -> dict:
        """The gathered arrays holding shard `index`: exactly it (rows=None), or all
        rows of its replicas (packed)."""
        by = index[:2] if rows is None else index[:1]
        key = tuple((s.start, s.stop, s.step) for s in by)
        if key not in cache:
            cache[key] = gather(arrays, indices[by])
        return cache[key]

    def shard(name: str, index: tuple):
        within = (slice(None),) * 2 if rows is None else (slice(None), index[1])
        return block(index)[name][within + index[2:]]

    def one(name):
        shape = (indices.shape[0], num_rows) + probe[name].shape[2:]
        return jax.make_array_from_callback(shape, sharding,
                                            lambda index: shard(name, index))

    return {name: one(name) for name in probe}


def check_same_config(config_dict: dict) -> None:
    """Stops every process, with the same message, unless all hold the same config.

    Every process's config JSON is gathered (a collective), so that each one
    can name the keys where another process differs from process 0.

    Raises:
      ValueError: 'process i differs from process 0 in config keys a, b'.
    """
    if not is_multiprocess():
        return
    from jax.experimental import multihost_utils

    from psm.training import workdir
    text = json.dumps(config_dict, sort_keys=True).encode()
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(text)], np.int64)))
    width = int(sizes.max())
    mine = np.zeros(width, np.uint8)
    mine[:len(text)] = np.frombuffer(text, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(len(sizes), width)
    configs = [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, sizes.ravel())]
    problems = []
    for i, other in enumerate(configs[1:], start=1):
        keys = sorted(workdir.diff_keys(configs[0], other))
        if keys:
            problems.append(f"process {i} differs from process 0 in config keys "
                            f"{', '.join(keys[:20])}")
    if problems:
        raise ValueError("the processes of a multi-process run were given different "
                         f"configs: {'; '.join(problems)}; give every process the same "
                         "--config and --config.* overrides")

