"""Imbalance statistics on data with a known trend, and on hand-computed examples."""

import json
import os
import warnings

import numpy as np
import pytest

from psm import imbalance
from psm.training import report


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


# ---- hand-computed values ------------------------------------------------------------------
# K = 3 replicas, N = 5 samples. Controlled loss of replica 0 (METHOD.md: its loss minus the
# mean loss of the same sample under the OTHER replicas):
#   [1-(2+0)/2, 2-(2+1)/2, 3-(2+1)/2, 4-(2+3)/2, 5-(2+6)/2] = [0, 0.5, 1.5, 1.5, 1.0].
HAND_POSITIONS = np.array([[0.0, 0.2, 0.4, 0.6, 0.8],
                           [0.8, 0.6, 0.4, 0.2, 0.0],
                           [0.4, 0.0, 0.8, 0.2, 0.6]])
HAND_LOSSES = np.array([[1.0, 2.0, 3.0, 4.0, 5.0],
                        [2.0, 2.0, 2.0, 2.0, 2.0],
                        [0.0, 1.0, 1.0, 3.0, 6.0]])


def test_controlled_trend_of_a_hand_example():
    rep = imbalance.imbalance_report(HAND_POSITIONS, HAND_LOSSES, num_bins=5)
    ctrl = rep["controlled"][0]
    # Least squares of y = [0, .5, 1.5, 1.5, 1] on x = [0, .2, .4, .6, .8]:
    # Sxy = .36 + .08 + 0 + .12 + .04 = .6, Sxx = .4 -> slope 1.5, intercept .9 - 1.5 * .4.
    # (Subtracting the mean over ALL replicas would scale y by 2/3: slope 1.0.)
    assert ctrl["slope"] == pytest.approx(1.5, abs=1e-12)
    assert ctrl["intercept"] == pytest.approx(0.3, abs=1e-12)
    # One sample per bin: the binned means are the controlled values themselves.
    np.testing.assert_allclose(ctrl["binned_means"], [0.0, 0.5, 1.5, 1.5, 1.0], atol=1e-12)
    np.testing.assert_allclose(ctrl["quintile_means"], [0.0, 0.5, 1.5, 1.5, 1.0], atol=1e-12)
    # Ranks of y: [1, 2, 4.5, 4.5, 3] against [1..5]: rho = 6.5 / sqrt(10 * 9.5).
    assert ctrl["spearman"] == pytest.approx(6.5 / np.sqrt(95.0), abs=1e-12)

    # Replica 1 is constant (2.0): controlled = 2 - mean(replica 0, replica 2)
    #   = 2 - [0.5, 1.5, 2, 3.5, 5.5] = [1.5, .5, 0, -1.5, -3.5] at positions [.8,.6,.4,.2,0].
    c1 = rep["controlled"][1]
    np.testing.assert_allclose(c1["binned_means"], [-3.5, -1.5, 0.0, 0.5, 1.5], atol=1e-12)
    assert c1["slope"] == pytest.approx(6.0, abs=1e-12)  # Sxy = 2.4, Sxx = .4
    assert c1["spearman"] == pytest.approx(1.0)
    # Raw trend of replica 0: y = 1 + 5x exactly.
    raw = rep["raw"][0]
    assert raw["slope"] == pytest.approx(5.0) and raw["intercept"] == pytest.approx(1.0)
    assert raw["spearman"] == pytest.approx(1.0)


def test_binned_means_put_edge_positions_in_the_bin_they_start():
    # Positions are r / N; r / N == b / B exactly must land in bin b, also where
    # np.linspace's edge is one ulp above (0.6000000000000001).
    n, bins = 10, 5
    positions = np.arange(n) / n
    centres, means = imbalance.binned_means(positions, np.arange(n, dtype=float), bins)
    np.testing.assert_allclose(centres, [0.1, 0.3, 0.5, 0.7, 0.9])
    np.testing.assert_array_equal(means, [0.5, 2.5, 4.5, 6.5, 8.5])
    # An empty bin is NaN, not an error or a zero, and no empty slice is averaged.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, sparse = imbalance.binned_means(np.array([0.05, 0.95]), np.array([1.0, 3.0]), 4)
    assert sparse[0] == 1.0 and sparse[3] == 3.0 and np.isnan(sparse[1]) and np.isnan(sparse[2])


@pytest.mark.parametrize("bad", [[0.2, 1.0], [-0.1, 0.5], [0.3, np.nan]])
def test_binned_means_refuse_positions_outside_the_unit_interval(bad):
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 1\)"):
        imbalance.binned_means(np.array(bad), np.ones(len(bad)), 4)


