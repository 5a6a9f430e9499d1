"""Training speed accounting (psm.training.throughput) and float32 master weights for
bfloat16 parameters (psm.training.replicas.with_master_weights)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from psm.data import tasks
from psm.models import bert, llama
from psm.training import encoder_task, replicas, throughput, trainer
from tiny_config import tiny_test_config


def _param_count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_llama_flops_per_token_equals_a_hand_count():
    cfg = llama.LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=2,
                            num_heads=2, num_kv_heads=1, tie_embeddings=True)
    seq = 6
    # D=8, F=12, L=2, H=2, KV=1, Q=D/H=4, V=10, T=6.
    # per layer: q 8*2*4=64, k 8*1*4=32, v 32, o 2*4*8=64, MLP 3*8*12=288, 2 norms 16 -> 496
    # N = 2*496 + final norm 8 = 1000                      -> 6N        = 6000
    # attention 12*L*H*Q*T = 12*2*2*4*6                       =          1152
    # output projection 6*D*V = 6*8*10 (tied, still counted)  =           480
    assert throughput.flops_per_token(cfg, seq) == 6000 + 1152 + 480 == 7632
    # N is the model's own parameter count without the [V, D] embedding table.
    model = llama.Llama(cfg, rngs=nnx.Rngs(0))
    assert _param_count(model) - 10 * 8 == 1000
    # Untied: the lm_head is the output projection already counted; N does not change.
    assert throughput.flops_per_token(cfg.replace(tie_embeddings=False), seq) == 7632


def test_bert_flops_per_token_equals_a_hand_count():
    cfg = bert.BertConfig(vocab_size=20, hidden_size=8, num_layers=2, num_heads=2,
                          intermediate_size=16, num_labels=3)
    seq = 4
    # D=8, F=16, L=2, H*Q=D=8, C=3, T=4.
    # per layer: q,k,v,out with biases 4*(64+8)=288, MLP 8*16+16+16*8+8=280, 2 LayerNorms 32
    #   -> 600; N = 2*600 + embedding LayerNorm 16 = 1216      -> 6N = 7296
    # attention 12*L*D*T = 12*2*8*4 (bidirectional, whole)     =       768
    # once per sequence: pooler 64+8=72, classifier 24+3=27 -> 6*99/T = 148.5
    assert throughput.flops_per_token(cfg, seq) == 7296 + 768 + 148.5 == 8212.5
    model = bert.Bert(cfg, rngs=nnx.Rngs(0))
    embeddings = 20 * 8 + 512 * 8 + 2 * 8  # word, position, token-type tables
    assert _param_count(model) - embeddings == 1216 + 99


def test_peak_table_and_cpu():
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("NVIDIA H200") == 989e12
    assert throughput.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert throughput.peak_flops("TPU v4") == 275e12
    assert throughput.peak_flops("TPU v5 lite") == 197e12
    assert throughput.peak_flops("TPU v5p") == 459e12
    assert throughput.peak_flops("cpu") is None
    with pytest.raises(TypeError, match="no FLOP count"):
        throughput.flops_per_token(object(), 8)


def test_step_timer_leaves_out_excluded_time_and_reports_mfu():
    timer = throughput.StepTimer(flops_per_token=100.0, peak=1e6, devices=2)
    assert timer.lap() == {}  # not started: nothing timed
    timer.start()
    timer.add(1000, 250)
    timer.add(1000, 250)
    with timer.excluded():
        time.sleep(0.3)
    speed = timer.lap()
    assert 0 < speed["perf/step_time_s"] < 0.1  # the 0.3 s inside excluded() is left out
    assert speed["perf/tokens_per_s"] == pytest.approx(4 * speed["perf/loss_tokens_per_s"])
    assert speed["perf/mfu"] == pytest.approx(speed["perf/tokens_per_s"] * 100 / 2e6)
    assert timer.lap() == {}  # an empty window adds no row
    summary = timer.summary()
    assert summary["timed_steps"] == 2 and summary["tokens_per_s"] > 0
    assert throughput.StepTimer().summary()["tokens_per_s"] is None
    cpu = throughput.StepTimer(flops_per_token=100.0, peak=None)
    cpu.start()
    cpu.add(10, 5)
    assert "perf/mfu" not in cpu.lap() and cpu.summary()["mfu"] is None


def test_token_counts_of_decoder_and_encoder_batches():
    dec = {"tokens": np.zeros((2, 3, 5), np.int32),
           "loss_mask": np.array([[[0, 0, 1, 1, 1]] * 3, [[0, 1, 1, 0, 0]] * 3], np.float32)}
    assert throughput.token_counts(dec) == (30, 3 * 3 + 3 * 2)
    enc = {"tokens": np.zeros((1, 2, 4), np.int32),
           "attention": np.array([[[1, 1, 1, 0], [1, 1, 0, 0]]]),
           "weight": np.array([[1.0, 0.0]])}  # the second row is padding
    assert throughput.token_counts(enc) == (8, 3)


@pytest.mark.parametrize("gather", [tasks.gather_batch, encoder_task.gather_batch],
                         ids=["decoder", "encoder"])
def test_batch_counter_equals_the_counts_of_the_gathered_batch(gather):
    """The loop counts tokens from indices (per-row counts made once); the counts equal
    those of the batch itself, padding rows (-1) included."""
    rng = np.random.default_rng(0)
    n, t = 7, 6
    arrays = {"tokens": rng.integers(0, 9, (n, t)).astype(np.int32),
              "targets": rng.integers(0, 9, (n, t)).astype(np.int32),
              "loss_mask": (rng.random((n, t)) < 0.5).astype(np.float32),
              "segment_ids": np.ones((n, t), np.int32),
              "positions": np.tile(np.arange(t, dtype=np.int32), (n, 1)),
              "type_ids": np.zeros((n, t), np.int32),
              "attention": (rng.random((n, t)) < 0.7).astype(np.int32),
              "label": rng.integers(0, 2, n).astype(np.int32)}
    counter = throughput.BatchTokenCounter(gather, arrays)
    for indices in (np.array([[0, 3, 6], [2, 2, 5]]), np.array([[1, -1, -1], [4, 0, -1]])):
        assert counter(indices) == throughput.token_counts(gather(arrays, indices))


# --------------------------------------------------------------- master weights

def test_master_weights_accumulate_updates_below_half_a_bf16_ulp():
    # 1.0 in bfloat16: the next values are 1 - 2^-8 and 1 + 2^-7, so an update of 1e-3
    # (below half the spacing either way) rounds back to 1.0.
    params = {"w": jnp.ones((4,), jnp.bfloat16)}
    grads = {"w": jnp.ones((4,), jnp.bfloat16)}
    sgd = optax.sgd(1e-3)
    naive, naive_state = params, sgd.init(params)
    tx = replicas.with_master_weights(sgd)
    master, state = params, tx.init(params)
    for _ in range(5):
        u, naive_state = sgd.update(grads, naive_state, naive)
        naive = optax.apply_updates(naive, u)
        u, state = tx.update(grads, state, master)
        master = optax.apply_updates(master, u)
    assert naive["w"].dtype == master["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(naive["w"], 1.0)  # the naive update never moves it
    np.testing.assert_allclose(state.master["w"], 1.0 - 5e-3, rtol=1e-6)
    # The parameters are the float32 master rounded to bfloat16.
    np.testing.assert_array_equal(master["w"], state.master["w"].astype(jnp.bfloat16))
    assert float(master["w"][0]) < 1.0


def test_bf16_run_optimizer_moves_parameters_a_naive_bf16_update_would_not():
    """The run's own optimizer (trainer.make_optimizer) for config.model.param_dtype
    'bfloat16': Adam steps of lr=2e-4 on a norm scale of 1.0 (below half a bf16 ulp,
    2^-9 ~ 2e-3) add up over 12 steps; the same AdamW applied to the bf16 parameters
    directly leaves every norm scale at exactly 1.0."""
    c = tiny_test_config(**{"model.param_dtype": "bfloat16", "optim.learning_rate": 2e-4,
                            "optim.warmup_steps": 0, "optim.schedule": "constant"})
    trainer.validate_config(c)
    cfg = llama.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=1,
                            num_heads=2, num_kv_heads=1, param_dtype="bfloat16",
                            tie_embeddings=True)
    graphdef, params = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 16, (1, 4, 8)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, -1),
             "loss_mask": np.ones((1, 4, 8), np.float32),
             "segment_ids": np.ones((1, 4, 8), np.int32),
             "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (1, 4, 8))}

    def train(tx):
        p, s = replicas.stack(params, 1), replicas.init_opt_state(tx, replicas.stack(params, 1))
        step = replicas.make_train_step(graphdef, tx)
        for _ in range(12):  # the same batch: the gradient keeps its sign
            p, s, _ = step(p, s, batch)
        return p, s

    def scales(p):
        return np.concatenate([np.asarray(x, np.float32).ravel() for path, x in
                               jax.tree_util.tree_leaves_with_path(p)
                               if "norm" in jax.tree_util.keystr(path)])

    tx, _ = trainer.make_optimizer(c, total_steps=12)
    naive, _ = replicas.make_optimizer(learning_rate=2e-4, total_steps=12, warmup_steps=0,
                                       schedule="constant")
    assert np.all(scales(params) == 1.0)
    assert np.all(scales(train(naive)[0]) == 1.0)  # every single update rounds away
    p, s = train(tx)
    assert jax.tree.leaves(p)[0].dtype == jnp.bfloat16
    assert np.any(scales(p) != 1.0)
    master = scales(s.master)
    assert master.dtype == np.float32 and np.mean(np.abs(master - 1.0)) > 1e-3
    # The parameters are the master rounded to bfloat16: the scales whose master has
    # crossed half a bf16 spacing have moved.
    np.testing.assert_array_equal(scales(p), master.astype(jnp.bfloat16).astype(np.float32))
