"""The encoder path of the replica trainer: GLUE classification / regression with BERT.

`configs/glue_bert.py:<task>,smoke` (a random 1-layer BERT with MiniLM's vocabulary,
K = 2, real GLUE data) runs end to end through `psm.training.trainer.train_and_evaluate`; the
files it leaves are checked against direct recomputations and read back by the
multi-seed harness (`psm.experiment`).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import glue_bert
from psm import experiment, merge
from psm.training import checkpoint, encoder_task, replicas, throughput, trainer
from psm.data import paper_tasks
from psm.evaluation import glue
from psm.models import registry
from psm.models.safetensors_io import SafetensorsCheckpoint


def _need_minilm() -> str:
    try:
        return registry.minilm_path()
    except ValueError as e:
        pytest.skip(str(e))


def _config(arg: str, data_dir: str):
    c = glue_bert.get_config(arg)
    c.task.data_dir = data_dir
    c.mesh.replica = 1
    return c


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


_BATCH_INDICES = trainer.orders.batch_indices


@pytest.fixture(scope="module")
def cola_run(shared_data_dir, tmp_path_factory):
    """One finished `:cola,smoke` run: (config, workdir, results, steps it trained)."""
    _need_minilm()
    config = _config("cola,smoke", shared_data_dir)
    workdir = str(tmp_path_factory.mktemp("cola"))
    calls = []

    def counted(step, **kwargs):
        calls.append(step)
        return _BATCH_INDICES(step, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer.orders, "batch_indices", counted)
        results = trainer.train_and_evaluate(config, workdir)
    return config, workdir, results, calls


def _check_predictions_file(config, workdir, regression: bool):
    """test_predictions.jsonl rows, and results.json metrics = glue_metrics of those rows."""
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    rows = _jsonl(os.path.join(workdir, "test_predictions.jsonl"))
    names = list(results["models"])
    assert len(rows) == config.task.num_test
    assert [r["id"] for r in rows] == list(range(config.task.num_test))  # GLUE dev order
    labels = np.array([r["label"] for r in rows])
    gold = experiment.task_labels(config.to_dict(), [r["id"] for r in rows])
    np.testing.assert_array_equal(labels, gold)  # the file's labels are the source's
    for name in names:
        entries = [r["models"][name] for r in rows]
        preds = np.array([e["prediction"] for e in entries])
        assert [e["extracted"] for e in entries] == list(preds)
        if regression:
            errors = np.abs(preds - labels)
            np.testing.assert_allclose([e["abs_error"] for e in entries], errors)
            assert [e["correct"] for e in entries] == list(errors <= 0.5)
        else:
            assert all(isinstance(e["prediction"], int) for e in entries)
            assert [e["correct"] for e in entries] == list(preds == labels)
        row = results["models"][name]
        assert row["test_metrics"] == pytest.approx(
            glue.glue_metrics(config.task.name, preds, labels), nan_ok=True)
        assert row["test_accuracy"] == pytest.approx(np.mean([e["correct"] for e in entries]))
    return rows


def test_cola_smoke_writes_every_report_file(cola_run):
    config, workdir, results, calls = cola_run
    steps = results["steps"]
    assert calls == list(range(steps)) and results["resumed_from_step"] == 0
    for name in ("config.json", "metrics.jsonl", "per_sample.jsonl", "test_predictions.jsonl",
                 "results.json", "plots/loss_vs_position.png"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))
    k = config.num_replicas
    expected = [f"replica {i}" for i in range(k)] + [trainer.row_name(config, m)
                                                     for m in config.merge.methods]
    assert list(results["models"]) == expected
    assert results["models"]["ensemble"]["members"] == k
    for row in results["models"].values():
        assert np.isfinite(row["val_loss"]) and set(row["test_metrics"]) == {"mcc"}
    assert results["barrier"] is not None
    # Training moved the parameters, and the replicas' data orders differ.
    logged = [r for r in _jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    assert logged[-1]["train/loss"][0] < logged[0]["train/loss"][0]
    assert any("val/loss" in r for r in _jsonl(os.path.join(workdir, "metrics.jsonl")))
    assert results["data"]["train"]["examples"] == config.task.num_train
    _check_predictions_file(config, workdir, regression=False)


def test_cola_log_rows_carry_the_encoder_speed(cola_run):
    """The BERT path's log rows carry step time and tokens/s (log_every = 1: the first row's
    window holds only the compiling step, so it has none); results.json has the means,
    with the encoder's FLOP count (psm.training.throughput.bert_flops_per_token)."""
    config, workdir, results, _ = cola_run
    logged = [r for r in _jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert config.train.log_every == 1 and "perf/tokens_per_s" not in logged[0]
    for row in logged[1:]:
        assert row["perf/step_time_s"] > 0
        assert row["perf/tokens_per_s"] > row["perf/loss_tokens_per_s"] > 0  # padding
    speed = results["speed"]
    assert speed["timed_steps"] == results["steps"] - 1
    assert speed["tokens_per_s"] > speed["loss_tokens_per_s"] > 0
    _, _, _, cfg = encoder_task.load_base(config)
    assert speed["flops_per_token"] == throughput.bert_flops_per_token(cfg, config.task.max_len)


def test_cola_files_are_read_by_the_multi_seed_harness(cola_run):
    config, workdir, results, _ = cola_run
    run = experiment.load_seed(workdir)
    assert run.names == list(results["models"])
    [(preds, labels)] = experiment.metric_inputs([run], "mcc")
    for m, name in enumerate(run.names):
        assert glue.matthews_corrcoef(preds[m], labels) == pytest.approx(
            results["models"][name]["test_metrics"]["mcc"])
    [(correct, none)] = experiment.metric_inputs([run], "accuracy")
    assert none is None
    np.testing.assert_allclose(correct.mean(axis=1),
                               [results["models"][n]["test_accuracy"] for n in run.names])


def test_per_sample_records_equal_a_direct_recomputation(cola_run):
    """Final losses in per_sample.jsonl = cross-entropy recomputed by hand from the last
    checkpoint (replicas) and from its uniform average, one example at a time."""
    config, workdir, results, _ = cola_run
    graphdef, base, tokenizer, _ = encoder_task.load_base(config)
    params_k = replicas.stack(base, config.num_replicas)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), interval=1, keep=1)
    params_k = ckpt.restore(results["steps"], {"params": params_k,
                                               "opt_state": replicas.init_opt_state(
                                                   trainer.make_optimizer(config, 1)[0],
                                                   params_k)})["params"]
    ckpt.close()
    average = merge.average(params_k, stacked=True)
    task = paper_tasks.paper_task(config.task, tokenizer)
    records = {r["id"]: r for r in _jsonl(os.path.join(workdir, "per_sample.jsonl"))}
    train = task.splits["train"]
    assert sorted(records) == sorted(e["id"] for e in train)

    def loss(params, example):
        ids, types = tokenizer.encode_pair(example["sentence"])
        logits = nnx.merge(graphdef, params)(jnp.asarray([ids]), jnp.asarray([types]),
                                             jnp.ones((1, len(ids)), jnp.int32))[0]
        return float(-jax.nn.log_softmax(logits)[int(example["label"])])

    for example in train[:3]:
        rec = records[example["id"]]["loss"]
        for i in range(config.num_replicas):
            assert rec["replicas"][i] == pytest.approx(
                loss(replicas.unstack(params_k, i), example), rel=1e-4, abs=1e-6)
        assert rec["merged"]["average"] == pytest.approx(loss(average, example), rel=1e-4,
                                                         abs=1e-6)


