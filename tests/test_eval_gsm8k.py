"""Tests for psm.evaluation.gsm8k: answer extraction and exact match."""

import json
import os

import pytest

from psm.evaluation import gsm8k


def _load(shared_data_dir, split):
    path = os.path.join(shared_data_dir, "gsm8k", f"{split}.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _final(answer_field):
    return answer_field.split("####")[-1].strip()


def test_every_test_reference_scores_correct_in_model_formats(shared_data_dir):
    rows = _load(shared_data_dir, "test")
    assert len(rows) == 1319
    for i, row in enumerate(rows):
        answer = row["answer"]
        final = _final(answer)
        plain = final.replace(",", "")
        bare_solution = answer.rsplit("####", 1)[0]
        outputs = [
            answer,  # the full reference solution, calculator annotations included
            f"The answer is {final}.",
            f"{bare_solution}The answer is {final}.",
            f"{bare_solution}So the final answer is ${final}.",
            f"Answer: {plain}",
            f"{bare_solution}#### {plain}",
            f"{bare_solution}Therefore {final} dollars.",
        ]
        for out in outputs:
            result = gsm8k.score(out, answer)
            assert result["correct"], (i, out[-120:], result)
        # The reference compared with a different number must fail.
        wrong = str(int(plain) + 1)
        assert not gsm8k.score(f"The answer is {wrong}.", answer)["correct"], i
        json.dumps(result)  # per-example results must be JSON-serialisable


def test_reference_extraction_matches_hash_line_on_train(shared_data_dir):
    for row in _load(shared_data_dir, "train"):
        assert gsm8k.extract_reference(row["answer"]) == str(int(_final(row["answer"])
                                                                 .replace(",", "")))


# (model output, reference answer, expected correct)
TRICKY = [
    ("$1,234.50", "1234.5", True),
    ("The total is $1,234.50.", "1234.5", True),
    ("The answer is -3", "-3", True),
    ("The answer is 3", "-3", False),
    ("The answer is -3", "3", False),
    ("x = -3", "-3", True),
    ("It ends at 10 - 3 = 7.", "7", True),
    ("He has 7.", "7", True),
    ("She pays 18 dollars", "18", True),
    ("She pays 18 dollars", "180", False),
    ("The answer is 18.00", "18", True),
    ("The answer is 0.5", "1/2", True),
    ("The answer is .5", "0.5", True),
    ("The answer is 1/2", "0.5", True),
    ("The answer is 1/3", "0.33", False),
    ("The answer is 50%", "50", True),
    ("The answer is \u22124", "-4", True),
    ("The answer is 1,080 eggs.", "1,080", True),
    ("The answer is 1,080 eggs.", "108", False),
    # Rule order: "####" beats "answer is", which beats the last number.
    ("The answer is 5. #### 6", "6", True),
    ("The answer is 5. #### 6", "5", False),
    ("The answer is 5, since 2 + 3 = 5 and 9 > 8", "5", True),
    ("2 + 3 = 5 and 9 > 8", "8", True),
    ("Answer: 12 apples", "12", True),
    ("The final answer is: $42.", "42", True),
    ("#### 42", "42", True),
    ("#### 42", "24", False),
    ("It costs 3.5 per pound, 7 pounds", "7", True),
    ("I cannot solve this.", "7", False),
    ("", "7", False),
    # A "1,2,3" list is three numbers, not 123.
    ("The numbers are 1,2,3", "3", True),
    ("The numbers are 1,2,3", "123", False),
    # Digits glued to words are not numbers; a hyphen between digits is no sign.
    ("H2O", "2", False),
    ("Pages 2-3", "3", True),
    ("Pages 2-3", "-3", False),
]


@pytest.mark.parametrize("output,reference,expected", TRICKY)
def test_tricky_cases(output, reference, expected):
    assert gsm8k.score(output, reference)["correct"] is expected


@pytest.mark.parametrize("text,value", [
    ("$1,234.50", "1234.5"), ("-3", "-3"), ("7.", "7"), ("18 dollars", "18"),
    ("0.250", "0.25"), ("-$3.00", "-3"), ("2/6", "1/3"), ("007", "7"),
])
def test_normalize_number(text, value):
    assert gsm8k.normalize_number(text) == value


def test_score_rejects_reference_without_number_and_non_str():
    with pytest.raises(ValueError, match="no number in reference"):
        gsm8k.score("42", "#### none")
    with pytest.raises(TypeError, match="str prediction"):
        gsm8k.score(42, "42")


def test_aggregate_counts():
    results = [{"correct": True}, {"correct": False}, {"correct": True}, {"correct": True}]
    assert gsm8k.aggregate(results) == {"accuracy": 0.75, "correct": 3, "total": 4}
    assert gsm8k.aggregate([]) == {"accuracy": 0.0, "correct": 0, "total": 0}
    with pytest.raises(ValueError, match="result 1 has no 'correct'"):
        gsm8k.aggregate([{"correct": True}, {"extracted": "1"}])


def test_evaluate_records():
    out = gsm8k.evaluate(["#### 5", "The answer is 7", "no idea"], ["5", "#### 8", "1"],
                         ids=[3, 4, 5])
    assert (out["accuracy"], out["correct"], out["total"]) == (1 / 3, 1, 3)
    assert out["per_example"][1] == {"id": 4, "prediction": "The answer is 7",
                                     "correct": False, "extracted": "7", "reference": "8"}
    json.dumps(out)
    with pytest.raises(ValueError, match="example id=1: gsm8k.score: no number"):
        gsm8k.evaluate(["1", "2"], ["1", "none"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        gsm8k.evaluate(["1", "2"], ["1"])


# ---- cases that mutation testing showed were not pinned ---------------------------------

def test_negative_decimals_keep_their_sign():
    from fractions import Fraction

    assert gsm8k.canonical_number(Fraction(-1, 4)) == "-0.25"
    assert gsm8k.canonical_number(Fraction(1, 8)) == "0.125"
    assert gsm8k.canonical_number(Fraction(-3, 1)) == "-3"
    assert not gsm8k.score("The answer is -0.5", "#### 0.5")["correct"]
    assert gsm8k.score("The answer is -0.5", "#### -0.5")["correct"]


def test_the_last_hashes_mark_the_answer():
    assert gsm8k.extract_answer("#### 3 no wait #### 5") == "5"
    assert gsm8k.extract_answer("#### 3 #### 5 #### 7") == "7"
    assert gsm8k.extract_reference("a #### 1 b #### 2 c #### 4") == "4"


def test_division_by_zero_is_no_number():
    assert gsm8k.normalize_number("3/0") is None
    assert gsm8k.normalize_number("6/1") == "6"
    assert gsm8k.extract_answer("ratio 3/0, so 7") == "7"


def test_type_and_reference_errors_say_what_was_given():
    with pytest.raises(TypeError, match=r"^gsm8k.score expects str prediction and reference, "
                                        r"got int and NoneType$"):
        gsm8k.score(3, None)
    with pytest.raises(ValueError, match=r"^gsm8k.score: no number in reference '.{79}z'; "
                                         r"expected text ending in '#### <number>' or a bare "
                                         r"number$"):
        gsm8k.score("1", "a" * 100 + "z")
