"""Speed options of the decoder: attention implementation, remat policy, chunked loss.

Each must leave the numbers as they are (up to rounding) and do what it is for
(the compiled step's temporaries, the jaxpr's checkpoint policy, the cuDNN
call's masking arguments, checked on CPU through the XLA implementation).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from psm.models import chunked_loss, llama, speed
from psm.models.llama import Llama, LlamaConfig
from psm.training import replicas

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
            num_kv_heads=2, rope_theta=500.0)


def _segments():
    """Two rows: packed examples then padding, and one example then padding."""
    return jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0],
                      [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]], jnp.int32)


def _qkv(b=2, t=10, h=4, kv=2, hd=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, h, hd)), jax.random.normal(ks[1], (b, t, kv, hd)),
            jax.random.normal(ks[2], (b, t, kv, hd)))


def _batch(b, t, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return {"tokens": jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32),
            "loss_mask": jnp.asarray(rng.random((b, t)) < 0.7, jnp.float32),
            "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t), (b, t)).astype(jnp.int32)}


# ----------------------------------------------------------------- attention


def test_xla_attention_is_the_former_masked_call_exactly():
    q, k, v = _qkv()
    seg = _segments()
    slot = jnp.arange(seg.shape[1])
    mask = (seg[:, :, None] == seg[:, None, :]) & (slot[None, None, :] <= slot[None, :, None])
    before = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    np.testing.assert_array_equal(speed.self_attention(q, k, v, seg, "xla"), before)


def test_model_attention_xla_and_auto_give_identical_logits_on_cpu():
    cfg = LlamaConfig(**TINY, attention="xla")
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    auto_graphdef, _ = llama.abstract_model(cfg.replace(attention="auto"))
    tok = jax.random.randint(jax.random.key(1), (2, 10), 0, 97)
    seg = _segments()

    def fwd(g, s):
        return nnx.merge(g, s)(tok, segment_ids=seg)

    np.testing.assert_array_equal(jax.jit(fwd, static_argnums=0)(graphdef, state),
                                  jax.jit(fwd, static_argnums=0)(auto_graphdef, state))


def test_cudnn_mask_args_express_the_segment_rule():
    """is_causal=True plus the same-segment mask is psm's mask: run through XLA (the
    same keywords cuDNN gets), packed rows and padding give the xla path's output."""
    q, k, v = _qkv()
    seg = _segments()
    args = speed.cudnn_mask_args(seg)
    assert args["is_causal"] is True and args["mask"].shape == (2, 1, 10, 10)
    slot = jnp.arange(10)
    full = (seg[:, :, None] == seg[:, None, :]) & (slot[None, None, :] <= slot[None, :, None])
    np.testing.assert_array_equal(args["mask"][:, 0] & (slot[None, None, :] <= slot[:, None]),
                                  full)
    via_cudnn_args = jax.nn.dot_product_attention(q, k, v, implementation="xla", **args)
    np.testing.assert_allclose(via_cudnn_args, speed.self_attention(q, k, v, seg, "xla"),
                               rtol=1e-6, atol=1e-6)
    # No segment ids: one segment per row, causality only (no mask to read).
    assert speed.cudnn_mask_args(None) == {"is_causal": True}
    ones = jnp.ones_like(seg)
    np.testing.assert_allclose(
        jax.nn.dot_product_attention(q, k, v, implementation="xla", is_causal=True),
        speed.self_attention(q, k, v, ones, "xla"), rtol=1e-6, atol=1e-6)


ON_CPU = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU backend")


@ON_CPU
def test_auto_resolves_to_xla_on_cpu_and_logs_it_once(caplog):
    with caplog.at_level(logging.INFO, logger="psm.models.speed"):
        speed._LOGGED.clear()
        for _ in range(3):
            assert speed.resolve_attention("auto", jnp.bfloat16, 64, 128) == "xla"
    assert caplog.text.count("using xla attention (the backend is 'cpu'") == 1


