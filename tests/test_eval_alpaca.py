"""Tests for psm.evaluation.alpaca: loss/perplexity helpers and judged win rate."""

import json
import math
import os

import numpy as np
import pytest

from psm.evaluation import alpaca


def test_loss_and_perplexity_by_hand():
    out = alpaca.loss_and_perplexity([2.0, 4.0], [1, 3])
    # Token-weighted: (2 + 4) / (1 + 3); per-example mean: (2/1 + 4/3) / 2.
    assert out["loss"] == pytest.approx(1.5)
    assert out["perplexity"] == pytest.approx(math.exp(1.5))
    assert out["macro_loss"] == pytest.approx((2.0 + 4.0 / 3.0) / 2.0)
    assert out["tokens"] == 4 and out["examples"] == 2
    json.dumps(out)


def test_loss_equals_the_mean_over_all_tokens():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=25)
    token_nll = [rng.exponential(2.0, size=n) for n in lengths]  # per-token NLLs
    out = alpaca.loss_and_perplexity([t.sum() for t in token_nll], lengths)
    all_tokens = np.concatenate(token_nll)
    assert out["loss"] == pytest.approx(all_tokens.mean(), rel=1e-12)
    # Perplexity is the exponentiated mean NLL: the geometric mean of 1/p.
    probs = np.exp(-all_tokens)
    assert out["perplexity"] == pytest.approx(np.exp(np.mean(np.log(1.0 / probs))), rel=1e-9)
    assert out["macro_loss"] == pytest.approx(np.mean([t.mean() for t in token_nll]))
    records = alpaca.per_example_losses(list(range(25)), [t.sum() for t in token_nll], lengths)
    assert [r["id"] for r in records] == list(range(25))
    assert records[3]["loss"] == pytest.approx(token_nll[3].mean())
    assert records[3]["tokens"] == int(lengths[3])
    json.dumps(records)


def test_loss_input_errors_name_the_example():
    with pytest.raises(ValueError, match="example 1 has 0 tokens"):
        alpaca.loss_and_perplexity([1.0, 0.0], [2, 0])
    with pytest.raises(ValueError, match="example 0 has NLL sum nan"):
        alpaca.loss_and_perplexity([float("nan")], [2])
    with pytest.raises(ValueError, match="must be integers"):
        alpaca.loss_and_perplexity([1.0], [2.5])
    with pytest.raises(ValueError, match="equal length"):
        alpaca.loss_and_perplexity([1.0, 2.0], [2])
    with pytest.raises(ValueError, match="no examples"):
        alpaca.loss_and_perplexity([], np.zeros(0, dtype=np.int64))


class LongerIsBetter:
    """A deterministic stand-in judge: the longer output wins, equal length ties."""

    def compare(self, instruction, output_a, output_b):
        return float(np.sign(len(output_a) - len(output_b)) + 1) / 2


class FirstPositionJudge:
    """A judge with total position bias: always prefers whatever comes first."""

    def compare(self, instruction, output_a, output_b):
        return 1.0


class BrokenJudge:
    def __init__(self, value):
        self.value = value

    def compare(self, instruction, output_a, output_b):
        return self.value


def test_judge_protocol_is_structural():
    assert isinstance(LongerIsBetter(), alpaca.Judge)
    assert not isinstance(object(), alpaca.Judge)


def test_win_rate_with_fake_judges():
    instructions = ["a", "b", "c", "d"]
    outputs = ["long answer", "x", "same", "longer still"]
    references = ["short", "much longer", "SAME", "tiny"]
    # Wins at 0 and 3, a loss at 1, a tie at 2: (1 + 0 + 0.5 + 1) / 4.
    out = alpaca.win_rate(LongerIsBetter(), instructions, outputs, references, ids=[10, 11, 12, 13])
    assert out["win_rate"] == pytest.approx(2.5 / 4)
    assert (out["wins"], out["ties"], out["losses"], out["examples"]) == (2, 1, 1, 4)
    assert [r["preference"] for r in out["per_example"]] == [1.0, 0.0, 0.5, 1.0]
    assert [r["id"] for r in out["per_example"]] == [10, 11, 12, 13]
    assert out["stderr"] == pytest.approx(np.std([1, 0, 0.5, 1], ddof=1) / 2)
    json.dumps(out)
    # Position bias: without swapping the model looks perfect; swapping cancels it.
    biased = alpaca.win_rate(FirstPositionJudge(), instructions, outputs, references, swap=False)
    assert biased["win_rate"] == 1.0
    fair = alpaca.win_rate(FirstPositionJudge(), instructions, outputs, references)
    assert fair["win_rate"] == 0.5 and fair["ties"] == 4


def test_win_rate_rejects_bad_judges_and_inputs():
    args = (["i0", "i1"], ["o0", "o1"], ["r0", "r1"])
    with pytest.raises(ValueError, match=r"judge returned 1.5 for example 0 \(model first\)"):
        alpaca.win_rate(BrokenJudge(1.5), *args)
    with pytest.raises(ValueError, match="judge returned nan for example 0"):
        alpaca.win_rate(BrokenJudge(float("nan")), *args)
    with pytest.raises(ValueError, match="judge returned 'yes'"):
        alpaca.win_rate(BrokenJudge("yes"), *args)
    with pytest.raises(ValueError, match="2 instructions, 1 outputs and 2 references"):
        alpaca.win_rate(LongerIsBetter(), ["i0", "i1"], ["o0"], ["r0", "r1"])
    with pytest.raises(TypeError, match="has no compare"):
        alpaca.win_rate(object(), *args)


def test_win_rate_on_alpaca_sample(shared_data_dir):
    with open(os.path.join(shared_data_dir, "alpaca", "alpaca_data_1k.json"),
              encoding="utf-8") as f:
        records = json.load(f)
    assert len(records) == 1000
    records = records[:200]
    instructions = [r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
                    for r in records]
    references = [r["output"] for r in records]
    # Padded outputs always win; outputs cut to half lose unless the reference
    # has fewer than two characters (then cutting changes nothing: a tie).
    padded = [r + " Thanks!" for r in references]
    assert alpaca.win_rate(LongerIsBetter(), instructions, padded, references)["win_rate"] == 1.0
    halves = [r[:len(r) // 2] for r in references]
    ties = sum(len(r) // 2 == len(r) for r in references)
    out = alpaca.win_rate(LongerIsBetter(), instructions, halves, references)
    assert out["win_rate"] == pytest.approx(0.5 * ties / len(records))
    assert out["losses"] == len(records) - ties