def test_resume_after_a_finished_run_retrains_nothing(cola_run, monkeypatch):
    config, workdir, first, _ = cola_run
    calls = []
    monkeypatch.setattr(trainer.orders, "batch_indices",
                        lambda step, **kw: calls.append(step) or _BATCH_INDICES(step, **kw))
    again = trainer.train_and_evaluate(config, workdir)
    assert calls == [] and again["resumed_from_step"] == first["steps"]
    for name, row in first["models"].items():
        assert again["models"][name]["val_loss"] == row["val_loss"]
        assert again["models"][name]["test_metrics"] == row["test_metrics"]


def test_stsb_smoke_regression_end_to_end(shared_data_dir, tmp_path):
    _need_minilm()
    config = _config("stsb,smoke", shared_data_dir)
    config.eval.barrier = False  # exercised by the CoLA run
    results = trainer.train_and_evaluate(config, str(tmp_path))
    for name in ("per_sample.jsonl", "test_predictions.jsonl", "results.json",
                 "plots/loss_vs_position.png"):
        assert os.path.isfile(tmp_path / name), name
    rows = _check_predictions_file(config, str(tmp_path), regression=True)
    assert all(isinstance(r["label"], float) for r in rows)
    for row in results["models"].values():
        assert set(row["test_metrics"]) == {"pearson", "spearman"}
    run = experiment.load_seed(str(tmp_path))
    [(preds, labels)] = experiment.metric_inputs([run], "pearson")
    for m, name in enumerate(run.names):
        assert glue.pearson(preds[m], labels) == pytest.approx(
            results["models"][name]["test_metrics"]["pearson"], nan_ok=True)


