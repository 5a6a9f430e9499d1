"""Reference rows (best_single, greedy_soup, ensemble, ties, dare), merging of
checkpoints as stored in bfloat16, and the merge-readiness report, all checked
on one run of the tiny config's `:test` variant."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psm import evaluate
from psm.training import base_model, replicas, report, trainer
from psm.data import tasks
from psm.evaluation import lm, runner
from tiny_config import tiny_test_config

METHODS = ("average", "select", "select_resample", "ties", "dare", "best_single",
           "greedy_soup", "ensemble")


def _config(**overrides):
    return tiny_test_config(**{"mesh.replica": 1, "merge.methods": METHODS,
                               "merge.storage_dtype": "bfloat16", **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, workdir, results, graphdef, replicas [K, ...], base), all float32."""
    workdir = str(tmp_path_factory.mktemp("refrows"))
    config = _config()
    results = trainer.train_and_evaluate(config, workdir)
    graphdef, params_k, _, _ = evaluate.load_models(config, workdir)
    task = tasks.get_task(config.task)
    _, base, _, _ = base_model.load_base(config, workdir, task.tokenizer)
    return config, workdir, results, graphdef, params_k, base


def _row_names(config):
    return [trainer.row_name(config, m) for m in config.merge.methods]


def _jsonl(workdir, name):
    with open(os.path.join(workdir, name)) as f:
        return [json.loads(line) for line in f]


def _stored_f32(tree):
    """Rounded to bfloat16 (the run's storage dtype) and back to float32."""
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), tree)


def _val_loss(config, graphdef, params_m):
    task = tasks.get_task(config.task)
    val, _ = tasks.encode_split(task, "validation", config.task.max_len)
    return runner.validation_loss(replicas.make_eval_step(graphdef), params_m, val,
                                  config.eval.batch_size)


def test_every_row_is_in_every_report(run):
    config, workdir, results, *_ = run
    k = config.num_replicas
    names = [f"replica {i}" for i in range(k)] + _row_names(config)
    assert list(results["models"]) == names
    with open(os.path.join(workdir, "results.json")) as f:
        assert list(json.load(f)["models"]) == names
    for row in _jsonl(workdir, "per_sample.jsonl"):
        assert list(row["loss"]["merged"]) == names[k:]
        assert all(np.isfinite(v) and v > 0 for v in row["loss"]["merged"].values())
    predictions = _jsonl(workdir, "test_predictions.jsonl")
    assert len(predictions) == config.task.num_test
    assert all(list(p["models"]) == names for p in predictions)
    for m in results["models"].values():
        assert np.isfinite(m["val_loss"]) and 0.0 <= m["test_accuracy"] <= 1.0
    table = report.format_table(results, k)
    best = results["models"]["best_single"]["replica"]
    kept = results["models"]["greedy_soup"]["kept"]
    for label in ("merge: ties", "merge: dare", f"reference: best_single (replica {best})",
                  f"reference: greedy_soup (replicas {kept})",
                  f"reference: ensemble of {k} (mean probabilities)"):
        assert label in table


def test_storage_dtype_rounds_inputs_and_shows_more_unchanged_parameters(run):
    config, _, results, _, params_k, base = run
    assert results["storage_dtype"] == "bfloat16"
    f32 = np.array(results["fraction_unchanged_from_base"])
    bf16 = np.array(results["fraction_unchanged_from_base_storage"])
    assert f32.shape == bf16.shape == (config.num_replicas,)
    assert np.all(bf16 > f32)
    stored_k, stored_base = _stored_f32(params_k), _stored_f32(base)
    for i in range(config.num_replicas):
        same = [np.asarray(a[i] == b).ravel() for a, b in
                zip(jax.tree.leaves(stored_k), jax.tree.leaves(stored_base))]
        assert bf16[i] == pytest.approx(np.mean(np.concatenate(same)), abs=1e-12)


def test_merged_models_are_scored_from_the_rounded_replicas(run):
    config, _, results, graphdef, params_k, base = run
    merged = trainer.merge_models(config, _stored_f32(params_k), _stored_f32(base),
                                  methods=("average", "select"))
    # Merged in bfloat16 (average: accumulated in float32, rounded back), scored in float32.
    losses = _val_loss(config, graphdef, lm.stack_models([_stored_f32(t)
                                                          for t in merged.values()]))
    for name, loss in zip(merged, losses):
        assert results["models"][name]["val_loss"] == pytest.approx(loss, rel=2e-5)


