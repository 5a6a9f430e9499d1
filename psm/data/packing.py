"""Static-shape batches from tokenized examples: one example per row, or packed.

Both layouts give the same arrays, all `[N, T]` unless noted:
  tokens       int32   token ids; 0 (`pad_id`) in padding.
  targets      int32   the next token of the same example: `targets[n, t] =
                       tokens[n, t + 1]` inside an example; `pad_id` at the
                       last token of each example and in padding.
  loss_mask    float32 1.0 where `targets` is a response token or EOS (the
                       example's own loss mask shifted by one), else 0.
  segment_ids  int32   1, 2, 3, ... for the 1st, 2nd, 3rd example of the row;
                       0 in padding.
  positions    int32   0, 1, 2, ... restarting at each example.
  example_ids  int32   `[N, S]`: the stable id of segment s + 1 of row n, -1
                       where a row has fewer than S examples.

An example of L tokens occupies L positions; its last position predicts
nothing (EOS is the last token), so a row of T tokens holds examples whose
lengths add up to at most T.

Attention must stay inside an example: query t may attend key u when
`segment_ids[t] == segment_ids[u] != 0` and `u <= t` (`attention_mask` builds
that `[N, T, T]` mask). With positions restarting per example, a packed row
then gives every example the same logits as a row of its own.

`pack_examples` packs next-fit in the given order (a row is closed when the
next example does not fit), so the order of examples, which the training method
controls, is kept. The training step's packed batches
(`psm.data.packed_batches`) pack each batch first-fit decreasing
(`first_fit_decreasing`): the batch's examples are fixed by the data order, and
their order inside the batch does not change its loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm.data.tokenize import TokenizedExample

ARRAY_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _empty(num_rows: int, seq_len: int, num_segments: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.full((num_rows, seq_len), pad_id, np.int32),
        "targets": np.full((num_rows, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((num_rows, seq_len), np.float32),
        "segment_ids": np.zeros((num_rows, seq_len), np.int32),
        "positions": np.zeros((num_rows, seq_len), np.int32),
        "example_ids": np.full((num_rows, num_segments), -1, np.int32),
    }


def _check_fits(ex: TokenizedExample, seq_len: int) -> None:
    if len(ex) > seq_len:
        raise ValueError(f"example id {ex.id} has {len(ex)} tokens > seq_len={seq_len}; "
                         "tokenize with max_len <= seq_len")
    if len(ex) == 0:
        raise ValueError(f"example id {ex.id} has no tokens")


def _write(batch: dict[str, np.ndarray], row: int, offset: int, segment: int,
           ex: TokenizedExample) -> None:
    n = len(ex)
    sl = slice(offset, offset + n)
    batch["tokens"][row, sl] = ex.tokens
    batch["targets"][row, offset:offset + n - 1] = ex.tokens[1:]
    batch["loss_mask"][row, offset:offset + n - 1] = ex.loss_mask[1:]
    batch["segment_ids"][row, sl] = segment
    batch["positions"][row, sl] = np.arange(n, dtype=np.int32)
    batch["example_ids"][row, segment - 1] = ex.id


def pad_examples(examples: Sequence[TokenizedExample], seq_len: int, *,
                 pad_id: int = 0) -> dict[str, np.ndarray]:
    """One example per row, padded to `seq_len`: arrays `[N, T]`, example_ids `[N, 1]`.

    Raises:
      ValueError: naming the example id when an example is longer than `seq_len`.
    """
    batch = _empty(len(examples), seq_len, 1, pad_id)
    for row, ex in enumerate(examples):
        _check_fits(ex, seq_len)
        _write(batch, row, 0, 1, ex)
    return batch


def pack_rows(lengths: Sequence[int], seq_len: int, max_segments: int | None = None
              ) -> list[list[int]]:
    """Next-fit assignment of examples (by index) to rows, keeping their order.

    A row is closed when the next example would overflow `seq_len` tokens or
    the row already holds `max_segments` examples.
    """
    rows: list[list[int]] = []
    used = seq_len + 1  # forces a new row for the first example
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens > seq_len={seq_len}")
        full = max_segments is not None and rows and len(rows[-1]) >= max_segments
        if used + n > seq_len or full:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def first_fit_decreasing(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """First-fit-decreasing assignment of examples (by index) to rows of `seq_len` tokens.

    Examples are placed longest first (ties: the earlier index first), each into
    the first row with room for it. Fewer rows than `pack_rows` in general; the
    order of examples inside a batch is not kept (a training step's loss is a
    token-weighted sum over the batch, which does not depend on it). Each row
    lists its examples in placement order. Zero lengths (padding slots) are
    skipped.

    Raises:
      ValueError: an example longer than `seq_len`.
    """
    lengths = np.asarray(lengths, np.int64)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        if n > seq_len:
            raise ValueError(f"example {int(i)} has {n} tokens > seq_len={seq_len}")
        if n <= 0:
            continue
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(int(i))
                free[r] -= n
                break
        else:
            rows.append([int(i)])
            free.append(seq_len - n)
    return rows


def pack_examples(examples: Sequence[TokenizedExample], seq_len: int, *,
                  max_segments: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Packs examples into rows of `seq_len` tokens, in order (see the module docstring).

    Args:
      examples: tokenized examples, each at most `seq_len` tokens.
      seq_len: T, the row length.
      max_segments: S, the most examples per row and the width of
        `example_ids`. None: as many as fit, and S is the largest count in
        any row (so the shape depends on the data; pass S for a fixed shape).
      pad_id: the token used in padding and as the target of last tokens.

    Returns:
      The arrays of the module docstring, with N = the number of rows needed.
    """
    for ex in examples:
        _check_fits(ex, seq_len)
    rows = pack_rows([len(ex) for ex in examples], seq_len, max_segments)
    width = max_segments if max_segments is not None else max((len(r) for r in rows), default=1)
    batch = _empty(len(rows), seq_len, width, pad_id)
    for row, members in enumerate(rows):
        offset = 0
        for seg, i in enumerate(members, start=1):
            _write(batch, row, offset, seg, examples[i])
            offset += len(examples[i])
    return batch