def test_auto_resolves_to_cudnn_only_where_it_runs():
    assert speed.resolve_attention("auto", jnp.bfloat16, 64, 128, gpu=True) == "cudnn"
    assert speed.resolve_attention("auto", jnp.float32, 64, 128, gpu=True) == "xla"
    assert speed.resolve_attention("auto", jnp.bfloat16, 36, 128, gpu=True) == "xla"
    assert speed.resolve_attention("auto", jnp.bfloat16, 64, 127, gpu=True) == "xla"
    assert speed.resolve_attention("xla", jnp.bfloat16, 64, 128, gpu=True) == "xla"
    assert speed.resolve_attention("cudnn", jnp.bfloat16, 64, 128, gpu=True) == "cudnn"
    with pytest.raises(ValueError, match=r"config\.model\.attention='cudnn' cannot be used: "
                                         r"the compute dtype is float32"):
        speed.resolve_attention("cudnn", jnp.float32, 64, 128, gpu=True)


@ON_CPU
def test_cudnn_on_cpu_fails_at_the_model_naming_the_key():
    cfg = LlamaConfig(**TINY, attention="cudnn", dtype="bfloat16")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"config\.model\.attention='cudnn' cannot be used: "
                                         r"the backend is 'cpu'"):
        model(jnp.zeros((1, 8), jnp.int32))


def test_bad_attention_and_remat_names_are_refused_by_the_config():
    with pytest.raises(ValueError, match=r"LlamaConfig\.attention must be one of"):
        LlamaConfig(**TINY, attention="flash")
    with pytest.raises(ValueError, match=r"LlamaConfig\.remat must be one of"):
        LlamaConfig(**TINY, remat="some")
    # The older boolean form still reads (checkpoints, converters, old config.json).
    assert LlamaConfig(**TINY, remat=True).remat == "full"
    assert LlamaConfig(**TINY, remat=False) == LlamaConfig(**TINY)
    assert LlamaConfig.from_dict({**TINY, "remat": True}).remat == "full"


# ---------------------------------------------------------------------- remat


def _loss(graphdef, state, batch):
    return replicas.mean_loss(graphdef, state, batch)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_give_equal_gradients_and_carry_their_policy(scan):
    cfg = LlamaConfig(**TINY, scan_layers=scan)
    _, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    batch = _batch(2, 12, 97)
    grads, policies = {}, {}
    for name in speed.REMAT_POLICIES:
        graphdef, _ = llama.abstract_model(cfg.replace(remat=name))
        traced = jax.jit(jax.grad(functools.partial(_loss, graphdef))).trace(state, batch)
        policies[name] = _checkpoint_policies(traced.jaxpr.jaxpr)
        grads[name] = traced.lower().compile()(state, batch)
    for name in ("full", "dots_saveable"):
        # rtol 1e-6 of each leaf's scale: the embedding gradient sums several
        # rows' contributions, and an entry near 0 after cancellation differs
        # in its last bits when the sum is taken in another order.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-6, atol=1e-6 * float(np.abs(a).max())), grads["none"], grads[name])
    assert policies["none"] == []
    for name in ("full", "dots_saveable"):
        assert policies[name], name
        assert all(p == speed.REMAT_POLICIES[name] for p in policies[name]), policies[name]
    assert speed.REMAT_POLICIES["full"] != speed.REMAT_POLICIES["dots_saveable"]


