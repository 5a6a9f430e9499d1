"""Llama-family decoder in Flax NNX.

One config type covers the tiny test sizes, SmolLM2-135M, TinyLlama-1.1B and
Llama-2-7b: RMSNorm, rotary embeddings (rotate-half convention, as in HF
transformers), grouped-query attention through `jax.nn.dot_product_attention`
(XLA, or cuDNN's flash kernel on GPUs: `LlamaConfig.attention`, see
`psm.models.speed`), SwiGLU MLP, tied or untied embeddings. `LlamaConfig.remat`
names what each block keeps for the backward pass (`speed.REMAT_POLICIES`).
`Llama.features` / `Llama.project` split the forward pass before the
vocabulary projection, for the chunked loss (`psm.models.chunked_loss`).

Parameter tree (names follow HF's Llama module names so converters stay short;
kernels are stored `[in, out]`, the transpose of HF's `[out, in]`):

  embed/embedding                    [V, D]
  layers/<i>/attn_norm/scale         [D]
  layers/<i>/attn/{q,k,v,o}_proj/kernel  [D, H*hd] [D, KV*hd] [D, KV*hd] [H*hd, D]
  layers/<i>/mlp_norm/scale          [D]
  layers/<i>/mlp/{gate,up,down}_proj/kernel  [D, F] [D, F] [F, D]
  final_norm/scale                   [D]
  lm_head/kernel                     [D, V]   (absent when embeddings are tied)

Every parameter carries the logical names of its axes as Flax sharding
metadata (`out_sharding`, not applied at creation): `embed` (D), `heads`
(H*hd), `kv_heads` (KV*hd), `mlp` (F), `vocab` (V), `norm` (norm scales) and
`layers` (the scan axis). `psm.models.logical.LOGICAL_RULES` maps them to mesh axes;
the names change neither the computation nor the checkpoint format. Under a
mesh the main activations are constrained by the same table
(`psm.models.logical.constrain`): the residual stream `[B, T, D]` as
`(batch, length, embed)`, the q/k/v projections and the attention output as
`heads` / `kv_heads`, the MLP hidden `[B, T, F]` as `mlp`, the logits as
`vocab`; outside a mesh these are no-ops.

This per-layer ("list") layout is the canonical one: converters, exports and
checkpoints use it. With `LlamaConfig.scan_layers=True` the blocks are stored
stacked instead, `layers/<name>` with a leading `[L]` axis (for example
`layers/attn/q_proj/kernel [L, D, H*hd]`), and applied with one `lax.scan`,
so compile time no longer grows with depth. `stack_layers` /
`unstack_layers` convert a parameter tree between the two layouts (with an
`axis` argument for trees that carry a leading replica axis), and
`to_canonical` / `from_canonical` go to and from the list layout for any
config.

Attention masking is expressed with `segment_ids` ([B, T] ints; 0 = padding):
a query attends to keys of the same segment at the same or earlier slot. This
one rule covers plain causal batches, packed rows (several examples per row)
and left-padded prompts during decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from psm.models import speed
from psm.models._fields import DTYPES, axes, check_dtype_names, from_fields
from psm.models.logical import constrain
from psm.models.speed import ATTENTION_IMPLEMENTATIONS, remat_name


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls
    # What each block keeps for the backward pass (REMAT_POLICIES): 'none' keeps all
    # activations, 'full' recomputes the block, 'dots_saveable' keeps only the weight
    # matmuls' outputs. True / False (the older boolean form) mean 'full' / 'none'.
    remat: str = "none"
    scan_layers: bool = False  # stacked block params applied with lax.scan (see module doc)
    attention: str = "auto"  # 'auto' | 'xla' | 'cudnn' (ATTENTION_IMPLEMENTATIONS)

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_name(self.remat, "LlamaConfig.remat"))
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"LlamaConfig.attention must be one of "
                             f"{list(ATTENTION_IMPLEMENTATIONS)}, got {self.attention!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"LlamaConfig.hidden_size ({self.hidden_size}) is not divisible by num_heads "
                f"({self.num_heads}); set head_dim explicitly")
        check_dtype_names(self)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
        """Builds a config from a HF `config.json` dict (`LlamaForCausalLM`).

        Args:
          hf: the parsed `config.json`.
          **overrides: LlamaConfig fields to set on top (dtype, remat, ...).
        Raises:
          ValueError: a feature this decoder does not implement (biases, rope
            scaling, another activation), or a missing required key.
        """
        return cls(**{**_hf_to_fields(hf), **overrides})

    def to_hf_config(self, **extra) -> dict[str, Any]:
        """The HF `config.json` dict of this architecture (`LlamaForCausalLM`).

        Both `rope_theta` (transformers 4) and `rope_parameters` (transformers 5)
        are written. `extra` keys (e.g. `bos_token_id`) are added verbatim.
        """
        hd = self.resolved_head_dim
        out = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": hd,
            "hidden_act": "silu", "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_scaling": None, "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
            "torch_dtype": self.param_dtype, "dtype": self.param_dtype,
        }
        out.update(extra)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        return from_fields(cls, d)


def _hf_to_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Maps HF LlamaConfig keys to LlamaConfig fields, rejecting unsupported features."""
    archs = hf.get("architectures") or []
    if hf.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in archs:
        raise ValueError(f"config.json model_type {hf.get('model_type')!r} / architectures "
                         f"{archs} is not a Llama decoder (expected model_type 'llama')")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"config.json lacks required Llama key {key!r}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json {key}=true: biased projections are not supported")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling or rope_type not in ("default", None):
        raise ValueError(f"config.json rope scaling {scaling or rope} is not supported; only "
                         "plain RoPE (rope_type 'default') is")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) == int(hf["hidden_size"]) // heads:
        head_dim = None  # the default; keeps configs equal to the presets
    return dict(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim is None else int(head_dim), rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)))


