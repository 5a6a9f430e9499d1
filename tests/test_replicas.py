"""The vmapped K-replica step equals K independent single-replica steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psm.training import replicas
from psm.models.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_seq_len=12)
K, B, T = 3, 4, 12


def _batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (K, B, T)).astype(np.int32)
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=-1),
        "loss_mask": (rng.random((K, B, T)) < 0.7).astype(np.float32),
        "segment_ids": np.ones((K, B, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (K, B, T)).copy(),
    }


def _setup(clip_norm=0.05):
    graphdef, base = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))
    # A tight clip makes the per-replica global norm matter: a clip that spanned
    # replicas would give different updates.
    tx, _ = replicas.make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=2,
                                    clip_norm=clip_norm, weight_decay=0.01)
    return graphdef, base, tx


def test_vmapped_step_equals_loop_of_single_steps():
    graphdef, base, tx = _setup()
    params_k = replicas.stack(base, K)
    opt_k = replicas.init_opt_state(tx, params_k)
    step = replicas.make_train_step(graphdef, tx)
    single = jax.jit(replicas.make_replica_step(graphdef, tx))
    loop_params = [base] * K
    loop_opt = [tx.init(base) for _ in range(K)]
    for s in range(3):
        batch = _batch(s)
        params_k, opt_k, metrics = step(params_k, opt_k, batch)
        for i in range(K):
            bi = jax.tree.map(lambda x: x[i], batch)
            loop_params[i], loop_opt[i], m = single(loop_params[i], loop_opt[i], bi)
            np.testing.assert_allclose(metrics["loss"][i], m["loss"], rtol=1e-5)
    for i in range(K):
        for a, b in zip(jax.tree.leaves(replicas.unstack(params_k, i)),
                        jax.tree.leaves(loop_params[i])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The replicas really diverged (different data), so the check is not vacuous.
    leaf = jax.tree.leaves(params_k)[0]
    assert not np.allclose(leaf[0], leaf[1])


def test_state_is_donated_and_step_compiles_once():
    graphdef, base, tx = _setup()
    params_k = replicas.stack(base, K)
    params_k = jax.tree.map(jnp.copy, params_k)
    opt_k = replicas.init_opt_state(tx, params_k)
    step = replicas.make_train_step(graphdef, tx)
    first = jax.tree.leaves(params_k)[0]
    params_k, opt_k, _ = step(params_k, opt_k, _batch(0))
    assert first.is_deleted()  # donated: no second copy of the K models
    params_k, opt_k, _ = step(params_k, opt_k, _batch(1))
    assert step._cache_size() == 1


def test_vmapped_optimizer_state_has_replica_axis():
    _, base, tx = _setup()
    opt_k = replicas.init_opt_state(tx, replicas.stack(base, K))
    for leaf in jax.tree.leaves(opt_k):
        assert leaf.shape[0] == K


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedules_warm_up_then_decay(schedule):
    _, lr = replicas.make_optimizer(learning_rate=1.0, total_steps=100, warmup_steps=10,
                                    schedule=schedule)
    # Warm-up: linear from 0 at step 0 to the peak at step 10.
    for step in (0, 3, 5, 10):
        assert float(lr(step)) == pytest.approx(step / 10, abs=1e-6)
    # Decay over the remaining 90 steps, at t = (step - 10) / 90 of the way:
    # linear 1 - t, cosine (1 + cos(pi t)) / 2, constant 1.
    shape = {"linear": lambda t: 1 - t, "cosine": lambda t: (1 + np.cos(np.pi * t)) / 2,
             "constant": lambda t: 1.0}[schedule]
    for step in (25, 40, 55, 70, 85, 99, 100):
        t = (step - 10) / 90
        assert float(lr(step)) == pytest.approx(shape(t), abs=1e-6), step


def test_unknown_schedule_names_the_config_key():
    with pytest.raises(ValueError, match="config.optim.schedule"):
        replicas.make_optimizer(learning_rate=1.0, total_steps=10, warmup_steps=0,
                                schedule="step")
