"""Tests for psm.evaluation.glue against scipy and hand computations."""

import csv
import json
import os
import re

import numpy as np
import pytest
from scipy import stats

from psm.evaluation import glue


def test_accuracy_and_f1_by_hand():
    assert glue.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # tp = 2 (positions 0, 4), fp = 1 (position 1), fn = 1 (position 3):
    # precision = recall = 2/3, so F1 = 2/3.
    assert glue.f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)
    # Positive class 0 instead: tp = 1, fp = 1, fn = 1 -> F1 = 1/2.
    assert glue.f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], positive=0) == pytest.approx(0.5)
    # Precision 1, recall 1/3 -> F1 = 2 * 1 * (1/3) / (4/3) = 1/2.
    assert glue.f1([1, 0, 0], [1, 1, 1]) == pytest.approx(0.5)
    assert glue.f1([0, 0], [0, 0]) == 0.0  # no positives anywhere: undefined -> 0


def test_matthews_by_hand_and_as_phi_coefficient():
    # The textbook example (also in scikit-learn's documentation): -1/3.
    assert glue.matthews_corrcoef([1, -1, 1, 1], [1, 1, 1, -1]) == pytest.approx(-1 / 3)
    # tp=3, tn=2, fp=1, fn=0: (3*2 - 1*0) / sqrt(4 * 3 * 3 * 2) = 6 / sqrt(72).
    pred, gold = [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]
    assert glue.matthews_corrcoef(pred, gold) == pytest.approx(6 / np.sqrt(72))
    assert glue.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction
    rng = np.random.default_rng(0)
    for _ in range(20):
        # For two classes MCC is Pearson's phi of the 0/1 vectors.
        gold = rng.integers(0, 2, 50)
        pred = np.where(rng.random(50) < 0.7, gold, 1 - gold)
        assert glue.matthews_corrcoef(pred, gold) == pytest.approx(
            stats.pearsonr(pred, gold)[0], abs=1e-12)


def _one_hot_mcc(pred, gold):
    # Multi-class MCC as the correlation of one-hot indicator matrices.
    classes = np.union1d(pred, gold)
    x = (pred[:, None] == classes[None]).astype(float)
    y = (gold[:, None] == classes[None]).astype(float)
    x -= x.mean(0)
    y -= y.mean(0)
    return np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))


def test_matthews_multiclass_matches_one_hot_correlation():
    rng = np.random.default_rng(1)
    for _ in range(20):
        gold = rng.integers(0, 3, 40)
        pred = np.where(rng.random(40) < 0.5, gold, rng.integers(0, 3, 40))
        assert glue.matthews_corrcoef(pred, gold) == pytest.approx(_one_hot_mcc(pred, gold))


def test_pearson_and_spearman_match_scipy_with_ties():
    rng = np.random.default_rng(2)
    for size in (2, 3, 10, 200):
        x = np.round(rng.normal(size=size), 1)  # rounding creates ties
        y = np.round(x + rng.normal(size=size), 1)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        assert glue.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert glue.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    # Heavy ties: integer scores 0..5.
    x, y = rng.integers(0, 6, 100), rng.integers(0, 6, 100)
    assert glue.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    # Hand case: ranks of [10, 20, 20, 30] are [1, 2.5, 2.5, 4].
    np.testing.assert_allclose(glue._average_ranks(np.array([20.0, 10, 30, 20])),
                               [2.5, 1, 4, 2.5])
    assert glue.spearman([1, 2, 3, 4], [10, 100, 1000, 10000]) == pytest.approx(1.0)
    assert np.isnan(glue.pearson([1, 1, 1], [1, 2, 3]))


def test_glue_metrics_mapping():
    pred, gold = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    assert set(glue.glue_metrics("CoLA", pred, gold)) == {"mcc"}
    assert glue.glue_metrics("SST-2", pred, gold) == {"accuracy": 0.6}
    mrpc = glue.glue_metrics("mrpc", pred, gold)
    assert mrpc == {"accuracy": 0.6, "f1": pytest.approx(2 / 3)}
    for task in ("rte", "WNLI", "qnli", "mnli_matched"):
        assert glue.glue_metrics(task, pred, gold) == {"accuracy": 0.6}
    sts = glue.glue_metrics("STS-B", [0.5, 2.0, 4.5, 3.0], [1.0, 2.2, 5.0, 2.5])
    assert set(sts) == {"pearson", "spearman"}
    assert glue.metric_names("sts_b") == ("pearson", "spearman")
    json.dumps(mrpc)