# Published architectures (for converters and configs); tiny sizes live in configs.
PRESETS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100_000.0,
                         rms_norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_layers=22, num_heads=32, num_kv_heads=4, rope_theta=10_000.0,
                           rms_norm_eps=1e-5, tie_embeddings=False, max_seq_len=2048),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, num_kv_heads=32, rope_theta=10_000.0,
                       rms_norm_eps=1e-5, tie_embeddings=False, max_seq_len=4096),
}


@struct.dataclass
class KVCache:
    """Per-layer keys and values of the tokens decoded so far.

    Attributes:
      k, v: `[L, B, S, KV, hd]` in the compute dtype; slots >= `length` are unused.
      segment_ids: `[B, S]` int32, 0 for padding and unused slots.
      length: scalar int32, the number of slots written.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    length: jax.Array

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, max_len: int) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads,
                 config.resolved_head_dim)
        zeros = jnp.zeros(shape, config.jnp_dtype)
        return cls(k=zeros, v=zeros, segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   length=jnp.zeros((), jnp.int32))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 (as HF Llama does) and cast back."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **axes("norm"))

    def __call__(self, x):  # [..., D]
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half rotary embedding.

    Args:
      x: `[B, T, N, hd]`.
      positions: `[B, T]` integer positions.
    Returns:
      `[B, T, N, hd]` in x's dtype.
    """
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))  # [hd/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _linear(d_in, d_out, cfg: LlamaConfig, rngs, names: tuple[str, str]):
    """Bias-free `[d_in, d_out]` projection whose axes are named `names`."""
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.jnp_dtype,
                      param_dtype=cfg.jnp_param_dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
                      kernel_metadata=axes(*names))


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        hd = cfg.resolved_head_dim
        self.q_proj = _linear(cfg.hidden_size, cfg.num_heads * hd, cfg, rngs, ("embed", "heads"))
        self.k_proj = _linear(cfg.hidden_size, cfg.num_kv_heads * hd, cfg, rngs,
                              ("embed", "kv_heads"))
        self.v_proj = _linear(cfg.hidden_size, cfg.num_kv_heads * hd, cfg, rngs,
                              ("embed", "kv_heads"))
        self.o_proj = _linear(cfg.num_heads * hd, cfg.hidden_size, cfg, rngs, ("heads", "embed"))

    def __call__(self, x, positions, segment_ids, kv=None):
        """Attend over the sequence, or over a cache when `kv` is given.

        Args:
          x: `[B, T, D]`; positions, segment_ids: `[B, T]`.
          kv: optional `(k_all, v_all, layer, cache_segment_ids, length)` with
            `k_all, v_all: [L, B, S, KV, hd]` (all layers, so that the write of
            the new keys is an in-place update of the one cache buffer),
            `layer` the scalar layer index, `cache_segment_ids: [B, S]` already
            holding the new tokens' segments, and `length` the slots written.
        Returns:
          `[B, T, D]`, and the updated `(k_all, v_all)` when `kv` is given.
        """
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.resolved_head_dim
        # Constrained flat ([B, T, H*hd]): the mesh divides H*hd (a parameter
        # dimension), not necessarily H.
        q = constrain(self.q_proj(x), "batch", "length", "heads").reshape(
            b, t, cfg.num_heads, hd)
        k = constrain(self.k_proj(x), "batch", "length", "kv_heads").reshape(
            b, t, cfg.num_kv_heads, hd)
        v = constrain(self.v_proj(x), "batch", "length", "kv_heads").reshape(
            b, t, cfg.num_kv_heads, hd)
        q = rotary(q, positions, cfg.rope_theta)
        k = rotary(k, positions, cfg.rope_theta)
        new_kv = None
        if kv is None:
            impl = speed.resolve_attention(cfg.attention, q.dtype, hd, t)
            if impl == "xla" and segment_ids is None:
                segment_ids = jnp.ones((b, t), jnp.int32)
            out = speed.self_attention(q, k, v, segment_ids, impl)
        else:
            # Decoding (a few new queries against the cache) stays on XLA: the
            # cache's slots are not causal in the kernel's sense (the queries sit
            # at `length`, not at 0) and the work per token is small.
            k_all, v_all, layer, k_seg, length = kv
            at = (layer, 0, length, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
            new_kv = (k_all, v_all)
            k = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)
            q_slot = length + jnp.arange(t)
            k_slot = jnp.arange(k.shape[1])
            # [B, 1, T, S]: same segment and not in the future (as in
            # speed.self_attention); padding attends to padding.
            mask = (segment_ids[:, :, None] == k_seg[:, None, :]) & (
                k_slot[None, None, :] <= q_slot[None, :, None])
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                               mask=mask[:, None, :, :], implementation="xla")
        out = constrain(out.reshape(b, t, cfg.num_heads * hd), "batch", "length", "heads")
        out = constrain(self.o_proj(out), "batch", "length", "embed")
        return out if kv is None else (out, new_kv)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, cfg, rngs, ("embed", "mlp"))
        self.up_proj = _linear(d, f, cfg, rngs, ("embed", "mlp"))
        self.down_proj = _linear(f, d, cfg, rngs, ("mlp", "embed"))

    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = constrain(h, "batch", "length", "mlp")  # [B, T, F]
        return constrain(self.down_proj(h), "batch", "length", "embed")


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids, kv=None):
        h = self.attn(self.attn_norm(x), positions, segment_ids, kv)
        h, new_kv = (h, None) if kv is None else h
        x = constrain(x + h, "batch", "length", "embed")
        x = constrain(x + self.mlp(self.mlp_norm(x)), "batch", "length", "embed")
        return x if kv is None else (x, new_kv)


