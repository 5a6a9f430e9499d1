"""An offline task generated in code: multi-step arithmetic word problems.

Everything here is a pure function of a seed, so the tiny default config runs
on any machine without downloads:

* `make_problems(n, seed)`: word problems with a chain-of-thought solution and
  a numeric answer, e.g.

      Q: Ann has 7 pens . She buys 5 more . Then she loses 3 . How many pens does
      Ann have now ?
      A: 7 + 5 = 12 . 12 - 3 = 9 . #### 9

* `make_corpus(n, seed, qa_fraction)`: a pre-training corpus in the same small
  language (arithmetic facts and short narratives, and optionally solved word
  problems with larger starting amounts than the task's, so never a task
  problem), used to make a base model that knows the words, some arithmetic
  and, with qa_fraction > 0, the task family before fine-tuning.
* `WordTokenizer`: a closed-vocabulary tokenizer for that language; numbers are
  split into digits as in real LLM tokenizers.

Splits are disjoint: a problem's text decides its split (by a stable hash), so
no test question also appears in training.
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import numpy as np

NAMES = ("Ann", "Ben", "Cal", "Dia", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Leo")
PRONOUN = {n: ("She" if n in ("Ann", "Dia", "Eve", "Fay", "Ivy", "Kim") else "He") for n in NAMES}
ITEMS = ("apples", "pens", "cards", "coins", "books", "eggs", "shells", "stamps", "cups", "keys")
GAIN_VERBS = ("buys", "finds", "gets", "wins")
LOSS_VERBS = ("loses", "sells", "gives away", "uses")
FILLER = ("Then", "Later", "Next")

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
_WORDS = sorted({w for phrase in (NAMES + ITEMS + GAIN_VERBS + LOSS_VERBS + FILLER)
                 for w in phrase.split()} | {
    "has", "She", "He", "more", "How", "many", "does", "have", "now", "Q", "A",
    "she", "he"})
_SYMBOLS = ("+", "-", "=", ".", "?", ":", "####", ",")
VOCAB = SPECIAL_TOKENS + tuple(str(d) for d in range(10)) + _SYMBOLS + tuple(_WORDS)
_TOKEN_RE = re.compile(r"####|\d|[A-Za-z]+|[^\sA-Za-z\d]")


class WordTokenizer:
    """Closed-vocabulary tokenizer of the synthetic language.

    Text is split into words, single digits and symbols; `decode` joins tokens
    with spaces except between digits, so numbers come back intact.
    """

    def __init__(self, vocab: Sequence[str] = VOCAB):
        self.vocab = tuple(vocab)
        self._index = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
            self._index[t] for t in SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self._index.get(t, self.unk_id) for t in _TOKEN_RE.findall(text)]

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i in (self.pad_id, self.bos_id):
                continue
            if i == self.eos_id:
                break
            tok = self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>"
            if out and tok.isdigit() and out[-1][-1:].isdigit():
                out[-1] += tok
            else:
                out.append(tok)
        return " ".join(out)


# Starting amounts: the task's problems start at 2-9; the pre-training corpus's
# solved problems start at 10-29, so no corpus problem can be a task problem.
TASK_START = (2, 10)
CORPUS_QA_START = (10, 30)


def _problem(rng: np.random.Generator, start: tuple[int, int] = TASK_START) -> dict:
    name = NAMES[rng.integers(len(NAMES))]
    item = ITEMS[rng.integers(len(ITEMS))]
    value = int(rng.integers(*start))
    sentences = [f"{name} has {value} {item} ."]
    steps = []
    for j in range(int(rng.integers(2, 4))):
        if value > 2 and rng.random() < 0.5:
            amount = int(rng.integers(1, value))
            verb = LOSS_VERBS[rng.integers(len(LOSS_VERBS))]
            new = value - amount
            steps.append(f"{value} - {amount} = {new} .")
        else:
            amount = int(rng.integers(1, 10))
            verb = GAIN_VERBS[rng.integers(len(GAIN_VERBS))]
            new = value + amount
            steps.append(f"{value} + {amount} = {new} .")
        subject = PRONOUN[name]
        if j > 0:
            subject = f"{FILLER[rng.integers(len(FILLER))]} {subject.lower()}"
        amount_text = f"{amount} more" if verb in GAIN_VERBS else f"{amount}"
        sentences.append(f"{subject} {verb} {amount_text} .")
        value = new
    question = " ".join(sentences) + f" How many {item} does {name} have now ?"
    return {"question": question, "solution": " ".join(steps) + f" #### {value}",
            "answer": value}


def _split_of(text: str) -> str:
    # Stable across runs and machines (unlike hash()): 80/10/10 by crc32.
    bucket = zlib.crc32(text.encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def make_problems(num_train: int, num_validation: int, num_test: int, seed: int) -> dict:
    """Generates disjoint splits of distinct word problems.

    Returns:
      {"train": [...], "validation": [...], "test": [...]}, each a list of dicts
      with keys id (stable int: order of generation within the split), question,
      solution, answer.
    Raises:
      ValueError: if the generator cannot find enough distinct problems.
    """
    want = {"train": num_train, "validation": num_validation, "test": num_test}
    out: dict[str, list] = {k: [] for k in want}
    seen: set[str] = set()
    rng = np.random.default_rng([seed, 7])
    for _ in range(50 * sum(want.values()) + 1000):
        if all(len(out[k]) >= want[k] for k in want):
            break
        p = _problem(rng)
        if p["question"] in seen:
            continue
        seen.add(p["question"])
        split = _split_of(p["question"])
        if len(out[split]) < want[split]:
            p["id"] = len(out[split])
            out[split].append(p)
    short = {k: (len(out[k]), want[k]) for k in want if len(out[k]) < want[k]}
    if short:
        raise ValueError(f"could only generate {short} (got, wanted) distinct problems; "
                         "ask for fewer")
    return out


def make_corpus(num_documents: int, seed: int, qa_fraction: float = 0.0) -> list[str]:
    """Pre-training documents: arithmetic facts and narratives, and (a share
    `qa_fraction` of the documents) solved word problems in the task's Q/A format.

    The solved problems are of the same family as the task but start at
    CORPUS_QA_START amounts (10-29) instead of the task's 2-9, so the base learns
    the format and the chain of thought without seeing any task problem (train,
    validation or test). With qa_fraction 0 the corpus is the facts and narratives
    only, identical to what it was before the option existed.
    """
    if not 0.0 <= qa_fraction <= 1.0:
        raise ValueError(f"qa_fraction must be in [0, 1], got {qa_fraction!r}")
    rng = np.random.default_rng([seed, 11])
    # A separate stream for the Q/A documents, so the other documents do not
    # depend on qa_fraction.
    qa_rng = np.random.default_rng([seed, 13])
    docs = []
    for _ in range(num_documents):
        if qa_fraction > 0 and qa_rng.random() < qa_fraction:
            p = _problem(qa_rng, CORPUS_QA_START)
            docs.append(format_prompt(p) + format_response(p))
            continue
        parts = []
        for _ in range(int(rng.integers(3, 7))):
            kind = rng.random()
            a, b = int(rng.integers(0, 31)), int(rng.integers(0, 31))
            if kind < 0.35:
                parts.append(f"{a} + {b} = {a + b} .")
            elif kind < 0.6:
                hi, lo = max(a, b), min(a, b)
                parts.append(f"{hi} - {lo} = {hi - lo} .")
            else:
                p = _problem(rng)
                parts.append(p["question"].rsplit(" How many", 1)[0])
        docs.append(" ".join(parts))
    return docs


def format_prompt(problem: dict) -> str:
    return f"Q : {problem['question']} A :"


def format_response(problem: dict) -> str:
    return f" {problem['solution']}"