@pytest.mark.parametrize("method", ["select_resample", "ties"])
def test_evaluate_command_scores_a_merge_of_stored_replicas_as_the_trainer(run, tmp_path,
                                                                          method):
    config, workdir, results, *_ = run
    name = trainer.row_name(config, method)
    scored = evaluate.evaluate(config, workdir, merge=method, out=str(tmp_path))["models"]
    assert list(scored) == [name]
    assert scored[name]["val_loss"] == pytest.approx(results["models"][name]["val_loss"],
                                                     rel=1e-6)
    assert scored[name]["test_accuracy"] == results["models"][name]["test_accuracy"]


def test_select_resample_differs_from_select_only_where_a_candidate_equals_the_base(run):
    config, _, _, _, params_k, base = run
    k, n = config.num_replicas, config.merge.resample
    merged = trainer.merge_models(config, params_k, base,
                                  methods=("select", "select_resample"))
    cand = np.concatenate([np.asarray(x).astype(jnp.bfloat16).astype(np.float32).reshape(k, -1)
                           for x in jax.tree.leaves(params_k)], axis=1)  # [K, P]
    base_v = np.concatenate([np.asarray(x).astype(jnp.bfloat16).astype(np.float32).ravel()
                             for x in jax.tree.leaves(base)])
    sel = np.concatenate([np.asarray(x, np.float32).ravel()
                          for x in jax.tree.leaves(merged["select"])])
    res = np.concatenate([np.asarray(x, np.float32).ravel()
                          for x in jax.tree.leaves(merged[f"select_resample{n}"])])
    unchanged = cand == base_v[None]  # [K, P], equality in bfloat16
    some = unchanged.any(0)
    differ = sel != res
    assert differ.any() and not np.any(differ & ~some)
    # Where no candidate equals the base both draw the same candidate (with K a
    # power of two, select's and resampling's uniform cut the same intervals).
    assert k in (1, 2, 4, 8)
    np.testing.assert_array_equal(sel[~some], res[~some])
    # Every resampled value is a changed candidate, or the base.
    is_changed_candidate = ((cand == res[None]) & ~unchanged).any(0)
    assert np.all(is_changed_candidate | (res == base_v))
    # The base survives with probability q^(n+1), q = fraction of unchanged candidates.
    q = unchanged.mean(0)
    partial = some & ~unchanged.all(0)
    kept_base = (res == base_v) & ~is_changed_candidate
    expected = np.sum(q[partial] ** (n + 1))
    var = np.sum(q[partial] ** (n + 1) * (1 - q[partial] ** (n + 1)))
    assert abs(np.sum(kept_base[partial]) - expected) <= 5 * np.sqrt(var) + 1
    assert np.all(res[unchanged.all(0)] == base_v[unchanged.all(0)])


def test_best_single_and_greedy_soup_follow_their_rules(run):
    config, _, results, graphdef, params_k, base = run
    k = config.num_replicas
    models = results["models"]
    replica_loss = np.array([models[f"replica {i}"]["val_loss"] for i in range(k)])
    best = int(np.argmin(replica_loss))
    assert models["best_single"]["replica"] == best
    assert models["best_single"]["val_loss"] == pytest.approx(replica_loss[best], rel=1e-6)
    soup = models["greedy_soup"]
    np.testing.assert_allclose(soup["replica_val_loss"], replica_loss, rtol=1e-6)
    order = list(np.argsort(soup["replica_val_loss"], kind="stable"))
    assert soup["order"] == order
    # Recompute the greedy rule from the losses the run reports.
    kept, current = [order[0]], soup["replica_val_loss"][order[0]]
    assert [s["replica"] for s in soup["steps"]] == order[1:]
    for step in soup["steps"]:
        joins = step["val_loss"] < current
        assert step["kept"] == joins
        if joins:
            kept.append(step["replica"])
            current = step["val_loss"]
    assert soup["kept"] == kept
    assert soup["val_loss"] == current
    assert soup["val_loss"] == pytest.approx(models["greedy_soup"]["val_loss"], rel=1e-6)
    # The first candidate is the uniform average of the best two replicas.
    stored = _stored_f32(params_k)
    pair = _stored_f32(jax.tree.map(lambda x: x[np.array(order[:2])].mean(0), stored))
    first = _val_loss(config, graphdef, lm.stack_models([pair]))[0]
    assert soup["steps"][0]["val_loss"] == pytest.approx(first, rel=2e-5)