# ------------------------------------------------------------- step and base model

PAIRS = [{"sentence1": "A man is playing a guitar.", "sentence2": "A man plays music.",
          "label": 1}, {"sentence1": "The cat sleeps.", "sentence2": "Stocks fell sharply "
          "on Monday after the report.", "label": 0},
         {"sentence1": "Two dogs run.", "sentence2": "Dogs are running.", "label": 1},
         {"sentence1": "It rains.", "sentence2": "The sun is out.", "label": 0},
         {"sentence1": "She reads a book.", "sentence2": "A woman is reading.", "label": 1}]


@functools.lru_cache(maxsize=None)
def _tiny(task_name: str):
    """`(config, graphdef, base, tokenizer)` of the task's smoke model (random tiny BERT)."""
    config = glue_bert.get_config(f"{task_name},smoke")
    graphdef, base, tokenizer, _ = encoder_task.load_base(config)
    return config, graphdef, base, tokenizer


def _distinct_replicas(base, k: int, scale: float = 0.01):
    rng = np.random.default_rng(1)  # base + a different noise for each replica
    return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape, np.float32),
                        replicas.stack(base, k))


@pytest.mark.parametrize("task_name", ["mrpc", "stsb"])
def test_vmapped_replica_step_equals_separate_single_model_steps(task_name):
    """K replicas (made distinct) on K different batches, one padding row among them: the
    vmapped step's losses and updated parameters equal K single-replica steps."""
    _need_minilm()
    config, graphdef, base, tokenizer = _tiny(task_name)
    records = [dict(r, label=float(r["label"]) * (2.5 if task_name == "stsb" else 1))
               for r in PAIRS]
    arrays, stats = encoder_task.encode_split(records, tokenizer, task_name, max_len=15)
    assert stats["truncated"] == 1  # the long second pair, cut to 15 tokens
    assert arrays["tokens"][1, 14] == tokenizer.eos_id and arrays["attention"][1].all()
    k = 3
    params_k = _distinct_replicas(base, k)
    tx, _ = trainer.make_optimizer(config, 10)
    opt_k = replicas.init_opt_state(tx, params_k)
    idx = np.array([[0, 1], [2, 4], [3, -1]])  # padding gathers row 0, another label
    batch = encoder_task.gather_batch(arrays, idx)
    single = jax.jit(replicas.make_replica_step(graphdef, tx, encoder_task.mean_loss))
    expected = [single(replicas.unstack(params_k, i), replicas.unstack(opt_k, i),
                       jax.tree.map(lambda x: x[i], batch)) for i in range(k)]
    # The padding row carries no loss: replica 2's loss is its one real row's.
    own = encoder_task.per_sample_loss(graphdef, replicas.unstack(params_k, 2),
                                       jax.tree.map(lambda x: x[2], batch))[0]
    new_k, _, metrics = encoder_task.make_train_step(graphdef, tx)(params_k, opt_k, batch)
    for i in range(k):
        assert float(metrics["loss"][i]) == pytest.approx(float(expected[i][2]["loss"]),
                                                          rel=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7),
                     new_k, expected[i][0])
    assert float(metrics["loss"][2]) == pytest.approx(float(own), rel=1e-5)


def test_batch_length_is_the_longest_real_example_rounded_up():
    attention = np.zeros((4, 40), np.int32)
    for row, n in enumerate([3, 17, 33, 40]):
        attention[row, :n] = 1
    arrays = {"tokens": attention, "attention": attention}
    assert encoder_task.batch_length(arrays, np.array([[0, 1], [0, -1]]), 16) == 32
    assert encoder_task.batch_length(arrays, np.array([0, -1, -1]), 16) == 16
    assert encoder_task.batch_length(arrays, np.array([2, 0]), 16) == 40  # capped at T
    assert encoder_task.batch_length(arrays, np.array([0, 1]), 0) == 40  # 0: uncut
    assert encoder_task.batch_length(arrays, np.array([-1, -1]), 16) == 40  # nothing real


