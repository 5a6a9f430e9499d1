"""The same steps on 1 device and on (replica, fsdp, tensor) meshes of 8 CPU devices,
with every parameter placed where psm.training.sharding.LOGICAL_RULES says."""

import functools
import re
import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_dict

from psm import merge
from psm.evaluation import lm
from psm.training import replicas, sharding
from psm.models.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_seq_len=8)
K, B, T = 4, 8, 8

# What the rules must give, written out by hand: leaf name -> spec of the stacked leaf.
EXPECTED = {
    "embed/embedding": P("replica", "tensor", "fsdp"),  # [V, D]: vocab, embed
    "attn/q_proj/kernel": P("replica", "fsdp", "tensor"),  # [D, H*hd]: embed, heads
    "attn/k_proj/kernel": P("replica", "fsdp", "tensor"),  # [D, KV*hd]: embed, kv_heads
    "attn/v_proj/kernel": P("replica", "fsdp", "tensor"),
    "attn/o_proj/kernel": P("replica", "tensor", "fsdp"),  # [H*hd, D]: heads, embed
    "mlp/gate_proj/kernel": P("replica", "fsdp", "tensor"),  # [D, F]: embed, mlp
    "mlp/up_proj/kernel": P("replica", "fsdp", "tensor"),
    "mlp/down_proj/kernel": P("replica", "tensor", "fsdp"),  # [F, D]: mlp, embed
    "attn_norm/scale": P("replica"),  # norms: replicated inside a replica
    "mlp_norm/scale": P("replica"),
    "final_norm/scale": P("replica"),
    "lm_head/kernel": P("replica", "fsdp", "tensor"),  # [D, V]: embed, vocab
}


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


def _leaves(tree):
    """'a/b/c' -> leaf, for a tree of arrays or shardings."""
    return {jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"): x
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _sharded_step(replica, fsdp, tensor, loss_chunk=0):
    """(mesh, stacked params, opt state, batch sharding, jitted K-replica train step) of
    CFG on a (replica, fsdp, tensor) mesh; `loss_chunk` as config.train.loss_chunk."""
    mesh = sharding.make_mesh(K, B, replica=replica, fsdp=fsdp, tensor=tensor)
    graphdef, base = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))
    tx, _ = replicas.make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
    params, opt, param_sh, opt_sh = replicas.place_state(base, K, tx, mesh)
    bt = sharding.batch_sharding(mesh)
    return mesh, params, opt, bt, replicas.make_train_step(
        graphdef, tx, param_sh, bt, opt_sh, loss_fn=replicas.decoder_losses(loss_chunk)[0])


@functools.lru_cache(maxsize=None)  # each mesh compiles once per session (nothing is donated later)
def _run(replica, fsdp, tensor, steps=3):
    mesh, params, opt, bt, step = _sharded_step(replica, fsdp, tensor)
    losses = []
    with jax.set_mesh(mesh):
        for batch in _batches(steps):
            params, opt, m = step(params, opt, jax.device_put(batch, bt))
            losses.append(np.asarray(m["loss"]))
    return mesh, params, opt, np.stack(losses)


def _one_device():
    return _run(1, 1, 1)


def _needs_8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices; tests/conftest.py sets them up")


@functools.lru_cache(maxsize=1)
def _eval_step():
    return replicas.make_eval_step(nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))[0])


def _eval(params, held):
    return np.asarray(_eval_step()(params, held))