def _member_logits(graphdef, params_k, batch):
    """`[K, B, T, V]` float64 logits of each stored replica."""
    k = jax.tree.leaves(params_k)[0].shape[0]
    return np.stack([np.asarray(nnx.merge(graphdef, replicas.unstack(params_k, i))(
        jnp.asarray(batch["tokens"]), positions=jnp.asarray(batch["positions"]),
        segment_ids=jnp.asarray(batch["segment_ids"])), np.float64) for i in range(k)])


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_ensemble_per_sample_loss_is_minus_log_of_the_mean_probability(run):
    config, workdir, _, graphdef, params_k, _ = run
    task = tasks.get_task(config.task)
    train, _ = tasks.encode_split(task, "train", config.task.max_len)
    idx = np.array([0, 5, 17])
    batch = tasks.gather_batch(train, idx)
    probs = _softmax(_member_logits(graphdef, _stored_f32(params_k), batch))  # [K, B, T, V]
    target_p = np.take_along_axis(probs, batch["targets"][None, ..., None].astype(int),
                                  -1)[..., 0]
    nll = -np.log(target_p.mean(0))  # [B, T]
    mask = batch["loss_mask"]
    expected = (nll * mask).sum(1) / mask.sum(1)
    rows = _jsonl(workdir, "per_sample.jsonl")
    got = np.array([rows[i]["loss"]["merged"]["ensemble"] for i in idx])
    np.testing.assert_allclose(got, expected, rtol=2e-5)
    # Not the mean of the members' losses (that would be the ensemble of log-probs).
    member = [(-np.log(target_p[i]) * mask).sum(1) / mask.sum(1) for i in range(len(target_p))]
    assert not np.allclose(got, np.mean(member, axis=0), rtol=1e-7)


def test_ensemble_decodes_greedily_from_the_mean_probability(run):
    config, workdir, _, graphdef, params_k, _ = run
    task = tasks.get_task(config.task)
    tok = task.tokenizer
    stored = _stored_f32(params_k)
    n_new = config.task.max_new_tokens

    # Independent of the ensemble model: K members' full forward passes over a fixed
    # buffer (later slots are hidden by the causal mask), one compilation.
    @jax.jit
    def member_logits_at(buf, i):
        logits = jax.vmap(lambda s: nnx.merge(graphdef, s)(buf))(stored)  # [K, 1, L, V]
        return jax.lax.dynamic_index_in_dim(logits[:, 0], i, axis=1, keepdims=False)

    predictions = _jsonl(workdir, "test_predictions.jsonl")
    for example, row in list(zip(task.splits["test"], predictions))[:2]:
        ids = ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(task.prompt(example))
        buf = np.full((1, len(ids) + n_new), tok.pad_id, np.int32)
        buf[0, :len(ids)] = ids
        out = []
        for i in range(n_new):
            logits = np.asarray(member_logits_at(buf, len(ids) - 1 + i), np.float64)
            out.append(int(np.argmax(_softmax(logits).mean(0))))
            buf[0, len(ids) + i] = out[-1]
            if out[-1] == tok.eos_id:
                break
        assert row["models"]["ensemble"]["text"] == tok.decode(
            np.array(out + [tok.pad_id] * (n_new - len(out))))


