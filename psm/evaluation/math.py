"""MATH (Hendrycks et al. 2021) scoring: boxed-answer extraction and equivalence.

The final answer of a MATH solution is the content of its last ``\\boxed{...}``
(or ``\\fbox{...}``, or ``\\boxed 5`` without braces). Two answers are
equivalent when their normalized strings are equal. The normalization follows
the reference ``is_equiv``/``strip_string`` of the MATH release, with its
order-of-operations quirks fixed (spaces are removed before the ``x =`` prefix
is dropped, so ``" x = 5 "`` and ``"5"`` agree) and a few additions:

* ``\\dfrac``/``\\tfrac`` -> ``\\frac``; ``\\frac12`` and ``\\frac1{72}`` ->
  ``\\frac{1}{2}``, ``\\frac{1}{72}``; ``\\sqrt3`` -> ``\\sqrt{3}``;
* ``\\left``/``\\right``, ``\\!``, ``\\,``, ``\\;``, ``\\displaystyle``, all
  whitespace, dollar signs, percent signs, degree marks (``^\\circ``,
  ``^{\\circ}``, ``°``), a trailing period, and a trailing unit
  (``\\text{ cm}``, ``\\mbox{ inches}``, or ``\\text{cm}`` after a number);
* a ``\\text{...}`` group that is the whole answer is unwrapped;
* ``.5`` -> ``0.5``; a short ``k =`` prefix;
* a pure number (integer, decimal, ``a/b``, ``\\frac{a}{b}``, ``1,000``, with a
  sign) is rewritten as an exact reduced rational, so ``0.5``, ``1/2``,
  ``\\frac{2}{4}`` and ``\\frac12`` agree (the reference only special-cases
  ``0.5``). Numbers are never rounded: ``0.333`` is not ``\\frac{1}{3}``.

The module name shadows nothing: with absolute imports ``import math`` still
means the standard library everywhere in this package.
"""

from __future__ import annotations

import fractions
import re
from typing import Iterable, Mapping, Optional, Sequence