@pytest.mark.parametrize("replica, fsdp, tensor", [(4, 2, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1)])
def test_mesh_matches_one_device_and_places_parameters_by_the_rules(replica, fsdp, tensor):
    _needs_8()
    _, params_1, _, losses_1 = _one_device()
    mesh, params, opt, losses = _run(replica, fsdp, tensor)
    assert dict(mesh.shape) == {"replica": replica, "fsdp": fsdp, "tensor": tensor}
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)

    # Every parameter, after 3 donated steps, is laid out as the rules say.
    sizes = dict(mesh.shape)
    leaves = _leaves(params)
    assert len(leaves) == 2 * 9 + 3
    for path, x in leaves.items():
        name = "/".join(path.split("/")[2:]) if path.startswith("layers/") else path
        want = EXPECTED[name]
        assert x.sharding.spec == want, path
        assert len(x.sharding.device_set) == 8, path
        shard = tuple(d // (sizes[a] if a else 1) for d, a in
                      zip(x.shape, tuple(want) + (None,) * (x.ndim - len(want))))
        assert x.sharding.shard_shape(x.shape) == shard, path
    # Adam's moments mirror their parameter; the step counts are split on K only.
    adam = opt[1][0]
    for moments in (adam.mu, adam.nu):
        for path, x in _leaves(moments).items():
            assert x.sharding.spec == leaves[path].sharding.spec, path
    for count in (adam.count, opt[1][-1].count):
        assert count.shape == (K,) and count.sharding.spec == P("replica")

    # The batch split changes the gradient's summation order, and Adam's
    # g / (sqrt(v) + eps) turns rounding in near-zero gradients into visible moves
    # of single parameters, so the final parameters are compared through what
    # they compute: per-sample losses on a held-out batch.
    held = jax.tree.map(lambda x: x[0], _batches(4)[3])
    with jax.set_mesh(mesh):
        sharded = _eval(params, held)
    np.testing.assert_allclose(sharded, _eval(params_1, held), rtol=1e-5)
    # ... and the replicas did train apart (the comparison is not vacuous).
    assert np.ptp(_eval(params_1, held).mean(axis=1)) > 1e-4


def test_merge_and_evaluation_run_on_the_sharded_state():
    """The merges keep each leaf split inside the replica group: no device ever
    holds a whole merged (or stacked) model."""
    _needs_8()
    mesh, params, _, _ = _run(2, 2, 2)
    with jax.set_mesh(mesh):
        merged = {"average": merge.average(params, stacked=True),
                  "select": merge.select(params, key=jax.random.key(0), stacked=True)}
    for name, tree in merged.items():
        for path, x in _leaves(tree).items():
            want = _leaves(params)[path].sharding.spec
            assert x.sharding.spec == P(*tuple(want)[1:]), (name, path)
            assert len(x.sharding.device_set) == 8, (name, path)
    embed = _leaves(merged["average"])["embed/embedding"]  # [V, D] over tensor x fsdp
    assert embed.sharding.shard_shape(embed.shape) == (CFG.vocab_size // 2, CFG.hidden_size // 2)
    # The same merge of the same replicas gathered onto one device (the sum over
    # K is split over `replica` above, so it may differ in the last bit).
    one = merge.average(jax.device_get(params), stacked=True)
    for path, x in _leaves(merged["average"]).items():
        np.testing.assert_allclose(np.asarray(x), np.asarray(_leaves(one)[path]),
                                   rtol=1e-6, atol=1e-9)
    # Evaluation of the merged model, also sharded.
    held = jax.tree.map(lambda x: x[0], _batches(2)[1])
    with jax.set_mesh(mesh):
        stacked_avg = jax.tree.map(lambda x: x[None], merged["average"])
        got = _eval(stacked_avg, held)
    np.testing.assert_allclose(got, _eval(jax.tree.map(lambda x: x[None], one), held), rtol=1e-5)
    # The K replicas and the merge scored together, as the trainer does: M = 5 models on
    # 2 replica groups are padded to 6 and split over `replica`, 3 models per group.
    models = [replicas.unstack(params, i) for i in range(K)] + [merged["average"]]
    with jax.set_mesh(mesh):
        stacked = lm.stack_models(models)
        got = _eval(stacked, held)
    for path, x in _leaves(stacked).items():
        assert x.shape[0] == 6 and x.sharding.spec[0] == "replica", path
        assert x.sharding.shard_shape(x.shape)[0] == 3, path
    host = [jax.device_get(t) for t in models]
    want = _eval(lm.stack_models(host), held)
    assert want.shape[0] == 5  # no mesh: stacked as they are
    np.testing.assert_allclose(got[:5], want, rtol=1e-5)
    np.testing.assert_allclose(got[5], want[4], rtol=1e-5)  # the repeat of the last model


def test_a_base_of_host_arrays_is_placed_split_like_one_replica():
    """What the checkpoint loaders return (host arrays) goes to the devices in parts:
    every split leaf's device shards are smaller than the leaf, the layout is one
    replica's (the stacked spec without its replica entry) and the values are the host's."""
    _needs_8()
    mesh = sharding.make_mesh(K, B, replica=2, fsdp=2, tensor=2)
    _, base = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))
    host = jax.tree.map(np.asarray, base)
    placed = _leaves(replicas.place_base(host, K, mesh))
    stacked = _leaves(sharding.state_shardings(
        jax.eval_shape(functools.partial(replicas.stack, k=K), host), mesh))
    wanted = _leaves(host)
    assert set(placed) == set(wanted) and len(placed) > 5
    split = 0
    for name, x in placed.items():
        assert x.sharding.spec == P(*tuple(stacked[name].spec)[1:]), name
        np.testing.assert_array_equal(np.asarray(x), wanted[name])
        if any(axis is not None for axis in x.sharding.spec):
            split += 1
            assert all(s.data.size < x.size for s in x.addressable_shards), name
    assert split >= 5  # embeddings, projections: the rules split the large leaves


