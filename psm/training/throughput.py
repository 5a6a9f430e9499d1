"""Training speed: model FLOPs per token, the accelerator's peak, and a step timer.

FLOPs are *model* FLOPs (what the architecture needs, not what the compiled
program happens to execute: rematerialisation is not counted), per token of
one training step (forward + backward = 3 x forward), in the form of the PaLM
paper (Chowdhery et al. 2022, appendix B), which MaxText also uses:

    6 N  +  12 L H Q T

  N  non-embedding parameters (each weight costs 2 FLOPs per token forward,
     4 backward); embedding lookups are gathers and cost nothing;
  L  layers, H query heads, Q head dim, T the sequence length: the two
     attention matmuls (QK^T and AV), 2 x 2 L H Q T forward, x 3 for training.

No causal halving is applied to the attention term: the decoder masks a full
`[T, T]` score matrix (segment ids), so all of it is computed, and PaLM's form
counts it whole (newer MaxText halves it for causal models; our decoder MFU is
therefore PaLM's, slightly above MaxText's at long sequences).

The output (vocabulary) projection is a matmul whatever the storage, so it adds
`6 D V` per token for decoders whether or not the embeddings are tied.

MFU = achieved model FLOP/s / (peak dense bf16 FLOP/s per device x devices).
Peaks are looked up by `jax.devices()[0].device_kind` in `PEAK_BF16_FLOPS`;
an unknown kind (the CPU) has none, and MFU is then omitted (None).
"""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np

from psm.models import bert, llama

PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    # (substring of device_kind, lower-cased; dense bf16 FLOP/s per device). First match wins,
    # so the more specific names come first.
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),  # SXM
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e reports itself as "TPU v5 lite"
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports itself as "TPU v5"
)
"""Dense (no sparsity) bf16 peak of one device, from the vendors' data sheets."""


