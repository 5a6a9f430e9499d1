"""Prompt formats: one function per task, example -> (prompt, response).

The loss is taken on the response only (see `psm.data.tokenize`), so the split
between the two strings is what the model is trained to produce. Responses
start with a space where the prompt ends in a word (`"Answer:"` + `" 72"`), so
that BPE tokenizers see the same word boundary as in running text when the two
parts are encoded separately.

Chat models: `chat_pair(prompt, response, template)` wraps a pair in a model's
chat template (a Jinja2 string, rendered the way Hugging Face `transformers`
does: sandboxed, `trim_blocks`, `lstrip_blocks`, `tojson`, `raise_exception`).
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

Pair = tuple[str, str]

# Stanford Alpaca's templates (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# Label words per GLUE task, indexed by the class index of `psm.data.builders.glue`.
# One common word each, so a classifier can compare the log-probabilities of
# `" " + word` after the prompt.
GLUE_LABEL_WORDS: Mapping[str, tuple[str, ...]] = {
    "cola": ("no", "yes"),           # 0 unacceptable, 1 acceptable
    "sst2": ("negative", "positive"),
    "mrpc": ("no", "yes"),           # 0 not_equivalent, 1 equivalent
    "rte": ("yes", "no"),            # 0 entailment, 1 not_entailment
    "wnli": ("no", "yes"),           # 0 not_entailment, 1 entailment
}
GLUE_QUESTIONS: Mapping[str, str] = {
    "cola": "Is this sentence grammatically acceptable?",
    "sst2": "Is the sentiment of this sentence positive or negative?",
    "mrpc": "Do the two sentences mean the same thing?",
    "rte": "Does the first sentence entail the second?",
    "wnli": "Does the first sentence entail the second?",
    "stsb": "How similar are the two sentences, from 0 to 5?",
}
_GSM8K_CALC = re.compile(r"<<[^>]*>>")


def alpaca(ex: Mapping) -> Pair:
    """Alpaca instruction, optional input -> Stanford Alpaca template; response = output."""
    # As in Stanford Alpaca: the input template whenever `input` is not "".
    template = ALPACA_PROMPT_INPUT if ex.get("input", "") != "" else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=ex["instruction"], input=ex.get("input", "")), \
        ex["output"]


def gsm8k_prompt(ex: Mapping) -> str:
    """'Question: ...\\nAnswer:'."""
    return f"Question: {ex['question']}\nAnswer:"


def gsm8k(ex: Mapping, *, keep_calculator: bool = True) -> Pair:
    """GSM8K: the full reference solution, ending in '#### N', is the response.

    Args:
      ex: a record with `question` and `answer`.
      keep_calculator: keep the `<<48/2=24>>` calculator notes of the reference
        solutions (as released); False drops them.
    """
    answer = ex["answer"] if keep_calculator else _GSM8K_CALC.sub("", ex["answer"])
    return gsm8k_prompt(ex), " " + answer


def math_prompt(ex: Mapping) -> str:
    """'Problem: ...\\nSolution:'."""
    return f"Problem: {ex['problem']}\nSolution:"


def math(ex: Mapping) -> Pair:
    """MATH: the worked solution (holding the final `\\boxed{}` answer) is the response."""
    return math_prompt(ex), " " + ex["solution"]


def humaneval(ex: Mapping) -> Pair:
    """HumanEval: the prompt (signature + docstring) and the canonical body."""
    return ex["prompt"], ex["canonical_solution"]


def glue_prompt(task: str, ex: Mapping) -> str:
    """The GLUE input (one sentence or a pair) and the task's question, ending in 'Answer:'."""
    if task not in GLUE_QUESTIONS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_QUESTIONS)}")
    if "sentence" in ex:
        text = f"Sentence: {ex['sentence']}\n"
    else:
        text = f"Sentence 1: {ex['sentence1']}\nSentence 2: {ex['sentence2']}\n"
    return f"{text}Question: {GLUE_QUESTIONS[task]}\nAnswer:"