def test_mesh_errors_name_the_config_key_and_sizes():
    with pytest.raises(ValueError, match=r"config\.mesh\.replica \(3\) must divide "
                                         r"config\.num_replicas \(4\)"):
        sharding.make_mesh(4, 8, replica=3, fsdp=1, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match=r"config\.mesh\.fsdp \(3\) must divide "
                                         r"config\.train\.batch_size \(8\)"):
        sharding.make_mesh(4, 8, replica=1, fsdp=3, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match=r"asks for 4 x 4 devices .* only 8 are available"):
        sharding.make_mesh(4, 8, replica=4, fsdp=2, tensor=2, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match=r"config\.mesh\.tensor must be a positive integer"):
        sharding.make_mesh(4, 8, tensor=0)
    with pytest.raises(ValueError, match=r"only one of config\.mesh\.fsdp and"):
        sharding.make_mesh(4, 8, fsdp=-1, tensor=-1)


def test_minus_one_fills_from_the_device_count():
    assert sharding.mesh_shape(64, 4, 16, replica=-1, fsdp=-1) == (4, 16, 1)
    assert sharding.mesh_shape(64, 4, 16, replica=-1, fsdp=-1, tensor=4) == (4, 4, 4)
    assert sharding.mesh_shape(8, 4, 8, replica=-1, tensor=-1) == (4, 1, 2)
    assert sharding.mesh_shape(8, 6, 8) == (6, 1, 1)
    assert sharding.mesh_shape(8, 4, 8, replica=1, fsdp=-1) == (1, 8, 1)


def test_mesh_data_is_a_deprecated_alias_of_fsdp():
    _needs_8()
    c = config_dict.ConfigDict({"num_replicas": 4, "mesh": {
        "replica": 2, "fsdp": 1, "tensor": 1, "data": config_dict.placeholder(int)}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without the alias
        assert dict(sharding.mesh_from_config(c, 8).shape)["fsdp"] == 1
    c.mesh.data = 4
    with pytest.warns(FutureWarning, match=r"config\.mesh\.data is deprecated"):
        mesh = sharding.mesh_from_config(c, 8)
    assert dict(mesh.shape) == {"replica": 2, "fsdp": 4, "tensor": 1}
    c.mesh.data = 3  # the error names the key the user set
    with pytest.warns(FutureWarning), pytest.raises(
            ValueError, match=r"config\.mesh\.data \(3\) must divide config\.train\.batch_size"):
        sharding.mesh_from_config(c, 8)
    c.mesh.data, c.mesh.fsdp = 2, 4
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"conflicts with"):
        sharding.mesh_from_config(c, 8)


def test_a_mesh_that_does_not_divide_a_parameter_is_refused_before_compiling():
    _needs_8()
    cfg = CFG.replace(vocab_size=42)  # 42 rows of the embedding, tensor = 4
    mesh = sharding.make_mesh(K, B, replica=2, fsdp=1, tensor=4)
    _, base = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    tx, _ = replicas.make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0)
    with pytest.raises(ValueError, match=r"config\.mesh\.tensor \(4\) does not divide dimension "
                                         r"1 \('vocab', size 42\) of embed/embedding"):
        replicas.place_state(base, K, tx, mesh)


