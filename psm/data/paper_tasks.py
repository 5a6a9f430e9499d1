"""The paper's tasks as trainer `Task`s: GSM8K, MATH, Alpaca, HumanEval, GLUE.

Data comes from `psm.data.sources` (TFDS builders, local folder or download),
prompts from `psm.data.prompts`, scores from `psm.evaluation.*`. Splits:

  train       the source's train split (HumanEval: a user-supplied instruction
              file, `config.task.train_file`, JSONL or Alpaca JSON), minus the
              held-out validation examples;
  validation  `num_validation` examples held out from train by a seeded draw
              (none of these sources ships a labelled validation split we keep
              for testing; GLUE's labelled validation split is the test set);
  test        the source's test split (GLUE: its validation split).

Ids are the sources' stable ids, so per-sample records join across runs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from psm.data import jsonl, prompts, sources
from psm.data.tasks import Task
from psm.evaluation import glue as glue_eval
from psm.evaluation import gsm8k as gsm8k_eval
from psm.evaluation import humaneval as humaneval_eval
from psm.evaluation import math as math_eval

GLUE_TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")
PAPER_TASKS = ("gsm8k", "math", "alpaca", "humaneval") + GLUE_TASKS


class ModelTokenizer:
    """Adapts a model tokenizer to what tokenization and decoding expect.

    `encode` adds no special tokens (BOS is added once, by the tokenizer of
    pairs, and only for models whose tokenizer adds one itself); `decode` stops
    at EOS and drops special tokens.
    """

    def __init__(self, tok):
        self.tok = tok
        with_special = tok.encode("a", add_special_tokens=True)
        plain = tok.encode("a", add_special_tokens=False)
        self.bos_id = with_special[0] if len(with_special) > len(plain) else None
        self.eos_id = tok.eos_id
        self.pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
        self.vocab_size = tok.vocab_size
        self.chat_template = getattr(tok, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)


def _data_root(cfg) -> str | None:
    root = cfg.get("data_dir", "") or os.environ.get("PSM_DATA_DIR", "")
    return os.path.abspath(root) if root else None


def _split_off(records: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Holds out `n` records by a seeded draw: returns (kept, held out), each in id order."""
    if n >= len(records):
        raise ValueError(f"config.task.num_validation ({n}) must be smaller than the "
                         f"{len(records)} training examples")
    held = set(np.random.default_rng([seed, 5]).choice(len(records), n, replace=False).tolist())
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def _first(records: list[dict], n: int) -> list[dict]:
    return records if not n else records[:n]


def _glue_scorer(task: str):
    if task == "stsb":
        def score(text: str, ex: dict) -> dict:
            num = gsm8k_eval.extract_answer(text)
            try:
                value = float(num) if num is not None else None
            except ValueError:
                value = None
            # STS-B is scored by correlation; an exact match within 0.5 is a
            # readable per-example proxy.
            return {"correct": value is not None and abs(value - ex["label"]) <= 0.5,
                    "extracted": value}
        return score
    words = {prompts.glue_response(task, i).strip().lower(): i
             for i in range(len(prompts.GLUE_LABEL_WORDS[task]))}

    def score(text: str, ex: dict) -> dict:
        first = text.strip().split()[0].strip(".,!").lower() if text.strip() else ""
        label = words.get(first)
        return {"correct": label == int(ex["label"]), "extracted": label}
    return score


def _humaneval_score(text: str, ex: dict) -> dict:
    result = humaneval_eval.score(humaneval_eval.truncate_completion(text), ex)
    return {"correct": bool(result["correct"]), "extracted": result["status"]}


def _instruction_file(path: str) -> list[dict]:
    """User SFT data for HumanEval: JSONL or Alpaca JSON of instruction/input/output."""
    if not path:
        raise ValueError("config.task.train_file must name an instruction dataset (JSONL or "
                         "Alpaca JSON with instruction/input/output) for HumanEval, which has "
                         "no training split")
    records = (jsonl.read_jsonl(path, ("instruction", "output"))
               if path.endswith((".jsonl", ".jsonl.gz"))
               else jsonl.read_json_records(path, ("instruction", "output")))
    return [dict(r, id=i, input=r.get("input", "")) for i, r in enumerate(records)]


def paper_task(cfg, tokenizer) -> Task:
    """Builds the task named `cfg.name` (one of PAPER_TASKS) for a model's tokenizer.

    Args:
      cfg: config.task (name, data_dir, num_train, num_validation, num_test,
        seed, chat_template, train_file).
      tokenizer: the model's tokenizer (`psm.models.tokenizer.Tokenizer`).
    """
    name = cfg.name
    if name not in PAPER_TASKS:
        raise ValueError(f"unknown config.task.name {name!r}; known: {sorted(PAPER_TASKS)}")
    root = _data_root(cfg)
    load = lambda task, split: sources.load(task, split, manual_dir=root)  # noqa: E731
    if name == "humaneval":
        train, test = _instruction_file(cfg.get("train_file", "")), load("humaneval", "test")
        fmt_train, fmt_test = prompts.alpaca, prompts.humaneval
    elif name in GLUE_TASKS:
        train, test = load(name, "train"), load(name, "validation")
        fmt_train = fmt_test = prompts.glue(name)
    elif name == "alpaca":
        records = load("alpaca", "train")
        train, test = _split_off(records, min(cfg.num_test or 100, len(records) // 10), cfg.seed)
        fmt_train = fmt_test = prompts.alpaca
    else:
        train, test = load(name, "train"), load(name, "test")
        fmt_train = fmt_test = getattr(prompts, name)
    train, validation = _split_off(train, cfg.num_validation, cfg.seed)
    splits = {"train": _first(train, cfg.num_train), "validation": validation,
              "test": _first(test, cfg.num_test)}
    tok = ModelTokenizer(tokenizer)
    use_chat = bool(cfg.get("chat_template", False))
    if use_chat and not tok.chat_template:
        raise ValueError("config.task.chat_template is True but the model's tokenizer has no "
                         "chat template; set it to False")

    test_objects = {id(ex) for ex in splits["test"]}  # ids may repeat across sources

    def pair(ex: dict) -> tuple[str, str]:
        fmt = fmt_test if id(ex) in test_objects else fmt_train
        p, r = fmt(ex)
        return prompts.chat_pair(p, r, tok.chat_template) if use_chat else (p, r)

    scorers: dict[str, Any] = {
        "gsm8k": lambda text, ex: gsm8k_eval.score(text, ex["answer"]),
        "math": lambda text, ex: math_eval.score(text, ex["solution"]),
        "alpaca": lambda text, ex: {"correct": False, "extracted": None},  # loss-only task
        "humaneval": _humaneval_score,
    }
    score = scorers[name] if name in scorers else _glue_scorer(name)
    return Task(name=name, splits=splits, tokenizer=tok, prompt=lambda ex: pair(ex)[0],
                response=lambda ex: pair(ex)[1], score=score)