def _stacked_blocks(cfg: LlamaConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose parameters carry a leading `[L]` axis (scan layout)."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, rngs=r)

    return make(rngs)


class Llama(nnx.Module):
    """Llama-family causal language model."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg = config
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype,
                               param_dtype=cfg.jnp_param_dtype,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
                               embedding_metadata=axes("vocab", "embed"))
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, cfg, rngs, ("embed", "vocab"))

    def project(self, h):
        """Vocabulary projection of final-normed states: `[B, T, D]` -> float32 `[B, T, V]`."""
        logits = self.embed.attend(h) if self.config.tie_embeddings else self.lm_head(h)
        return constrain(logits.astype(jnp.float32), "batch", "length", "vocab")

    def _logits(self, x):  # [B, T, D] -> float32 [B, T, V]
        return self.project(self.final_norm(x))

    def __call__(self, tokens, *, positions=None, segment_ids=None):
        """Full-sequence forward pass (training and scoring).

        Args:
          tokens: `[B, T]` int token ids.
          positions: `[B, T]` rotary positions; default `0..T-1` per row.
          segment_ids: `[B, T]`; tokens attend within their segment; 0 marks
            padding. Default: one segment per row.
        Returns:
          logits `[B, T, V]` float32.
        """
        return self.project(self.features(tokens, positions=positions,
                                          segment_ids=segment_ids))

    def features(self, tokens, *, positions=None, segment_ids=None):
        """The final-normed hidden states, the input of the vocabulary projection.

        Args: as `__call__`.
        Returns:
          `[B, T, D]` in the compute dtype; `project` of it is `__call__`'s logits.
        """
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        # segment_ids stays None here when not given: the cuDNN path then needs
        # no mask; the XLA path builds the one-segment-per-row ids itself.
        x = constrain(self.embed(tokens), "batch", "length", "embed")
        policy = speed.remat_policy(self.config.remat)
        if self.config.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(h, layer_state):
                return nnx.merge(graphdef, layer_state)(h, positions, segment_ids), None

            if self.config.remat != "none":
                body = jax.checkpoint(body, policy=policy)
            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for block in self.layers:
                if self.config.remat != "none":
                    x = nnx.remat(lambda blk, h: blk(h, positions, segment_ids),
                                  policy=policy)(block, x)
                else:
                    x = block(x, positions, segment_ids)
        return self.final_norm(x)

    def decode(self, tokens, positions, segment_ids, cache: KVCache):
        """Forward pass over `T` new tokens appended to a KV cache.

        Args:
          tokens, positions, segment_ids: `[B, T]` for the new tokens.
          cache: holds `cache.length` earlier slots; must have room for `T` more.
        Returns:
          (logits `[B, T, V]` float32, updated cache).
        """
        x = self.embed(tokens)
        seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                           (0, cache.length))
        k_all, v_all = cache.k, cache.v
        if self.config.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            # The whole cache rides in the carry and each layer updates its
            # slice in place; scanning over per-layer cache slices instead
            # would copy the full cache once per decoded token.
            def body(carry, xs):
                h, ka, va = carry
                layer_state, i = xs
                h, (ka, va) = nnx.merge(graphdef, layer_state)(
                    h, positions, segment_ids, (ka, va, i, seg, cache.length))
                return (h, ka, va), None

            layer_ids = jnp.arange(self.config.num_layers)
            (x, k_all, v_all), _ = jax.lax.scan(body, (x, k_all, v_all), (stacked, layer_ids))
        else:
            for i, block in enumerate(self.layers):
                x, (k_all, v_all) = block(x, positions, segment_ids,
                                          (k_all, v_all, i, seg, cache.length))
        new_cache = KVCache(k=k_all, v=v_all, segment_ids=seg,
                            length=cache.length + tokens.shape[1])
        return self._logits(x), new_cache


def count_params(tree) -> int:
    """Number of scalars in a parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# Parameter layouts (see the module docstring).


def _pure(tree):
    """A nested dict of arrays from an `nnx.State` or a nested mapping."""
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return tree


def stack_layers(tree, axis: int = 0) -> dict:
    """List layout -> scan layout.

    Args:
      tree: parameter tree (nnx.State or nested dict) whose `layers` maps
        `0..L-1` to per-layer subtrees.
      axis: where to insert the layer axis (1 for trees with a leading `[K]`
        replica axis).
    Returns:
      A nested dict whose `layers` is one subtree with leaves stacked at `axis`.
    """
    tree = dict(_pure(tree))
    layers = tree["layers"]
    keys = sorted(layers, key=int)
    if [int(k) for k in keys] != list(range(len(keys))):
        raise ValueError(f"stack_layers: 'layers' keys must be 0..L-1, got {keys}")
    tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis),
                                  *[layers[k] for k in keys])
    return tree


