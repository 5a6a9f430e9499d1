"""Tests for psm.evaluation.humaneval (scoring, pass@k); the sandbox has tests/test_sandbox.py."""

import fractions
import json
import math
import os

import numpy as np
import pytest

from psm.evaluation import humaneval

# Two small problems in HumanEval's format, so that scoring is tested without the data folder.
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "humaneval_tiny.jsonl")


@pytest.fixture(scope="module")
def tiny():
    return humaneval.load_problems(FIXTURE)


@pytest.fixture(scope="module")
def problems(shared_data_dir):
    problems = humaneval.load_problems(
        os.path.join(shared_data_dir, "humaneval", "HumanEval.jsonl.gz"))
    assert len(problems) == 164
    return problems


@pytest.mark.slow
def test_all_canonical_solutions_pass(problems):
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    result = humaneval.evaluate(problems, samples, ks=(1,), workers=2)
    failed = [(r["id"], r["status"], r["detail"]) for r in result["per_example"]
              if not r["correct"]]
    assert failed == []
    assert result["pass_at_k"] == {"pass@1": 1.0}
    assert result["num_problems"] == 164 and result["num_samples"] == 164
    json.dumps(result)  # results go to eval.json as they are


def test_trivially_wrong_completions_fail(problems):
    task_ids = list(problems)[::8]  # 21 problems spread over the set
    samples = [{"task_id": t, "completion": "    return None\n"} for t in task_ids]
    samples += [{"task_id": "HumanEval/0", "completion": "    return (\n"},  # syntax error
                {"task_id": "HumanEval/0", "completion": "    raise NotImplementedError\n"},
                {"task_id": "HumanEval/0", "completion": "    return False\n"}]
    result = humaneval.evaluate(problems, samples, ks=(1,), workers=2)
    assert [r["correct"] for r in result["per_example"]] == [False] * len(samples)
    assert result["pass_at_k"]["pass@1"] == 0.0
    details = [r["detail"] for r in result["per_example"][-3:]]
    assert "SyntaxError" in details[0] and "NotImplementedError" in details[1]
    assert "AssertionError" in details[2]


def test_load_problems_reads_the_fixture_and_names_bad_lines(tmp_path):
    problems = humaneval.load_problems(FIXTURE)
    assert list(problems) == ["Tiny/0", "Tiny/1"]
    assert problems["Tiny/0"]["entry_point"] == "running_max"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "prompt": ""}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: problem lacks keys \['test', "
                                         r"'entry_point'\]"):
        humaneval.load_problems(str(bad))


def test_pass_at_1_by_hand_correct_wrong_timeout_crash(tiny):
    """Four completions of one problem, one of each outcome: pass@1 = 1/4."""
    samples = [
        {"task_id": "Tiny/0", "completion": tiny["Tiny/0"]["canonical_solution"]},  # correct
        {"task_id": "Tiny/0", "completion": "    return sorted(numbers)\n"},  # wrong
        {"task_id": "Tiny/0", "completion": "    while True:\n        pass\n"},  # times out
        {"task_id": "Tiny/0", "completion": "    return [n // 0 for n in numbers]\n"},  # crashes
    ]
    result = humaneval.evaluate(tiny, samples, ks=(1, 2), workers=2, timeout_s=1.5)
    got = [(r["sample"], r["correct"], r["status"], r["detail"]) for r in result["per_example"]]
    assert got[0] == (0, True, "passed", "passed")
    assert got[1] == (1, False, "failed", "AssertionError")
    assert got[2] == (2, False, "timed_out", "timed out after 1.5 s")
    # A crash is a failure with the exception as its reason.
    assert got[3] == (3, False, "failed",
                      "ZeroDivisionError: integer division or modulo by zero")
    assert result["pass_at_k"]["pass@1"] == pytest.approx(1 / 4)
    # pass@2 with n=4, c=1: 1 - C(3, 2) / C(4, 2) = 1/2.
    assert result["pass_at_k"]["pass@2"] == pytest.approx(1 / 2)
    assert result["num_problems"] == 1 and result["num_samples"] == 4
    json.dumps(result)