def pad_rows(batch: dict[str, np.ndarray], num_rows: int, *, pad_id: int = 0
             ) -> dict[str, np.ndarray]:
    """Appends empty rows (all padding, no loss, example id -1) up to `num_rows`."""
    have = batch["tokens"].shape[0]
    if num_rows < have:
        raise ValueError(f"pad_rows: batch has {have} rows > num_rows={num_rows}")
    extra = _empty(num_rows - have, batch["tokens"].shape[1], batch["example_ids"].shape[1],
                   pad_id)
    return {k: np.concatenate([batch[k], extra[k]]) for k in batch}


def attention_mask(segment_ids) -> jax.Array:
    """`[N, T] -> [N, T, T]` bool: causal and within one example (no padding keys)."""
    seg = jnp.asarray(segment_ids)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    t = seg.shape[-1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    return same & causal[None]


def per_example_loss(token_loss, loss_mask, segment_ids, num_segments: int
                     ) -> tuple[jax.Array, jax.Array]:
    """Mean loss of each example of each row; traceable under `jit`/`vmap`.

    Args:
      token_loss: `[N, T]` loss of each target (e.g. cross-entropy).
      loss_mask: `[N, T]` weights (the batch's `loss_mask`).
      segment_ids: `[N, T]`.
      num_segments: S, the width of `example_ids`.

    Returns:
      `(mean [N, S], count [N, S])`: the masked mean loss of segment s + 1 of
      row n and its number of loss tokens (mean 0 where the count is 0). Pair
      them with `example_ids [N, S]` to key the losses by example id.
    """
    token_loss = jnp.asarray(token_loss, jnp.float32)
    w = jnp.asarray(loss_mask, jnp.float32)
    seg = jnp.asarray(segment_ids)
    n = seg.shape[0]
    # Flat segment index n * S + (s - 1); padding (s = 0) maps out of range and
    # segment_sum drops it.
    flat = jnp.where(seg > 0, jnp.arange(n)[:, None] * num_segments + seg - 1,
                     n * num_segments)
    total = jax.ops.segment_sum((token_loss * w).ravel(), flat.ravel(), n * num_segments)
    count = jax.ops.segment_sum(w.ravel(), flat.ravel(), n * num_segments)
    mean = jnp.where(count > 0, total / jnp.maximum(count, 1e-9), 0.0)
    return mean.reshape(n, num_segments), count.reshape(n, num_segments)


def losses_by_id(mean, count, example_ids) -> dict[int, float]:
    """`{example id: mean loss}` from `per_example_loss` output (skips empty slots)."""
    mean, count, ids = np.asarray(mean), np.asarray(count), np.asarray(example_ids)
    return {int(i): float(m) for i, m, c in zip(ids.ravel(), mean.ravel(), count.ravel())
            if i >= 0 and c > 0}