def test_a_mesh_that_does_not_divide_the_vocabulary_is_refused_before_pre_training(
        tmp_path, monkeypatch):
    _needs_8()
    from psm.training import trainer
    from tiny_config import tiny_test_config
    # The tiny task's vocabulary has 69 tokens; tensor = 2 divides every other dimension.
    config = tiny_test_config(**{"mesh.replica": 2, "mesh.tensor": 2})

    def pretrain_base(*args, **kwargs):
        raise AssertionError("pre-training started before the mesh was checked")

    monkeypatch.setattr(trainer.base_model, "pretrain_base", pretrain_base)  # the name it calls
    with pytest.raises(ValueError, match=r"config\.mesh\.tensor \(2\) does not divide dimension "
                                         r"0 \('vocab', size 69\) of embed/embedding"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "base").exists()


def test_every_logical_name_has_a_rule():
    with pytest.raises(ValueError, match=r"'experts' has no rule"):
        sharding.logical_to_mesh(("embed", "experts"))
    # An axis is used once per array: the second 'embed' stays unsplit.
    assert sharding.logical_to_mesh(("embed", "embed")) == ("fsdp", None)


def test_bert_parameters_are_placed_by_the_same_rules():
    _needs_8()
    from psm.models.bert import Bert, BertConfig
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    state = nnx.state(Bert(cfg, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh(2, 2, replica=2, fsdp=2, tensor=2)
    shardings = _leaves(sharding.state_shardings(state, mesh, stacked=False))
    want = {
        "embed/word/embedding": P("tensor", "fsdp"),  # vocab, embed
        "embed/position/embedding": P(None, "fsdp"),  # positions (unsplit), embed
        "embed/token_type/embedding": P(None, "fsdp"),
        "embed/norm/scale": P(), "embed/norm/bias": P(),
        "layers/0/attn/query/kernel": P("fsdp", "tensor"), "layers/0/attn/query/bias": P("tensor"),
        "layers/0/attn/out/kernel": P("tensor", "fsdp"), "layers/0/attn/out/bias": P("fsdp"),
        "layers/0/ffn_in/kernel": P("fsdp", "tensor"), "layers/0/ffn_in/bias": P("tensor"),
        "layers/0/ffn_out/kernel": P("tensor", "fsdp"), "layers/0/attn_norm/scale": P(),
        "pooler/kernel": P("fsdp"), "pooler/bias": P(),  # embed, pooled (unsplit)
        "classifier/kernel": P("fsdp"), "classifier/bias": P(),
    }
    for path, spec in want.items():
        assert shardings[path].spec == spec, path
    placed = jax.device_put(state, sharding.state_shardings(state, mesh, stacked=False))
    x = _leaves(placed)["layers/0/ffn_in/kernel"]
    assert x.sharding.shard_shape(x.shape) == (16, 32)


def _lowered_step_text(replica, fsdp, tensor, loss_chunk=0):
    """StableHLO text of the K-replica train step of CFG under a mesh (lowered, not run)."""
    mesh, params, opt, bt, step = _sharded_step(replica, fsdp, tensor, loss_chunk)
    batch = {key: jax.ShapeDtypeStruct((K, B, T), np.float32 if key == "loss_mask" else
                                       np.int32, sharding=bt) for key in replicas.BATCH_KEYS}
    with jax.set_mesh(mesh):
        return step.lower(params, opt, batch).as_text()


def _constraints(text):
    """{(spec, shape)} of the sharding constraints in StableHLO (Shardy) text."""
    return set(re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])> : "
                          r"tensor<([\dx]+)x[a-z]", text))