def glue_response(task: str, label) -> str:
    """The label word (or the STS-B score with one decimal), with a leading space."""
    if task == "stsb":
        if label < 0:
            raise ValueError("stsb example has no score (label -1: GLUE test split)")
        return f" {float(label):.1f}"
    words = GLUE_LABEL_WORDS[task]
    if not 0 <= int(label) < len(words):
        raise ValueError(f"{task} example has no label (label {label}; GLUE test labels are "
                         f"hidden); expected a class index 0..{len(words) - 1}")
    return " " + words[int(label)]


def glue(task: str) -> Callable[[Mapping], Pair]:
    """The (prompt, response) function of one GLUE task."""
    if task not in GLUE_QUESTIONS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_QUESTIONS)}")

    def fmt(ex: Mapping) -> Pair:
        return glue_prompt(task, ex), glue_response(task, ex["label"])

    fmt.__name__ = f"glue_{task}"
    return fmt


PROMPT_FORMATS: Mapping[str, Callable[[Mapping], Pair]] = {
    "alpaca": alpaca, "alpaca_full": alpaca, "alpaca_1k": alpaca,
    "gsm8k": gsm8k, "math": math, "humaneval": humaneval,
    **{t: glue(t) for t in GLUE_QUESTIONS},
}


def format_example(task: str, ex: Mapping) -> Pair:
    """(prompt, response) of `ex` in the format of `task` (a `psm.data.sources` name)."""
    if task not in PROMPT_FORMATS:
        raise ValueError(f"no prompt format for task {task!r}; known: {sorted(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[task](ex)


# ---------------------------------------------------------------------------
# Chat templates


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own `tojson` escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # A chat template is untrusted code from a model repository: sandboxed.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def _require_template(template: str | None, owner: str) -> str:
    if not template:
        raise ValueError(
            f"{owner} has no chat template, but the config asks for one; use a plain prompt "
            "format (no chat template) or give a tokenizer that defines `chat_template`")
    return template


def apply_chat_template(messages: Sequence[Mapping[str, str]], template: str | None, *,
                        add_generation_prompt: bool = False, owner: str = "the tokenizer",
                        **variables) -> str:
    """Renders `messages` with a Jinja2 chat template, as `transformers` does.

    Args:
      messages: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`.
      template: the template string (e.g. a tokenizer's `chat_template`).
      add_generation_prompt: append the header of an assistant turn.
      owner: who the template belongs to, for the error message.
      **variables: extra template variables, e.g. `bos_token="<s>"`.

    Raises:
      ValueError: when `template` is None or empty.
    """
    template = _require_template(template, owner)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
    return _compile(template).render(messages=[dict(m) for m in messages],
                                     add_generation_prompt=add_generation_prompt, **variables)


def chat_pair(prompt: str, response: str, template: str | None, *, system: str | None = None,
              owner: str = "the tokenizer", **variables) -> Pair:
    """Wraps a (prompt, response) pair in a chat template.

    The chat prompt is the rendering of the user turn with the generation
    prompt; the chat response is what the full conversation adds after it (the
    response plus the template's end-of-turn text), so the loss covers exactly
    the assistant turn.

    Raises:
      ValueError: when there is no template, or when the template renders the
        conversation so that it does not start with the prompt rendering (then
        the two cannot be split into prompt and response).
    """
    head = [{"role": "system", "content": system}] if system is not None else []
    user = head + [{"role": "user", "content": prompt}]
    p = apply_chat_template(user, template, add_generation_prompt=True, owner=owner,
                            **variables)
    full = apply_chat_template(user + [{"role": "assistant", "content": response}], template,
                               owner=owner, **variables)
    if not full.startswith(p):
        raise ValueError(
            "the chat template renders the conversation differently from its prompt part "
            f"(prompt ends {p[-40:]!r}, conversation has {full[len(p) - 40:len(p)]!r} there); "
            "it cannot be split into prompt and response")
    return p, full[len(p):]