def test_pass_at_1_averages_over_problems(tiny):
    samples = [{"task_id": "Tiny/0", "completion": tiny["Tiny/0"]["canonical_solution"]},
               {"task_id": "Tiny/1", "completion": "    return True\n"},
               {"task_id": "Tiny/1", "completion": tiny["Tiny/1"]["canonical_solution"]}]
    result = humaneval.evaluate(tiny, samples, ks=(1, 2), workers=1)
    # Tiny/0: 1 of 1; Tiny/1: 1 of 2 -> (1 + 1/2) / 2. pass@2 needs 2 samples per task.
    assert result["pass_at_k"] == {"pass@1": pytest.approx(0.75)}
    assert result["skipped_k"] == [2]
    assert [r["detail"] for r in result["per_example"]] == ["passed", "AssertionError",
                                                            "passed"]


def test_truncate_then_score(tiny):
    problem = tiny["Tiny/1"]
    raw = "    return text == text[::-1]\n\ndef extra():\n    raise SystemExit(0)\nextra()\n"
    result = humaneval.evaluate(tiny, [{"task_id": "Tiny/1", "completion": raw}],
                                truncate=True)
    record = result["per_example"][0]
    assert record["correct"] and record["extracted"] == "    return text == text[::-1]\n"
    assert record["prediction"] == raw
    # Untruncated, the trailing code exits before check() runs: a failure.
    assert not humaneval.score(raw, problem)["correct"]


def _pass_at_k_exact(n, c, k):
    return 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in range(1, 16):
        for c in range(n + 1):
            assert humaneval.pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
            for k in range(1, n + 1):
                exact = float(_pass_at_k_exact(n, c, k))
                assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # Large n, where the binomial coefficients overflow float64 (C(1000, 500) ~ 1e299
    # and beyond for larger n), the product form stays accurate.
    for n, c, k in [(2000, 3, 1000), (2000, 1990, 5), (5000, 17, 100)]:
        exact = float(_pass_at_k_exact(n, c, k))
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)
    per_problem = humaneval.estimate_pass_at_k([10, 10, 5], [0, 3, 5], 2)
    np.testing.assert_allclose(per_problem, [0.0, float(_pass_at_k_exact(10, 3, 2)), 1.0])
    np.testing.assert_allclose(humaneval.estimate_pass_at_k(4, [1, 2], 1), [0.25, 0.5])
    with pytest.raises(ValueError, match="1 <= k <= n"):
        humaneval.pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        humaneval.pass_at_k(3, 4, 1)


def test_evaluate_aggregates_several_samples_per_task(problems):
    good = {t: problems[t]["canonical_solution"] for t in ("HumanEval/0", "HumanEval/2")}
    bad = "    return None\n"
    samples = [{"task_id": "HumanEval/0", "completion": c}
               for c in (good["HumanEval/0"], bad, good["HumanEval/0"])]
    samples += [{"task_id": "HumanEval/2", "completion": c}
                for c in (bad, bad, good["HumanEval/2"])]
    result = humaneval.evaluate(problems, samples, ks=(1, 2, 3, 4), workers=2)
    # Task 0: 2 of 3 correct; task 2: 1 of 3 correct.
    # pass@1 = (2/3 + 1/3) / 2; pass@2 = (1 + (1 - C(2,2)/C(3,2))) / 2; pass@3 = 1.
    assert result["pass_at_k"]["pass@1"] == pytest.approx(0.5)
    assert result["pass_at_k"]["pass@2"] == pytest.approx((1 + (1 - 1 / 3)) / 2)
    assert result["pass_at_k"]["pass@3"] == pytest.approx(1.0)
    assert result["skipped_k"] == [4]
    assert [(r["id"], r["sample"], r["correct"]) for r in result["per_example"]] == [
        ("HumanEval/0", 0, True), ("HumanEval/0", 1, False), ("HumanEval/0", 2, True),
        ("HumanEval/2", 0, False), ("HumanEval/2", 1, False), ("HumanEval/2", 2, True)]
    with pytest.raises(ValueError, match="sample 0 names unknown task 'nope'"):
        humaneval.evaluate(problems, [{"task_id": "nope", "completion": ""}])


def test_truncate_completion_and_build_program(problems):
    text = "    return 1\n\ndef helper():\n    pass\n"
    assert humaneval.truncate_completion(text) == "    return 1\n"
    assert humaneval.truncate_completion("    return 1\n") == "    return 1\n"
    assert humaneval.truncate_completion("    x = 1\n# note\nprint(x)") == "    x = 1"
    problem = problems["HumanEval/0"]
    program = humaneval.build_program(problem, "    return True\n")
    assert program.startswith(problem["prompt"] + "    return True\n")
    assert program.rstrip().endswith("check(has_close_elements)")
    assert problem["test"] in program