def test_activations_are_constrained_by_the_rules_under_a_mesh():
    """The Llama activations carry the logical rules' shardings inside the vmapped
    step: batch rows on fsdp, heads / MLP / vocabulary features on tensor, the
    replica axis K left to propagation ({?})."""
    _needs_8()
    found = _constraints(_lowered_step_text(2, 2, 2))
    d, f, v = CFG.hidden_size, CFG.intermediate_size, CFG.vocab_size
    hd = d // CFG.num_heads
    split = '[{?}, {"fsdp"}, {}, {"tensor"}]'
    want = {
        ('[{?}, {"fsdp"}, {}, {}]', f"{K}x{B}x{T}x{d}"),  # residual stream: batch, length, embed
        (split, f"{K}x{B}x{T}x{CFG.num_heads * hd}"),  # q, attention output: heads
        (split, f"{K}x{B}x{T}x{CFG.num_kv_heads * hd}"),  # k, v: kv_heads
        (split, f"{K}x{B}x{T}x{f}"),  # MLP hidden: mlp
        (split, f"{K}x{B}x{T}x{v}"),  # logits: vocab
    }
    assert want <= found, sorted(found)


def test_chunked_loss_under_a_mesh_matches_one_device_and_splits_the_vocabulary():
    """config.train.loss_chunk under a (2, 2, 2) mesh: the first step's losses equal the
    one-device whole-sequence step's, and each chunk's logits `[K, B, C, V]` are
    constrained like the whole logits (rows on fsdp, vocabulary on tensor)."""
    _needs_8()
    chunk = 3  # T = 8 is not a multiple: the last chunk is padded
    mesh, params, opt, bt, step = _sharded_step(2, 2, 2, loss_chunk=chunk)
    with jax.set_mesh(mesh):
        _, _, m = step(params, opt, jax.device_put(_batches(1)[0], bt))
    np.testing.assert_allclose(np.asarray(m["loss"]), _one_device()[3][0], rtol=1e-5)
    found = _constraints(_lowered_step_text(2, 2, 2, loss_chunk=chunk))
    assert ('[{?}, {"fsdp"}, {}, {"tensor"}]', f"{K}x{B}x{chunk}x{CFG.vocab_size}") in found, \
        sorted(found)


def test_constrain_is_a_no_op_outside_a_mesh_and_leaves_odd_sizes_to_xla():
    from psm.models import logical
    x = jax.numpy.zeros((6, 8, 32))
    assert logical.constrain(x, "batch", "length", "mlp") is x  # no mesh: untouched
    _needs_8()
    mesh = sharding.make_mesh(2, 4, replica=2, fsdp=2, tensor=2)
    fn = jax.jit(lambda y: logical.constrain(y, "batch", "length", "mlp"))
    with jax.set_mesh(mesh):
        # 6 rows split over fsdp = 2, the MLP features over tensor = 2.
        assert '[{"fsdp"}, {}, {"tensor"}]' in fn.lower(x).as_text()
        # 5 rows: fsdp does not divide them; XLA decides ({?}) instead of an error.
        assert '[{?}, {}, {"tensor"}]' in fn.lower(jax.numpy.zeros((5, 8, 32))).as_text()
        with pytest.raises(ValueError, match=r"2 logical names .* shape \(6, 8, 32\)"):
            logical.constrain(x, "batch", "mlp")


def test_bert_activations_are_constrained_and_compute_the_same():
    _needs_8()
    from psm.models.bert import Bert, BertConfig
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    graphdef, state = nnx.split(Bert(cfg, rngs=nnx.Rngs(0)))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16)).astype(np.int32)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    want = np.asarray(fwd(state, tokens))
    mesh = sharding.make_mesh(2, 4, replica=2, fsdp=2, tensor=2)
    placed = jax.device_put(state, sharding.state_shardings(state, mesh, stacked=False))
    with jax.set_mesh(mesh):
        text = fwd.lower(placed, tokens).as_text()
        got = np.asarray(fwd(placed, tokens))
    found = _constraints(text)
    assert {('[{"fsdp"}, {}, {}]', "4x16x32"),  # hidden states: batch, length, embed
            ('[{"fsdp"}, {}, {"tensor"}]', "4x16x64")} <= found, sorted(found)  # FFN: mlp
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _merge_config(methods):
    return config_dict.ConfigDict({"merge": {
        "methods": methods, "seed": 0, "resample": 3, "storage_dtype": None,
        "ties_density": 0.2, "ties_trim": "tensor", "dare_drop_rate": 0.5,
        "dare_rescale": "inverse", "dare_combine": "linear"}})


