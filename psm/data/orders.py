"""Per-replica data orders: pure functions of (data seed, replica, epoch).

Nothing here holds state, so resuming needs only the step number, and every
order can be recomputed after the run for the per-sample report.

Two modes (METHOD.md section 2):

* standard: replica k's epoch e is `permutation(N)` drawn from the seed
  `[data_seed, k, e]`; batches are consecutive slices of it.
* fixed intra-batch: per epoch, batch membership is drawn once from
  `[data_seed, SHARED, e]` and shared by all replicas; replica k visits that
  epoch's batches in its own order, drawn from `[data_seed, k, e, BATCHES]`.

An epoch has `ceil(N / B)` steps; the last batch is filled with index -1
(padding rows that carry no loss), so every sample is seen exactly once per
epoch and shapes stay static.
"""

from __future__ import annotations

import numpy as np

_SHARED = 2**31 - 1  # a replica index no real replica uses
_BATCHES = 1


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def epoch_order(data_seed: int, replica: int, epoch: int, num_samples: int,
                batch_size: int, fixed_intra_batch: bool = False) -> np.ndarray:
    """Sample indices of one replica's epoch, padded with -1 to whole batches.

    Returns:
      `[steps_per_epoch * batch_size]` int64; each index in `range(num_samples)`
      appears exactly once, -1 fills the last batch.
    """
    steps = steps_per_epoch(num_samples, batch_size)
    pad = steps * batch_size - num_samples
    if not fixed_intra_batch:
        perm = np.random.default_rng([data_seed, replica, epoch]).permutation(num_samples)
        return np.concatenate([perm, np.full(pad, -1, np.int64)])
    shared = np.random.default_rng([data_seed, _SHARED, epoch]).permutation(num_samples)
    batches = np.concatenate([shared, np.full(pad, -1, np.int64)]).reshape(steps, batch_size)
    batch_order = np.random.default_rng([data_seed, replica, epoch, _BATCHES]).permutation(steps)
    return batches[batch_order].reshape(-1)


def batch_indices(step: int, *, data_seed: int, num_replicas: int, num_samples: int,
                  batch_size: int, fixed_intra_batch: bool = False) -> np.ndarray:
    """Sample indices of global step `step` for all replicas.

    Returns:
      `[K, B]` int64, -1 for padding rows.
    """
    steps = steps_per_epoch(num_samples, batch_size)
    epoch, within = divmod(step, steps)
    rows = [epoch_order(data_seed, k, epoch, num_samples, batch_size, fixed_intra_batch)
            [within * batch_size:(within + 1) * batch_size] for k in range(num_replicas)]
    return np.stack(rows)


def first_epoch_positions(*, data_seed: int, num_replicas: int, num_samples: int,
                          batch_size: int, fixed_intra_batch: bool = False) -> np.ndarray:
    """Each sample's position in each replica's first epoch, normalised to [0, 1).

    Returns:
      `[K, N]` float64: `position[k, i] = (index of sample i in replica k's
      epoch-0 order) / N`.
    """
    out = np.empty((num_replicas, num_samples))
    for k in range(num_replicas):
        order = epoch_order(data_seed, k, 0, num_samples, batch_size, fixed_intra_batch)
        order = order[order >= 0]
        out[k, order] = np.arange(num_samples) / num_samples
    return out
