"""Statistical tests of psm.merge's random draws and of selection with resampling.

Every test uses fixed keys and seeds, so it is deterministic; the thresholds
(p-values above 1e-4, 5-sigma binomial bounds) are what a correct sampler
passes with overwhelming probability, and each resampling comparison also
checks that a deliberately wrong sampler is rejected (the test has power).
"""

import itertools

import jax
import numpy as np
import pytest
from scipy import stats

from psm import merge as M

K_MODELS = 4
PROBS = np.array([0.1, 0.2, 0.3, 0.4])
PATTERNS = list(itertools.product([False, True], repeat=K_MODELS))  # changed masks
PER_PATTERN = 4000


def _resampling_leaf():
    """Rows = changed patterns; model i holds i + 1 where changed, else base (0)."""
    changed = np.repeat(np.array(PATTERNS)[:, None, :], PER_PATTERN, axis=1)  # [16, M, K]
    models = [{"w": np.where(changed[..., i], np.float32(i + 1), np.float32(0))}
              for i in range(K_MODELS)]
    return models, {"w": np.zeros(changed.shape[:2], np.float32)}, changed


def _sequential(changed, n, rng, probs=PROBS, extra_draws=0):
    """Direct simulation of the sequential definition: draw, redraw while unchanged
    (at most n more times); first changed candidate wins, else the base (0)."""
    flat = changed.reshape(-1, K_MODELS)
    draws = rng.choice(K_MODELS, p=probs, size=(n + 1 + extra_draws, flat.shape[0]))
    out = np.zeros(flat.shape[0], np.float32)
    done = np.zeros(flat.shape[0], bool)
    for d in draws:
        hit = ~done & flat[np.arange(flat.shape[0]), d]
        out[hit] = d[hit] + 1
        done |= hit
    return out.reshape(changed.shape[:2])


def _min_pvalue(a, b):
    """Smallest per-pattern chi-square p-value comparing two outcome tables [16, M]."""
    pvals = []
    for row_a, row_b in zip(a, b):
        cats = np.union1d(row_a, row_b)
        table = np.array([[np.sum(row_a == c) for c in cats], [np.sum(row_b == c) for c in cats]])
        if len(cats) > 1:
            pvals.append(stats.chi2_contingency(table)[1])
    return min(pvals)


@pytest.mark.parametrize("n", [0, 1, 3, 40])
def test_resampling_matches_sequential_simulation(n):
    models, base, changed = _resampling_leaf()
    got = np.asarray(M.select(models, key=jax.random.key(100 + n), base=base, probs=PROBS,
                              resample=n)["w"])
    # Outputs are always a changed candidate, or the base value.
    vals = np.arange(1, K_MODELS + 1, dtype=np.float32)
    is_changed_pick = (got[..., None] == vals) & changed
    assert (is_changed_pick.any(-1) | (got == 0)).all()
    sim = _sequential(changed, n, np.random.default_rng(n))
    assert _min_pvalue(got, sim) > 1e-4
    # Power: a sampler with a different number of redraws is detected (one more
    # for small n; for n = 40, where one more barely matters, n = 2).
    extra = 1 if n <= 3 else 2 - n
    wrong = _sequential(changed, n, np.random.default_rng(50 + n), extra_draws=extra)
    assert _min_pvalue(got, wrong) < 1e-6


def test_resampling_ignores_probability_of_unchanged_candidates():
    """Among changed candidates the pick is proportional to p_i, not uniform."""
    models, base, changed = _resampling_leaf()
    got = np.asarray(M.select(models, key=jax.random.key(5), base=base, probs=PROBS,
                              resample=3)["w"])
    sim = _sequential(changed, 3, np.random.default_rng(9), probs=np.full(4, 0.25))
    assert _min_pvalue(got, sim) < 1e-6  # uniform probabilities would be detected


def test_selection_frequencies_follow_probs():
    shape = (512, 512)
    models = [{"w": np.full(shape, i, np.float32)} for i in range(K_MODELS)]
    got = np.asarray(M.select(models, key=jax.random.key(1), probs=PROBS)["w"]).astype(int)
    counts = np.bincount(got.ravel(), minlength=K_MODELS)
    assert stats.chisquare(counts, PROBS * got.size).pvalue > 1e-4
    # Rows, columns and quadrants see the same mix (no positional pattern).
    for part in (got[:256], got[:, 256:], got[::2, ::2], got[1::7]):
        counts = np.bincount(part.ravel(), minlength=K_MODELS)
        assert stats.chisquare(counts, PROBS * part.size).pvalue > 1e-4


