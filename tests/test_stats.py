"""psm.stats: the paired bootstrap against hand-computed cases and a known-distribution
simulation, pairing, multi-seed pooling, metric recomputation and verdicts."""

import itertools

import numpy as np
import pytest

from psm import stats
from psm.evaluation import glue


def test_percentile_interval_of_known_values():
    assert stats.percentile_interval(np.arange(101)) == (2.5, 97.5)
    assert stats.percentile_interval(np.arange(101), level=0.5) == (25.0, 75.0)
    with pytest.raises(ValueError, match="no values"):
        stats.percentile_interval([])


def test_two_examples_hand_computed():
    # A right on example 0 only, B never: a resample of 2 examples holds example 0
    # 0, 1 or 2 times with probability 1/4, 1/2, 1/4, so D is 0, 0.5 or 1.
    out = stats.paired_bootstrap([np.array([1, 0])], [np.array([0, 0])], draws=10_000, seed=3)
    assert out["estimate"] == 0.5 and out["per_seed"] == [0.5]
    assert (out["lo"], out["hi"]) == (0.0, 1.0)
    d = stats.paired_bootstrap([np.array([1, 0])], [np.array([0, 0])], draws=10_000,
                               seed=3)["draws"]
    assert set(np.unique(d)) == {0.0, 0.5, 1.0}
    for value, p in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        # 4 binomial standard errors: fails with probability ~1e-4 for a correct sampler.
        assert abs(np.mean(d == value) - p) < 4 * np.sqrt(p * (1 - p) / len(d))


def test_three_examples_match_the_exact_bootstrap_distribution():
    a = np.array([1.0, 0.0, 1.0])
    b = np.array([0.0, 0.0, 1.0])  # D per example: 1, 0, 0
    exact = {}
    for idx in itertools.product(range(3), repeat=3):  # 27 equally likely resamples
        value = round(float(np.mean(a[list(idx)] - b[list(idx)])), 9)
        exact[value] = exact.get(value, 0) + 1 / 27
    d = stats.paired_bootstrap([a], [b], stats.MEAN, draws=20_000, seed=1)["draws"]
    d = np.round(d, 9)
    assert set(np.unique(d)) == set(exact)
    for value, p in exact.items():
        assert abs(np.mean(d == value) - p) < 4 * np.sqrt(p * (1 - p) / len(d)), value


def test_mean_of_models_side_is_the_mean_of_their_metrics():
    singles = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # accuracies .5 .25 0
    merged = np.array([1, 1, 1, 0])
    out = stats.paired_bootstrap([merged], [singles], draws=200)
    assert out["estimate"] == pytest.approx(0.75 - 0.25)


def test_identical_sides_give_exactly_zero():
    rng = np.random.default_rng(0)
    flags = [rng.random(50) < 0.4, rng.random(80) < 0.7]
    out = stats.paired_bootstrap(flags, flags, draws=2_000)
    assert (out["lo"], out["hi"], out["estimate"]) == (0.0, 0.0, 0.0)
    labels = [rng.integers(0, 2, 50), rng.integers(0, 2, 80)]
    preds = [rng.integers(0, 2, 50), rng.integers(0, 2, 80)]
    out = stats.paired_bootstrap(preds, preds, stats.MATTHEWS, labels=labels, draws=300)
    assert (out["lo"], out["hi"]) == (0.0, 0.0)


def test_constant_shift_gives_the_shift():
    rng = np.random.default_rng(1)
    b = rng.normal(size=200)
    out = stats.paired_bootstrap([b + 0.3], [b], stats.MEAN, draws=2_000)
    assert out["lo"] == pytest.approx(0.3, abs=1e-12)
    assert out["hi"] == pytest.approx(0.3, abs=1e-12)
    # Two seeds shifted by 0.2 and 0.4: D is averaged over seeds in every draw.
    c = rng.normal(size=70)
    out = stats.paired_bootstrap([b + 0.2, c + 0.4], [b, c], stats.MEAN, draws=2_000)
    assert out["lo"] == pytest.approx(0.3, abs=1e-12)
    assert out["hi"] == pytest.approx(0.3, abs=1e-12)
    assert out["per_seed"] == pytest.approx([0.2, 0.4])


def test_pairing_uses_one_resample_for_both_sides():
    # With A = B + noise on a few examples only, an unpaired bootstrap would have an
    # interval as wide as the spread of B itself; the paired one only sees the noise.
    rng = np.random.default_rng(2)
    b = rng.random(400) < 0.5
    a = b.copy()
    a[:8] = True  # at most 8 examples differ, all in A's favour
    out = stats.paired_bootstrap([a], [b], draws=2_000)
    assert out["lo"] >= 0.0
    assert out["hi"] <= 8 / 400 * 2.5


def test_pooling_averages_seed_differences_within_each_draw():
    rng = np.random.default_rng(3)
    a = [rng.random(60) < 0.6, rng.random(90) < 0.5]
    b = [rng.random(60) < 0.5, rng.random(90) < 0.5]
    out = stats.paired_bootstrap(a, b, draws=1_000, seed=7)
    by_seed = []
    for s in range(2):
        r = stats.resampled_scores(np.stack([a[s], b[s]]), None, stats.ACCURACY, 1_000, 7, s)
        by_seed.append(r[:, 0] - r[:, 1])
    np.testing.assert_allclose(out["draws"], (by_seed[0] + by_seed[1]) / 2, atol=1e-15)
    assert out["estimate"] == pytest.approx(np.mean([a[s].mean() - b[s].mean()
                                                     for s in range(2)]))


