"""Imbalance statistics on data with a known trend."""

import numpy as np

from psm import imbalance


def test_trend_recovers_known_slope_and_sign():
    rng = np.random.default_rng(0)
    pos = rng.permutation(2000) / 2000
    losses = 1.0 - 0.5 * pos + rng.normal(0, 0.05, 2000)
    t = imbalance.trend(pos, losses, num_bins=10)
    assert t["spearman"] < -0.8
    assert abs(t["slope"] + 0.5) < 0.02
    assert t["binned_means"][0] > t["binned_means"][-1]
    flat = imbalance.trend(pos, rng.normal(0, 1, 2000))
    assert abs(flat["spearman"]) < 0.1


def test_difficulty_controlled_trend_removes_per_sample_difficulty():
    rng = np.random.default_rng(1)
    k, n = 4, 3000
    positions = np.stack([rng.permutation(n) / n for _ in range(k)])
    difficulty = rng.gamma(2.0, 0.5, n)  # shared by all replicas, much larger than the effect
    losses = difficulty[None] + 0.1 * positions
    rep = imbalance.imbalance_report(positions, losses, num_bins=10)
    for raw, ctrl in zip(rep["raw"], rep["controlled"]):
        # loss_k - mean(others) = 0.1 * (pos_k - mean of 3 other uniform positions):
        # its correlation with pos_k is 1 / sqrt(1 + 1/3) = 0.866 in expectation.
        assert 0.83 < ctrl["spearman"] < 0.9
        assert raw["spearman"] < 0.2  # the same effect, buried under sample difficulty


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(2)
    pos = np.stack([rng.permutation(100) / 100 for _ in range(3)])
    losses = rng.normal(1, 0.1, (3, 100))
    path = tmp_path / "plots" / "a.png"
    imbalance.plot_loss_vs_position(pos, losses, str(path))
    imbalance.plot_anchor_view(pos, losses, {"average": losses.mean(0)}, str(tmp_path / "b.png"))
    assert path.stat().st_size > 10_000 and (tmp_path / "b.png").stat().st_size > 10_000
