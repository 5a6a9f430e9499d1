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


@pytest.mark.parametrize("fixed", [False, True])
def test_padding_rows_are_minus_one_int64(fixed):
    order = orders.epoch_order(0, 1, 0, N, B, fixed)
    assert order.dtype == np.int64
    assert set(order[order < 0].tolist()) == {-1}
    if not fixed:  # the standard mode pads at the end of the epoch
        assert set(order[N:].tolist()) == {-1}


@pytest.mark.parametrize("fixed", [False, True])
def test_orders_are_pure_functions_of_seed_replica_epoch(fixed):
    for k in range(K):
        np.testing.assert_array_equal(orders.epoch_order(5, k, 2, N, B, fixed),
                                      orders.epoch_order(5, k, 2, N, B, fixed))


def test_fixed_intra_batch_orders_follow_the_documented_seeds():
    """Membership from [seed, SHARED, epoch]; replica k's batch order from
    [seed, k, epoch, BATCHES] (module docstring)."""
    spe = orders.steps_per_epoch(N, B)
    shared = np.random.default_rng([7, 2**31 - 1, 1]).permutation(N)
    batches = np.concatenate([shared, np.full(spe * B - N, -1)]).reshape(spe, B)
    for k in range(K):
        visit = np.random.default_rng([7, k, 1, 1]).permutation(spe)
        np.testing.assert_array_equal(orders.epoch_order(7, k, 1, N, B, True),
                                      batches[visit].reshape(-1))
    std = np.random.default_rng([7, 2, 1]).permutation(N)
    np.testing.assert_array_equal(orders.epoch_order(7, 2, 1, N, B)[:N], std)


@pytest.mark.parametrize("fixed", [False, True])
def test_batch_indices_slice_each_replicas_epoch_order(fixed):
    spe = orders.steps_per_epoch(N, B)
    kw = dict(data_seed=2, num_replicas=K, num_samples=N, batch_size=B)
    if fixed:
        kw["fixed_intra_batch"] = True
    for step in (0, spe - 1, spe, 2 * spe + 3):
        epoch, within = divmod(step, spe)
        want = np.stack([orders.epoch_order(2, k, epoch, N, B, fixed)[within * B:(within + 1) * B]
                         for k in range(K)])
        np.testing.assert_array_equal(orders.batch_indices(step, **kw), want)


def test_first_epoch_positions_invert_the_fixed_intra_batch_order():
    pos = orders.first_epoch_positions(data_seed=4, num_replicas=K, num_samples=N,
                                       batch_size=B, fixed_intra_batch=True)
    for k in range(K):
        order = _real(orders.epoch_order(4, k, 0, N, B, True))
        np.testing.assert_array_equal(pos[k, order], np.arange(N) / N)