def test_logit_ensemble_of_distinct_models_scores_and_decodes_the_mean_probability():
    # Replicas of a short run are nearly the same model; random members of a toy
    # Llama differ enough to tell the mean of probabilities from other mixtures.
    from psm.models import decode, llama

    cfg = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                            num_layers=2, num_heads=2, num_kv_heads=1, max_seq_len=32,
                            dtype="float32")
    states = []
    for seed in range(3):
        graphdef, state = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(seed)))
        states.append(state)
    params_k = lm.stack_models(states)
    ens_graphdef, ens_state = lm.logit_ensemble(graphdef, params_k)
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, 40, (2, 9)).astype(np.int32)
    batch = {"tokens": tokens, "positions": np.tile(np.arange(9), (2, 1)),
             "segment_ids": np.ones_like(tokens), "targets": np.roll(tokens, -1, 1),
             "loss_mask": np.array([[0] * 4 + [1] * 5, [0] * 2 + [1] * 7], np.float32)}
    got = np.asarray(replicas.make_eval_step(ens_graphdef)(lm.stack_models([ens_state]),
                                                           batch))[0]
    probs = _softmax(_member_logits(graphdef, params_k, batch))
    target_p = np.take_along_axis(probs, batch["targets"][None, ..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    expected = (-np.log(target_p.mean(0)) * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    geometric = (-np.log(target_p).mean(0) * mask).sum(1) / mask.sum(1)
    assert np.all(np.abs(expected - geometric) > 1e-3)  # the check can tell them apart
    # Greedy decoding with the KV cache = argmax of the mean probability, recomputed.
    out = np.asarray(decode.generate_tokens(
        ens_graphdef, ens_state, jnp.asarray(tokens), jnp.ones_like(tokens),
        jax.random.key(0), max_new_tokens=4, eos_id=0, pad_id=0))
    seq = tokens
    for _ in range(4):
        batch = {"tokens": seq, "positions": np.tile(np.arange(seq.shape[1]), (2, 1)),
                 "segment_ids": np.ones_like(seq)}
        mean_p = _softmax(_member_logits(graphdef, params_k, batch)[:, :, -1]).mean(0)
        seq = np.concatenate([seq, np.argmax(mean_p, -1)[:, None].astype(np.int32)], 1)
    np.testing.assert_array_equal(out, seq[:, 9:])


def test_barrier_report_covers_pairs_and_average_and_task_vectors(run):
    config, _, results, *_ = run
    k = config.num_replicas
    b = results["barrier"]
    models = results["models"]
    assert b["grid"] == list(config.eval.barrier_grid)
    assert [(p["a"], p["b"]) for p in b["pairs"]] == [(i, j) for i in range(k)
                                                      for j in range(i + 1, k)]
    for p in b["pairs"]:
        assert p["losses"][0] == pytest.approx(models[f"replica {p['a']}"]["val_loss"],
                                               rel=2e-5)
        assert p["losses"][-1] == pytest.approx(models[f"replica {p['b']}"]["val_loss"],
                                                rel=2e-5)
        assert p["barrier"] >= 0 and np.isfinite(p["barrier"])
    assert [r["replica"] for r in b["to_average"]] == list(range(k))
    for r in b["to_average"]:
        assert r["losses"][-1] == pytest.approx(models["average"]["val_loss"], rel=2e-5)
    tv = b["task_vectors"]
    dist, sign = np.array(tv["relative_distance"]), np.array(tv["sign_agreement"])
    assert dist.shape == sign.shape == (k, k) and len(tv["norm"]) == k
    np.testing.assert_allclose(dist, dist.T)
    assert np.all(np.diag(dist) == 0) and np.all(dist[~np.eye(k, dtype=bool)] > 0)
    assert np.all((sign >= 0) & (sign <= 1))
    text = report.format_barrier(b)
    assert "replica pairs" in text and "replica -> uniform average" in text


@pytest.mark.parametrize("key,value,match", [
    ("merge.storage_dtype", "int8", "config.merge.storage_dtype"),
    ("merge.storage_dtype", "bfloat61", "config.merge.storage_dtype"),
    ("merge.methods", ("average", "soup"), "config.merge.methods"),
    ("merge.methods", ("average", "average"), "more than once"),
    ("export.hf", ("ensemble",), "ensemble"),
    ("merge.ties_density", 1.5, "config.merge.ties_density"),
    ("merge.dare_drop_rate", 1.0, "config.merge.dare_drop_rate"),
    ("eval.barrier_grid", (0.0, 0.5), "config.eval.barrier_grid"),
])
def test_bad_reference_options_are_refused_before_anything_is_written(tmp_path, key, value,
                                                                     match):
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match=match):
        trainer.train_and_evaluate(_config(**{key: value}), str(workdir))
    assert not workdir.exists() or not any(workdir.iterdir())
