"""Tasks as the trainer sees them: splits with stable ids, a prompt/response
format, a tokenizer, and a scorer for generated text.

`encode_sft` turns (prompt, response) pairs into static-shape arrays with the
loss on the response tokens only. Truncation is counted and returned, never
silent.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

from psm.data import synthetic


@dataclasses.dataclass
class Task:
    """Everything the trainer needs to know about a fine-tuning task.

    Attributes:
      name: task name (config.task.name).
      splits: split name -> list of example dicts, each with an int `id`.
      tokenizer: object with encode/decode, bos_id, eos_id, pad_id, vocab_size.
      prompt: example -> prompt text.
      response: example -> target text (what carries loss).
      score: (generated text, example) -> dict with at least `correct` (bool)
        and `extracted` (the answer found in the text, or None).
    """

    name: str
    splits: dict[str, list[dict]]
    tokenizer: Any
    prompt: Callable[[dict], str]
    response: Callable[[dict], str]
    score: Callable[[str, dict], dict]


_ANSWER_RE = re.compile(r"####\s*(-?\d+)")


def score_numeric(text: str, example: dict) -> dict:
    """Exact match of the number after '####' with `example['answer']`."""
    m = _ANSWER_RE.search(text)
    extracted = int(m.group(1)) if m else None
    return {"correct": extracted == example["answer"], "extracted": extracted}


def arithmetic_task(cfg) -> Task:
    """The offline synthetic word-problem task (config.task.name == 'arithmetic')."""
    splits = synthetic.make_problems(cfg.num_train, cfg.num_validation, cfg.num_test, cfg.seed)
    return Task(name="arithmetic", splits=splits, tokenizer=synthetic.WordTokenizer(),
                prompt=synthetic.format_prompt, response=synthetic.format_response,
                score=score_numeric)


TASKS = {"arithmetic": arithmetic_task}


def get_task(cfg) -> Task:
    """Builds the task named by `config.task.name`."""
    if cfg.name not in TASKS:
        raise ValueError(f"unknown config.task.name {cfg.name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[cfg.name](cfg)


def encode_sft(tokenizer, prompts: Sequence[str], responses: Sequence[str],
               max_len: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Tokenizes prompt/response pairs into padded arrays; loss on the response only.

    Each row is `[bos] prompt response [eos]`, shifted into inputs and next-token
    targets. A row longer than `max_len + 1` tokens loses the end of its response.

    Returns:
      arrays: tokens, targets, segment_ids, positions `[N, max_len]` int32 and
        loss_mask `[N, max_len]` float32.
      stats: {"examples": N, "truncated": number of rows cut}.
    """
    n = len(prompts)
    tokens = np.full((n, max_len + 1), tokenizer.pad_id, np.int32)
    loss = np.zeros((n, max_len + 1), np.float32)
    seg = np.zeros((n, max_len + 1), np.int32)
    truncated = 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p_ids = [tokenizer.bos_id] + tokenizer.encode(p)
        r_ids = tokenizer.encode(r) + [tokenizer.eos_id]
        ids = (p_ids + r_ids)
        if len(ids) > max_len + 1:
            truncated += 1
            ids = ids[:max_len + 1]
        tokens[i, :len(ids)] = ids
        loss[i, len(p_ids):len(ids)] = 1.0
        seg[i, :len(ids)] = 1
    arrays = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        # The target at position t is token t+1: it carries loss if token t+1 is
        # part of the response.
        "loss_mask": loss[:, 1:],
        "segment_ids": seg[:, :-1],
        "positions": np.broadcast_to(np.arange(max_len, dtype=np.int32), (n, max_len)).copy(),
    }
    return arrays, {"examples": n, "truncated": truncated}


def encode_lm(tokenizer, documents: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Concatenates documents (each `[bos] doc [eos]`) and cuts rows of `max_len` tokens.

    Returns arrays like `encode_sft`, with loss on every target (pre-training).
    """
    stream = []
    for d in documents:
        stream += [tokenizer.bos_id] + tokenizer.encode(d) + [tokenizer.eos_id]
    rows = (len(stream) - 1) // max_len
    if rows < 1:
        raise ValueError(f"pre-training corpus has {len(stream)} tokens, fewer than one row "
                         f"of {max_len}")
    ids = np.asarray(stream[:rows * max_len + 1], np.int32)
    tokens = np.stack([ids[i * max_len:(i + 1) * max_len] for i in range(rows)])
    targets = np.stack([ids[i * max_len + 1:(i + 1) * max_len + 1] for i in range(rows)])
    return {
        "tokens": tokens, "targets": targets,
        "loss_mask": np.ones_like(tokens, np.float32),
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(max_len, dtype=np.int32), tokens.shape).copy(),
    }


def gather_batch(arrays: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `indices` (any shape, e.g. `[K, B]`; -1 = padding row with no loss)."""
    safe = np.maximum(indices, 0)
    out = {k: v[safe] for k, v in arrays.items()}
    out["loss_mask"] = out["loss_mask"] * (indices >= 0)[..., None]
    return out