from psm.evaluation import scoring

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` in `text`, or None.

    Braces are matched, so nested groups survive (``\\boxed{\\frac{1}{2}}`` gives
    ``\\frac{1}{2}``). ``\\boxed 5`` (no braces) gives the text up to the next
    whitespace or ``$``. An unclosed box gives None.
    """
    start, command = -1, None
    for cmd in _BOX_COMMANDS:
        # A command name must not continue with a letter ("\\boxedx" is not \boxed).
        for match in re.finditer(re.escape(cmd) + r"(?![A-Za-z])", text):
            if match.start() > start:
                start, command = match.start(), cmd
    if command is None:
        return None
    i = start + len(command)
    rest = text[i:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        i += len(rest) - len(stripped)
        group = _brace_group(text, i)
        return None if group is None else group[0]
    if rest[:1].isspace():
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else None
    return None


def _brace_group(text: str, i: int) -> Optional[tuple[str, int]]:
    """(content, index after the closing brace) of the group opening at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j], j + 1
    return None


def _fix_fracs(s: str) -> str:
    """``\\frac12``/``\\frac1{2}``/``\\frac{1}2`` -> ``\\frac{1}{2}`` (no spaces in s)."""
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j + 5])
        k = j + 5
        args = []
        for _ in range(2):
            arg = _read_argument(s, k)
            if arg is None:
                break
            args.append(arg[0])
            k = arg[1]
        if len(args) < 2:
            i = j + 5
            continue
        out.append("{" + args[0] + "}{" + args[1] + "}")
        i = k


def _read_argument(s: str, k: int) -> Optional[tuple[str, int]]:
    """A TeX macro argument at s[k]: a brace group, a control word, or one char."""
    if k >= len(s) or s[k] == "}":
        return None
    if s[k] == "{":
        return _brace_group(s, k)
    if s[k] == "\\":
        word = re.match(r"\\[A-Za-z]+|\\.", s[k:])
        return (word.group(0), k + len(word.group(0))) if word else None
    return s[k], k + 1


_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z\s.]*\}(?:\^\{?\d\}?)?$")
_SPACED_TEXT = re.compile(r"\\(?:text|mbox)\{ ")
_NUMERIC = re.compile(
    r"^(?P<sign>[-+]?)(?:"
    r"(?P<dec>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"|(?P<num>\d+)/(?P<den>\d+)"
    r"|\\frac\{(?P<fsign>-?)(?P<fnum>\d+)\}\{(?P<fden>\d+)\})$")


def _remove_units(s: str) -> str:
    # The reference strips everything from "\text{ " on (units are written with a
    # leading space there, while answers such as \text{(A)} are not); a unit
    # written without the space is dropped only when a number precedes it.
    match = _SPACED_TEXT.search(s)
    if match and match.start() > 0 and s[:match.start()].strip():
        return s[:match.start()]
    match = _UNIT.search(s)
    if match and re.search(r"\d", s[:match.start()]):
        return s[:match.start()]
    return s


def _unwrap_text(s: str) -> str:
    """``\\text{Evelyn}`` -> ``Evelyn`` when the text group is the whole answer."""
    match = re.match(r"\\(?:text|textbf|mathrm|mbox)(?=\{)", s)
    if match:
        group = _brace_group(s, match.end())
        if group is not None and group[1] == len(s):
            return group[0]
    return s


def _canonical_rational(s: str) -> str:
    match = _NUMERIC.match(s)
    if match is None:
        return s
    if match.group("dec") is not None:
        value = fractions.Fraction(match.group("dec").replace(",", ""))
    elif match.group("num") is not None:
        if int(match.group("den")) == 0:
            return s
        value = fractions.Fraction(int(match.group("num")), int(match.group("den")))
    else:
        if int(match.group("fden")) == 0:
            return s
        value = fractions.Fraction(int(match.group("fnum")), int(match.group("fden")))
        if match.group("fsign"):
            value = -value
    if match.group("sign") == "-":
        value = -value
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def normalize(answer: str) -> str:
    """Normalized form of a MATH answer string (see the module docstring)."""
    s = answer.replace("\n", "").strip()
    for junk in ("\\!", "\\,", "\\;", "\\:", "\\displaystyle"):
        s = s.replace(junk, "")
    s = s.replace("\\\\", "\\")
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|°", "", s)
    s = s.replace("\\$", "").replace("$", "").rstrip(". ")
    s = _remove_units(s)
    s = _unwrap_text(s.strip())
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s)
    s = s.replace("{,}", ",")
    s = s.rstrip(".")
    s = re.sub(r"(?<!\d)\.(?=\d)", "0.", s)
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs) <= 2:
            s = rhs
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = _fix_fracs(s)
    return _canonical_rational(s)


def is_equiv(a: str, b: str) -> bool:
    """Whether two answer strings are equal after `normalize`."""
    if not isinstance(a, str) or not isinstance(b, str):
        raise TypeError(f"math.is_equiv expects two str, got {type(a).__name__} "
                        f"and {type(b).__name__}")
    return normalize(a) == normalize(b)


def extract_reference(solution: str) -> str:
    """Final answer of a reference: the last boxed content, else the text itself.

    Raises:
      ValueError: if `solution` has a box that never closes.
    """
    if any(cmd in solution for cmd in _BOX_COMMANDS):
        boxed = last_boxed(solution)
        if boxed is None:
            raise ValueError("math.extract_reference: unclosed \\boxed in reference "
                             f"...{solution[-80:]!r}")
        return boxed
    return solution


def score(prediction: str, reference: str) -> dict:
    """Scores one model output against one MATH reference.

    Args:
      prediction: generated text; its answer is the last boxed content.
      reference: the dataset ``solution`` field or a bare answer string.

    Returns:
      ``{"correct": bool, "extracted": str | None, "reference": str}`` with the
      extracted (un-normalized) answers; no box in `prediction` is incorrect.
    """
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError("math.score expects str prediction and reference, got "
                        f"{type(prediction).__name__} and {type(reference).__name__}")
    ref = extract_reference(reference)
    got = last_boxed(prediction)
    return {"correct": got is not None and is_equiv(got, ref), "extracted": got,
            "reference": ref}


def aggregate(results: Iterable[Mapping]) -> dict:
    """Accuracy over per-example results: ``{"accuracy", "correct", "total"}``."""
    return scoring.aggregate(results, "math")


def evaluate(predictions: Sequence[str], references: Sequence[str],
             ids: Optional[Sequence] = None) -> dict:
    """Scores ``[N]`` outputs against ``[N]`` references (see `scoring.evaluate`)."""
    return scoring.evaluate(score, "math", predictions, references, ids)
