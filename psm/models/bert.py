"""BERT encoder in Flax NNX, with an optional pooler and classification/regression head.

Covers BERT-base-style checkpoints and sentence encoders such as
all-MiniLM-L6-v2 (post-norm blocks, learned absolute positions, token-type
embeddings, GELU MLP).

Parameter tree (kernels `[in, out]`, the transpose of HF's `[out, in]`):

  embed/{word,position,token_type}/embedding   [V, D] [P, D] [2, D]
  embed/norm/{scale,bias}                      [D]
  layers/<i>/attn/{query,key,value,out}/{kernel,bias}   [D, D], [D]
  layers/<i>/attn_norm/{scale,bias}            [D]
  layers/<i>/ffn_in/{kernel,bias}              [D, F], [F]
  layers/<i>/ffn_out/{kernel,bias}             [F, D], [D]
  layers/<i>/ffn_norm/{scale,bias}             [D]
  pooler/{kernel,bias}                         [D, D], [D]   (when add_pooler)
  classifier/{kernel,bias}                     [D, C], [C]   (when num_labels > 0)

Every parameter names its axes in Flax sharding metadata (`embed` D, `heads`
the D = H*hd attention features, `mlp` F, `vocab` V, `norm`, and the
unsharded `positions`, `types`, `pooled`, `classes`); `psm.training.sharding` maps
them to mesh axes. The names change neither the computation nor the
checkpoint format. Under a mesh the hidden states `[B, T, D]`, the attention
features and the FFN hidden `[B, T, F]` are constrained by the same rules
(`psm.models.logical.constrain`); outside a mesh that is a no-op.

Dropout is active only when a `dropout_key` is passed, which keeps the
forward pass a pure function of (params, inputs, key).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from psm.models._fields import DTYPES, axes, check_dtype_names, from_fields
from psm.models.logical import constrain

_ACTS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
         "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
         "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
         "relu": jax.nn.relu}
PROBLEM_TYPES = ("single_label_classification", "regression")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture, head and numerics of a BERT encoder.

    `num_labels == 0` means no head (plain encoder); `problem_type`
    "regression" expects `num_labels == 1` (GLUE STS-B).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    add_pooler: bool = True
    num_labels: int = 0
    problem_type: str = "single_label_classification"
    pad_token_id: int = 0
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"BertConfig.hidden_size ({self.hidden_size}) is not divisible by "
                             f"num_heads ({self.num_heads})")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported; "
                             f"supported: {sorted(_ACTS)}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"BertConfig.problem_type must be one of {PROBLEM_TYPES}, "
                             f"got {self.problem_type!r}")
        if self.problem_type == "regression" and self.num_labels != 1:
            raise ValueError("BertConfig: a regression head needs num_labels == 1, "
                             f"got {self.num_labels}")
        if self.num_labels and not self.add_pooler:
            raise ValueError("BertConfig: a classification head reads the pooler output; "
                             "set add_pooler=True")
        check_dtype_names(self)

    def replace(self, **changes) -> "BertConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
        return from_fields(cls, d)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "BertConfig":
        """From a HF BERT `config.json` dict; the head size comes from `num_labels`
        / `id2label` for `BertForSequenceClassification`, else 0."""
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config.json position_embedding_type "
                             f"{hf['position_embedding_type']!r} is not supported (absolute)")
        archs = hf.get("architectures") or []
        num_labels = 0
        if "BertForSequenceClassification" in archs:
            num_labels = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)
        problem = hf.get("problem_type") or ("regression" if num_labels == 1
                                             else "single_label_classification")
        if problem == "multi_label_classification":
            raise ValueError("config.json problem_type 'multi_label_classification' is not "
                             f"supported; supported: {PROBLEM_TYPES}")
        fields = dict(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
            num_labels=num_labels, problem_type=problem,
            pad_token_id=int(hf.get("pad_token_id") or 0))
        return cls(**{**fields, **overrides})

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]


def _dense(d_in, d_out, cfg: BertConfig, rngs, names: tuple[str, str] = ("embed", "classes")):
    """`[d_in, d_out]` kernel named `names`, `[d_out]` bias named `names[1]`."""
    return nnx.Linear(d_in, d_out, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
                      kernel_metadata=axes(*names), bias_metadata=axes(names[1]))


def _norm(cfg: BertConfig, rngs):
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=cfg.jnp_param_dtype, rngs=rngs,
                         scale_metadata=axes("norm"), bias_metadata=axes("norm"))


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, embedding_init=init,
                  rngs=rngs)
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size,
                              embedding_metadata=axes("vocab", "embed"), **kw)
        self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                  embedding_metadata=axes("positions", "embed"), **kw)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size,
                                    embedding_metadata=axes("types", "embed"), **kw)
        self.norm = _norm(cfg, rngs)

    def __call__(self, tokens, type_ids):  # [B, T] -> [B, T, D] float32
        pos = jnp.arange(tokens.shape[1])[None, :]
        x = self.word(tokens) + self.position(pos) + self.token_type(type_ids)
        return constrain(self.norm(x), "batch", "length", "embed")


class SelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.query, self.key, self.value = (_dense(d, d, cfg, rngs, ("embed", "heads"))
                                            for _ in range(3))
        self.out = _dense(d, d, cfg, rngs, ("heads", "embed"))

    def __call__(self, x, mask, key):
        """x: `[B, T, D]`; mask: `[B, T]` bool (True = real token)."""
        cfg = self.cfg
        b, t, d = x.shape
        hd = d // cfg.num_heads
        q, k, v = (constrain(f(x), "batch", "length", "heads").reshape(b, t, cfg.num_heads, hd)
                   for f in (self.query, self.key, self.value))
        if key is None or cfg.attention_dropout == 0.0:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        else:  # dropout on the attention probabilities, as HF BERT does
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(hd)
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
            probs = _dropout(jax.nn.softmax(logits, axis=-1), cfg.attention_dropout, key)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        out = constrain(out.reshape(b, t, d), "batch", "length", "heads")
        return constrain(self.out(out), "batch", "length", "embed")


class Layer(nnx.Module):
    """Post-norm encoder block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.attn_norm = _norm(cfg, rngs)
        self.ffn_in = _dense(cfg.hidden_size, cfg.intermediate_size, cfg, rngs, ("embed", "mlp"))
        self.ffn_out = _dense(cfg.intermediate_size, cfg.hidden_size, cfg, rngs, ("mlp", "embed"))
        self.ffn_norm = _norm(cfg, rngs)

    def __call__(self, x, mask, key):
        cfg = self.cfg
        keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
        h = _dropout(self.attn(x.astype(cfg.jnp_dtype), mask, keys[0]), cfg.hidden_dropout,
                     keys[1])
        x = constrain(self.attn_norm(x + h), "batch", "length", "embed")
        h = _ACTS[cfg.hidden_act](self.ffn_in(x.astype(cfg.jnp_dtype)))
        h = self.ffn_out(constrain(h, "batch", "length", "mlp"))  # [B, T, F] -> [B, T, D]
        return constrain(self.ffn_norm(x + _dropout(h, cfg.hidden_dropout, keys[2])),
                         "batch", "length", "embed")


