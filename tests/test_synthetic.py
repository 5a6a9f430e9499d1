"""The offline synthetic task: correct answers, disjoint splits, stable ids, tokenizer."""

import re

import pytest

from psm.data import synthetic, tasks


def test_solutions_are_correct_arithmetic():
    splits = synthetic.make_problems(300, 40, 40, seed=1)
    for ex in splits["train"]:
        steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", ex["solution"])
        assert 2 <= len(steps) <= 3
        for a, op, b, c in steps:
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
        assert ex["solution"].endswith(f"#### {ex['answer']}")
        assert int(steps[-1][3]) == ex["answer"]


def test_splits_disjoint_and_ids_stable():
    a = synthetic.make_problems(200, 30, 30, seed=0)
    b = synthetic.make_problems(200, 30, 30, seed=0)
    assert a == b
    qs = {s: {e["question"] for e in a[s]} for s in a}
    assert not (qs["train"] & qs["test"]) and not (qs["train"] & qs["validation"])
    assert [e["id"] for e in a["train"]] == list(range(200))
    assert synthetic.make_problems(200, 30, 30, seed=1)["train"] != a["train"]


def test_tokenizer_round_trips_numbers_and_scorer_reads_answer():
    tok = synthetic.WordTokenizer()
    text = "12 + 305 = 317 . #### 317"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids + [tok.eos_id, 5]) == text
    assert tasks.score_numeric(tok.decode(ids), {"answer": 317})["correct"]
    assert not tasks.score_numeric("#### 31", {"answer": 317})["correct"]
    assert tasks.score_numeric("no answer", {"answer": 1})["extracted"] is None


def test_encode_split_masks_the_response_only_and_counts_truncation():
    cfg = type("C", (), dict(num_train=8, num_validation=2, num_test=2, seed=0))
    task = tasks.arithmetic_task(cfg)
    tok = task.tokenizer
    ex = task.splits["train"][0]
    arrays, stats = tasks.encode_split(task, "train", 80)
    n_prompt = 1 + len(tok.encode(task.prompt(ex)))
    n_resp = len(tok.encode(task.response(ex))) + 1
    mask = arrays["loss_mask"][0]
    assert mask.sum() == n_resp
    assert mask[:n_prompt - 1].sum() == 0  # targets inside the prompt carry no loss
    assert arrays["targets"][0][mask > 0][-1] == tok.eos_id
    assert stats["examples"] == 8 and stats["truncated"] == 0
    _, stats = tasks.encode_split(task, "train", 30)
    assert stats["truncated"] == 8


def test_corpus_word_problems_are_solved_and_never_a_task_problem():
    corpus = synthetic.make_corpus(400, seed=0, qa_fraction=0.75)
    qa = [d for d in corpus if d.startswith("Q :")]
    assert 250 <= len(qa) <= 350  # ~75% of 400
    task = synthetic.make_problems(480, 100, 200, seed=0)
    task_text = {synthetic.format_prompt(p) + synthetic.format_response(p)
                 for split in task.values() for p in split}
    assert not task_text & set(qa)
    lo, hi = synthetic.CORPUS_QA_START
    for doc in qa:
        assert " A : " in doc and re.search(r"#### \d+$", doc)
        start = int(re.search(r" has (\d+) ", doc).group(1))
        assert lo <= start < hi  # the task's problems start at 2-9
        for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", doc):
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)


def test_corpus_without_word_problems_is_unchanged_by_the_option():
    plain = synthetic.make_corpus(200, seed=0)
    assert plain == synthetic.make_corpus(200, seed=0, qa_fraction=0.0)
    assert not any(d.startswith("Q :") for d in plain)
    # The facts and narratives come from their own stream: adding word problems
    # replaces documents, it does not reshuffle the others.
    mixed = synthetic.make_corpus(200, seed=0, qa_fraction=0.5)
    others = [d for d in mixed if not d.startswith("Q :")]
    assert others == plain[:len(others)]


def test_corpus_qa_fraction_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="qa_fraction must be in"):
        synthetic.make_corpus(10, seed=0, qa_fraction=1.5)
