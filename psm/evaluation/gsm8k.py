"""GSM8K scoring: final-answer extraction and exact numeric match.

GSM8K reference solutions end in a line ``#### <answer>``. Model outputs are
read the way the field usually reads them, first rule that finds a number wins:

1. the first number after the last ``####``;
2. the first number after the last "answer is" / "answer:" phrase;
3. the last number anywhere in the text.

Numbers are compared exactly as rationals after removing what does not change
the value: thousands separators, currency signs, a trailing period, trailing
units or words, a percent sign. ``"$1,234.50"``, ``"1234.5"`` and
``"1,234.50 dollars."`` are the same answer; ``"-3"`` and ``"3"`` are not.

Every function returns plain Python values, so per-example results can be
written to JSON as they are.
"""

from __future__ import annotations

import fractions
import re
from typing import Iterable, Mapping, Optional, Sequence

from psm.evaluation import scoring

# A number as written in GSM8K text: an optional sign (ASCII hyphen or Unicode
# minus) written right against it, an optional currency sign, digits with
# optional thousands separators, an optional decimal part and an optional
# "/denominator". The look-behind rejects digits glued to a word or a decimal
# point ("H2O", the "5" of "3.5") and a hyphen after a word or digit ("2-3" is
# a range or subtraction, so "3" is positive); the look-ahead insists on a digit
# so that the pattern never matches an empty string. "- 3" (with a space) reads
# as 3. Thousands groups must have exactly three digits, so "1,2,3" is a list.
_NUMBER = re.compile(
    r"(?<![\w.])(?=[-\u2212]?(?:[$\u00a3\u20ac]\s?)?\.?\d)"
    r"(?P<sign>[-\u2212])?(?:[$\u00a3\u20ac]\s?)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)?(?P<frac>\.\d+)?"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?")
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|=|:)\s*:?", re.IGNORECASE)
_HASHES = "####"


def _numbers(text: str) -> list[str]:
    """Canonical strings of every number in `text`, in order of appearance."""
    out = []
    for match in _NUMBER.finditer(text):
        value = _to_fraction(match)
        if value is not None:
            out.append(canonical_number(value))
    return out


def _to_fraction(match: re.Match) -> Optional[fractions.Fraction]:
    digits = (match.group("int") or "0").replace(",", "") + (match.group("frac") or "")
    value = fractions.Fraction(digits)
    if match.group("den") is not None:
        den = fractions.Fraction(match.group("den"))
        if den == 0:
            return None
        value /= den
    return -value if match.group("sign") else value


def canonical_number(value: fractions.Fraction) -> str:
    """Canonical string of an exact number: ``"12"``, ``"-0.25"`` or ``"1/3"``.

    Terminating decimals are written in decimal notation without trailing zeros,
    other rationals as ``p/q``, so equal values always give equal strings.
    """
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    # A fraction terminates in decimal iff its reduced denominator is 2^a 5^b.
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    sign = "-" if value < 0 else ""
    mag = abs(value)
    whole, rest = divmod(mag.numerator, mag.denominator)
    digits = []
    while rest:
        rest *= 10
        digit, rest = divmod(rest, mag.denominator)
        digits.append(str(digit))
    return f"{sign}{whole}.{''.join(digits)}"


def normalize_number(text: str) -> Optional[str]:
    """Canonical form of the first number in `text`, or None if there is none.

    Example: ``normalize_number("$1,234.50.") == "1234.5"``.
    """
    found = _numbers(text)
    return found[0] if found else None


def extract_reference(answer: str) -> Optional[str]:
    """The canonical final answer of a GSM8K reference.

    Args:
      answer: a dataset ``answer`` field (solution text ending ``#### 18``) or
        a bare answer such as ``"18"``.

    Returns:
      The canonical number (``"18"``), or None when no number is found.
    """
    if _HASHES in answer:
        answer = answer.rsplit(_HASHES, 1)[1]
    return normalize_number(answer)


def extract_answer(text: str) -> Optional[str]:
    """The canonical final answer in a model output, or None.

    Rules in order: first number after the last ``####``; first number after
    the last "answer is"/"answer:"; the last number in the text.
    """
    if _HASHES in text:
        found = _numbers(text.rsplit(_HASHES, 1)[1])
        if found:
            return found[0]
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        found = _numbers(text[phrases[-1].end():])
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def score(prediction: str, reference: str) -> dict:
    """Scores one model output against one reference.

    Args:
      prediction: the model's generated text.
      reference: the dataset ``answer`` field, or a bare answer string.

    Returns:
      ``{"correct": bool, "extracted": str | None, "reference": str | None}``;
      ``extracted`` and ``reference`` are canonical numbers.

    Raises:
      ValueError: if no number can be read from `reference`.
    """
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError("gsm8k.score expects str prediction and reference, got "
                        f"{type(prediction).__name__} and {type(reference).__name__}")
    ref = extract_reference(reference)
    if ref is None:
        raise ValueError(f"gsm8k.score: no number in reference {reference[-80:]!r}; "
                         "expected text ending in '#### <number>' or a bare number")
    got = extract_answer(prediction)
    return {"correct": got is not None and got == ref, "extracted": got, "reference": ref}


def aggregate(results: Iterable[Mapping]) -> dict:
    """Accuracy over per-example results: ``{"accuracy", "correct", "total"}``."""
    return scoring.aggregate(results, "gsm8k")


def evaluate(predictions: Sequence[str], references: Sequence[str],
             ids: Optional[Sequence] = None) -> dict:
    """Scores ``[N]`` outputs against ``[N]`` references (see `scoring.evaluate`)."""
    return scoring.evaluate(score, "gsm8k", predictions, references, ids)