def test_pooling_narrows_the_interval_like_more_data():
    # Two seeds of N examples from one distribution: the pooled interval is about
    # 1/sqrt(2) as wide as one seed's.
    rng = np.random.default_rng(4)
    a = [rng.random(2_000) < 0.55 for _ in range(2)]
    b = [rng.random(2_000) < 0.5 for _ in range(2)]
    one = stats.paired_bootstrap(a[:1], b[:1], draws=4_000)
    two = stats.paired_bootstrap(a, b, draws=4_000)
    ratio = (two["hi"] - two["lo"]) / (one["hi"] - one["lo"])
    assert 0.6 < ratio < 0.82, ratio


def test_coverage_on_a_known_distribution():
    # Paired Bernoulli scores with a known difference of means 0.1: the 95% interval
    # should hold it in about 95% of simulated test sets.
    rng = np.random.default_rng(5)
    trials, n, hits = 300, 150, 0
    for t in range(trials):
        u = rng.random(n)
        b = u < 0.5
        a = (u < 0.6) ^ (rng.random(n) < 0.05)  # correlated with B, mean 0.6 * .95 + .4 * .05
        out = stats.paired_bootstrap([a], [b], draws=1_000, seed=t)
        hits += out["lo"] <= 0.6 * 0.95 + 0.4 * 0.05 - 0.5 <= out["hi"]
    # Binomial(300, 0.95) lies in [270, 296] with probability > 0.999; the percentile
    # bootstrap undercovers slightly at this N, so allow down to 0.89.
    assert 0.89 <= hits / trials <= 0.99, hits / trials


def test_fast_path_equals_recomputation_per_draw():
    rng = np.random.default_rng(6)
    a, b = [rng.random(40) < 0.6], [rng.random(40) < 0.4]
    slow = stats.Metric("accuracy_by_draw", stats.ACCURACY.fn)  # no per_example: recomputes
    fast = stats.paired_bootstrap(a, b, stats.ACCURACY, draws=600, seed=2)
    recomputed = stats.paired_bootstrap(a, b, slow, draws=600, seed=2)
    np.testing.assert_allclose(fast["draws"], recomputed["draws"], atol=1e-12)
    assert (fast["lo"], fast["hi"]) == pytest.approx((recomputed["lo"], recomputed["hi"]))


def test_matthews_is_recomputed_on_each_resample():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 30)
    a = np.where(rng.random(30) < 0.8, labels, 1 - labels)
    b = np.where(rng.random(30) < 0.6, labels, 1 - labels)
    got = stats.resampled_scores(np.stack([a, b]), labels, stats.MATTHEWS, draws=300,
                                 seed=4, seed_index=1)
    want = np.concatenate([
        [[glue.matthews_corrcoef(a[i], labels[i]), glue.matthews_corrcoef(b[i], labels[i])]
         for i in idx] for _, idx in stats.resample_indices(4, 1, 30, 300)])
    np.testing.assert_array_equal(got, want)
    # Matthews of a resample is not the resample's mean of any per-example score:
    # check it differs from accuracy on the same draws.
    acc = stats.resampled_scores(np.stack([a, b]), labels, stats.ACCURACY, 300, 4, 1)
    assert not np.allclose(got, acc)
    out = stats.paired_bootstrap([a], [b], stats.MATTHEWS, labels=[labels], draws=300)
    assert out["estimate"] == pytest.approx(glue.matthews_corrcoef(a, labels)
                                            - glue.matthews_corrcoef(b, labels))


def test_draws_do_not_depend_on_the_other_models():
    rng = np.random.default_rng(8)
    x = rng.random((3, 25)) < 0.5
    all3 = stats.resampled_scores(x, None, stats.ACCURACY, 700, 1, 0)
    one = stats.resampled_scores(x[1], None, stats.ACCURACY, 700, 1, 0)
    np.testing.assert_array_equal(all3[:, 1], one[:, 0])


@pytest.mark.parametrize("lo,hi,sign,want", [
    (0.01, 0.2, 1, "reproduced"), (-0.2, -0.01, 1, "not reproduced"),
    (-0.1, 0.1, 1, "inconclusive"), (0.0, 0.1, 1, "inconclusive"),
    (0.0, 0.0, 1, "inconclusive"), (-0.1, 0.0, 1, "inconclusive"),
    (-0.2, -0.01, -1, "reproduced"), (0.01, 0.2, -1, "not reproduced"),
    (-0.1, 0.1, -1, "inconclusive")])
def test_verdict(lo, hi, sign, want):
    assert stats.verdict(lo, hi, sign) == want


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="paper_sign"):
        stats.verdict(0.0, 1.0, 0)
    with pytest.raises(ValueError, match="empty or not a number"):
        stats.verdict(1.0, 0.0)
    with pytest.raises(ValueError, match="seed 1: A has 3 examples, B has 4"):
        stats.paired_bootstrap([np.ones(2), np.ones(3)], [np.ones(2), np.ones(4)], draws=10)
    with pytest.raises(ValueError, match="2 seeds in one argument but 1"):
        stats.paired_bootstrap([np.ones(2)], [np.ones(2), np.ones(2)], draws=10)
    with pytest.raises(ValueError, match="no seeds"):
        stats.paired_bootstrap([], [], draws=10)
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        stats.get_metric("auc")