def peak_flops(device_kind: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device of `device_kind` (default: the first
    visible device's), or None when the kind is not in `PEAK_BF16_FLOPS` (CPUs)."""
    kind = (jax.devices()[0].device_kind if device_kind is None else device_kind).lower()
    for name, peak in PEAK_BF16_FLOPS:
        if name in kind:
            return peak
    return None


def llama_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token of a `psm.models.llama.LlamaConfig` at sequence length `seq_len`.

    N (non-embedding) per layer: q, k, v, o projections `D*H*Q + 2*D*KV*Q + H*Q*D`,
    the SwiGLU MLP `3*D*F`, two RMSNorm scales `2*D`; plus the final norm `D`.
    Then `6 N + 12 L H Q T + 6 D V` (the vocabulary projection, tied or not).
    """
    d, f, q = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
    h, kv, n_layers, v = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, cfg.vocab_size
    per_layer = d * h * q + 2 * d * kv * q + h * q * d + 3 * d * f + 2 * d
    n = n_layers * per_layer + d
    return float(6 * n + 12 * n_layers * h * q * seq_len + 6 * d * v)


def bert_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token of a `psm.models.bert.BertConfig` encoder with its head.

    Bidirectional attention: the whole `[T, T]` score matrix is real work, so
    the attention term is PaLM's `12 L H Q T` with Q = D / H (H Q = D), and
    there is no vocabulary projection (the head classifies the sequence).
    N per token: per layer the q, k, v, out projections with biases `4*(D*D + D)`,
    the MLP `D*F + F + F*D + D`, two LayerNorms `4*D`; plus the embedding
    LayerNorm `2*D`. The pooler `D*D + D` and the classifier `D*C + C` run once
    per sequence (on the first token), so they add `6 * (their parameters) / T`.
    """
    d, f, n_layers, c = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_labels
    per_layer = 4 * (d * d + d) + (d * f + f + f * d + d) + 4 * d
    n = n_layers * per_layer + 2 * d
    head = (d * d + d if cfg.add_pooler else 0) + (d * c + c if c else 0)
    return float(6 * n + 12 * n_layers * d * seq_len + 6 * head / seq_len)


def flops_per_token(cfg, seq_len: int) -> float:
    """`llama_flops_per_token` or `bert_flops_per_token`, by the config's type."""
    if isinstance(cfg, llama.LlamaConfig):
        return llama_flops_per_token(cfg, seq_len)
    if isinstance(cfg, bert.BertConfig):
        return bert_flops_per_token(cfg, seq_len)
    raise TypeError(f"no FLOP count for a {type(cfg).__name__}; expected LlamaConfig or "
                    "BertConfig")


def row_loss_tokens(batch: dict) -> np.ndarray:
    """Tokens that carry loss in each row of a host batch `[..., T]` -> `[...]`.

    Decoders: the `loss_mask` ones. Encoders (batches with `attention` and a
    per-row `weight`): the non-padding tokens of the real rows (every one of
    them feeds the sequence's prediction).
    """
    if "loss_mask" in batch:
        return np.sum(batch["loss_mask"], axis=-1)
    return np.sum(batch["attention"], axis=-1) * np.asarray(batch["weight"])


def token_counts(batch: dict) -> tuple[int, int]:
    """(all tokens, tokens that carry loss) of a host batch `[K, B, T]` (numpy).

    All tokens: every slot the step computes, `K * B * T` (padding included:
    it is computed). Loss tokens: `row_loss_tokens`, summed.
    """
    return int(np.size(batch["tokens"])), int(round(float(np.sum(row_loss_tokens(batch)))))


class BatchTokenCounter:
    """`token_counts` of the batch of examples `indices`, without gathering the batch.

    The training loop's batches are built on the devices' shards (several
    processes build their own parts), so counting them on the host would mean
    gathering every batch a second time; instead each example's loss tokens are
    counted once here, through the unpacked `gather`, and a batch's counts are
    sums over its indices (-1: a padding slot, no loss tokens).

    Packed batches (`rows`: each replica's B examples in R rows of T tokens,
    `psm.data.packed_batches`) compute R * T slots per replica; their loss
    tokens are the same examples' and are counted the same way.
    """

    def __init__(self, gather, arrays: dict, rows: int | None = None):
        """gather: the loop's one-example-per-row `(arrays, indices) -> batch` (decoder
        or encoder); rows: R when the loop packs its batches, None when it does not."""
        rows_of = gather(arrays, np.arange(len(arrays["tokens"])))
        self._row_len = int(rows_of["tokens"].shape[-1])
        self._row_loss = row_loss_tokens(rows_of)
        self._rows = rows

    def __call__(self, indices, length: int | None = None) -> tuple[int, int]:
        """(all token slots, loss tokens) of the batch of `indices` `[..., B]`, whose rows
        hold `length` tokens (None: all T; cut encoder batches are shorter)."""
        indices = np.asarray(indices)
        loss = float(np.sum(self._row_loss[indices[indices >= 0]]))
        rows = indices.size if self._rows is None else (
            indices.size // indices.shape[-1] * self._rows)
        return int(rows * (length or self._row_len)), int(round(loss))


class StepTimer:
    """Wall time and tokens of the timed training steps, read window by window.

    The caller starts the clock after the first (compiling) step has finished
    (`start`), adds each later step's tokens (`add`), wraps evaluation and
    checkpointing in `excluded()` so their time is not counted, and calls
    `lap()` at a log boundary once the state is ready (`block_until_ready`):
    the window's step time is its wall time minus the excluded time, divided
    by its steps. Host work of a step (gathering the batch, `device_put`) is
    part of the step time.
    """

    def __init__(self, flops_per_token: float | None = None, peak: float | None = None,
                 devices: int = 1):
        self.flops_per_token, self.peak, self.devices = flops_per_token, peak, devices
        self._t0 = None
        self._excluded = 0.0
        self._steps = self._tokens = self._loss_tokens = 0
        self.total = {"steps": 0, "seconds": 0.0, "tokens": 0, "loss_tokens": 0}

    @property
    def running(self) -> bool:
        return self._t0 is not None

    def start(self) -> None:
        """Starts (or restarts) the clock with an empty window."""
        self._t0, self._excluded = time.perf_counter(), 0.0
        self._steps = self._tokens = self._loss_tokens = 0

    def add(self, tokens: int, loss_tokens: int) -> None:
        """One more timed step of `tokens` tokens, `loss_tokens` of which carry loss."""
        self._steps += 1
        self._tokens += tokens
        self._loss_tokens += loss_tokens

    @contextlib.contextmanager
    def excluded(self):
        """Context manager: the time spent inside is not step time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t

    def lap(self) -> dict:
        """The window's speed as metrics, then a new window. {} when no step was timed.

        Returns:
          {"perf/step_time_s", "perf/tokens_per_s", "perf/loss_tokens_per_s"} and
          "perf/mfu" when the peak is known.
        """
        if self._t0 is None:
            return {}
        seconds = time.perf_counter() - self._t0 - self._excluded
        steps, tokens, loss_tokens = self._steps, self._tokens, self._loss_tokens
        self.start()
        if not steps or seconds <= 0:
            return {}
        for key, value in (("steps", steps), ("seconds", seconds), ("tokens", tokens),
                           ("loss_tokens", loss_tokens)):
            self.total[key] += value
        return self._rates(steps, seconds, tokens, loss_tokens)

    def _rates(self, steps, seconds, tokens, loss_tokens) -> dict:
        out = {"perf/step_time_s": seconds / steps, "perf/tokens_per_s": tokens / seconds,
               "perf/loss_tokens_per_s": loss_tokens / seconds}
        mfu = self.mfu(tokens / seconds)
        if mfu is not None:
            out["perf/mfu"] = mfu
        return out

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation at `tokens_per_s` (None without a peak or a count)."""
        if self.peak is None or self.flops_per_token is None:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak * self.devices)

    def summary(self) -> dict:
        """The run's speed for results.json: totals over every timed step (so the mean
        rates are total tokens / total seconds); rates None when nothing was timed."""
        t = self.total
        rate = (lambda n: n / t["seconds"]) if t["seconds"] > 0 else (lambda n: None)
        tokens_per_s = rate(t["tokens"])
        return {"tokens_per_s": tokens_per_s, "loss_tokens_per_s": rate(t["loss_tokens"]),
                "mfu": None if tokens_per_s is None else self.mfu(tokens_per_s),
                "step_time_s": t["seconds"] / t["steps"] if t["steps"] else None,
                "timed_steps": t["steps"], "timed_seconds": t["seconds"],
                "flops_per_token": self.flops_per_token, "peak_flops_per_device": self.peak,
                "devices": self.devices}
