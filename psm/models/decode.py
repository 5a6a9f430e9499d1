"""Batched generation with a KV cache.

Prompts are left-padded to a fixed length and the number of new tokens is
fixed, so one compilation serves a whole evaluation set. Generation is a pure
function of `(params, prompt arrays, key)`: the caller can `jax.vmap` it over
a stacked `[K, ...]` parameter tree to decode K models in one program.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psm.models.llama import KVCache


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    """Left-pads token lists into `tokens [B, length]` and `segment_ids [B, length]`.

    Raises:
      ValueError: a prompt is longer than `length` (names its index).
    """
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segs = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the prompt length "
                             f"{length}; raise the prompt length or truncate the prompt")
        if len(p):
            tokens[i, length - len(p):] = p
            segs[i, length - len(p):] = 1
    return tokens, segs


def _sample(logits, key, temperature, top_p):
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling. `[B, V]`."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
        cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id",
                                             "temperature", "top_p"))
def generate_tokens(graphdef, state, tokens, segment_ids, key, *, max_new_tokens: int,
                    eos_id: int, pad_id: int, temperature: float = 0.0, top_p: float = 1.0):
    """Generates `max_new_tokens` tokens after left-padded prompts.

    Args:
      graphdef, state: the model from `nnx.split(model)`.
      tokens, segment_ids: `[B, P]` left-padded prompts (segment 1 = real token).
      key: PRNG key (unused when greedy).
    Returns:
      `[B, max_new_tokens]` int32; every token after a row's EOS is `pad_id`.
    """
    model = nnx.merge(graphdef, state)
    b, p = tokens.shape
    cache = KVCache.create(model.config, b, p + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    logits, cache = model.decode(tokens, positions, segment_ids, cache)
    next_pos = positions[:, -1:] + 1  # [B, 1]
    first = _sample(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_p)
    ones = jnp.ones((b, 1), jnp.int32)

    def step(carry, i):
        tok, pos, done, cache = carry
        logits, cache = model.decode(tok[:, None], pos, ones, cache)
        nxt = _sample(logits[:, -1], jax.random.fold_in(key, i), temperature, top_p)
        done = done | (tok == eos_id)
        nxt = jnp.where(done, pad_id, nxt)
        return (nxt, pos + 1, done, cache), tok

    init = (first, next_pos, jnp.zeros((b,), bool), cache)
    (last, _, done, _), out = jax.lax.scan(step, init, jnp.arange(1, max_new_tokens))
    out = jnp.concatenate([out.T, last[:, None]], axis=1) if max_new_tokens > 1 else first[:, None]
    # Mask everything after the first EOS (the EOS itself is kept).
    after_eos = jnp.cumsum(out == eos_id, axis=1) - (out == eos_id) > 0
    return jnp.where(after_eos, pad_id, out)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id",
                                             "temperature", "top_p"))
def generate_tokens_recompute(graphdef, state, tokens, segment_ids, key, *,
                              max_new_tokens: int, eos_id: int, pad_id: int,
                              temperature: float = 0.0, top_p: float = 1.0):
    """Reference generation without a KV cache: same contract as `generate_tokens`.

    Every step runs the full forward pass over a fixed `[B, P + max_new_tokens]`
    buffer (prompt, tokens so far, and not-yet-written slots that the causal
    mask hides), so one compilation serves all steps. It is quadratic in the
    length and exists to check the cached path and to measure what the cache
    buys. Sampling keys match `generate_tokens`, so seeded samples agree too.

    Returns:
      `[B, max_new_tokens]` int32; every token after a row's EOS is `pad_id`.
    """
    model = nnx.merge(graphdef, state)
    b, p = tokens.shape
    n = max_new_tokens
    buf = jnp.concatenate([tokens.astype(jnp.int32), jnp.full((b, n), pad_id, jnp.int32)], 1)
    # New slots are real tokens (segment 1); the causal mask keeps later,
    # unwritten slots out of each query's view.
    seg = jnp.concatenate([segment_ids.astype(jnp.int32), jnp.ones((b, n), jnp.int32)], 1)
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)

    def step(carry, i):
        buf, done = carry
        logits = model(buf, positions=positions, segment_ids=seg)  # [B, P + n, V]
        last = jax.lax.dynamic_index_in_dim(logits, p - 1 + i, axis=1, keepdims=False)
        nxt = _sample(last, jax.random.fold_in(key, i), temperature, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        done = done | (nxt == eos_id)
        buf = jax.lax.dynamic_update_slice(buf, nxt[:, None], (0, p + i))
        return (buf, done), nxt

    _, out = jax.lax.scan(step, (buf, jnp.zeros((b,), bool)), jnp.arange(n))
    return out.T


def generate_text(graphdef, state, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  prompt_len: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, stop_strings: Sequence[str] = ()) -> list[str]:
    """Host-side convenience: encode, left-pad, generate, decode, cut at stops.

    Args:
      tokenizer: a `psm.models.tokenizer.Tokenizer` (encode/decode/eos_id/pad_id).
      prompt_len: padded prompt length; default the longest prompt (rounded
        up to a multiple of 8 so that similar batches share a compilation).
    Returns:
      One completion string per prompt (without the prompt).
    """
    ids = [tokenizer.encode(p) for p in prompts]
    if prompt_len is None:
        prompt_len = -(-max(len(x) for x in ids) // 8) * 8
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    tokens, segs = left_pad(ids, prompt_len, pad_id)
    out = generate_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(segs),
                          jax.random.key(seed), max_new_tokens=max_new_tokens,
                          eos_id=tokenizer.eos_id, pad_id=pad_id, temperature=temperature,
                          top_p=top_p)
    texts = []
    for row in np.asarray(out):
        row = row.tolist()
        if tokenizer.eos_id in row:
            row = row[:row.index(tokenizer.eos_id)]
        texts.append(truncate_at_stop(tokenizer.decode(row), stop_strings))
    return texts


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cuts `text` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]
