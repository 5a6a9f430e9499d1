"""The selection and resampling bodies, scalar by scalar, against a numpy transcription of
their documented sampling rule with the same random words.

These call the per-element bodies directly (no jit, small arrays), so they run in a second
and pin every comparison and sum of the sampler; the statistical tests in
tests/test_merge_stats.py check that the rule itself has the distribution METHOD.md defines.
"""

import numpy as np
import pytest

from psm.merge import kernels as K

# lowbias32 (Chris Wellons), the hash `draw` documents.
M1, M2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def _mix32(h):
    h = h ^ (h >> np.uint32(16))
    h = h * M1
    h = h ^ (h >> np.uint32(15))
    h = h * M2
    return h ^ (h >> np.uint32(16))


def _draw(ctr, s0, s1):
    with np.errstate(over="ignore"):
        return _mix32(_mix32(ctr ^ s0) ^ s1)


SEEDS = np.array([[0x12345678, 0x9ABCDEF1]], np.uint32)
N = 400


def _unit(u32):
    return ((u32 >> np.uint32(8)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)


def _inputs(seed=0, k=4):
    """K models over a base where each model leaves a different share of scalars unchanged,
    and a stretch (scalars 0..19) where no model changed anything."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(N).astype(np.float32)
    xs = []
    for i in range(k):
        changed = rng.random(N) < (0.3 + 0.2 * i)
        changed[:20] = False
        xs.append(np.where(changed, base + rng.standard_normal(N).astype(np.float32), base))
    return xs, base


def test_draws_are_the_documented_hash():
    ctr = np.arange(1000, dtype=np.uint32) + np.uint32(7)
    got = np.asarray(K.draw(ctr, SEEDS[0]))
    np.testing.assert_array_equal(got, _draw(ctr, SEEDS[0, 0], SEEDS[0, 1]))
    seeds = np.array([[5, 6], [5, 9], [5, 11]], np.uint32)  # streams share s0
    streams = K.draws(ctr, seeds)
    assert len(streams) == 3
    for i, d in enumerate(streams):
        np.testing.assert_array_equal(np.asarray(d), _draw(ctr, seeds[0, 0], seeds[i, 1]))
    u = np.asarray(K._unit(got))
    np.testing.assert_array_equal(u, _unit(got))
    assert u.min() > 0 and u.max() < 1


def test_counters_are_row_major_flat_indices_plus_offset():
    got = np.asarray(K.counters((3, 4, 5), 11))
    np.testing.assert_array_equal(got, np.arange(60, dtype=np.uint32).reshape(3, 4, 5) + 11)
    assert got.dtype == np.uint32  # the hash's shifts are logical only on unsigned words
    scalar = K.counters((), 9)
    assert int(scalar) == 9 and scalar.dtype == np.uint32


@pytest.mark.parametrize("probs", [[0.25] * 4, [0.1, 0.2, 0.3, 0.4]])
def test_select_body_picks_by_cumulative_probability(probs):
    xs, base = _inputs(1)
    ctr = np.arange(N, dtype=np.uint32)
    cum = np.cumsum(probs)
    # Thresholds as the library computes them: C_i * 2^32 as uint32 (last one implicit).
    thresholds = np.array([min(int(c * 2.0**32), 2**32 - 1) for c in cum[:-1]], np.uint32)
    got = np.asarray(K._select_body(xs, base, ctr, SEEDS, thresholds, last=3, poison=False))
    u = _draw(ctr, SEEDS[0, 0], SEEDS[0, 1])
    pick = np.searchsorted(thresholds, u, side="right")  # first i with u < C_i
    want = np.choose(pick, xs)
    np.testing.assert_array_equal(got, want)
    assert len(set(pick.tolist())) == 4


@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("probs", [[0.25] * 4, [0.1, 0.2, 0.3, 0.4]])
def test_resample_body_is_the_closed_form_rule(n, probs):
    xs, base = _inputs(2)
    p = np.asarray(probs, np.float32)
    ctr = np.arange(N, dtype=np.uint32) + np.uint32(1000)
    got = np.asarray(K._resample_body(xs, base, ctr, SEEDS, p, np.float32(0), n=n,
                                      use_tol=False, poison=False))
    u = _unit(_draw(ctr, SEEDS[0, 0], SEEDS[0, 1]))
    changed = np.stack([x != base for x in xs])                       # [K, N]
    q = np.where(changed, 0, p[:, None]).sum(0, dtype=np.float32)     # unchanged mass
    w = np.where(changed, p[:, None], 0).cumsum(0, dtype=np.float32)  # [K, N]
    p_base = q ** np.float32(n + 1)
    r = np.minimum((u - p_base) / (1 - p_base), np.float32(1 - 2.0**-23))
    v = r * w[-1]
    first = np.argmax(v[None] < w, axis=0)  # first changed candidate with r W < W_i
    want = np.where((u < p_base) | (w[-1] == 0), base, np.choose(first, xs))
    np.testing.assert_array_equal(got, want)
    # Where nothing changed the base comes back; elsewhere a changed value, unless the
    # draw fell in the base's share q^(n+1).
    np.testing.assert_array_equal(got[:20], base[:20])
    took_base = (got == base) & changed.any(0)
    assert np.all(u[took_base] < p_base[took_base])
    if n == 3:
        assert took_base.sum() < (got != base).sum()


def test_resample_body_with_a_tolerance_counts_small_changes_as_unchanged():
    xs, base = _inputs(3)
    xs[0] = base + np.float32(1e-4)          # model 0 moved only a little everywhere
    p = np.full(4, 0.25, np.float32)
    ctr = np.arange(N, dtype=np.uint32)
    got = np.asarray(K._resample_body(xs, base, ctr, SEEDS, p, np.float32(1e-3), n=40,
                                      use_tol=True, poison=False))
    changed_elsewhere = np.stack([x != base for x in xs[1:]]).any(0)
    # n = 40 redraws: a changed model is found almost surely, never model 0's tiny change.
    assert not np.any(got == xs[0])
    np.testing.assert_array_equal(got[~changed_elsewhere], base[~changed_elsewhere])
    exact = np.asarray(K._resample_body(xs, base, ctr, SEEDS, p, np.float32(0), n=40,
                                        use_tol=False, poison=False))
    assert np.any(exact == xs[0])  # without the tolerance model 0's change counts


def test_poison_is_negative_zero_or_nan():
    a = np.array([1.0, -0.0, np.inf, 2.0], np.float32)
    b = np.array([3.0, 0.0, 1.0, np.nan], np.float32)
    z = np.asarray(K._poison([a, b], np.float32))
    assert np.all(np.signbit(z[:2])) and np.all(z[:2] == 0) and np.all(np.isnan(z[2:]))
    xs, base = _inputs(4)
    xs[1] = xs[1].copy()
    xs[1][30] = np.nan
    p = np.full(4, 0.25, np.float32)
    ctr = np.arange(N, dtype=np.uint32)
    clean = np.asarray(K._resample_body(xs, base, ctr, SEEDS, p, np.float32(0), n=1,
                                        use_tol=False, poison=False))
    poisoned = np.asarray(K._resample_body(xs, base, ctr, SEEDS, p, np.float32(0), n=1,
                                           use_tol=False, poison=True))
    assert np.isnan(poisoned[30])
    keep = np.arange(N) != 30
    np.testing.assert_array_equal(poisoned[keep], clean[keep])


def test_select_threshold_is_strict():
    """u < C_i picks model i: a draw equal to a threshold goes to the next model."""
    xs, base = _inputs(5)
    ctr = np.arange(N, dtype=np.uint32)
    u = _draw(ctr, SEEDS[0, 0], SEEDS[0, 1])
    j = 37  # every model changed this scalar, so each pick is visible
    assert len({float(x[j]) for x in xs}) == 4
    thresholds = np.array([u[j], np.uint32(3 << 30), np.uint32(0xFFFFFFFF)], np.uint32)
    got = np.asarray(K._select_body(xs, base, ctr, SEEDS, thresholds, last=3, poison=False))
    assert got[j] == (xs[1][j] if u[j] < thresholds[1] else xs[2][j])


def test_resample_boundaries_are_strict():
    """A draw exactly at the base's share P(base) = q goes to a changed model, and a
    cumulative weight equal to r W (here 0, an unchanged model's) does not take it."""
    base = np.zeros(8, np.float32)
    xs = [base.copy(), base + np.float32(1.0)]  # model 0 unchanged, model 1 changed
    ctr = np.arange(8, dtype=np.uint32)
    j = 3
    u_j = _unit(_draw(ctr, SEEDS[0, 0], SEEDS[0, 1]))[j]
    p = np.array([u_j, 1 - u_j], np.float32)  # q = p_0 = u_j at every scalar
    got = np.asarray(K._resample_body(xs, base, ctr, SEEDS, p, np.float32(0), n=0,
                                      use_tol=False, poison=False))
    assert got[j] == 1.0


def test_compute_dtype_widens_16_bit_floats_only():
    import ml_dtypes
    assert K.compute_dtype(ml_dtypes.bfloat16) == np.float32
    assert K.compute_dtype(np.float16) == np.float32
    assert K.compute_dtype(np.float32) == np.float32
    assert K.compute_dtype(np.float64) == np.float64


@pytest.mark.parametrize("body", ["select", "resample"])
def test_poison_keeps_finite_results_bit_identical_and_marks_nan(body):
    xs, base = _inputs(6)
    xs = [x.copy() for x in xs]
    for x in xs:
        x[40] = np.float32(-0.0)  # the sign of a zero result must survive the poison term
    base = base.copy()
    base[40] = np.float32(-0.0)
    xs[2][50] = np.nan
    ctr = np.arange(N, dtype=np.uint32)
    p = np.full(4, 0.25, np.float32)
    thresholds = np.array([1 << 30, 2 << 30, 3 << 30], np.uint32)

    def run(poison):
        if body == "select":
            return np.asarray(K._select_body(xs, base, ctr, SEEDS, thresholds, last=3,
                                             poison=poison))
        return np.asarray(K._resample_body(xs, base, ctr, SEEDS, p, np.float32(0), n=2,
                                           use_tol=False, poison=poison))

    clean, poisoned = run(False), run(True)
    assert np.isnan(poisoned[50])
    keep = np.arange(N) != 50
    np.testing.assert_array_equal(poisoned[keep].view(np.uint32), clean[keep].view(np.uint32))
    assert np.signbit(poisoned[40])


def test_tolerance_is_strict():
    """|x - base| == tol counts as unchanged (changed means strictly more than tol)."""
    base = np.ones(8, np.float32)
    xs = [base + np.float32(0.5), base + np.float32(2.0), base + np.float32(2.0),
          base + np.float32(2.0)]
    p = np.array([0.97, 0.01, 0.01, 0.01], np.float32)
    ctr = np.arange(8, dtype=np.uint32)
    got = np.asarray(K._resample_body(xs, base, ctr, SEEDS, p, np.float32(0.5), n=0,
                                      use_tol=True, poison=False))
    # Model 0 (exactly tol away) is never a changed candidate, so never chosen.
    assert not np.any(got == xs[0])


def test_top_draw_is_one_and_the_cap_keeps_it_on_a_changed_model():
    """The top 24-bit draw maps to u = 1.0 in float32 (k + 0.5 rounds up there), so
    r = (u - P(base)) / (1 - P(base)) = 1; the cap r <= 1 - 2^-23 keeps r W < W, so the
    pick is the changed model, never the unchanged one that sits last."""
    ctr = np.array([5179393], np.uint32)  # found by search: draw >> 8 == 2^24 - 1
    assert (_draw(ctr, SEEDS[0, 0], SEEDS[0, 1]) >> np.uint32(8)) == 2**24 - 1
    assert float(np.asarray(K._unit(K.draw(ctr, SEEDS[0])))[0]) == 1.0
    base = np.zeros(1, np.float32)
    xs = [base + np.float32(1.0), base.copy()]  # model 0 changed, model 1 unchanged (last)
    p = np.array([0.5, 0.5], np.float32)
    got = np.asarray(K._resample_body(xs, base, ctr, SEEDS, p, np.float32(0), n=0,
                                      use_tol=False, poison=False))
    assert got[0] == 1.0