def test_trend_reports_the_p_value_and_default_bins():
    rng = np.random.default_rng(5)
    pos = rng.permutation(300) / 300
    losses = pos + rng.normal(0, 1.0, 300)
    t = imbalance.trend(pos, losses)
    rho, p = __import__("scipy").stats.spearmanr(pos, losses)
    assert t["spearman"] == rho and t["spearman_p"] == p
    assert len(t["binned_means"]) == 20 and len(t["quintile_means"]) == 5
    rep = imbalance.imbalance_report(np.stack([pos, pos[::-1]]), np.stack([losses, losses]))
    assert all(len(x["binned_means"]) == 20 for x in rep["raw"] + rep["controlled"])
    rep = imbalance.imbalance_report(np.stack([pos, pos[::-1]]), np.stack([losses, losses]),
                                     num_bins=7)
    assert all(len(x["binned_means"]) == 7 for x in rep["raw"] + rep["controlled"])


def test_controlled_trend_needs_two_replicas():
    rep = imbalance.imbalance_report(HAND_POSITIONS[:1], HAND_LOSSES[:1], num_bins=5)
    assert rep["controlled"] is None and len(rep["raw"]) == 1
    # K = 2: each replica's loss minus the other's.
    rep = imbalance.imbalance_report(HAND_POSITIONS[:2], HAND_LOSSES[:2], num_bins=5)
    np.testing.assert_allclose(rep["controlled"][0]["binned_means"],
                               HAND_LOSSES[0] - HAND_LOSSES[1], atol=1e-12)
    # Replica 1's positions run backwards: bin b holds sample 4 - b.
    np.testing.assert_allclose(rep["controlled"][1]["binned_means"],
                               (HAND_LOSSES[1] - HAND_LOSSES[0])[::-1], atol=1e-12)


def test_quintile_table_of_a_linear_trend():
    n = 1000
    rng = np.random.default_rng(4)
    positions = rng.permutation(n) / n
    losses = 2.0 - positions  # the mean of quintile q is 2 - (q / 5 + 0.1 - 0.0005)
    t = imbalance.trend(positions, losses, num_bins=20)
    expected = [2.0 - (q / 5 + 0.1 - 0.0005) for q in range(5)]
    np.testing.assert_allclose(t["quintile_means"], expected, atol=1e-12)
    assert len(t["binned_means"]) == 20 and t["slope"] == pytest.approx(-1.0)


