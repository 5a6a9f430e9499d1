"""Tests for psm.evaluation.math: boxed-answer extraction and equivalence."""

import glob
import json
import os
import re

import pytest

from psm.evaluation import math as math_eval

# Measured on the 5,000 MATH test solutions: every one has a box.
EXPECTED_WITHOUT_BOX = 0


@pytest.fixture(scope="module")
def test_solutions(shared_data_dir):
    paths = sorted(glob.glob(os.path.join(shared_data_dir, "math", "test", "*", "*.json")))
    solutions = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            solutions.append(json.load(f)["solution"])
    assert len(solutions) == 5000
    return solutions


@pytest.fixture(scope="module")
def test_answers(test_solutions):
    return [math_eval.last_boxed(s) for s in test_solutions]


def test_extractor_finds_the_box_in_every_test_solution(test_solutions, test_answers):
    missing = sum(a is None for a in test_answers)
    print(f"MATH test solutions without a boxed answer: {missing} of {len(test_answers)}")
    assert missing == EXPECTED_WITHOUT_BOX
    for solution, answer in zip(test_solutions, test_answers):
        # The extracted text is exactly the content of the last box: it is
        # brace-balanced and re-boxing it gives a substring after the last "\boxed".
        assert answer.count("{") == answer.count("}"), answer
        tail = solution[solution.rfind("\\boxed"):]
        assert tail.startswith("\\boxed{" + answer + "}"), (answer, tail[:200])


def _distortions(answer):
    """(name, distorted) pairs for the distortions that apply to `answer`."""
    out = []
    is_number = re.fullmatch(r"-?\d+(\.\d+)?", answer) is not None
    if "\\frac" in answer:
        out.append(("dfrac", answer.replace("\\frac", "\\dfrac")))
        out.append(("tfrac", answer.replace("\\frac", "\\tfrac")))
        # \frac{1}{2} -> \frac12 for single-character numerator and denominator.
        short = re.sub(r"\\frac\{(\w)\}\{(\w)\}", r"\\frac\1\2", answer)
        if short != answer:
            out.append(("frac12", short))
    # Spaces around operators, commas (not the "\," command) and at the ends.
    spaced = " " + re.sub(r"(?<!\\)([=+,])", r" \1 ", answer) + " "
    out.append(("spaces", spaced))
    if "(" in answer or ")" in answer:
        out.append(("left_right", answer.replace("(", "\\left(").replace(")", "\\right)")))
    if is_number:
        out.append(("text_unit", answer + "\\text{ cm}"))
        out.append(("mbox_unit", answer + " \\mbox{ inches}"))
        out.append(("circ", answer + "^\\circ"))
        out.append(("circ_braced", answer + "^{\\circ}"))
        out.append(("dollar", "\\$" + answer))
        out.append(("percent", answer + "\\%"))
    # "0.5" -> ".5" wherever a decimal has a zero integer part.
    no_zero = re.sub(r"(?<![\d.])0\.(?=\d)", ".", answer)
    if no_zero != answer:
        out.append(("leading_zero", no_zero))
    match = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if match:
        out.append(("slash", f"{match.group(1)}{match.group(2)}/{match.group(3)}"))
    if not answer.endswith("."):
        out.append(("period", answer + "."))
    return out


def test_answers_equal_their_distortions(test_answers):
    counts = {}
    for answer in test_answers:
        for name, distorted in _distortions(answer):
            counts[name] = counts.get(name, 0) + 1
            assert math_eval.is_equiv(distorted, answer), (name, answer, distorted)
            prediction = f"So we get $\\boxed{{{distorted}}}$."
            assert math_eval.score(prediction, f"Thus \\boxed{{{answer}}}.")["correct"], (
                name, answer, distorted)
    print("distortions applied:", dict(sorted(counts.items())))
    # Every kind of distortion was exercised on many real answers.
    for name in ("dfrac", "tfrac", "frac12", "spaces", "left_right", "text_unit", "mbox_unit",
                 "circ", "circ_braced", "dollar", "percent", "leading_zero", "slash", "period"):
        assert counts.get(name, 0) >= 20, (name, counts)


def test_answers_differ_from_other_answers(test_answers):
    normalized = [math_eval.normalize(a) for a in test_answers]
    checked = 0
    for i, answer in enumerate(test_answers):
        # The next answer in the list whose normalized form differs.
        j = next((j for j in range(i + 1, len(test_answers))
                  if normalized[j] != normalized[i]), None)
        if j is None:
            continue
        for _, distorted in _distortions(test_answers[j]):
            assert not math_eval.is_equiv(distorted, answer), (answer, distorted)
        checked += 1
    assert checked > 4900