# ---- quality of the counter-based hash draws ------------------------------------------

N_SIDE = 1024
KEY = jax.random.key(2024)


def _bits(name="layers/0/w", key=KEY, stream=0):
    return np.asarray(M.leaf_bits(key, name, (N_SIDE, N_SIDE), stream=stream)).ravel()


def _uniform_p(values, bins):
    counts = np.bincount(values, minlength=bins)
    return stats.chisquare(counts).pvalue


def _joint_p(a, b, bins=16):
    """Chi-square independence p-value of two bucketed draw sequences."""
    shift = 32 - int(np.log2(bins))
    table = np.zeros((bins, bins))
    np.add.at(table, ((a >> shift).astype(int), (b >> shift).astype(int)), 1)
    return stats.chi2_contingency(table)[1]


def test_draws_are_uniform():
    u = _bits()
    assert _uniform_p((u >> 24).astype(int), 256) > 1e-4   # top byte
    assert _uniform_p((u & 0xFF).astype(int), 256) > 1e-4  # bottom byte
    assert _uniform_p(((u >> 12) & 0xFF).astype(int), 256) > 1e-4
    ones = np.array([np.count_nonzero((u >> b) & 1) for b in range(32)])
    sigma = np.sqrt(u.size / 4)
    assert np.all(np.abs(ones - u.size / 2) < 5 * sigma)
    # Kolmogorov-Smirnov on the uniforms themselves.
    assert stats.kstest(u / 2.0**32, "uniform").pvalue > 1e-4


@pytest.mark.parametrize("lag", [1, 2, 3, 64, N_SIDE, N_SIDE + 1, 65536])
def test_draws_independent_across_positions(lag):
    u = _bits()
    assert _joint_p(u[:-lag], u[lag:]) > 1e-4
    x = u / 2.0**32 - 0.5
    r = np.corrcoef(x[:-lag], x[lag:])[0, 1]
    assert abs(r) < 5 / np.sqrt(u.size)
    # Low bits of neighbours too (a weak hash shows patterns there first).
    assert _joint_p(u[:-lag] << 28, u[lag:] << 28) > 1e-4


@pytest.mark.parametrize("other", [
    dict(stream=1), dict(stream=3), dict(name="layers/1/w"), dict(name="layers/0/W"),
    dict(key=jax.random.key(2025)), dict(key=jax.random.fold_in(KEY, 1)),
])
def test_draws_independent_across_streams_leaves_keys(other):
    a, b = _bits(), _bits(**other)
    assert _joint_p(a, b) > 1e-4
    assert _joint_p(a << 28, b << 28) > 1e-4
    r = np.corrcoef(a / 2.0**32, b / 2.0**32)[0, 1]
    assert abs(r) < 5 / np.sqrt(a.size)
    assert np.mean(a == b) < 1e-4


# ---- DARE masks -----------------------------------------------------------------------------

def test_dare_keep_rates_and_mask_independence():
    shape = (512, 256)
    base = {"w": np.zeros(shape, np.float32)}
    models = [{"w": np.full(shape, 1.0, np.float32)} for _ in range(3)]
    p = [0.2, 0.5, 0.9]
    keeps = []
    for i in range(3):
        probs = [0.0] * 3  # isolate model i: weight 1 for it, 0 for the others
        probs[i] = 1.0
        out = np.asarray(M.dare(models, base, p, key=jax.random.key(3), weights=probs,
                                rescale="none")["w"])
        keeps.append(out.ravel() == 1.0)
    size = keeps[0].size
    for i in range(3):
        rate = keeps[i].mean()
        assert abs(rate - (1 - p[i])) < 5 * np.sqrt(p[i] * (1 - p[i]) / size)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        table = np.array([[np.sum(keeps[i] & keeps[j]), np.sum(keeps[i] & ~keeps[j])],
                          [np.sum(~keeps[i] & keeps[j]), np.sum(~keeps[i] & ~keeps[j])]])
        assert stats.chi2_contingency(table)[1] > 1e-4
    # Inverse rescaling is unbiased: mean of kept / (1 - p) is 1.
    out = np.asarray(M.dare(models[:1], base, 0.5, key=jax.random.key(4))["w"])
    assert abs(out.mean() - 1.0) < 5 * np.sqrt(1.0 / size)
