"""Llama decoder: configs, layouts (list vs scan), remat, GQA, masking, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psm.models import llama
from psm.models.llama import PRESETS, Llama, LlamaConfig

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
            num_kv_heads=2, rope_theta=500.0)


def _model(cfg, seed=0):
    return Llama(cfg, rngs=nnx.Rngs(seed))


@functools.partial(jax.jit, static_argnums=0)
def _fwd(graphdef, state, tok, pos, seg):
    return nnx.merge(graphdef, state)(tok, positions=pos, segment_ids=seg)


def run(model, tok, positions=None, segment_ids=None):
    """Jitted forward pass (eager NNX dispatch is much slower on CPU)."""
    graphdef, state = nnx.split(model)
    return _fwd(graphdef, state, tok, positions, segment_ids)


def _pure(model):
    return nnx.to_pure_dict(nnx.split(model)[1])


def _tokens(b=2, t=9, vocab=97, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    cfg = LlamaConfig(**PRESETS[name])
    hf = cfg.to_hf_config()
    assert hf["architectures"] == ["LlamaForCausalLM"]
    assert hf["num_key_value_heads"] == cfg.num_kv_heads
    assert hf["rope_parameters"]["rope_theta"] == cfg.rope_theta
    assert LlamaConfig.from_hf_config(hf) == cfg


def test_from_hf_config_reads_transformers5_rope_and_defaults():
    hf = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "rope_parameters": {"rope_theta": 123.0,
                                                        "rope_type": "default"}}
    cfg = LlamaConfig.from_hf_config(hf, dtype="bfloat16")
    assert cfg.rope_theta == 123.0 and cfg.num_kv_heads == 2 and cfg.dtype == "bfloat16"
    assert LlamaConfig.from_hf_config({**hf, "head_dim": 8}).resolved_head_dim == 8


@pytest.mark.parametrize("bad, match", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_from_hf_config_rejects_unsupported(bad, match):
    hf = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, **bad}
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf_config(hf)


def test_from_hf_config_missing_key_is_named():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        LlamaConfig.from_hf_config({"vocab_size": 10, "hidden_size": 8,
                                    "intermediate_size": 16, "num_attention_heads": 2})


def test_scan_layout_matches_list_layout_and_round_trips():
    cfg = LlamaConfig(**TINY)
    model = _model(cfg)
    pure = _pure(model)
    scfg = cfg.replace(scan_layers=True)
    state = llama.state_from_canonical(scfg, pure)
    q = nnx.to_pure_dict(state)["layers"]["attn"]["q_proj"]["kernel"]
    assert q.shape == (3, 32, 32)
    np.testing.assert_array_equal(q[1], pure["layers"][1]["attn"]["q_proj"]["kernel"])
    graphdef, _ = llama.abstract_model(scfg)
    tok = _tokens()
    np.testing.assert_allclose(run(nnx.merge(graphdef, state), tok), run(model, tok), atol=1e-5)
    back = llama.to_canonical(state, scfg)
    jax.tree.map(np.testing.assert_array_equal, back, pure)


def test_stack_unstack_with_replica_axis():
    pure = _pure(_model(LlamaConfig(**TINY)))
    reps = jax.tree.map(lambda x: jnp.stack([x, x + 1.0]), pure)  # [K=2, ...]
    stacked = llama.stack_layers(reps, axis=1)
    assert stacked["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 3, 32, 48)
    np.testing.assert_array_equal(stacked["layers"]["mlp"]["up_proj"]["kernel"][1, 2],
                                  pure["layers"][2]["mlp"]["up_proj"]["kernel"] + 1.0)
    jax.tree.map(np.testing.assert_array_equal, llama.unstack_layers(stacked, axis=1), reps)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_gives_same_gradients_and_rematerializes(scan):
    cfg = LlamaConfig(**TINY, scan_layers=scan)
    pure = _pure(_model(cfg.replace(scan_layers=False)))
    state = llama.state_from_canonical(cfg, pure)
    tok = _tokens()

    def grads(remat):
        graphdef, _ = llama.abstract_model(cfg.replace(remat=remat))

        def loss(st):
            logits = nnx.merge(graphdef, st)(tok)
            return -jax.nn.log_softmax(logits)[..., 0].mean()

        return jax.jit(jax.grad(loss))(state), str(jax.make_jaxpr(jax.grad(loss))(state))

    g0, jaxpr0 = grads(False)
    g1, jaxpr1 = grads(True)
    assert "remat" not in jaxpr0 and "remat" in jaxpr1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_gqa_equals_mha_with_repeated_kv_heads():
    cfg = LlamaConfig(**TINY)
    model = _model(cfg)
    mha_cfg = cfg.replace(num_kv_heads=cfg.num_heads)
    pure = _pure(model)
    hd, rep = cfg.resolved_head_dim, cfg.num_heads // cfg.num_kv_heads
    for layer in pure["layers"].values():
        for name in ("k_proj", "v_proj"):
            k = layer["attn"][name]["kernel"].reshape(cfg.hidden_size, cfg.num_kv_heads, hd)
            layer["attn"][name]["kernel"] = jnp.repeat(k, rep, axis=1).reshape(
                cfg.hidden_size, cfg.num_heads * hd)
    graphdef, _ = llama.abstract_model(mha_cfg)
    mha = nnx.merge(graphdef, llama.state_from_canonical(mha_cfg, pure))
    tok = _tokens()
    np.testing.assert_allclose(run(mha, tok), run(model, tok), atol=1e-5)


def test_packed_segments_equal_separate_rows():
    model = _model(LlamaConfig(**TINY))
    a, b = _tokens(1, 5, seed=2), _tokens(1, 4, seed=3)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 4])
    pos = jnp.array([list(range(5)) + list(range(4))])
    out = run(model, packed, pos, seg)
    np.testing.assert_allclose(out[:, :5], run(model, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], run(model, b), atol=1e-5)
    # Without the segments the second example would see the first.
    assert not np.allclose(run(model, packed, pos)[:, 5:], run(model, b), atol=1e-3)


def test_tied_embeddings_have_no_head_and_share_matrix():
    model = _model(LlamaConfig(**{**TINY, "num_layers": 1}, tie_embeddings=True))
    assert "lm_head" not in _pure(model)
    tok = _tokens(1, 3)
    graphdef, state = nnx.split(model)

    @jax.jit
    def by_hand(state):
        m = nnx.merge(graphdef, state)
        x = m.final_norm(m.layers[0](m.embed(tok), jnp.arange(3)[None],
                                     jnp.ones((1, 3), jnp.int32)))
        return x @ m.embed.embedding[...].T

    np.testing.assert_allclose(run(model, tok), by_hand(state), atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_bfloat16_params_and_compute(scan):
    cfg = LlamaConfig(**TINY, scan_layers=scan)
    pure = _pure(_model(cfg.replace(scan_layers=False)))
    ref = nnx.merge(llama.abstract_model(cfg)[0], llama.state_from_canonical(cfg, pure))
    bcfg = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    state = llama.state_from_canonical(bcfg, pure)
    assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.bfloat16)}
    model = nnx.merge(llama.abstract_model(bcfg)[0], state)
    tok = _tokens()
    out, want = run(model, tok), run(ref, tok)
    assert out.dtype == jnp.float32
    # bf16 keeps ~3 significant digits: close to float32, but not equal.
    err = float(jnp.abs(out - want).max())
    assert 0 < err < 0.05 * float(jnp.abs(want).max()) + 1e-3


def test_state_from_canonical_names_bad_leaves():
    cfg = LlamaConfig(**TINY)
    pure = _pure(_model(cfg))
    del pure["layers"][1]["mlp"]["up_proj"]
    with pytest.raises(ValueError, match="layers/1/mlp/up_proj/kernel"):
        llama.state_from_canonical(cfg, pure)
    pure = _pure(_model(cfg))
    pure["final_norm"]["scale"] = jnp.ones((31,))
    with pytest.raises(ValueError, match=r"final_norm/scale has shape \(31,\), expected \(32,\)"):
        llama.state_from_canonical(cfg, pure)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LlamaConfig(**{**TINY, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="unknown LlamaConfig fields"):
        LlamaConfig.from_dict({**TINY, "n_layer": 2})
    with pytest.raises(ValueError, match=r"LlamaConfig.dtype must be one of \['bfloat16'"):
        LlamaConfig(**TINY, dtype="int8")
    cfg = LlamaConfig(**TINY, scan_layers=True)
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