@pytest.mark.parametrize("text,expected", [
    ("so $\\boxed{5}$.", "5"),
    ("nested \\boxed{\\frac{1}{\\sqrt{2}}} done", "\\frac{1}{\\sqrt{2}}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("an \\fbox{7} here", "7"),
    ("\\boxed{1} and \\fbox{3}", "3"),
    ("\\fbox{3} and \\boxed{1}", "1"),
    ("the answer is $\\boxed 5$.", "5"),
    ("\\boxed {12}", "12"),
    ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("no box here", None),
    ("unclosed \\boxed{1 + {2}", None),
    ("\\boxedx{3}", None),
])
def test_last_boxed(text, expected):
    assert math_eval.last_boxed(text) == expected


EQUIVALENT = [
    ("\\frac{1}{2}", "\\dfrac{1}{2}"), ("\\frac{1}{2}", "\\frac12"), ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "1/2"), ("\\frac{1}{2}", ".5"), ("\\frac{2}{4}", "\\frac{1}{2}"),
    ("-\\frac{1}{2}", "\\frac{-1}{2}"), ("\\frac{\\pi}{2}", "\\frac\\pi2"),
    ("\\frac{1}{72}", "\\frac1{72}"), ("\\sqrt{3}", "\\sqrt3"), ("2\\sqrt{3}", "2 \\sqrt 3"),
    ("(1,2)", "\\left( 1, 2 \\right)"), ("90", "90^\\circ"), ("90", "90^{\\circ}"),
    ("90", "90°"), ("5", "5\\text{ cm}"), ("5", "5\\text{cm}"), ("5", "5 \\text{ inches}^2"),
    ("10", "\\$10"), ("10", "$10$"), ("50", "50\\%"), ("5", "5."), ("5", "x = 5"),
    ("5", " k=5 "), ("14400", "14,\\!400"), ("1000", "1{,}000"), ("Evelyn", "\\text{Evelyn}"),
    ("3.5", "3.50"), ("7", "+7"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "\\frac{1}{3}"), ("2", "-2"), ("x+1", "x-1"), ("0.5", "0.05"),
    ("(1,2)", "(2,1)"), ("\\frac{1}{3}", "0.333"), ("\\sqrt{2}", "\\sqrt{3}"), ("12", "1,2"),
    ("2x", "x2"), ("[1,2]", "(1,2)"), ("\\text{(A)}", "\\text{(B)}"), ("5", "50"),
    ("y = x + 1", "y = x - 1"), ("10", "100"), ("\\pi", "2\\pi"),
]


@pytest.mark.parametrize("a,b", EQUIVALENT)
def test_equivalent_pairs(a, b):
    assert math_eval.is_equiv(a, b) and math_eval.is_equiv(b, a)


@pytest.mark.parametrize("a,b", NOT_EQUIVALENT)
def test_non_equivalent_pairs(a, b):
    assert not math_eval.is_equiv(a, b) and not math_eval.is_equiv(b, a)


def test_score_and_aggregate():
    reference = "Hence the area is $\\boxed{\\frac{3}{4}}$."
    good = math_eval.score("... so it is \\boxed{\\dfrac34}.", reference)
    assert good == {"correct": True, "extracted": "\\dfrac34", "reference": "\\frac{3}{4}"}
    assert not math_eval.score("... so it is \\boxed{\\frac43}.", reference)["correct"]
    unboxed = math_eval.score("The answer is 3/4.", reference)
    assert unboxed == {"correct": False, "extracted": None, "reference": "\\frac{3}{4}"}
    assert math_eval.score("\\boxed{7}", "7")["correct"]  # a bare reference answer
    with pytest.raises(ValueError, match="unclosed"):
        math_eval.score("\\boxed{7}", "\\boxed{7")
    results = [good, unboxed, {"correct": True}]
    assert math_eval.aggregate(results) == {"accuracy": 2 / 3, "correct": 2, "total": 3}


def test_evaluate_records():
    out = math_eval.evaluate(["\\boxed{\\dfrac12}", "\\boxed{3}", "3"],
                             ["$\\boxed{\\frac{1}{2}}$", "\\boxed{4}", "\\boxed{3}"],
                             ids=["a", "b", "c"])
    assert (out["correct"], out["total"]) == (1, 3)
    assert [r["correct"] for r in out["per_example"]] == [True, False, False]
    assert out["per_example"][0] == {"id": "a", "prediction": "\\boxed{\\dfrac12}",
                                     "correct": True, "extracted": "\\dfrac12",
                                     "reference": "\\frac{1}{2}"}
    json.dumps(out)
    with pytest.raises(ValueError, match="example id=0: math.extract_reference: unclosed"):
        math_eval.evaluate(["\\boxed{1}"], ["\\boxed{1"])
