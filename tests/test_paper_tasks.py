"""The paper tasks' own code (psm/data/paper_tasks.py): held-out splits never overlap
training, and the per-example scorers the trainer reports for GLUE and STS-B."""

import numpy as np
import pytest

from configs import common
from psm.data import paper_tasks, prompts


# ---- the validation split held out from train ----------------------------------------------

def _records(n, first_id=1000):
    return [{"id": first_id + 3 * i, "text": f"r{i}"} for i in range(n)]


@pytest.mark.parametrize("n,held", [(10, 1), (50, 7), (200, 199)])
def test_split_off_partitions_the_records_by_id(n, held):
    records = _records(n)
    kept, out = paper_tasks._split_off(records, held, seed=3)
    kept_ids, out_ids = [r["id"] for r in kept], [r["id"] for r in out]
    assert len(out_ids) == held and len(kept_ids) == n - held
    assert not set(kept_ids) & set(out_ids)
    assert sorted(kept_ids + out_ids) == [r["id"] for r in records]
    assert kept_ids == sorted(kept_ids) and out_ids == sorted(out_ids)  # id order kept


def test_split_off_is_a_pure_function_of_the_seed():
    records = _records(100)
    a = [r["id"] for r in paper_tasks._split_off(records, 10, seed=0)[1]]
    assert a == [r["id"] for r in paper_tasks._split_off(records, 10, seed=0)[1]]
    b = [r["id"] for r in paper_tasks._split_off(records, 10, seed=1)[1]]
    assert a != b


@pytest.mark.parametrize("held", [100, 150])
def test_split_off_refuses_holding_out_everything(held):
    with pytest.raises(ValueError, match=r"config.task.num_validation \(\d+\) must be smaller "
                                         r"than the 100 training examples"):
        paper_tasks._split_off(_records(100), held, seed=0)


class _WordTokenizer:
    """A stand-in for a model tokenizer: one id per character (enough for splitting)."""

    eos_id, pad_id, vocab_size, chat_template = 0, 0, 256, None

    def encode(self, text, add_special_tokens=False):
        return [min(ord(c), 255) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("task", ["cola", "sst2"])
def test_glue_task_splits_do_not_overlap(shared_data_dir, task):
    cfg = common.base().task
    cfg.name, cfg.data_dir, cfg.num_validation, cfg.num_train, cfg.num_test = (
        task, shared_data_dir, 64, 0, 0)
    t = paper_tasks.paper_task(cfg, _WordTokenizer())
    train, val = [e["id"] for e in t.splits["train"]], [e["id"] for e in t.splits["validation"]]
    assert len(val) == 64 and len(set(val)) == 64 and len(set(train)) == len(train)
    assert not set(train) & set(val)
    # The test set is GLUE's labelled validation split, a different source split.
    from psm.data import sources
    glue_val = sources.load(task, "validation", manual_dir=shared_data_dir)
    assert [e["id"] for e in t.splits["test"]] == [e["id"] for e in glue_val]
    glue_train = sources.load(task, "train", manual_dir=shared_data_dir)
    assert sorted(train + val) == sorted(e["id"] for e in glue_train)
    # num_train truncates the training split only, never into the held-out examples.
    cfg.num_train = 100
    t2 = paper_tasks.paper_task(cfg, _WordTokenizer())
    assert [e["id"] for e in t2.splits["train"]] == train[:100]
    assert [e["id"] for e in t2.splits["validation"]] == val


# ---- per-example scorers ----------------------------------------------------------------

@pytest.mark.parametrize("task,text,label,extracted,correct", [
    ("cola", " yes", 1, 1, True),
    ("cola", "Yes.", 1, 1, True),
    ("cola", "  NO, it is not acceptable", 0, 0, True),
    ("cola", "no", 1, 0, False),
    # Ambiguous outputs: the FIRST word decides, whatever follows.
    ("cola", "yes no", 0, 1, False),
    ("cola", "no yes", 0, 0, True),
    ("cola", "Yes! No.", 1, 1, True),
    # A first word that is no label word is wrong for every label, even if a
    # label word follows.
    ("cola", "maybe yes", 1, None, False),
    ("cola", "yesno", 1, None, False),
    ("cola", "", 0, None, False),
    ("cola", "   ", 1, None, False),
    ("sst2", "positive", 1, 1, True),
    ("sst2", "Negative, clearly", 0, 0, True),
    ("sst2", "positively", 1, None, False),
    # RTE's label order is reversed: 0 = entailment = "yes".
    ("rte", "yes", 0, 0, True),
    ("rte", "yes", 1, 0, False),
    ("rte", "No", 1, 1, True),
    ("mrpc", "yes", 1, 1, True),
])
def test_glue_label_word_scorer(task, text, label, extracted, correct):
    score = paper_tasks._glue_scorer(task)
    assert score(text, {"label": label}) == {"correct": correct, "extracted": extracted}


def test_glue_scorer_reads_back_every_trained_response():
    for task in ("cola", "sst2", "mrpc", "rte"):
        score = paper_tasks._glue_scorer(task)
        for label in range(len(prompts.GLUE_LABEL_WORDS[task])):
            response = prompts.glue_response(task, label)
            assert score(response, {"label": label}) == {"correct": True, "extracted": label}


@pytest.mark.parametrize("text,label,extracted,correct", [
    (" 3.2", 3.6, 3.2, True),
    ("3.1", 3.6, 3.1, True),        # |3.6 - 3.1| = 0.5: within 0.5 counts
    ("3.0", 3.6, 3.0, False),       # 0.6 off
    ("4.6", 4.0, 4.6, False),
    (" 5", 4.6, 5.0, True),
    ("The similarity is 2.5.", 2.2, 2.5, True),
    ("1.0 or maybe 4.0", 4.0, 4.0, True),  # the last number is the answer
    ("#### 0.4 then 3", 0.0, 0.4, True),   # an explicit final answer wins
    ("no number", 2.0, None, False),
    ("", 0.0, None, False),
])
def test_stsb_within_half_scorer(text, label, extracted, correct):
    score = paper_tasks._glue_scorer("stsb")
    got = score(text, {"label": label})
    assert got["correct"] is correct
    assert got["extracted"] == (pytest.approx(extracted) if extracted is not None else None)


def test_stsb_scorer_reads_back_trained_responses():
    score = paper_tasks._glue_scorer("stsb")
    for label in np.linspace(0.0, 5.0, 11):
        assert score(prompts.glue_response("stsb", label), {"label": float(label)})["correct"]
