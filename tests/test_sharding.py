"""The same step on 1 device and on a (replica=4, data=2) mesh of 8 CPU devices."""

import jax
import numpy as np
import pytest
from flax import nnx

from psm import replicas, sharding
from psm.models.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_seq_len=8)
K, B, T = 4, 4, 8


def _batches(n):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, CFG.vocab_size, (K, B, T)).astype(np.int32)
        out.append({"tokens": tokens, "targets": np.roll(tokens, -1, -1),
                    "loss_mask": np.ones((K, B, T), np.float32),
                    "segment_ids": np.ones((K, B, T), np.int32),
                    "positions": np.broadcast_to(np.arange(T, dtype=np.int32),
                                                 (K, B, T)).copy()})
    return out


def _run(replica_axis, data_axis):
    mesh = sharding.make_mesh(replica_axis, data_axis, K, B)
    graphdef, base = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))
    tx, _ = replicas.make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
    st, bt = sharding.replica_sharding(mesh), sharding.batch_sharding(mesh)
    params = jax.device_put(replicas.stack(base, K), st)
    opt = jax.device_put(replicas.init_opt_state(tx, params), st)
    step = replicas.make_train_step(graphdef, tx, st, bt)
    losses = []
    with jax.set_mesh(mesh):
        for batch in _batches(3):
            params, opt, m = step(params, opt, jax.device_put(batch, bt))
            losses.append(np.asarray(m["loss"]))
    return params, np.stack(losses)


def test_replica_axis_is_sharded_and_losses_match_one_device():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices; tests/conftest.py sets them up")
    params_1, losses_1 = _run(1, 1)
    params_8, losses_8 = _run(4, 2)
    leaf = jax.tree.leaves(params_8)[0]
    assert len(leaf.sharding.device_set) == 8
    assert leaf.sharding.shard_shape(leaf.shape)[0] == 1  # one replica per replica-row
    assert len(jax.tree.leaves(params_1)[0].sharding.device_set) == 1
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    # Splitting the batch over `data` changes the gradient's summation order, and
    # Adam's g / (sqrt(v) + eps) turns rounding in near-zero gradients into
    # visible moves of single parameters, so the final parameters are compared
    # through what they compute: per-sample losses on a held-out batch.
    # (A replica-only mesh changes XLA's tiling of the same sums, with the same effect.)
    held = jax.tree.map(lambda x: x[0], _batches(4)[3])
    eval_step = replicas.make_eval_step(nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))[0])
    np.testing.assert_allclose(np.asarray(eval_step(params_8, held)),
                               np.asarray(eval_step(params_1, held)), rtol=1e-5)
    # ... and the replicas did train apart (the comparison is not vacuous).
    per_replica = np.asarray(eval_step(params_1, held))
    assert np.ptp(per_replica.mean(axis=1)) > 1e-4


def test_mesh_errors_name_the_config_key():
    with pytest.raises(ValueError, match="config.mesh.replica"):
        sharding.make_mesh(3, 1, 4, 8)
    with pytest.raises(ValueError, match="config.mesh.data"):
        sharding.make_mesh(1, 3, 4, 8)
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(4, 4, 4, 8)