def unstack_layers(tree, axis: int = 0) -> dict:
    """Scan layout -> list layout (inverse of `stack_layers`)."""
    tree = dict(_pure(tree))
    stacked = tree["layers"]
    sizes = {x.shape[axis] for x in jax.tree.leaves(stacked)}
    if len(sizes) != 1:
        raise ValueError(f"unstack_layers: layer leaves disagree on the size of axis {axis}: "
                         f"{sorted(sizes)}")
    n = sizes.pop()
    tree["layers"] = {i: jax.tree.map(lambda x, i=i: jnp.take(x, i, axis=axis), stacked)
                      for i in range(n)}
    return tree


def to_canonical(tree, config: LlamaConfig, axis: int = 0) -> dict:
    """Any-layout params of `config` -> list-layout nested dict (for saving/exporting)."""
    return unstack_layers(tree, axis) if config.scan_layers else dict(_pure(tree))


def from_canonical(tree, config: LlamaConfig, axis: int = 0) -> dict:
    """List-layout params -> the layout `config` asks for (nested dict)."""
    return stack_layers(tree, axis) if config.scan_layers else dict(_pure(tree))


def abstract_model(config: LlamaConfig):
    """`(graphdef, state)` of a Llama with shape-only parameters (no allocation)."""
    return nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))


def state_from_canonical(config: LlamaConfig, tree) -> nnx.State:
    """An `nnx.State` for `Llama(config)` from list-layout arrays.

    Raises:
      ValueError: a leaf is missing, unexpected or has the wrong shape (names it).
    """
    _, state = abstract_model(config)
    pure = from_canonical(tree, config)
    want = {path: x for path, x in _flat(nnx.to_pure_dict(state))}
    got = dict(_flat(pure))
    missing = sorted(set(want) - set(got), key=str)
    extra = sorted(set(got) - set(want), key=str)
    if missing or extra:
        raise ValueError(f"parameter tree does not match {config}: missing "
                         f"{['/'.join(map(str, p)) for p in missing]}, unexpected "
                         f"{['/'.join(map(str, p)) for p in extra]}")
    for path, x in got.items():
        if tuple(x.shape) != tuple(want[path].shape):
            raise ValueError(f"parameter {'/'.join(map(str, path))} has shape "
                             f"{tuple(x.shape)}, expected {tuple(want[path].shape)}")
    pure = jax.tree.map(lambda x, w: jnp.asarray(x, w.dtype), pure, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return state


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v