@pytest.mark.parametrize("task_name", ["mrpc", "stsb"])
def test_cut_batches_compute_what_uncut_batches_compute(task_name):
    """config.task.pad_to_multiple: the step on batches cut to their longest example
    gives the uncut step's losses and updates; evaluation, which then visits examples
    shortest first, returns every example's loss and prediction in example order."""
    _need_minilm()
    config, graphdef, base, tokenizer = _tiny(task_name)
    records = [dict(r, label=float(r["label"]) * (2.5 if task_name == "stsb" else 1))
               for r in PAIRS]
    arrays, _ = encoder_task.encode_split(records, tokenizer, task_name, max_len=40)
    lengths = arrays["attention"].sum(axis=1)
    assert lengths.max() <= 24 and len(set(lengths)) > 2  # so the cut and the sort bite
    k = 3
    params_k = _distinct_replicas(base, k)
    tx, _ = trainer.make_optimizer(config, 10)
    opt_k = replicas.init_opt_state(tx, params_k)
    idx = np.array([[0, 2], [3, 4], [2, -1]])
    length = encoder_task.batch_length(arrays, idx, 8)
    assert length == -(-lengths[[0, 2, 3, 4]].max() // 8) * 8 < 40
    step = encoder_task.make_train_step(graphdef, tx)
    copy = functools.partial(jax.tree.map, jnp.copy)  # the step donates its inputs
    cut = step(copy(params_k), copy(opt_k), encoder_task.gather_batch(arrays, idx, length))
    full = step(copy(params_k), copy(opt_k), encoder_task.gather_batch(arrays, idx))
    np.testing.assert_allclose(cut[2]["loss"], full[2]["loss"], rtol=1e-5)
    np.testing.assert_allclose(cut[2]["grad_norm"], full[2]["grad_norm"], rtol=1e-5)
    # The gradients themselves (Adam's first update, ~lr * sign(g), would magnify the
    # rounding of near-zero components, so the updated parameters are no measure).
    grad = jax.jit(jax.grad(functools.partial(encoder_task.mean_loss, graphdef)))
    for i in range(k):
        one = replicas.unstack(params_k, i)
        g_cut = grad(one, encoder_task.gather_batch(arrays, idx[i], length))
        g_full = grad(one, encoder_task.gather_batch(arrays, idx[i]))
        # Some leaves' exact gradient is 0 (the attention key bias: softmax ignores a
        # shift), so both sides hold rounding noise there: absolute tolerance relative
        # to the largest gradient component.
        scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_full))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                             atol=1e-6 * scale), g_cut, g_full)

    eval_step = encoder_task.make_eval_step(graphdef)
    predict = encoder_task.make_predict_step(graphdef)
    by_cut = {m: (encoder_task.per_sample_losses(eval_step, params_k, arrays, 2,
                                                 pad_to_multiple=m),
                  encoder_task.predictions(predict, params_k, arrays, 2, pad_to_multiple=m))
              for m in (0, 8)}
    np.testing.assert_allclose(by_cut[8][0], by_cut[0][0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(by_cut[8][1], by_cut[0][1], rtol=1e-5, atol=1e-6)
    one = [float(encoder_task.per_sample_loss(
        graphdef, replicas.unstack(params_k, 1),
        encoder_task.gather_batch(arrays, np.array([i])))[0]) for i in range(len(PAIRS))]
    np.testing.assert_allclose(by_cut[8][0][1], one, rtol=1e-5, atol=1e-7)  # example order


@pytest.mark.parametrize("task_name", ["mrpc", "stsb"])
def test_ensemble_averages_probabilities_or_predictions(task_name):
    """The ensemble row: the mean of the K members' class probabilities (its loss is
    -log of the mean probability, its prediction that mean's argmax); STS-B: the mean value."""
    _need_minilm()
    _, graphdef, base, tokenizer = _tiny(task_name)
    arrays, _ = encoder_task.encode_split(PAIRS, tokenizer, task_name, max_len=16)
    batch = encoder_task.gather_batch(arrays, np.arange(len(PAIRS)))
    params_k = _distinct_replicas(base, 3, scale=0.5)  # members far apart
    outs = np.stack([np.asarray(nnx.merge(graphdef, replicas.unstack(params_k, i))(
        batch["tokens"], batch["type_ids"], batch["attention"])) for i in range(3)])
    ens_graphdef, ens_state = encoder_task.ensemble(graphdef, params_k)
    stacked = jax.tree.map(lambda x: x[None], ens_state)
    loss = encoder_task.make_eval_step(ens_graphdef)(stacked, batch)[0]
    pred = encoder_task.make_predict_step(ens_graphdef)(stacked, batch)[0]
    assert np.ptp(outs, axis=0).max() > 0.1  # the members disagree
    if task_name == "stsb":
        np.testing.assert_allclose(pred, outs[:, :, 0].mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(loss, (outs[:, :, 0].mean(axis=0) - batch["label"]) ** 2,
                                   rtol=1e-4, atol=1e-5)
        return
    probs = np.exp(outs - outs.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).mean(axis=0)  # [B, C]
    labels = batch["label"].astype(int)
    np.testing.assert_allclose(loss, -np.log(probs[np.arange(len(PAIRS)), labels]), rtol=1e-5)
    np.testing.assert_array_equal(pred, probs.argmax(-1))


def test_pretrained_base_is_minilm_with_a_seeded_head(shared_data_dir):
    path = _need_minilm()
    config = _config("mrpc", shared_data_dir)
    graphdef, base, tokenizer, cfg = encoder_task.load_base(config)
    pure = nnx.to_pure_dict(base)
    assert cfg.num_labels == 2 and pure["classifier"]["kernel"].shape == (384, 2)
    n = sum(x.size for x in jax.tree.leaves(base))
    assert n == 22_713_216 + 384 * 2 + 2  # MiniLM (pooler included) + the head
    word = SafetensorsCheckpoint(path).get("embeddings.word_embeddings.weight")
    np.testing.assert_array_equal(pure["embed"]["word"]["embedding"], word)
    again = nnx.to_pure_dict(encoder_task.load_base(config)[1])["classifier"]["kernel"]
    np.testing.assert_array_equal(again, pure["classifier"]["kernel"])  # config.seed
    config.seed = 1
    other = nnx.to_pure_dict(encoder_task.load_base(config)[1])["classifier"]["kernel"]
    assert not np.array_equal(other, pure["classifier"]["kernel"])
    ids, types = tokenizer.encode_pair("a b", "c")
    assert ids[0] == tokenizer.bos_id and types == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("key,value,message", [
    ("task.head", "tagging", "config.task.head"),
    ("task.head", "classification", "config.task.head='classification' does not fit"),
    ("task.name", "gsm8k", "needs a GLUE task"),
    ("model.kind", "smollm2", "config.model.kind"),
    ("model.init", "pretrain", "config.model.init"),
    ("model.num_heads", 3, "config.model.hidden_size"),
    ("export.hf", ("average",), "config.export.hf"),
    ("model.scan_layers", True, "config.model.scan_layers"),
    ("model.remat", "full", "config.model.remat is a Llama option"),
    ("model.attention", "cudnn", "config.model.attention='cudnn': the BERT encoder"),
    ("train.loss_chunk", 64, "config.train.loss_chunk is a decoder option"),
    ("task.max_len", 1024, "config.task.max_len"),
    ("task.pad_to_multiple", -8, "config.task.pad_to_multiple must be an int >= 0"),
    ("task.head", "lm", "config.model.kind='minilm' is a BERT encoder"),
])
def test_bad_encoder_config_values_are_named_before_any_work(tmp_path, key, value, message):
    config = glue_bert.get_config("stsb,smoke")
    section, field = key.split(".")
    config[section][field] = value
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trainer.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_config_variants():
    for name in glue_bert.TASKS:
        c = glue_bert.get_config(name)
        assert c.task.head == ("regression" if name == "stsb" else "classification")
        assert c.task.max_len == (128 if name in ("rte", "mrpc") else 64)
        assert (c.num_replicas, c.train.epochs, c.train.batch_size) == (4, 3, 32)
        assert 2e-5 <= c.optim.learning_rate <= 5e-5 and c.optim.warmup_steps > 0
        assert {"greedy_soup", "ensemble"} <= set(c.merge.methods)
    assert glue_bert.get_config("cola").task.num_train == 2000
    with pytest.raises(ValueError, match="unknown variant"):
        glue_bert.get_config("bogus")