def _write_records(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_load_records_round_trips_what_the_report_writes(tmp_path):
    merged = {"average": HAND_LOSSES.mean(0), "select": HAND_LOSSES[2]}
    report.write_per_sample(str(tmp_path), [10, 11, 12, 13, 14], HAND_POSITIONS,
                            HAND_LOSSES, merged)
    positions, losses, got_merged, ids = imbalance.load_records(str(tmp_path))
    assert ids == [10, 11, 12, 13, 14]
    np.testing.assert_array_equal(positions, HAND_POSITIONS)
    np.testing.assert_array_equal(losses, HAND_LOSSES)
    assert list(got_merged) == ["average", "select"]
    for name in merged:
        np.testing.assert_array_equal(got_merged[name], merged[name])
    paths = imbalance.redraw(str(tmp_path), num_bins=5)
    assert [os.path.relpath(p, tmp_path) for p in paths] == [
        os.path.join("plots", "loss_vs_position.png"), os.path.join("plots", "anchor_view.png")]
    assert all(os.path.getsize(p) > 10_000 for p in paths)


def test_positions_survive_the_records_file_exactly(tmp_path):
    # r / N with N = 7 has no short decimal form; a rounded file would change
    # the statistics recomputed from it.
    positions = np.stack([np.arange(7) / 7, np.arange(7)[::-1] / 7])
    report.write_per_sample(str(tmp_path), list(range(7)), positions,
                            np.ones((2, 7)), {})
    got, _, _, _ = imbalance.load_records(str(tmp_path))
    np.testing.assert_array_equal(got, positions)


@pytest.mark.parametrize("content,match", [
    ([], "holds no records"),
    (['{"id": 1, "position": [0.1], "loss": {"replicas": [1.0], "merged": {}}}', "{oops"],
     r"per_sample.jsonl, line 2: not a per-sample record"),
    (['{"id": 1, "position": [0.1]}'], r"per_sample.jsonl, line 1: .*'loss'"),
    (['{"id": 1, "position": [0.1], "loss": {"replicas": [1.0], "merged": {}}}',
      '{"id": 2, "position": [0.1, 0.2], "loss": {"replicas": [1.0, 2.0], "merged": {}}}'],
     r"line 2: 2 positions"),
])
def test_bad_records_file_names_the_file_and_line(tmp_path, content, match):
    _write_records(tmp_path / "per_sample.jsonl", content)
    with pytest.raises(ValueError, match=match):
        imbalance.load_records(str(tmp_path))


def test_missing_records_file_says_the_run_has_not_finished(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"per_sample.jsonl not found: per-sample "
                                                r"records are written at the end of a "
                                                r"finished run$"):
        imbalance.load_records(str(tmp_path))


def test_load_records_skips_blank_lines_and_reads_a_single_record(tmp_path):
    one = {"id": 3, "position": [0.5, 0.25], "loss": {"replicas": [1.0, 2.0],
                                                      "merged": {"average": 1.5}}}
    two = dict(one, id=4)
    _write_records(tmp_path / "per_sample.jsonl", [one, "", "   ", two])
    positions, losses, merged, ids = imbalance.load_records(str(tmp_path))
    assert ids == [3, 4] and positions.shape == (2, 2)
    np.testing.assert_array_equal(merged["average"], [1.5, 1.5])
    _write_records(tmp_path / "per_sample.jsonl", [one])
    positions, losses, merged, ids = imbalance.load_records(str(tmp_path))
    assert ids == [3] and losses.shape == (2, 1) and list(merged) == ["average"]


@pytest.mark.parametrize("second,match", [
    ({"position": [0.5]}, r"line 2: 1 positions, 2 replica losses"),
    ({"loss": {"replicas": [1.0], "merged": {"average": 1.5}}}, r"line 2: 2 positions, 1 "),
    ({"loss": {"replicas": [1.0, 2.0], "merged": {"select": 1.5}}}, r"merged models \['select'\]"),
])
def test_records_of_another_shape_name_the_line(tmp_path, second, match):
    one = {"id": 3, "position": [0.5, 0.25], "loss": {"replicas": [1.0, 2.0],
                                                      "merged": {"average": 1.5}}}
    _write_records(tmp_path / "per_sample.jsonl", [one, {**one, "id": 4, **second}])
    with pytest.raises(ValueError, match=match):
        imbalance.load_records(str(tmp_path))


def test_bad_record_message_names_the_error_type(tmp_path):
    _write_records(tmp_path / "per_sample.jsonl", ['{"id": "x", "position": [0.1]}'])
    with pytest.raises(ValueError, match=r"line 1: not a per-sample record \(ValueError: "):
        imbalance.load_records(str(tmp_path))


def test_redraw_draws_both_figures_with_the_requested_bins(tmp_path, monkeypatch):
    report.write_per_sample(str(tmp_path), [10, 11, 12, 13, 14], HAND_POSITIONS,
                            HAND_LOSSES, {"average": HAND_LOSSES.mean(0)})
    calls = {}
    monkeypatch.setattr(imbalance, "plot_loss_vs_position",
                        lambda *a, **kw: calls.setdefault("loss", (a, kw)))
    monkeypatch.setattr(imbalance, "plot_anchor_view",
                        lambda *a, **kw: calls.setdefault("anchor", (a, kw)))
    imbalance.redraw(str(tmp_path), num_bins=7)
    a, kw = calls["loss"]
    assert 7 in a[3:] or kw.get("num_bins") == 7
    assert kw.get("title") == "final training loss vs first-epoch position"
    a, kw = calls["anchor"]
    assert kw.get("num_bins") == 7
    assert set(a[2]) == {"average"}
    calls.clear()
    imbalance.redraw(str(tmp_path))  # the command's default: 20 bins, as the trainer's
    assert calls["anchor"][1].get("num_bins") == 20


def test_load_records_names_the_line_of_a_bad_byte(tmp_path):
    """Invalid UTF-8 in per_sample.jsonl is a user error naming file and line (a text-mode
    read raised it from the codec, outside psm, as a traceback)."""
    from psm import cli
    good = json.dumps({"id": 0, "position": [0.5], "loss": {"replicas": [1.0], "merged": {}}})
    (tmp_path / "per_sample.jsonl").write_bytes(good.encode() + b"\n" + b'{"id": 1\xff}\n')
    with pytest.raises(ValueError, match=r"per_sample.jsonl, line 2: not a per-sample record")\
            as raised:
        imbalance.load_records(str(tmp_path))
    assert cli.is_user_error(raised.value)
