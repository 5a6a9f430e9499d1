"""The merge API takes K models in exactly two forms, and refuses the rest.

A list/tuple of K trees, or one tree with a leading model axis K when the
caller passes `stacked=True`. A dict of K models or a single unstacked model
used to be read as a stacked tree and merged along the wrong axis.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm import merge as M

KEY = jax.random.key(0)


def _models(k=2):
    rng = np.random.default_rng(0)
    return [{"w": jnp.asarray(rng.standard_normal(4), jnp.float32)} for _ in range(k)]


def test_dict_of_models_is_refused_with_what_to_pass():
    t0, t1 = _models()
    with pytest.raises(TypeError, match=r"dict with keys \['m0', 'm1'\], read as ONE tree.*"
                                        r"list\(models.values\(\)\).*stacked=True"):
        M.average({"m0": t0, "m1": t1})
    for fn in (lambda m: M.select(m, key=KEY), lambda m: M.ties(m, t0, 0.5),
               lambda m: M.dare(m, t0, 0.5, key=KEY), lambda m: M.task_arithmetic(m, t0),
               lambda m: M.merge("average", m)):
        with pytest.raises(TypeError, match="read as ONE tree"):
            fn({"m0": t0, "m1": t1})


def test_single_unstacked_tree_is_refused():
    t0, _ = _models()
    with pytest.raises(TypeError, match=r"read as ONE tree.*stacked=True"):
        M.average(t0)


def test_list_with_stacked_true_is_refused():
    models = _models()
    with pytest.raises(TypeError, match=r"stacked=True takes one tree.*list of 2 entries"):
        M.average(models, stacked=True)
    with pytest.raises(TypeError, match="stacked must be True or False"):
        M.average({"w": jnp.zeros((2, 4))}, stacked="yes")


def test_both_accepted_forms_agree():
    models = _models(3)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    want = np.mean([np.asarray(m["w"]) for m in models], 0)
    for got in (M.average(models), M.average(tuple(models)), M.average(stacked, stacked=True),
                M.merge("average", stacked, stacked=True)):
        assert got["w"].shape == (4,)
        np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(M.select(models, key=KEY)["w"]),
                                  np.asarray(M.select(stacked, key=KEY, stacked=True)["w"]))
