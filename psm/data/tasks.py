"""Tasks as the trainer sees them: splits with stable ids, a prompt/response
format, a tokenizer, and a scorer for generated text; plus the encoders that
turn splits and corpora into static-shape arrays.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

from psm.data import packing, synthetic, tokenize


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


def encode_split(task: Task, split: str, max_len: int,
                 truncation: str = "prompt_left") -> tuple[dict[str, np.ndarray], dict]:
    """Tokenizes a split into one-example-per-row arrays with a response-only loss mask.

    Returns:
      arrays: tokens, targets, segment_ids, positions `[N, max_len]` int32 and
        loss_mask `[N, max_len]` float32 (see `psm.data.packing`).
      stats: truncation counts (`psm.data.tokenize.TruncationStats`), never silent.
    """
    examples, stats = tokenize.tokenize_records(
        task.tokenizer, task.splits[split], lambda e: (task.prompt(e), task.response(e)),
        max_len=max_len, truncation=truncation)
    arrays = packing.pad_examples(examples, max_len, pad_id=task.tokenizer.pad_id)
    return {k: arrays[k] for k in packing.ARRAY_KEYS}, stats.as_dict()


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