def test_glue_metrics_errors_name_the_task():
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'"):
        glue.glue_metrics("squad", [1], [1])
    with pytest.raises(ValueError, match="GLUE task 'MRPC': 3 predictions but 2 labels"):
        glue.glue_metrics("MRPC", [1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="GLUE task 'CoLA': predictions must be integer"):
        glue.glue_metrics("CoLA", [0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="GLUE task 'stsb': predictions must be finite"):
        glue.glue_metrics("stsb", [np.nan, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="GLUE task 'rte': no examples"):
        glue.glue_metrics("rte", [], [])
    with pytest.raises(ValueError, match=r"must be 1-D \[N\]"):
        glue.glue_metrics("sst2", [[1, 0]], [[1, 0]])


def test_per_example_records():
    records = glue.per_example("MRPC", [1, 0], [1, 1], ids=np.array([7, 9]))
    assert records == [{"id": 7, "prediction": 1, "label": 1, "correct": True},
                       {"id": 9, "prediction": 0, "label": 1, "correct": False}]
    sts = glue.per_example("stsb", [1.5], [2.0])
    assert sts == [{"prediction": 1.5, "label": 2.0, "abs_error": 0.5}]
    json.dumps(records)
    json.dumps(sts)


def _read_tsv(path, header):
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def test_dev_sets_against_scipy(shared_data_dir):
    root = os.path.join(shared_data_dir, "glue", "glue_data")
    cola = np.array([int(r[1]) for r in _read_tsv(os.path.join(root, "CoLA", "dev.tsv"), False)])
    assert cola.size == 1043
    flipped = cola.copy()
    flipped[::7] = 1 - flipped[::7]  # a deterministic imperfect classifier
    got = glue.glue_metrics("CoLA", flipped, cola)["mcc"]
    assert got == pytest.approx(stats.pearsonr(flipped, cola)[0], abs=1e-12)
    assert glue.glue_metrics("CoLA", cola, cola)["mcc"] == pytest.approx(1.0)

    sts = np.array([float(r[-1]) for r in _read_tsv(os.path.join(root, "STS-B", "dev.tsv"),
                                                  True)])
    assert sts.size == 1500
    noisy = np.round(sts + np.random.default_rng(3).normal(0, 1, sts.size), 1)
    got = glue.glue_metrics("STS-B", noisy, sts)
    assert got["pearson"] == pytest.approx(stats.pearsonr(noisy, sts)[0], abs=1e-12)
    assert got["spearman"] == pytest.approx(stats.spearmanr(noisy, sts)[0], abs=1e-12)

    mrpc = np.array([int(r[0]) for r in _read_tsv(os.path.join(root, "MRPC", "dev.tsv"), True)])
    assert mrpc.size == 408
    always_yes = np.ones_like(mrpc)
    got = glue.glue_metrics("MRPC", always_yes, mrpc)
    positive_rate = mrpc.mean()
    # Always predicting 1: accuracy = share of positives, precision = that share,
    # recall = 1, so F1 = 2p / (p + 1).
    assert got["accuracy"] == pytest.approx(positive_rate)
    assert got["f1"] == pytest.approx(2 * positive_rate / (positive_rate + 1))


# ---- input checks of each metric, named by the metric (mutation survivors) ------------------

@pytest.mark.parametrize("fn,name", [(glue.accuracy, "accuracy"), (glue.f1, "f1"),
                                     (glue.matthews_corrcoef, "matthews_corrcoef")])
def test_class_metrics_refuse_fractional_predictions_by_name(fn, name):
    with pytest.raises(ValueError, match=rf"^{name}: predictions must be integer class ids, "
                                         r"got dtype float64 \(first value 0\.5\)"):
        fn(np.array([0.5, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match=rf"^{name}: labels must be integer class ids"):
        fn(np.array([0, 1]), np.array([1.0, 0.25]))
    # Whole-valued floats are class ids.
    assert fn(np.array([1.0, 0.0, 1.0]), np.array([1, 0, 1])) == 1.0


@pytest.mark.parametrize("fn,name", [(glue.pearson, "pearson"), (glue.spearman, "spearman")])
def test_correlations_refuse_non_finite_values_by_name(fn, name):
    with pytest.raises(ValueError, match=rf"^{name}: labels must be finite real numbers"):
        fn(np.array([0.5, 1.0, 2.0]), np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match=rf"^{name}: predictions must be finite real numbers"):
        fn(np.array([np.inf, 1.0, 2.0]), np.array([0.0, 0.5, 1.0]))
    # Fractional values are fine here.
    assert fn(np.array([0.5, 1.5, 2.5]), np.array([0.1, 0.2, 0.3])) == pytest.approx(1.0)


@pytest.mark.parametrize("pred,gold,where", [
    (np.zeros((2, 2)), np.zeros(2), "shapes (2, 2) and (2,)"),
    (np.zeros(2), np.zeros((2, 1)), "shapes (2,) and (2, 1)"),
])
def test_metrics_refuse_non_vectors(pred, gold, where):
    with pytest.raises(ValueError, match=re.escape(f"accuracy: predictions and labels must be "
                                                   f"1-D [N], got {where}")):
        glue.accuracy(pred, gold)


def test_constant_vectors_give_documented_conventions_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(glue.pearson(np.ones(4), np.arange(4.0)))
        assert glue.matthews_corrcoef(np.ones(4, int), np.array([0, 1, 0, 1])) == 0.0
    # The smallest defined Matthews case: two examples, both right.
    assert glue.matthews_corrcoef(np.array([0, 1]), np.array([0, 1])) == 1.0
