"""Training batches with several examples per row, in a row count fixed for the run.

The data order (`psm.data.orders`) gives each step a batch of example indices
`[K, B]` (-1: a padding slot of an epoch's last batch). Unpacked, that is
`[K, B, T]` rows of one example each (`psm.data.tasks.gather_batch`), mostly
padding when examples are short. Packed (`gather_packed`), each replica's same B
examples are laid first-fit decreasing (`psm.data.packing.first_fit_decreasing`)
into R rows of T tokens: `[K, R, T]` arrays of `psm.data.packing`'s layout
(segment ids 1, 2, ... per example in a row, 0 in padding; positions restarting
at 0 for every example).

R is one number for the whole run (`rows_for_run`): the most rows any batch of
any replica in any epoch needs, so the train step compiles once. The orders are
pure functions of the config, so R is known before training, and a resumed or
multi-process run recomputes the same R.

Why a packed step has the unpacked step's loss: the decoder's loss is the
token-weighted mean over the batch's loss tokens (`replicas.mean_loss`), a sum
that does not depend on which row holds a token; attention stays inside an
example (same segment id, causal) and rotary positions restart per example, so
every token sees exactly the context of its own unpacked row. Only the float
summation order differs.
"""

from __future__ import annotations

import numpy as np

from psm.data import orders, packing


def example_lengths(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """`[N]` tokens of each example of one-example-per-row arrays (`tasks.encode_split`):
    its non-padding slots (segment id != 0). Truncated examples count as truncated."""
    return np.sum(np.asarray(arrays["segment_ids"]) != 0, axis=-1).astype(np.int64)


def gather_packed(arrays: dict[str, np.ndarray], indices: np.ndarray, *, num_rows: int,
                  pad_id: int = 0) -> dict[str, np.ndarray]:
    """The examples `indices` `[..., B]` of each batch packed into `[..., num_rows, T]`.

    A drop-in for `tasks.gather_batch` with packing: every batch (last axis of
    `indices`) holds the same examples, each once, with its own tokens, targets
    and loss mask, a segment id of its own in its row and positions 0..L-1;
    -1 slots add nothing. Unused slots and rows are padding (token and target
    `pad_id`, no loss, segment 0).

    Args:
      arrays: one-example-per-row arrays `[N, T]` (`packing.ARRAY_KEYS`).
      indices: `[..., B]` example indices, -1 = padding slot.
      num_rows: R, rows per batch (`rows_for_run`).
      pad_id: the tokenizer's padding id.
    Returns:
      `packing.ARRAY_KEYS` arrays `[..., R, T]`.
    Raises:
      ValueError: a batch needs more than `num_rows` rows (naming the batch).
    """
    indices = np.asarray(indices)
    *lead, b = indices.shape
    flat = indices.reshape(-1, b)
    t = arrays["tokens"].shape[-1]
    lengths = np.where(flat >= 0, example_lengths(
        {"segment_ids": arrays["segment_ids"][np.maximum(flat, 0)]}), 0)
    # Where each packed slot comes from: example row `src` (-1: padding), slot `col`.
    src = np.full((len(flat), num_rows, t), -1, np.int64)
    col = np.zeros((len(flat), num_rows, t), np.int64)
    seg = np.zeros((len(flat), num_rows, t), np.int32)
    for g, (batch, lens) in enumerate(zip(flat, lengths)):
        rows = packing.first_fit_decreasing(lens, t)
        if len(rows) > num_rows:
            raise ValueError(f"batch {g} (examples {[int(i) for i in batch if i >= 0]}) needs "
                             f"{len(rows)} packed rows of {t} tokens > num_rows={num_rows}; "
                             "num_rows must come from rows_for_run over the run's batches")
        for r, members in enumerate(rows):
            offset = 0
            for s, j in enumerate(members, start=1):
                n = int(lens[j])
                src[g, r, offset:offset + n] = batch[j]
                col[g, r, offset:offset + n] = np.arange(n)
                seg[g, r, offset:offset + n] = s
                offset += n
    real, safe = src >= 0, np.maximum(src, 0)
    fill = {"tokens": pad_id, "targets": pad_id, "loss_mask": 0, "positions": 0}
    out = {key: np.where(real, arrays[key][safe, col], value).astype(arrays[key].dtype)
           for key, value in fill.items()}
    out["segment_ids"] = seg
    shape = tuple(lead) + (num_rows, t)
    return {key: out[key].reshape(shape) for key in packing.ARRAY_KEYS}


def rows_for_run(lengths: np.ndarray, seq_len: int, *, epochs: int, data_seed: int,
                 num_replicas: int, num_samples: int, batch_size: int,
                 fixed_intra_batch: bool = False, multiple_of: int = 1) -> dict:
    """R for a run, and what packing saves, over every batch it will train on.

    Every replica's batches of every epoch come from `orders.epoch_order`, as
    the train loop's `orders.batch_indices` slices them; each is packed
    first-fit decreasing and R is the most rows any of them needs, rounded up
    to a multiple of `multiple_of` (the mesh's `fsdp` axis splits the rows).

    Args:
      lengths: `[N]` tokens of each example (`example_lengths`); at most `seq_len`.
      seq_len: T.
      epochs, data_seed, num_replicas, num_samples, batch_size, fixed_intra_batch:
        the run's data order (config.train / config.data_seed).
      multiple_of: R is rounded up to a multiple of this.
    Returns:
      {"rows": R, "rows_needed": the most any batch needs (before rounding),
       "rows_mean": the mean over batches (what a per-batch row count would cost),
       "batch_size": B, "seq_len": T, "batches": K * the run's steps,
       "padding_unpacked": share of the `[K, B, T]` token slots that are padding,
       "padding_packed": the same for `[K, R, T]`,
       "slots_saved": 1 - R / B, the share of computed token slots packing saves}.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) != num_samples:
        raise ValueError(f"rows_for_run: {len(lengths)} lengths for num_samples={num_samples}")
    steps = orders.steps_per_epoch(num_samples, batch_size)
    per_batch = []  # rows each batch needs
    for epoch in range(epochs):
        for k in range(num_replicas):
            order = orders.epoch_order(data_seed, k, epoch, num_samples, batch_size,
                                       fixed_intra_batch).reshape(steps, batch_size)
            per_batch += [len(packing.first_fit_decreasing(batch, seq_len))
                          for batch in np.where(order >= 0, lengths[np.maximum(order, 0)], 0)]
    needed, batches = max(per_batch, default=0), len(per_batch)
    rows = -(-max(needed, 1) // multiple_of) * multiple_of
    tokens = epochs * num_replicas * int(lengths.sum())
    batches_ = max(batches, 1)  # no training data: nothing to pack, nothing saved
    return {"rows": rows, "rows_needed": needed,
            "rows_mean": float(np.mean(per_batch)) if per_batch else 0.0,
            "batch_size": batch_size, "seq_len": seq_len, "batches": batches,
            "padding_unpacked": 1.0 - tokens / (batches_ * batch_size * seq_len),
            "padding_packed": 1.0 - tokens / (batches_ * rows * seq_len),
            "slots_saved": 1.0 - rows / batch_size}
