"""Tokenization of (prompt, response) pairs with a response-only loss mask.

A tokenized example is `[BOS] + encode(prompt) + encode(response) + [EOS]`.
Its loss mask is True on the response tokens and the EOS (the tokens the
model learns to produce) and False on BOS and the prompt. `loss_mask[i]`
refers to token `i` as a *target*: `psm.data.packing` shifts it onto the
position that predicts token `i`.

Truncation to `max_len` tokens is never silent: every example records how many
prompt and response tokens it lost, and `TruncationStats` sums them up.
Policies (`truncation=`):
  "prompt_left" (default): drop prompt tokens from the left (the start of the
    prompt, after BOS), keeping the whole response; only when BOS + response +
    EOS alone exceed `max_len` is the prompt dropped entirely and the response
    cut from the right (then the EOS goes first).
  "response_right": cut the response from the right (EOS first), keeping the
    whole prompt; only when BOS + prompt alone exceed `max_len` is the response
    dropped entirely and the prompt cut from the left.
  "error": raise ValueError naming the example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

TRUNCATION_POLICIES = ("prompt_left", "response_right", "error")


@runtime_checkable
class Tokenizer(Protocol):
    """What tokenization needs: `encode` without special tokens, plus BOS/EOS ids.

    `bos_id` may be None for models trained without a BOS token.
    """

    bos_id: int | None
    eos_id: int

    def encode(self, text: str) -> list[int]:
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 pad, 1 BOS, 2 EOS, byte b -> b + 3 (vocab 259).

    A dependency-free tokenizer for offline runs and tests.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One tokenized example.

    Attributes:
      id: the stable id of the source record.
      tokens: `[L]` int32 token ids, L <= max_len.
      loss_mask: `[L]` bool, True on response tokens and EOS.
      prompt_dropped: prompt tokens removed by truncation.
      response_dropped: response tokens removed by truncation (EOS included).
    """

    id: int
    tokens: np.ndarray
    loss_mask: np.ndarray
    prompt_dropped: int = 0
    response_dropped: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def truncated(self) -> bool:
        return self.prompt_dropped > 0 or self.response_dropped > 0


@dataclasses.dataclass
class TruncationStats:
    """Counts over a tokenized dataset.

    Attributes:
      examples: examples tokenized.
      truncated: examples that lost at least one token.
      prompt_truncated / response_truncated: examples that lost prompt /
        response tokens.
      prompt_tokens_dropped / response_tokens_dropped: tokens lost in total.
      no_loss_tokens: examples left with an all-False loss mask (they teach
        nothing; a trainer may want to drop them).
      max_len_seen: the longest untruncated length (to choose `max_len`).
    """

    examples: int = 0
    truncated: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    prompt_tokens_dropped: int = 0
    response_tokens_dropped: int = 0
    no_loss_tokens: int = 0
    max_len_seen: int = 0

    def add(self, ex: TokenizedExample, full_len: int) -> None:
        self.examples += 1
        self.truncated += int(ex.truncated)
        self.prompt_truncated += int(ex.prompt_dropped > 0)
        self.response_truncated += int(ex.response_dropped > 0)
        self.prompt_tokens_dropped += ex.prompt_dropped
        self.response_tokens_dropped += ex.response_dropped
        self.no_loss_tokens += int(not ex.loss_mask.any())
        self.max_len_seen = max(self.max_len_seen, full_len)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def tokenize_pair(tokenizer: Tokenizer, prompt: str, response: str, *, max_len: int,
                  truncation: str = "prompt_left", add_eos: bool = True,
                  example_id: int = 0) -> tuple[TokenizedExample, int]:
    """Tokenizes one pair; returns the example and its untruncated length.

    Args:
      tokenizer: see `Tokenizer`.
      prompt, response: the two texts (see `psm.data.prompts`).
      max_len: the most tokens an example may have (BOS and EOS included).
      truncation: one of `TRUNCATION_POLICIES` (see the module docstring).
      add_eos: end with EOS (inside the loss mask).
      example_id: the record's stable id (kept on the example, named in errors).
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation={truncation!r}; expected one of {TRUNCATION_POLICIES}")
    bos = [] if tokenizer.bos_id is None else [int(tokenizer.bos_id)]
    if max_len <= len(bos):
        raise ValueError(f"max_len={max_len} leaves no room after BOS")
    p = [int(t) for t in tokenizer.encode(prompt)]
    r = [int(t) for t in tokenizer.encode(response)] + ([int(tokenizer.eos_id)] if add_eos else [])
    full_len = len(bos) + len(p) + len(r)
    excess = full_len - max_len
    p_drop = r_drop = 0
    if excess > 0:
        if truncation == "error":
            raise ValueError(
                f"example id {example_id}: {full_len} tokens (prompt {len(p)}, response "
                f"{len(r)}) exceed max_len={max_len}; raise max_len or choose another "
                f"truncation policy {TRUNCATION_POLICIES}")
        if truncation == "prompt_left":
            p_drop = min(excess, len(p))
            r_drop = excess - p_drop
        else:
            r_drop = min(excess, len(r))
            p_drop = excess - r_drop
        p = p[p_drop:]
        r = r[:len(r) - r_drop]
    tokens = np.asarray(bos + p + r, dtype=np.int32)
    mask = np.zeros(tokens.shape, dtype=bool)
    mask[len(bos) + len(p):] = True
    return TokenizedExample(int(example_id), tokens, mask, p_drop, r_drop), full_len


def tokenize_records(tokenizer: Tokenizer, records: Iterable[Mapping],
                     format_fn: Callable[[Mapping], tuple[str, str]], *, max_len: int,
                     truncation: str = "prompt_left", add_eos: bool = True,
                     ) -> tuple[list[TokenizedExample], TruncationStats]:
    """Formats and tokenizes records (each with an `id`); returns examples and stats.

    Args:
      tokenizer: see `Tokenizer`.
      records: records from `psm.data.sources.load`.
      format_fn: record -> (prompt, response), e.g. `psm.data.prompts.gsm8k`.
      max_len, truncation, add_eos: see `tokenize_pair`.
    """
    out, stats = [], TruncationStats()
    for rec in records:
        prompt, response = format_fn(rec)
        ex, full_len = tokenize_pair(tokenizer, prompt, response, max_len=max_len,
                                     truncation=truncation, add_eos=add_eos,
                                     example_id=rec["id"])
        stats.add(ex, full_len)
        out.append(ex)
    return out, stats
