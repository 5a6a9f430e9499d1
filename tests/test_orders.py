"""Data orders: permutations, distinct per replica, pure functions of (seed, replica, epoch)."""

import numpy as np
import pytest

from psm.data import orders

N, B, K = 53, 8, 4  # N not a multiple of B: the last batch is padded


def _real(order):
    return order[order >= 0]


@pytest.mark.parametrize("fixed", [False, True])
def test_each_epoch_is_a_permutation_padded_to_whole_batches(fixed):
    for k in range(K):
        for epoch in range(3):
            order = orders.epoch_order(0, k, epoch, N, B, fixed)
            assert len(order) == orders.steps_per_epoch(N, B) * B
            assert sorted(_real(order).tolist()) == list(range(N))
            assert np.sum(order < 0) == orders.steps_per_epoch(N, B) * B - N


def test_orders_differ_across_replicas_and_epochs_and_seeds():
    firsts = [tuple(orders.epoch_order(0, k, 0, N, B)) for k in range(K)]
    assert len(set(firsts)) == K
    assert tuple(orders.epoch_order(0, 0, 1, N, B)) != firsts[0]
    assert tuple(orders.epoch_order(1, 0, 0, N, B)) != firsts[0]


def test_orders_identical_on_rerun_and_after_resume():
    kw = dict(data_seed=3, num_replicas=K, num_samples=N, batch_size=B)
    steps = orders.steps_per_epoch(N, B) * 3
    full = [orders.batch_indices(s, **kw) for s in range(steps)]
    # A resumed run computes batches from the step alone; recompute from a midpoint.
    resumed = [orders.batch_indices(s, **kw) for s in range(steps // 2, steps)]
    for a, b in zip(full[steps // 2:], resumed):
        np.testing.assert_array_equal(a, b)
    # Every epoch of the step stream is a permutation per replica.
    spe = orders.steps_per_epoch(N, B)
    for e in range(3):
        block = np.concatenate(full[e * spe:(e + 1) * spe], axis=1)
        for k in range(K):
            assert sorted(_real(block[k]).tolist()) == list(range(N))


def test_fixed_intra_batch_shares_batches_but_not_their_order():
    spe = orders.steps_per_epoch(N, B)
    batches = [orders.epoch_order(0, k, 0, N, B, True).reshape(spe, B) for k in range(K)]
    as_sets = [sorted(tuple(sorted(b.tolist())) for b in bk) for bk in batches]
    assert all(s == as_sets[0] for s in as_sets)  # same batch membership
    sequences = {tuple(tuple(sorted(b.tolist())) for b in bk) for bk in batches}
    assert len(sequences) == K  # visited in different orders
    # The standard mode does not share membership.
    std = [orders.epoch_order(0, k, 0, N, B).reshape(spe, B) for k in range(2)]
    assert {tuple(sorted(b)) for b in std[0].tolist()} != {tuple(sorted(b)) for b in std[1].tolist()}


def test_first_epoch_positions_invert_the_order():
    pos = orders.first_epoch_positions(data_seed=0, num_replicas=K, num_samples=N, batch_size=B)
    assert pos.shape == (K, N)
    for k in range(K):
        order = _real(orders.epoch_order(0, k, 0, N, B))
        np.testing.assert_allclose(pos[k, order], np.arange(N) / N)
