"""Merge-readiness diagnostics on 2-parameter toys with hand-computed answers."""

import jax.numpy as jnp
import numpy as np
import pytest

from psm.training import diagnostics

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def _stacked(*points):
    """Replicas as a tree {"w": [K, 2]}."""
    return {"w": jnp.asarray(points, jnp.float32)}


def _loss_fn(f, calls=None):
    """loss_fn over stacked {"w": [M, 2]} from a loss of one point (x, y)."""
    def fn(tree):
        w = np.asarray(tree["w"], np.float64)
        if calls is not None:
            calls.append(len(w))
        return np.array([f(x, y) for x, y in w])
    return fn


def test_barrier_of_a_linear_loss_is_zero():
    params = _stacked([1.0, -2.0], [3.0, 0.5], [-1.0, 4.0])
    avg = {"w": params["w"].mean(0)}
    out = diagnostics.loss_barriers(_loss_fn(lambda x, y: 2 * x - 3 * y + 1), params, avg, GRID)
    assert len(out["pairs"]) == 3 and len(out["to_average"]) == 3
    for row in out["pairs"] + out["to_average"]:
        assert row["barrier"] == pytest.approx(0.0, abs=1e-5)
    # Endpoint losses are the models' own: L(1, -2) = 9 and L(3, 0.5) = 5.5.
    first = out["pairs"][0]
    assert (first["a"], first["b"]) == (0, 1)
    assert first["losses"][0] == pytest.approx(9.0) and first["losses"][-1] == pytest.approx(5.5)
    np.testing.assert_allclose(first["losses"], [9.0, 8.125, 7.25, 6.375, 5.5], rtol=1e-6)


def test_barrier_of_a_double_well_between_its_two_minima():
    # L = (x^2 - 1)^2 + y^2 has minima (+-1, 0); on the line x = 2t - 1, y = 0 the
    # loss is ((2t-1)^2 - 1)^2: 0.5625 at t = 0.25 and 0.75, 1 at t = 0.5.
    params = _stacked([-1.0, 0.0], [1.0, 0.0])
    avg = {"w": jnp.zeros(2)}
    out = diagnostics.loss_barriers(_loss_fn(lambda x, y: (x * x - 1) ** 2 + y * y),
                                    params, avg, GRID)
    pair = out["pairs"][0]
    np.testing.assert_allclose(pair["losses"], [0.0, 0.5625, 1.0, 0.5625, 0.0], atol=1e-6)
    assert pair["barrier"] == pytest.approx(1.0)
    # Replica 0 -> the average (0, 0): x = t - 1, loss (x^2 - 1)^2 rises from 0 to 1;
    # excess over the chord t*1: at t = .25: (0.5625-1)^2 - .25 = -0.058..., t = .5:
    # 0.5625 - 0.5 = 0.0625, t = .75: (0.0625-1)^2 - 0.75 = 0.12890625.
    to_avg = out["to_average"][0]
    assert to_avg["replica"] == 0
    assert to_avg["barrier"] == pytest.approx(0.12890625, abs=1e-6)


def test_barrier_of_a_convex_bowl_is_zero_although_the_middle_is_below_the_chord():
    # L = x^2 + y^2 between (1, 0) and (-1, 0): L(t) = (1-2t)^2 <= 1 = the chord.
    params = _stacked([1.0, 0.0], [-1.0, 0.0])
    out = diagnostics.loss_barriers(_loss_fn(lambda x, y: x * x + y * y), params,
                                    {"w": jnp.zeros(2)}, GRID)
    np.testing.assert_allclose(out["pairs"][0]["losses"], [1, 0.25, 0, 0.25, 1], atol=1e-6)
    assert out["pairs"][0]["barrier"] == 0.0


def test_models_are_scored_in_passes_of_equal_size():
    calls = []
    params = _stacked([1.0, 0.0], [0.0, 1.0], [2.0, 2.0])
    diagnostics.loss_barriers(_loss_fn(lambda x, y: x + y, calls), params,
                              {"w": params["w"].mean(0)}, GRID, models_per_pass=4)
    # 4 ends, then 6 lines x 3 inner points = 18 models in passes of 4 (the last padded).
    assert calls == [4] + [4] * 5


def test_barrier_function_and_grid_checks():
    assert diagnostics.barrier([0, 0.5, 1], [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    for bad in [(0.25, 1.0), (0.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.0,)]:
        with pytest.raises(ValueError, match="grid"):
            diagnostics.check_grid(bad)


def test_task_vector_geometry_by_hand():
    base = {"w": jnp.array([1.0, 1.0])}
    # tau_0 = (3, 4), tau_1 = (3, -4), tau_2 = (0, 5)
    params = _stacked([4.0, 5.0], [4.0, -3.0], [1.0, 6.0])
    geo = diagnostics.task_vector_geometry(params, base)
    np.testing.assert_allclose(geo["norm"], [5.0, 5.0, 5.0])
    # ||tau_0 - tau_1|| = 8, ||tau_0 - tau_2|| = sqrt(9 + 1), ||tau_1 - tau_2|| = sqrt(9 + 81)
    rel = np.array(geo["relative_distance"])
    np.testing.assert_allclose(rel, np.array([[0, 8, 10 ** .5], [8, 0, 90 ** .5],
                                              [10 ** .5, 90 ** .5, 0]]) / 5.0, rtol=1e-6)
    sign = np.array(geo["sign_agreement"])
    # pair (0, 1): one of two entries agrees; pairs with tau_2 compare only entry y.
    np.testing.assert_allclose(sign, [[1, 0.5, 1], [0.5, 1, 0], [1, 0, 1]])


def test_fraction_unchanged_counts_exact_equality_in_the_trees_dtype():
    base = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.5, 0.5])}
    params = {"w": jnp.array([[1.0, 2.0], [1.0, 2.0 + 1e-4]]),
              "b": jnp.array([[0.5, 0.6], [0.5, 0.5]])}
    assert diagnostics.fraction_unchanged(params, base) == [0.75, 0.75]
    as_bf16 = lambda t: {n: v.astype(jnp.bfloat16) for n, v in t.items()}
    # 2 + 1e-4 rounds to 2 in bfloat16 (half an ulp there is 2^-7).
    assert diagnostics.fraction_unchanged(as_bf16(params), as_bf16(base)) == [0.75, 1.0]