def test_the_runs_merges_come_out_split_like_one_replica():
    """Every merge of a run (trainer.merge_models) on replicas and a base laid out by
    the rules gives leaves with the per-replica spec (the stacked spec without its
    leading 'replica'): split over the replica group's devices, never whole on one."""
    _needs_8()
    from psm.training import trainer
    mesh, params, _, _ = _run(2, 2, 2)
    base = jax.device_put(
        nnx.split(Llama(CFG, rngs=nnx.Rngs(0)))[1],
        jax.tree.map(sharding.unstacked, jax.tree.map(lambda x: x.sharding, params)))
    methods = ("average", "select", "select_resample", "ties", "dare")
    with jax.set_mesh(mesh):
        merged = trainer.merge_models(_merge_config(methods), params, base)
    assert sorted(merged) == sorted(["average", "select", "select_resample3", "ties", "dare"])
    stacked = _leaves(params)
    for name, tree in merged.items():
        for path, x in _leaves(tree).items():
            name_in_layer = "/".join(path.split("/")[2:]) if path.startswith("layers/") else path
            want = P(*tuple(EXPECTED[name_in_layer])[1:])
            assert x.sharding.spec == want == sharding.unstacked(stacked[path].sharding).spec, \
                (name, path)
            assert len(x.sharding.device_set) == 8, (name, path)
            if want != P():  # split leaves: no device holds the whole leaf
                assert x.sharding.shard_shape(x.shape) != x.shape, (name, path)
    # One replica, taken out of the stack, is laid out the same way.
    for path, x in _leaves(replicas.unstack(params, 1)).items():
        assert x.sharding.spec == sharding.unstacked(stacked[path].sharding).spec, path


def test_ties_thresholds_found_on_the_devices_equal_the_host_search(monkeypatch):
    """Several processes search the TIES thresholds on the devices
    (kernels.threshold_search_kernel); on one process the same merge, made to take
    that path, gives the host search's bits, ties at the threshold included."""
    _needs_8()
    mesh = sharding.make_mesh(K, B, replica=2, fsdp=2, tensor=2)
    rng = np.random.default_rng(0)
    # Magnitudes on a coarse grid: many entries tie at every threshold.
    theta = {"w": np.round(rng.normal(size=(K, 64, 48)) * 4).astype(np.float32) / 4,
             "v": rng.normal(size=(K, 300_000)).astype(np.float32)}
    base = {"w": np.zeros((64, 48), np.float32), "v": np.zeros(300_000, np.float32)}
    stacked_sh = {"w": NamedSharding(mesh, P("replica", "fsdp", "tensor")),
                  "v": NamedSharding(mesh, P("replica", "fsdp"))}
    theta = jax.device_put(theta, stacked_sh)
    base = jax.device_put(base, jax.tree.map(sharding.unstacked, stacked_sh))
    from psm.merge import leaf_inputs, ties_threshold
    host = ties_threshold.per_tensor(
        [leaf for leaf in leaf_inputs.prepare(theta, base, stacked=True).leaves],
        K, [0.3, 0.2, 0.5, 0.05])
    want = merge.ties(theta, base, [0.3, 0.2, 0.5, 0.05], stacked=True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    device = ties_threshold.per_tensor(
        [leaf for leaf in leaf_inputs.prepare(theta, base, stacked=True).leaves],
        K, [0.3, 0.2, 0.5, 0.05])
    got = merge.ties(theta, base, [0.3, 0.2, 0.5, 0.05], stacked=True)
    for name in ("w", "v"):
        np.testing.assert_array_equal(device[name][0], host[name][0], err_msg=name)
        np.testing.assert_array_equal(device[name][1], host[name][1], err_msg=name)
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
    # The tie cuts were exercised: some threshold splits its ties by position.
    assert any(c != ties_threshold.CUT_ALL for c in device["w"][1])