class Bert(nnx.Module):
    """BERT encoder; with `num_labels > 0` a sequence classification/regression model."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        self.embed = Embeddings(cfg, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        if cfg.add_pooler:
            self.pooler = _dense(cfg.hidden_size, cfg.hidden_size, cfg, rngs, ("embed", "pooled"))
        if cfg.num_labels:
            self.classifier = _dense(cfg.hidden_size, cfg.num_labels, cfg, rngs,
                                     ("embed", "classes"))

    def encode(self, tokens, type_ids=None, attention_mask=None, *, dropout_key=None):
        """Token representations.

        Args:
          tokens: `[B, T]` ids; type_ids: `[B, T]` segment (sentence A/B) ids,
            default 0; attention_mask: `[B, T]` 1 for real tokens, default all.
          dropout_key: PRNG key turning dropout on (training); None = eval.
        Returns:
          `[B, T, D]` float32.
        """
        if type_ids is None:
            type_ids = jnp.zeros_like(tokens)
        mask = (jnp.ones(tokens.shape, bool) if attention_mask is None
                else attention_mask.astype(bool))
        keys = ((None,) * (self.config.num_layers + 1) if dropout_key is None
                else tuple(jax.random.split(dropout_key, self.config.num_layers + 1)))
        x = _dropout(self.embed(tokens, type_ids), self.config.hidden_dropout, keys[0])
        for layer, key in zip(self.layers, keys[1:]):
            x = layer(x, mask, key)
        return x.astype(jnp.float32)

    def pool(self, hidden):
        """`tanh(dense(hidden[:, 0]))`: `[B, T, D]` -> `[B, D]`."""
        return jnp.tanh(self.pooler(hidden[:, 0].astype(self.config.jnp_dtype))).astype(
            jnp.float32)

    def __call__(self, tokens, type_ids=None, attention_mask=None, *, dropout_key=None):
        """Logits `[B, num_labels]` float32 with a head, else hidden states `[B, T, D]`."""
        k_enc, k_head = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        hidden = self.encode(tokens, type_ids, attention_mask, dropout_key=k_enc)
        if not self.config.num_labels:
            return hidden
        pooled = _dropout(self.pool(hidden), self.config.hidden_dropout, k_head)
        return self.classifier(pooled.astype(self.config.jnp_dtype)).astype(jnp.float32)


def mean_pool(hidden, attention_mask):
    """Mean of the real tokens' vectors: `[B, T, D]`, `[B, T]` -> `[B, D]`."""
    m = attention_mask.astype(jnp.float32)[..., None]
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x, eps: float = 1e-12):
    """`x / max(||x||, eps)` along the last axis (torch.nn.functional.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embedding(model: Bert, tokens, attention_mask, type_ids=None):
    """Sentence-transformers style embedding: mean pooling, then L2 normalization. `[B, D]`."""
    return l2_normalize(mean_pool(model.encode(tokens, type_ids, attention_mask),
                                  attention_mask))


def abstract_model(config: BertConfig):
    """`(graphdef, state)` of a Bert with shape-only parameters (no allocation)."""
    return nnx.split(nnx.eval_shape(lambda: Bert(config, rngs=nnx.Rngs(0))))
