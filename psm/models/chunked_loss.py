"""Token cross-entropy without materialising the `[B, T, V]` logits.

The vocabulary projection of a small model with a large vocabulary (SmolLM2:
D = 576, V = 49152) makes the float32 logits, and their gradient, the largest
activation of a training step: `B T V` floats, several times the whole
residual stream. Here the sequence is cut into chunks of `chunk` positions;
each chunk's projection, log-softmax and target gather run inside
`jax.checkpoint` under `jax.lax.map`, so the forward keeps only the `[B, T]`
losses and the backward recomputes one chunk's logits at a time. Peak memory
for the logits drops from `B T V` to `B chunk V`, at the cost of one more
projection matmul in the backward pass.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from psm.models.logical import constrain


def chunked_token_nll(project: Callable[[jax.Array], jax.Array], h: jax.Array,
                      targets: jax.Array, chunk: int) -> jax.Array:
    """Per-token negative log-likelihood, computed `chunk` positions at a time.

    Args:
      project: final-normed states `[B, C, D]` -> float32 logits `[B, C, V]`
        (`Llama.project`); it may close over the model's parameters.
      h: `[B, T, D]` final-normed hidden states (`Llama.features`).
      targets: `[B, T]` int target ids.
      chunk: positions per chunk, >= 1. T need not be a multiple: the last
        chunk is padded (the padded positions' losses are dropped, so they
        carry no gradient).
    Returns:
      `[B, T]` float32, equal to
      `softmax_cross_entropy_with_integer_labels(project(h), targets)`.
    """
    if chunk < 1:
        raise ValueError(f"config.train.loss_chunk must be >= 1 to chunk the loss, got {chunk}")
    b, t, d = h.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hc = jnp.moveaxis(h.reshape(b, n, chunk, d), 1, 0)  # [n, B, C, D]
    tc = jnp.moveaxis(targets.reshape(b, n, chunk), 1, 0)  # [n, B, C]

    # Saves nothing of the chunk: the backward recomputes its logits.
    @jax.checkpoint
    def one(args):
        hh, tt = args
        hh = constrain(hh, "batch", "length", "embed")
        return optax.softmax_cross_entropy_with_integer_labels(project(hh), tt)  # [B, C]

    nll = jax.lax.map(one, (hc, tc))  # [n, B, C]
    return jnp.moveaxis(nll, 0, 1).reshape(b, n * chunk)[:, :t]