def _checkpoint_policies(jaxpr) -> list:
    """The `policy` of every checkpoint (remat) equation in a jaxpr, nested ones too."""
    out = []
    for eqn in jaxpr.eqns:
        if "policy" in eqn.params and "remat" in eqn.primitive.name:
            out.append(eqn.params["policy"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out.extend(_checkpoint_policies(inner))
    return out


def _temp_bytes(graphdef, params, batch_shape, loss_fn):
    step = jax.jit(jax.grad(functools.partial(loss_fn, graphdef)))
    return step.lower(params, batch_shape).compile().memory_analysis().temp_size_in_bytes


def _abstract_batch(b, t):
    return {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "loss_mask" else jnp.int32)
            for k in replicas.BATCH_KEYS}


def test_full_remat_shrinks_the_compiled_step_temporaries():
    """Scanned layers: without remat the scan stacks every layer's activations for the
    backward pass (~31 MiB here), with 'full' only the layer inputs (~8 MiB). On CPU
    the unrolled layers' temporaries barely differ (XLA reuses buffers across the
    unrolled blocks), which is why the scanned path is measured; the unrolled path's
    remat is checked through its jaxpr above."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_layers=4,
                      num_heads=4, num_kv_heads=2, tie_embeddings=True, scan_layers=True)
    batch = _abstract_batch(4, 128)
    temp = {}
    for name in ("none", "full"):
        graphdef, params = llama.abstract_model(cfg.replace(remat=name))
        temp[name] = _temp_bytes(graphdef, params, batch, replicas.mean_loss)
    assert temp["full"] < 0.5 * temp["none"], temp


# -------------------------------------------------------------- chunked loss


@pytest.mark.parametrize("tied,t,chunk", [
    (True, 12, 4), (True, 13, 4), (False, 12, 3), (False, 13, 5), (True, 5, 8)])
def test_chunked_loss_and_gradients_equal_the_whole_sequence(tied, t, chunk):
    """Tied (embedding.attend) and untied (lm_head) projections; T a multiple of the
    chunk, not a multiple (the last chunk padded), and shorter than one chunk."""
    cfg = LlamaConfig(**{**TINY, "num_layers": 1}, tie_embeddings=tied)
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    batch = _batch(3, t, 97)

    @jax.jit
    def both(st):
        out = []
        for mean, per_sample in (replicas.decoder_losses(0), replicas.decoder_losses(chunk)):
            loss, grads = jax.value_and_grad(functools.partial(mean, graphdef))(st, batch)
            out.append((loss, grads, per_sample(graphdef, st, batch)))
        return out

    (l0, g0, p0), (l1, g1, p1) = both(state)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(p1, p0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), g0, g1)


def test_chunked_loss_under_the_vmapped_replica_step():
    """K = 2 replicas in one vmapped, jitted step: same losses and updated parameters."""
    cfg = LlamaConfig(**TINY, scan_layers=True)
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    # Plain SGD: the parameter change is the gradient itself (Adam would divide
    # rounding-level differences of near-zero gradients by their own size).
    tx = optax.sgd(1.0)
    params_k = replicas.stack(state, 2)
    batch = {k: jnp.stack([v, v[::-1]]) for k, v in _batch(2, 11, 97).items()}
    out = {}
    for chunk in (0, 4):
        step = replicas.make_train_step(graphdef, tx,
                                        loss_fn=replicas.decoder_losses(chunk)[0])
        p = jax.tree.map(jnp.copy, params_k)
        out[chunk] = step(p, replicas.init_opt_state(tx, p), batch)
    np.testing.assert_allclose(out[4][2]["loss"], out[0][2]["loss"], rtol=1e-5)
    np.testing.assert_allclose(out[4][2]["grad_norm"], out[0][2]["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 out[0][0], out[4][0])


def test_chunked_loss_never_holds_the_whole_logits():
    """V = 32000, D = 64, T = 256: the float32 logits of 2 rows are 62.5 MiB, and
    the whole-sequence step's temporaries hold them (and their gradient); chunks of
    32 positions hold 1/8 of them at a time."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=2, num_kv_heads=1, tie_embeddings=True)
    graphdef, params = llama.abstract_model(cfg)
    batch = _abstract_batch(2, 256)
    logits_bytes = 2 * 256 * 32000 * 4
    whole = _temp_bytes(graphdef, params, batch, replicas.decoder_losses(0)[0])
    chunked = _temp_bytes(graphdef, params, batch, replicas.decoder_losses(32)[0])
    assert whole > logits_bytes, (whole, logits_bytes)
    assert chunked < 0.5 * logits_bytes, (chunked, logits_bytes)


def test_chunk_size_below_one_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"config\.train\.loss_chunk must be >= 1"):
        chunked_loss.chunked_token_nll(lambda h: h, jnp.zeros((1, 4, 2)),
                                       jnp.zeros((1, 4), jnp.int32), 0)
