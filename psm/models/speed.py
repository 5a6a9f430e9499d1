"""Training-speed options of the decoder that do not change its mathematics.

Attention implementation (`LlamaConfig.attention`, `config.model.attention`):

  xla    `jax.nn.dot_product_attention(..., implementation="xla")` with psm's
         boolean `[B, 1, T, S]` mask (same segment, not in the future).
  cudnn  cuDNN's fused flash attention (GPU; bfloat16 / float16 only). Causality
         goes to the kernel as `is_causal=True`, so it skips the upper triangle
         instead of reading it from the mask. Segments (packed rows, padding)
         still go in as a same-segment mask, which jax hands to cuDNN as an
         additive bias: `jax.nn.dot_product_attention` takes only per-row
         sequence lengths (`query_seq_lengths` / `key_value_seq_lengths`), which
         cannot express several examples per row, and the mask keeps padding
         attending to padding exactly as the xla path does. A forward pass
         without `segment_ids` (one segment per row) sends no mask at all.
  auto   cudnn when the backend is a CUDA GPU and the compute dtype, head size
         and sequence length are ones cuDNN accepts; else xla. The choice is
         made at trace time from static shapes, so it is deterministic, and it
         is logged once.

Remat policy (`LlamaConfig.remat`, `config.model.remat`): what each transformer
block keeps from its forward pass for the backward pass (`REMAT_POLICIES`).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
CUDNN_DTYPES = ("bfloat16", "float16")

# name -> jax.checkpoint policy; None = no jax.checkpoint at all.
# 'full' saves nothing (jax.checkpoint's default): the whole block is
# recomputed. 'dots_saveable' saves the outputs of matmuls without batch
# dimensions (q/k/v/o, gate/up/down projections) and recomputes the cheap
# elementwise work, norms and the attention scores (batched matmuls); this is
# MaxText's 'minimal' policy (checkpoint_dots_with_no_batch_dims).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_LOGGED: set = set()


def remat_name(value, key: str = "config.model.remat") -> str:
    """The policy name of a remat setting: a name of REMAT_POLICIES, or the older
    boolean form (True = 'full', False = 'none').

    Raises:
      ValueError: naming `key`, for anything else.
    """
    if isinstance(value, bool):
        return "full" if value else "none"
    if isinstance(value, str) and value in REMAT_POLICIES:
        return value
    raise ValueError(f"{key} must be one of {list(REMAT_POLICIES)} (or True / False for "
                     f"'full' / 'none'), got {value!r}")


def remat_policy(name: str):
    """The jax.checkpoint policy of a REMAT_POLICIES name (None for 'none')."""
    return REMAT_POLICIES[remat_name(name)]


def cuda_backend() -> bool:
    """Whether jax runs on a CUDA GPU (where cuDNN is)."""
    if jax.default_backend() != "gpu":
        return False
    return "rocm" not in str(getattr(jax.devices()[0].client, "platform_version", "")).lower()


def cudnn_unsupported(dtype, head_dim: int, seq_len: int, *, gpu: bool) -> str | None:
    """Why cuDNN flash attention cannot run this call, or None when it can.

    Args:
      dtype: the compute dtype of q, k, v.
      head_dim: per-head size; seq_len: T (= S for self-attention).
      gpu: whether the backend is a CUDA GPU.
    """
    if not gpu:
        return f"the backend is {jax.default_backend()!r}, not a CUDA GPU"
    if jnp.dtype(dtype).name not in CUDNN_DTYPES:
        return f"the compute dtype is {jnp.dtype(dtype).name} (cuDNN needs {CUDNN_DTYPES})"
    if head_dim % 8 or head_dim > 128:
        # 128 is the limit before Hopper (256 from Hopper on); the lower one is
        # the safe automatic choice.
        return f"the head size {head_dim} is not a multiple of 8 up to 128"
    if seq_len % 2:
        return f"the sequence length {seq_len} is odd (cuDNN's masked training needs even)"
    return None


def resolve_attention(choice: str, dtype, head_dim: int, seq_len: int,
                      *, gpu: bool | None = None) -> str:
    """'xla' or 'cudnn' for an `attention` setting and one call's static shapes.

    Raises:
      ValueError: 'cudnn' was asked for where cuDNN cannot run (names
        config.model.attention and the reason), or an unknown setting.
    """
    if choice not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention must be one of "
                         f"{list(ATTENTION_IMPLEMENTATIONS)}, got {choice!r}")
    if choice == "xla":
        return "xla"
    why = cudnn_unsupported(dtype, head_dim, seq_len, gpu=cuda_backend() if gpu is None else gpu)
    if choice == "cudnn":
        if why:
            raise ValueError(f"config.model.attention='cudnn' cannot be used: {why}; use "
                             "'auto' or 'xla'")
        return "cudnn"
    chosen = "xla" if why else "cudnn"
    if (chosen, why) not in _LOGGED:
        _LOGGED.add((chosen, why))
        log.info("config.model.attention='auto': using %s attention%s", chosen,
                 f" ({why})" if why else "")
    return chosen


def cudnn_mask_args(segment_ids: jax.Array | None) -> dict:
    """The masking keywords of a cuDNN self-attention call for psm's segment rule.

    psm's rule: query t attends key u when `segment_ids[t] == segment_ids[u]`
    and `u <= t`. The causal half is `is_causal=True`; the segment half is a
    boolean same-segment mask (absent when `segment_ids` is None, i.e. one
    segment per row).

    Args:
      segment_ids: `[B, T]` ints, or None.
    Returns:
      `{"is_causal": True}` plus `"mask": [B, 1, T, T] bool` when segments are given.
    """
    if segment_ids is None:
        return {"is_causal": True}
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return {"is_causal": True, "mask": same}


def self_attention(q, k, v, segment_ids, implementation: str):
    """Full-sequence self-attention under psm's segment rule.

    Args:
      q: `[B, T, H, hd]`; k, v: `[B, T, KV, hd]` (grouped-query when KV < H).
      segment_ids: `[B, T]` ints (0 = padding), or None for one segment per row
        (cudnn only; the xla path builds its mask from explicit ids).
      implementation: 'xla' or 'cudnn' (from `resolve_attention`).
    Returns:
      `[B, T, H, hd]`.
    """
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn",
                                            **cudnn_mask_args(segment_ids))
    t = q.shape[1]
    slot = jnp.arange(t)
    # [B, 1, T, S]: same segment and not in the future. Padding (segment 0)
    # attends to padding, so no row is fully masked (no NaN from softmax).
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (
        slot[None, None, :] <= slot[None, :, None])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation="xla")
