"""Tests of psm.merge: semantics, structure handling, sharding, validation."""

import dataclasses
import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from psm.merge import host_staging, kernels, methods, ties_threshold
from psm import merge as M

KEY = jax.random.key(7)


def _tree(rng, shapes, dtype=np.float32, scale=1.0):
    return {name: jnp.asarray((scale * rng.standard_normal(shape)).astype(dtype))
            for name, shape in shapes.items()}


def _finetune(rng, base, frac_changed=0.6, scale=0.05):
    """base + sparse noise: a fraction of entries stays exactly at the base value."""
    out = {}
    for name, b in base.items():
        b32 = np.asarray(b, np.float32)
        delta = scale * rng.standard_normal(b32.shape) * (rng.random(b32.shape) < frac_changed)
        out[name] = jnp.asarray((b32 + delta).astype(b.dtype))
    return out


SHAPES = {"embed": (16, 8), "layers/0/w": (8, 12), "layers/1/w": (8, 12), "bias": (12,)}


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    base = _tree(rng, SHAPES)
    models = [_finetune(rng, base) for _ in range(4)]
    return base, models


def _stack(models):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *models)


def _assert_trees_identical(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.dtype(x.dtype) == np.dtype(y.dtype)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- leaf names and keys -------------------------------------------------------------

def test_leaf_name_conventions():
    @dataclasses.dataclass
    class Box:
        value: object
        other: object

    jax.tree_util.register_dataclass(Box, data_fields=["value", "other"], meta_fields=[])
    tree = {"model.layers.0.self_attn.q_proj.weight": np.zeros(2),
            "layers": [{"kernel": np.zeros(1)}, Box(np.zeros(1), np.zeros(1))],
            "blocks": {3: np.zeros(1)}}
    names = sorted(M.leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
    # Box.value is dropped as an NNX-style trailing 'value'; ints become decimals.
    assert names == ["blocks/3", "layers/0/kernel", "layers/1", "layers/1/other",
                     "model.layers.0.self_attn.q_proj.weight"]


def test_leaf_name_nnx_state():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs) for _ in range(2)])

    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    names = sorted(M.leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0])
    assert names == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]


def test_leaf_key_is_sha256_fold_in():
    name = "layers/0/attn/q_proj/kernel"
    digest = hashlib.sha256(name.encode()).digest()
    w0 = int.from_bytes(digest[0:4], "little")
    w1 = int.from_bytes(digest[4:8], "little")
    want = jax.random.fold_in(jax.random.fold_in(KEY, np.uint32(w0)), np.uint32(w1))
    got = M.leaf_key(KEY, name)
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
    raw = jax.random.key_data(KEY)  # raw uint32 keys give the same stream
    np.testing.assert_array_equal(jax.random.key_data(M.leaf_key(raw, name)),
                                  jax.random.key_data(want))


def test_leaf_bits_follow_documented_formula():
    name, shape = "a/b", (5, 7)
    lk = M.leaf_key(KEY, name)
    s0 = int(jax.random.bits(lk, (), jnp.uint32))
    s1 = int(jax.random.bits(jax.random.fold_in(lk, 2), (), jnp.uint32))

    def mix(h):
        h = np.uint32(h)
        with np.errstate(over="ignore"):
            h ^= h >> np.uint32(16)
            h = h * np.uint32(0x7FEB352D)
            h ^= h >> np.uint32(15)
            h = h * np.uint32(0x846CA68B)
            h ^= h >> np.uint32(16)
        return h

    ctr = np.arange(35, dtype=np.uint32).reshape(shape) + np.uint32(100)
    want = mix(mix(ctr ^ np.uint32(s0)) ^ np.uint32(s1))
    got = np.asarray(M.leaf_bits(KEY, name, shape, stream=2, offset=100))
    np.testing.assert_array_equal(got, want)


def test_draws_do_not_depend_on_python_hash_seed():
    code = ("import jax, numpy as np; from psm.merge import leaf_bits; "
            "b = np.asarray(leaf_bits(jax.random.key(3), 'layers/0/w', (64,))); "
            "print(','.join(map(str, b[:8])))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345", "JAX_PLATFORMS": "cpu"}).stdout.strip()
    here = np.asarray(M.leaf_bits(jax.random.key(3), "layers/0/w", (64,)))
    assert out == ",".join(map(str, here[:8]))


# ---- average ------------------------------------------------------------------------------

def test_average_matches_float64_reference(setup):
    _, models = setup
    w = [0.1, 0.2, 0.3, 0.4]
    out = M.average(models, w)
    for name in SHAPES:
        ref = sum(wi * np.asarray(m[name], np.float64) for wi, m in zip(w, models))
        np.testing.assert_allclose(np.asarray(out[name]), ref, rtol=1e-6, atol=1e-7)
        assert out[name].dtype == jnp.float32


def test_average_default_is_uniform_and_stacked_equals_list(setup):
    _, models = setup
    a = M.average(models)
    _assert_trees_identical(a, M.average(models, [0.25] * 4))
    _assert_trees_identical(a, M.average(_stack(models), stacked=True))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype):
    rng = np.random.default_rng(1)
    models = [{"w": jnp.asarray(rng.standard_normal((64, 33)), dtype)} for _ in range(3)]
    out = M.average(models, [0.5, 0.25, 0.25])
    assert out["w"].dtype == dtype
    ref32 = sum(w * np.asarray(m["w"], np.float32) for w, m in zip([0.5, 0.25, 0.25], models))
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(jnp.asarray(ref32, dtype)))


def test_numpy_inputs_give_numpy_outputs_including_float64():
    rng = np.random.default_rng(2)
    models = [{"w": rng.standard_normal((5, 6)), "n": np.arange(3)} for _ in range(3)]
    out = M.average(models)
    assert isinstance(out["w"], np.ndarray) and out["w"].dtype == np.float64
    np.testing.assert_allclose(out["w"], np.mean([m["w"] for m in models], 0), rtol=1e-14)
    sel = M.select(models, key=KEY)
    assert sel["w"].dtype == np.float64
    assert np.all(np.any([sel["w"] == m["w"] for m in models], axis=0))


# ---- select ---------------------------------------------------------------------------

def test_select_every_scalar_is_a_candidate_and_all_candidates_appear(setup):
    _, models = setup
    out = M.select(models, key=KEY)
    for name in SHAPES:
        cands = np.stack([np.asarray(m[name]) for m in models])
        hit = cands == np.asarray(out[name])[None]
        assert hit.any(axis=0).all()
    big = [{"w": jnp.full((200, 50), float(i))} for i in range(4)]
    counts = np.bincount(np.asarray(M.select(big, key=KEY)["w"]).astype(int).ravel(),
                         minlength=4)
    assert (counts > 2000).all()  # each ~2500 of 10000


def test_select_identical_models_and_one_hot(setup):
    base, models = setup
    _assert_trees_identical(M.select([base] * 3, key=KEY), base)
    for i in range(4):
        probs = [0.0] * 4
        probs[i] = 1.0
        _assert_trees_identical(M.select(models, key=KEY, probs=probs), models[i])
        _assert_trees_identical(
            M.select(models, key=KEY, probs=probs, base=base, resample=2),
            jax.tree.map(lambda x, b: x, models[i], base))


def test_select_keeps_negative_zero_bits():
    models = [{"w": jnp.array([-0.0, 0.0, -0.0])}] * 2
    out = np.asarray(M.select(models, key=KEY)["w"])
    np.testing.assert_array_equal(np.signbit(out), [True, False, True])


def test_select_depends_only_on_key_and_leaf_name(setup):
    _, models = setup
    full = M.select(models, key=KEY)
    # Reversed insertion order and a subset of leaves: same draws per leaf.
    rev = [dict(reversed(list(m.items()))) for m in models]
    _assert_trees_identical(M.select(rev, key=KEY), full)
    sub = M.select([{"bias": m["bias"]} for m in models], key=KEY)
    np.testing.assert_array_equal(sub["bias"], full["bias"])
    # Same data under another name, or another key: different draws.
    renamed = M.select([{"layers/0/w": m["layers/1/w"]} for m in models], key=KEY)
    assert not np.array_equal(renamed["layers/0/w"], full["layers/1/w"])
    other = M.select(models, key=jax.random.key(8))
    assert not np.array_equal(other["embed"], full["embed"])
    raw = M.select(models, key=jax.random.key_data(KEY))
    _assert_trees_identical(raw, full)


def test_select_stacked_equals_list(setup):
    base, models = setup
    _assert_trees_identical(M.select(_stack(models), key=KEY, stacked=True),
                            M.select(models, key=KEY))
    _assert_trees_identical(
        M.select(_stack(models), key=KEY, base=base, resample=3, stacked=True),
        M.select(models, key=KEY, base=base, resample=3))


def test_select_resample_prefers_changed_candidates():
    base = {"w": jnp.zeros((100, 100))}
    # Model i changed (value i+1) only where i == column % 4; else unchanged.
    cols = np.arange(100) % 4
    models = [{"w": jnp.asarray(np.where(cols == i, i + 1.0, 0.0)[None].repeat(100, 0))}
              for i in range(4)]
    plain = np.asarray(M.select(models, key=KEY)["w"])
    many = np.asarray(M.select(models, key=KEY, base=base, resample=60)["w"])
    want = (cols + 1.0)[None].repeat(100, 0)
    assert (plain == want).mean() < 0.4  # plain selection hits the changed one 1/4 of the time
    np.testing.assert_array_equal(many, want)  # 0.75^61 ~ 2e-8 per scalar


def test_select_tolerance_treats_small_changes_as_unchanged():
    base = {"w": jnp.zeros((50, 40))}
    models = [{"w": jnp.full((50, 40), 1e-4)}, {"w": jnp.full((50, 40), 1.0)}]
    exact = np.asarray(M.select(models, key=KEY, base=base, resample=40)["w"])
    tol = np.asarray(M.select(models, key=KEY, base=base, resample=40, tolerance=1e-3)["w"])
    assert np.isin(exact, [np.float32(1e-4), 1.0]).all() and (exact == np.float32(1e-4)).any()
    np.testing.assert_array_equal(tol, np.ones((50, 40), np.float32))


def test_select_offset_chunks_match_whole_leaf(setup):
    base, models = setup
    whole = M.select(models, key=KEY, base=base, resample=2)["layers/0/w"]
    chunks = [M.select([{"layers/0/w": m["layers/0/w"][r:r + 3]} for m in models], key=KEY,
                       base={"layers/0/w": base["layers/0/w"][r:r + 3]}, resample=2,
                       offset=r * 12)["layers/0/w"] for r in (0, 3, 6)]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


# ---- task arithmetic / TIES / DARE semantics -----------------------------------------

def test_task_arithmetic_reference(setup):
    base, models = setup
    w = [1.0, -0.5, 0.25, 2.0]
    out = M.task_arithmetic(models, base, 0.7, w)
    for name in SHAPES:
        b = np.asarray(base[name], np.float64)
        ref = b + 0.7 * sum(wi * (np.asarray(m[name], np.float64) - b)
                            for wi, m in zip(w, models))
        np.testing.assert_allclose(np.asarray(out[name]), ref, rtol=1e-5, atol=1e-6)


def _ties_reference(models, base, density, weights, scale=1.0, normalize=True,
                    scope="tensor"):
    """Brute force: stable sort of magnitudes (ties by position), float32 arithmetic
    (float64 for float64 leaves)."""
    names = sorted(base)
    k_models = len(models)
    ct = {n: np.float64 if np.asarray(base[n]).dtype == np.float64 else np.float32
          for n in names}
    tau = [{n: np.asarray(m[n], ct[n]) - np.asarray(base[n], ct[n]) for n in names}
           for m in models]
    kept = [dict() for _ in range(k_models)]
    for i in range(k_models):
        groups = [[n] for n in names] if scope == "tensor" else [names]
        for group in groups:
            flat = np.concatenate([tau[i][n].ravel() for n in group])
            k = ties_threshold.trim_count(density[i], flat.size)
            order = np.argsort(-np.abs(flat).astype(np.float64), kind="stable")
            mask = np.zeros(flat.size, bool)
            mask[order[:k]] = True
            off = 0
            for n in group:
                size = tau[i][n].size
                kept[i][n] = np.where(mask[off:off + size], flat[off:off + size], 0
                                      ).reshape(tau[i][n].shape)
                off += size
    out = {}
    for n in names:
        c = ct[n]
        ds = [c(weights[i]) * kept[i][n] for i in range(k_models)]
        maj = np.where(sum(ds) >= 0, c(1.0), c(-1.0))
        agree = [np.sign(d) == maj for d in ds]
        num = sum(np.where(a, d, c(0)) for a, d in zip(agree, ds))
        den = sum(np.where(a, c(w), c(0)) for a, w in zip(agree, weights))
        mixed = num / np.where(den == 0, c(1), den) if normalize else num
        out[n] = (np.asarray(base[n], c) + mixed * c(scale)).astype(np.asarray(base[n]).dtype)
    return out


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float64])
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_ties_exact_against_brute_force(dtype, scope):
    rng = np.random.default_rng(3)
    # 'big' exceeds the exact-solve size, so the sampled bracket path runs; bf16
    # magnitudes have many exact ties at the threshold.
    shapes = {"big": (ties_threshold.EXACT // 256 + 7, 300), "small": (33, 5), "vec": (9,)}
    base = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    models = [{n: (np.asarray(b, np.float32) + 0.01 * rng.standard_normal(b.shape)
                   * (rng.random(b.shape) < 0.7)).astype(dtype) for n, b in base.items()}
              for _ in range(3)]
    dens, w = [0.1, 0.35, 1.0], [0.5, 1.0, 2.0]
    got = M.ties(models, base, dens, w, trim=scope)
    ref = _ties_reference(models, base, dens, w, scope=scope)
    # Compared in the leaf's own dtype (bfloat16 through float32, which holds it exactly):
    # a float64 result must agree at float64 precision, not after a cast to float32.
    exact = np.float32 if dtype == ml_dtypes.bfloat16 else dtype
    for n in shapes:
        assert got[n].dtype == dtype
        np.testing.assert_array_equal(np.asarray(got[n], exact), np.asarray(ref[n], exact),
                                      err_msg=n)
    # With scale != 1 XLA may contract base + scale * m into one FMA: a 1-ulp change of
    # the result, so the tolerance is one ulp of the leaf's dtype (bf16: 2^-8 relative).
    scaled = M.ties(models, base, dens, w, scale=0.9, trim=scope)
    ref = _ties_reference(models, base, dens, w, scale=0.9, scope=scope)
    ulp = {np.float32: (1.2e-7, 1e-7), np.float64: (2.3e-16, 1e-15),
           ml_dtypes.bfloat16: (7.9e-3, 1e-6)}[dtype]
    for n in shapes:
        np.testing.assert_allclose(np.asarray(scaled[n], exact), np.asarray(ref[n], exact),
                                   rtol=ulp[0], atol=ulp[1], err_msg=n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_strict_bounds_match_position_tie_break(dtype):
    """The one-comparison kernel (signed strict bounds) keeps exactly what the
    position tie-break keeps, for every kind of (threshold, cut) it accepts,
    on data full of exact ties and zero deltas."""
    rng = np.random.default_rng(5)
    n = 4096
    base = rng.standard_normal(n).astype(dtype)
    # Deltas from a few values (many exact magnitude ties), 30% exactly zero.
    deltas = rng.choice(np.array([0.5, 0.25, 0.125, 0.0625], dtype), size=(3, n))
    deltas *= rng.choice([-1, 1], size=(3, n)) * (rng.random((3, n)) < 0.7)
    xs = tuple(jnp.asarray(base + d) for d in deltas)
    utype = kernels.uint_for(dtype)
    bits = lambda v: np.asarray([v], dtype).view(utype)[0]
    none = np.iinfo(utype).max
    cut_all = 0xFFFFFFFF
    cases = [  # (t, cut) per model
        [(bits(0.25), cut_all), (bits(0.125), 0), (bits(0.0), 1234)],
        [(bits(0.0), cut_all), (none, 0), (bits(0.5), cut_all)],
        [(bits(0.0625), 0), (bits(0.0), 0), (bits(0.7), cut_all)],
    ]
    w = np.asarray([0.5, 1.0, 2.0], dtype)
    with jax.enable_x64(dtype == np.float64):
        for case in cases:
            tbits = np.asarray([t for t, _ in case], utype)
            cuts = np.asarray([c for _, c in case], np.uint32)
            bounds = kernels.strict_bounds(tbits, cuts)
            assert bounds is not None
            for normalize in (True, False):
                args = dict(stacked=False, normalize=normalize, out_sharding=None,
                            poison=True)
                ref = kernels.ties_kernel(xs, jnp.asarray(base), tbits, cuts, w,
                                                 dtype(1), **args)
                got = kernels.ties_kernel(xs, jnp.asarray(base), bounds, cuts, w,
                                                 dtype(1), by_position=False, **args)
                np.testing.assert_array_equal(np.asarray(got).view(utype),
                                              np.asarray(ref).view(utype))
    # A cut inside the ties at a nonzero threshold needs the positions.
    assert kernels.strict_bounds(np.asarray([bits(0.25)], utype),
                                        np.asarray([7], np.uint32)) is None


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float64])
@pytest.mark.parametrize("stacked", [False, True])
def test_ties_host_sample_equals_device_sample(dtype, stacked):
    """Host-resident leaves are sampled by numpy: the same bits as the XLA kernel."""
    rng = np.random.default_rng(8)
    shape = (ties_threshold.EXACT // 64 + 3, 96)
    base = {"w": rng.standard_normal(shape).astype(dtype)}
    models = [{"w": (rng.standard_normal(shape) * 0.1 + base["w"]).astype(dtype)}
              for _ in range(3)]
    if stacked:
        models = {"w": np.stack([m["w"] for m in models])}
    with jax.enable_x64(dtype == np.float64):
        prep = methods._prepare(models, base, need_base=True, stacked=stacked)
        (leaf,) = prep.leaves
        host = ties_threshold._host_views(leaf)
        assert host is not None
        rows = ties_threshold._positions(leaf.size // 32, 512)
        got = ties_threshold._host_block_sample(*host, rows, 32)
        want = np.asarray(kernels.block_sample_bits_kernel(
            leaf.inputs, leaf.base, rows, stacked=stacked, block=32))
    np.testing.assert_array_equal(got, want)
    # Non-contiguous host arrays take the device path.
    leaf_t = dataclasses.replace(leaf, base=np.asarray(leaf.base).T)
    assert ties_threshold._host_views(leaf_t) is None


def test_ties_bracket_miss_falls_back_to_exact(monkeypatch):
    rng = np.random.default_rng(4)
    base = {"w": rng.standard_normal((ties_threshold.EXACT // 100 + 1, 101)).astype(np.float32)}
    models = [{"w": base["w"] + rng.standard_normal(base["w"].shape).astype(np.float32)}
              for _ in range(2)]
    want = _ties_reference(models, base, [0.3, 0.3], [1.0, 1.0])["w"]
    # A bracket that can never contain the k-th magnitude.
    never = lambda vals, *a: (vals.dtype.type(0), vals.dtype.type(1))  # noqa: E731
    monkeypatch.setattr(ties_threshold, "_bracket_uniform", never)
    monkeypatch.setattr(ties_threshold, "_bracket", never)
    got = M.ties(models, base, 0.3)
    np.testing.assert_array_equal(np.asarray(got["w"]), want)
    got = M.ties(models, base, 0.3, trim="model")  # one leaf: same as per tensor
    np.testing.assert_array_equal(np.asarray(got["w"]), want)


@pytest.mark.parametrize("size", [100, 5000, 70000])
def test_order_stats_equal_a_full_partition(size):
    rng = np.random.default_rng(size)
    # Many exact repeats (as magnitudes of unchanged entries are 0) and a spread.
    vals = (np.abs(rng.standard_normal(size)) * (rng.random(size) < 0.7)).astype(
        np.float32).view(np.uint32)
    for ranks in ([0], [size - 1], [size // 2, size // 3], [size - 5, 7, size // 4]):
        np.testing.assert_array_equal(ties_threshold._order_stats(vals, ranks),
                                      np.partition(vals, ranks)[ranks], err_msg=str(ranks))


def test_sample_variance_sees_correlated_blocks():
    """Blocks of equal magnitudes carry the information of one value each: the
    cluster estimate must exceed the binomial one by about the block size."""
    rng = np.random.default_rng(5)
    block, s, n, k = 32, 1 << 15, 1 << 22, 1 << 20
    iid = rng.random(s).astype(np.float32).view(np.uint32)
    clumped = np.repeat(rng.random(s // block), block).astype(np.float32).view(np.uint32)
    q = k / n
    binomial = n * n / s * q * (1 - q)
    assert ties_threshold._sample_variance(iid, n, k, block) == pytest.approx(binomial, rel=0.1)
    assert ties_threshold._sample_variance(clumped, n, k, block) > 0.5 * block * binomial


@pytest.mark.parametrize("rows_scaled", [False, True])
def test_ties_bracket_holds_on_typical_tensors(monkeypatch, rows_scaled):
    """The sampled bracket should contain the threshold (a miss is exact but
    costs a full search): for i.i.d. deltas, and for deltas whose scale varies
    by row (what makes magnitudes within a sampled block correlate)."""
    rng = np.random.default_rng(6)
    shape = (ties_threshold.EXACT // 128 + 3, 256)
    scale = np.exp(rng.standard_normal((shape[0], 1))) if rows_scaled else 1.0
    base = {"w": rng.standard_normal(shape).astype(np.float32)}
    models = [{"w": (base["w"] + scale * 0.01 * rng.standard_normal(shape)
                     * (rng.random(shape) < 0.7)).astype(np.float32)} for _ in range(4)]
    exact_searches = []
    orig = ties_threshold._solve_job_exact
    monkeypatch.setattr(ties_threshold, "_solve_job_exact",
                        lambda job: (exact_searches.append(job.leaf.name), orig(job))[1])
    got = M.ties(models, base, [0.05, 0.2, 0.5, 0.9])
    assert exact_searches == []
    want = _ties_reference(models, base, [0.05, 0.2, 0.5, 0.9], [1.0] * 4)["w"]
    np.testing.assert_array_equal(np.asarray(got["w"]), want)


def test_ties_normalize_off_and_density_ends(setup):
    base, models = setup
    w = [1.0, 0.5, 0.25, 1.5]
    got = M.ties(models, base, 0.4, w, normalize=False)
    ref = _ties_reference(models, base, [0.4] * 4, w, normalize=False)
    for n in SHAPES:
        np.testing.assert_array_equal(np.asarray(got[n]), ref[n])
    _assert_trees_identical(M.ties(models, base, 0.0), base)


def test_dare_without_drop_is_task_arithmetic(setup):
    base, models = setup
    w = [1.0, 0.5, -0.5, 0.3]
    ta = M.task_arithmetic(models, base, 0.8, w)
    for rescale in ("inverse", "l1", "none"):
        d = M.dare(models, base, 0.0, key=KEY, weights=w, scale=0.8, rescale=rescale)
        for n in SHAPES:
            np.testing.assert_allclose(np.asarray(d[n]), np.asarray(ta[n]), rtol=1e-6,
                                       atol=1e-7)
    dt = M.dare(models, base, 0.0, key=KEY, weights=w, combine="ties", normalize=True)
    tt = M.ties(models, base, 1.0, w)
    for n in SHAPES:
        np.testing.assert_allclose(np.asarray(dt[n]), np.asarray(tt[n]), rtol=1e-6, atol=1e-7)


def test_dare_masks_follow_leaf_bits_and_rescale():
    base = {"w": jnp.zeros((64, 64))}
    models = [{"w": jnp.full((64, 64), 1.0 + i)} for i in range(2)]
    p = [0.25, 0.6]
    out = np.asarray(M.dare(models, base, p, key=KEY, weights=[1.0, 10.0])["w"])
    keep = [np.asarray(M.leaf_bits(KEY, "w", (64, 64), stream=i)) >=
            np.uint32(round(p[i] * 2**32)) for i in range(2)]
    want = (keep[0] * (1.0 / 0.75) + keep[1] * (10.0 * 2.0 / 0.4)).astype(np.float32)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    l1 = np.asarray(M.dare(models[:1], base, 0.5, key=KEY, rescale="l1")["w"])
    assert np.isclose(np.abs(l1).sum(), 64 * 64, rtol=1e-6)  # L1 of tau preserved


def test_dare_offset_chunks_match_whole_leaf(setup):
    base, models = setup
    whole = M.dare(models, base, 0.4, key=KEY)["layers/1/w"]
    parts = [M.dare([{"layers/1/w": m["layers/1/w"][r:r + 4]} for m in models],
                    {"layers/1/w": base["layers/1/w"][r:r + 4]}, 0.4, key=KEY,
                    offset=r * 12)["layers/1/w"] for r in (0, 4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


# ---- structure: NNX, integer leaves, no stacking ---------------------------------------

def test_nnx_states_list_and_stacked():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(6, 5, rngs=rngs) for _ in range(2)])
            self.count = nnx.Variable(jnp.array(3, jnp.int32))

    nets = [Net(nnx.Rngs(i)) for i in range(3)]
    states = [nnx.state(n) for n in nets]
    base = {"layers": {0: {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)},
                       1: {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)}},
            "count": jnp.array(3, jnp.int32)}
    avg = M.average(states)
    assert isinstance(avg, nnx.State)
    target = Net(nnx.Rngs(9))
    nnx.update(target, avg)
    want = np.mean([np.asarray(n.layers[1].kernel[...]) for n in nets], 0)
    np.testing.assert_allclose(np.asarray(target.layers[1].kernel[...]), want, rtol=1e-6)
    assert int(target.count[...]) == 3
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    a = M.select(states, key=KEY, base=base, resample=1)
    b = M.select(stacked, key=KEY, base=base, resample=1, stacked=True)
    _assert_trees_identical(a, b)


def test_integer_leaves_must_match(setup):
    _, models = setup
    with_step = [{**m, "step": jnp.array([5, 6], jnp.int32), "flag": jnp.array(True)}
                 for m in models]
    out = M.average(with_step)
    np.testing.assert_array_equal(out["step"], [5, 6])
    assert out["step"].dtype == jnp.int32 and bool(out["flag"])
    with_step[2] = {**with_step[2], "step": jnp.array([5, 7], jnp.int32)}
    with pytest.raises(ValueError, match=r"leaf 'step'.*models\[2\]"):
        M.select(with_step, key=KEY)


def test_k_trees_are_never_stacked(setup, monkeypatch):
    base, models = setup
    seen = []
    for name in ("average_kernel", "select_kernel", "resample_kernel", "ties_kernel",
                 "dare_kernel", "task_arithmetic_kernel"):
        orig = getattr(kernels, name)

        def spy(inputs, *a, _orig=orig, **kw):
            seen.append(type(inputs))
            return _orig(inputs, *a, **kw)
        monkeypatch.setattr(kernels, name, spy)
    M.average(models)
    M.select(models, key=KEY, base=base, resample=1)
    M.task_arithmetic(models, base)
    M.ties(models, base, 0.5)
    M.dare(models, base, 0.5, key=KEY)
    assert len(seen) == 5 * len(SHAPES) and set(seen) == {tuple}


# ---- sharding ------------------------------------------------------------------------------

def _all_methods(models, base, stacked=False):
    return {
        "average": M.average(models, [0.1, 0.2, 0.3, 0.4], stacked=stacked),
        "select": M.select(models, key=KEY, probs=[0.1, 0.2, 0.3, 0.4], stacked=stacked),
        "resample": M.select(models, key=KEY, base=base, resample=3, stacked=stacked),
        "task_arithmetic": M.task_arithmetic(models, base, 0.6, stacked=stacked),
        "ties": M.ties(models, base, 0.3, [1.0, 0.5, 2.0, 1.0], stacked=stacked),
        "ties_model": M.ties(models, base, 0.3, trim="model", stacked=stacked),
        "dare": M.dare(models, base, 0.3, key=KEY, stacked=stacked),
        "dare_l1_ties": M.dare(models, base, 0.3, key=KEY, rescale="l1", combine="ties",
                               stacked=stacked),
    }


def test_sharded_inputs_give_bit_identical_results():
    assert jax.device_count() == 8
    rng = np.random.default_rng(5)
    base = _tree(rng, {"a": (16, 400), "b": (8, 64), "c": (300, 8)})
    base["a"] = base["a"][:, :392]  # 392 columns: 8-way split, ragged sizes elsewhere
    models = [_finetune(rng, base) for _ in range(4)]
    ref = _all_methods(models, base)
    mesh = jax.make_mesh((8,), ("x",))
    sh = NamedSharding(mesh, P(None, "x"))  # non-leading axis
    put = lambda t: jax.tree.map(lambda x: jax.device_put(x, sh), t)  # noqa: E731
    s_models, s_base = [put(m) for m in models], put(base)
    got = _all_methods(s_models, s_base)
    for method in ref:
        _assert_trees_identical(got[method], ref[method])
        for leaf in jax.tree.leaves(got[method]):
            assert leaf.sharding.is_equivalent_to(sh, 2), method
    # Auto (GSPMD) axes instead of the explicit ones make_mesh defaults to.
    mesh_auto = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sh_auto = NamedSharding(mesh_auto, P(None, "x"))
    put = lambda t: jax.tree.map(lambda x: jax.device_put(x, sh_auto), t)  # noqa: E731
    for method, out in [
            ("resample", M.select([put(m) for m in models], key=KEY, base=put(base),
                                  resample=3)),
            ("ties", M.ties([put(m) for m in models], put(base), 0.3, [1.0, 0.5, 2.0, 1.0]))]:
        _assert_trees_identical(out, ref[method])
        for leaf in jax.tree.leaves(out):
            assert leaf.sharding.is_equivalent_to(sh_auto, 2), method
    # Stacked models sharded along the model axis K and a feature axis.
    mesh2 = jax.make_mesh((4, 2), ("k", "x"))
    stacked = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh2, P("k", None, "x"))),
                           _stack(models))
    got2 = _all_methods(stacked, base, stacked=True)
    for method in ref:
        _assert_trees_identical(got2[method], ref[method])
        for leaf in jax.tree.leaves(got2[method]):
            assert leaf.sharding.is_equivalent_to(NamedSharding(mesh2, P(None, "x")), 2)


def test_ties_sampled_search_same_on_sharded_and_host_leaves():
    """Above the exact-solve size TIES samples and gathers with numpy for host
    leaves and with XLA for sharded ones: the results are the same bits."""
    assert jax.device_count() == 8
    rng = np.random.default_rng(6)
    base = {"w": rng.standard_normal((ties_threshold.EXACT // 256 + 8, 256)).astype(np.float32)}
    models = [_finetune(rng, base) for _ in range(3)]
    sh = NamedSharding(jax.make_mesh((8,), ("x",)), P("x", None))
    put = lambda t: jax.tree.map(lambda x: jax.device_put(x, sh), t)  # noqa: E731
    assert ties_threshold._host_views(methods._prepare([put(m) for m in models], put(base),
                                              need_base=True).leaves[0]) is None
    want = M.ties(models, base, [0.2, 0.5, 0.05])
    got = M.ties([put(m) for m in models], put(base), [0.2, 0.5, 0.05])
    _assert_trees_identical(got, want)


# ---- chunked (staged) merging of host-resident leaves ------------------------------------

def _all_methods_kw(models, base, stacked=False):
    return {
        "average": M.average(models, [0.1, 0.2, 0.3, 0.4], stacked=stacked),
        "select": M.select(models, key=KEY, probs=[0.1, 0.2, 0.3, 0.4], offset=17,
                           stacked=stacked),
        "resample": M.select(models, key=KEY, base=base, resample=3, stacked=stacked),
        "resample_tol": M.select(models, key=KEY, base=base, resample=2, tolerance=0.01,
                                 stacked=stacked),
        "task_arithmetic": M.task_arithmetic(models, base, 0.6, [1.0, -0.5, 0.3, 2.0],
                                             stacked=stacked),
        "ties": M.ties(models, base, 0.3, [1.0, 0.5, 2.0, 1.0], scale=0.9, stacked=stacked),
        "dare": M.dare(models, base, 0.3, key=KEY, offset=5, stacked=stacked),
        "dare_l1_ties": M.dare(models, base, 0.3, key=KEY, rescale="l1", combine="ties",
                               stacked=stacked),
    }


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("dtype, numpy_in", [
    (np.float32, False), (np.float32, True), (ml_dtypes.bfloat16, False),
    (np.float64, True)])
def test_staged_path_matches_whole_leaf_kernels(monkeypatch, dtype, numpy_in):
    """Leaves merged chunk by chunk into host memory give the whole-leaf kernels'
    bits, for K trees and stacked models; 1073 scalars in chunks of 64 exercise
    the overlapping last chunk."""
    rng = np.random.default_rng(11)
    shapes = {"a": (37, 29), "b": (300,), "c": (5, 7, 11)}
    base = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    models = [{n: (b.astype(np.float32) + 0.05 * rng.standard_normal(b.shape)
                   * (rng.random(b.shape) < 0.6)).astype(dtype) for n, b in base.items()}
              for _ in range(4)]
    if not numpy_in:
        base = jax.tree.map(jnp.asarray, base)
        models = [jax.tree.map(jnp.asarray, m) for m in models]
    stack = np.stack if numpy_in else jnp.stack
    monkeypatch.setattr(host_staging, "MIN_SIZE", 2**40)
    want = _all_methods_kw(models, base)
    monkeypatch.setattr(host_staging, "MIN_SIZE", 64)
    monkeypatch.setattr(host_staging, "CHUNK", 64)
    jobs = []
    orig_add = host_staging.Stager.add
    monkeypatch.setattr(host_staging.Stager, "add", lambda self, leaf, *a, **k: (
        jobs.append(leaf.name), orig_add(self, leaf, *a, **k))[1])
    for got in (_all_methods_kw(models, base),
                _all_methods_kw(jax.tree.map(lambda *xs: stack(xs), *models), base,
                                stacked=True)):
        for method in want:
            for n in shapes:
                assert type(got[method][n]) is type(want[method][n]), (method, n)
                _bits_equal(got[method][n], want[method][n])
                if numpy_in:
                    assert not got[method][n].flags.writeable
    assert set(jobs) == set(shapes) and len(jobs) == 2 * len(want) * len(shapes)


def _at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of a whose data starts `offset` bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_chunk_grid_covers_the_leaf_on_aligned_starts(monkeypatch, itemsize):
    """With numpy views the full chunks start on the first operand's 64-byte
    boundaries (zero-copy kernel arguments); MINI chunks cover the ends; every
    scalar is covered; without views the grid is the plain one."""
    monkeypatch.setattr(host_staging, "CHUNK", 256)
    monkeypatch.setattr(host_staging, "MINI", 64)
    dtype = {2: np.float16, 4: np.float32, 8: np.float64}[itemsize]
    for n in (256, 257, 256 + 17, 1000, 3 * 256 + 5, 4 * 256):
        plain = host_staging.chunk_grid(n)
        assert plain == [(min(s, n - 256), 256) for s in range(0, n, 256)]
        for offset in range(0, 64, itemsize):
            view = _at_offset(np.zeros(n, dtype), offset)
            grid = host_staging.chunk_grid(n, (view, None))
            first = (-offset) % 64 // itemsize  # first aligned scalar
            covered = np.zeros(n, bool)
            for start, size in grid:
                assert 0 <= start and start + size <= n and size in (256, 64), grid
                covered[start:start + size] = True
                if size == 256 and n >= 256 + first:  # else no aligned chunk fits
                    assert view[start:].ctypes.data % 64 == 0, (n, offset, grid)
            assert covered.all(), (n, offset, grid)
            assert sum(size == 64 for _, size in grid) <= 2
            assert len(grid) <= len(plain) + 2


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float64])
def test_staged_numpy_operands_at_any_alignment(monkeypatch, dtype):
    """numpy operands at every mix of alignments (the base aligned like none of
    the models) give the whole-leaf kernels' bits; every full chunk reaches the
    kernel 64-byte aligned (in place, or staged when misaligned)."""
    rng = np.random.default_rng(21)
    shape = (37, 29)
    base = {"w": rng.standard_normal(shape).astype(dtype)}
    models = [{"w": (base["w"].astype(np.float32) + 0.05 * rng.standard_normal(shape)
                     * (rng.random(shape) < 0.6)).astype(dtype)} for _ in range(4)]
    monkeypatch.setattr(host_staging, "MIN_SIZE", 2**40)
    with jax.enable_x64(dtype == np.float64):
        want = _all_methods_kw(models, base)
    monkeypatch.setattr(host_staging, "MIN_SIZE", 64)
    monkeypatch.setattr(host_staging, "CHUNK", 64)
    itemsize = np.dtype(dtype).itemsize
    shifted = [{"w": _at_offset(m["w"], (16 + 16 * i) % 64 // itemsize * itemsize)}
               for i, m in enumerate(models)]
    shifted_base = {"w": _at_offset(base["w"], 8 // itemsize * itemsize)}
    seen = []
    orig = kernels.chunk_kernel

    def spy(stage, inputs, base, *a, chunk, **k):
        if k.get("sliced") and chunk == 64:
            seen.extend(x.ctypes.data % 64 for x in (*inputs, base)
                        if isinstance(x, np.ndarray))
        return orig(stage, inputs, base, *a, chunk=chunk, **k)

    monkeypatch.setattr(kernels, "chunk_kernel", spy)
    got = _all_methods_kw(shifted, shifted_base)
    with jax.enable_x64(dtype == np.float64):  # stacked jax models, numpy base
        mixed = _all_methods_kw(_stack(models), shifted_base, stacked=True)
    for method in want:
        _bits_equal(got[method]["w"], want[method]["w"])
        np.testing.assert_array_equal(np.asarray(mixed[method]["w"]).view(np.uint8),
                                      np.asarray(want[method]["w"]).view(np.uint8))
    assert seen and not any(seen)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float64])
def test_staged_ties_labels_numpy_operands_in_chunks(monkeypatch, dtype):
    """TIES on a large host leaf with misaligned numpy operands labels it chunk by
    chunk (K = 5: two label groups) and equals brute force."""
    monkeypatch.setattr(host_staging, "MIN_SIZE", 1024)
    monkeypatch.setattr(host_staging, "CHUNK", 1 << 14)
    calls = []
    orig = kernels.chunk_kernel
    monkeypatch.setattr(kernels, "chunk_kernel", lambda *a, **k: (
        calls.append(k["body"]), orig(*a, **k))[1])
    rng = np.random.default_rng(22)
    shape = (ties_threshold.EXACT // 256 + 7, 300)
    base = {"w": _at_offset(rng.standard_normal(shape).astype(dtype), 16)}
    models = [{"w": _at_offset((np.asarray(base["w"], np.float32) + 0.01 * rng.standard_normal(
        shape) * (rng.random(shape) < 0.7)).astype(dtype), 8 * i % 64)} for i in range(5)]
    dens, w = [0.1, 0.35, 0.6, 0.02, 0.2], [0.5, 1.0, 2.0, 1.0, 0.3]
    with jax.enable_x64(dtype == np.float64):
        got = M.ties(models, base, dens, w)
    ref = _ties_reference(models, base, dens, w)
    np.testing.assert_array_equal(np.asarray(got["w"]), ref["w"])
    assert "code" in calls and "ties" in calls


@pytest.mark.parametrize("n", [0, 5, 8, 1000, 4099, 100_003])
def test_sparse_flatnonzero_equals_numpy(n):
    rng = np.random.default_rng(n)
    for density in (0.0, 0.001, 0.035, 0.3, 0.9, 1.0):
        mask = rng.random(n) < density
        got = ties_threshold.sparse_flatnonzero(mask)
        np.testing.assert_array_equal(got, np.flatnonzero(mask))
        assert got.dtype == np.flatnonzero(mask).dtype


def test_staged_outputs_live_in_aligned_host_memory(monkeypatch):
    monkeypatch.setattr(host_staging, "MIN_SIZE", 64)
    monkeypatch.setattr(host_staging, "CHUNK", 64)
    models = [{"w": jnp.full((40, 30), float(i))} for i in range(3)]
    out = M.average(models)["w"]
    assert isinstance(out, jax.Array) and out.devices() == models[0]["w"].devices()
    # A 2 MiB-aligned numpy buffer wrapped without a copy (huge pages, no faults).
    assert out.unsafe_buffer_pointer() % (2 << 20) == 0
    np.testing.assert_array_equal(np.asarray(out), np.ones((40, 30), np.float32))


@pytest.mark.parametrize("method", ["average", "select", "resample", "task_arithmetic",
                                    "ties", "dare"])
def test_staged_nonfinite_inputs(setup, monkeypatch, method):
    monkeypatch.setattr(host_staging, "MIN_SIZE", 8)
    monkeypatch.setattr(host_staging, "CHUNK", 8)
    test_nonfinite_inputs(setup, method)


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nonfinite_in_a_never_selected_model_is_detected(monkeypatch, staged, dtype):
    """The result only copies model 0 here, so only the poison term (not the
    selected values) can reveal model 3's inf."""
    if staged:
        monkeypatch.setattr(host_staging, "MIN_SIZE", 64)
        monkeypatch.setattr(host_staging, "CHUNK", 64)
    models = [{"w": jnp.full((20, 10), float(i), dtype)} for i in range(4)]
    models[3] = {"w": models[3]["w"].at[5, 5].set(jnp.inf)}
    base = {"w": jnp.zeros((20, 10), dtype)}
    with pytest.raises(ValueError, match=r"leaf 'w': models\[3\] contains NaN"):
        M.select(models, key=KEY, probs=[1, 0, 0, 0])
    with pytest.raises(ValueError, match=r"leaf 'w': models\[3\] contains NaN"):
        M.select(models, key=KEY, base=base, probs=[1, 0, 0, 0], resample=2)
    out = M.select(models, key=KEY, probs=[1, 0, 0, 0], allow_nonfinite=True)
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), np.zeros((20, 10)))


def test_staged_finite_check_tolerates_overflowing_sums():
    big = np.full(64, 3e38, np.float32)  # finite, but the sum overflows
    assert host_staging.finite(big)
    for bad in (np.nan, np.inf, -np.inf):
        v = big.copy()
        v[17] = bad
        assert not host_staging.finite(v)
    half = np.ones(64, ml_dtypes.bfloat16)
    assert host_staging.finite(half)
    half[3] = np.inf
    assert not host_staging.finite(half)


def test_staged_ties_on_large_tensors_is_exact(monkeypatch):
    """Tensors above the exact-solve size take the sampled-bracket search; their
    final pass runs staged; both scopes equal the brute-force reference."""
    monkeypatch.setattr(host_staging, "MIN_SIZE", 1024)
    monkeypatch.setattr(host_staging, "CHUNK", 1 << 14)
    rng = np.random.default_rng(12)
    shapes = {"big": (ties_threshold.EXACT // 256 + 7, 300), "small": (33, 5)}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    models = [{n: b + (0.01 * rng.standard_normal(b.shape) * (rng.random(b.shape) < 0.7)
                       ).astype(np.float32) for n, b in base.items()} for _ in range(3)]
    dens, w = [0.1, 0.35, 1.0], [0.5, 1.0, 2.0]
    for scope in ("tensor", "model"):
        got = M.ties([jax.tree.map(jnp.asarray, m) for m in models], base, dens, w,
                     trim=scope)
        ref = _ties_reference(models, base, dens, w, scope=scope)
        for n in shapes:
            np.testing.assert_array_equal(np.asarray(got[n]), ref[n], err_msg=n)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float64])
@pytest.mark.parametrize("layout", ["numpy", "jax", "stacked"])
def test_sampled_ties_search_is_exact_for_every_layout(dtype, layout):
    """The sampled search on host leaves (numpy samples and gathers; K = 5 needs
    two label groups) equals brute force for every input layout."""
    rng = np.random.default_rng(13)
    shape = (ties_threshold.EXACT // 256 + 7, 300)
    base = {"w": rng.standard_normal(shape).astype(dtype)}
    models = [{"w": (np.asarray(base["w"], np.float32) + 0.01 * rng.standard_normal(shape)
                     * (rng.random(shape) < 0.7)).astype(dtype)} for _ in range(5)]
    dens, w = [0.1, 0.35, 0.6, 0.02, 0.2], [0.5, 1.0, 2.0, 1.0, 0.3]
    with jax.enable_x64(dtype == np.float64):  # jax arrays of float64
        given = {"numpy": lambda: models,
                 "jax": lambda: [jax.tree.map(jnp.asarray, m) for m in models],
                 "stacked": lambda: _stack(models)}[layout]()
        got = M.ties(given, base, dens, w, stacked=layout == "stacked")
    ref = _ties_reference(models, base, dens, w)
    np.testing.assert_array_equal(np.asarray(got["w"]), ref["w"])


# ---- validation -------------------------------------------------------------------------

@pytest.fixture()
def no_kernels(monkeypatch):
    """Makes any kernel call fail, to show validation happens before computation."""
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the input was rejected")
    for name in dir(kernels):
        if name.endswith("_kernel"):
            monkeypatch.setattr(kernels, name, boom)


def test_structure_errors_name_the_leaf(setup, no_kernels):
    base, models = setup
    broken = [models[0], {k: v for k, v in models[1].items() if k != "bias"}]
    with pytest.raises(ValueError, match=r"models\[1\].*missing leaves \['bias'\]"):
        M.average(broken)
    extra = [models[0], {**models[1], "zzz": models[1]["bias"]}]
    with pytest.raises(ValueError, match=r"extra leaves \['zzz'\]"):
        M.select(extra, key=KEY)
    with pytest.raises(ValueError, match=r"base.*missing leaves \['embed'\]"):
        M.task_arithmetic(models, {k: v for k, v in base.items() if k != "embed"})
    shp = [models[0], {**models[1], "bias": jnp.zeros(13)}]
    with pytest.raises(ValueError, match=r"leaf 'bias': models\[1\] has shape \(13,\)"):
        M.average(shp)
    dt = [models[0], {**models[1], "bias": models[1]["bias"].astype(jnp.bfloat16)}]
    with pytest.raises(ValueError, match=r"leaf 'bias': models\[1\] has dtype bfloat16"):
        M.average(dt)
    with pytest.raises(ValueError, match=r"leaf 'bias': base has dtype float16"):
        M.ties(models, {**base, "bias": base["bias"].astype(jnp.float16)}, 0.5)
    with pytest.raises(ValueError, match=r"leaf 'embed': base has shape \(8, 16\)"):
        M.dare(models, {**base, "embed": base["embed"].T}, 0.5, key=KEY)
    with pytest.raises(TypeError, match=r"leaf 'x' is a str"):
        M.average([{"x": "a"}, {"x": "b"}])


def test_k_and_stacked_errors(setup, no_kernels):
    _, models = setup
    with pytest.raises(ValueError, match="K >= 1"):
        M.average([])
    with pytest.raises(ValueError, match="size 0"):
        M.average({"w": jnp.zeros((0, 3))}, stacked=True)
    with pytest.raises(ValueError, match=r"leaf 'b' has leading axis 3 but leaf 'a' has 2"):
        M.average({"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}, stacked=True)
    with pytest.raises(ValueError, match=r"leaf 's' is a scalar"):
        M.average({"s": jnp.zeros(())}, stacked=True)


@pytest.mark.parametrize("bad, match", [
    ([0.5, 0.5], "has 2 entries but there are K = 4"),
    ([0.5, 0.7, -0.2, 0.0], "non-negative"),
    ([0.3, 0.3, 0.3, 0.3], r"sum to 1 \(tolerance 1e-05\)"),
    ([0.25, 0.25, 0.25, float("nan")], "finite"),
])
def test_probability_errors(setup, no_kernels, bad, match):
    _, models = setup
    with pytest.raises(ValueError, match=match):
        M.select(models, key=KEY, probs=bad)
    with pytest.raises(ValueError, match=match.replace("probs", "weights")):
        M.average(models, bad)


def test_probabilities_within_tolerance_are_renormalised(setup):
    _, models = setup
    near = [0.25, 0.25, 0.25, 0.25 + 5e-6]
    _assert_trees_identical(M.select(models, key=KEY, probs=near),
                            M.select(models, key=KEY, probs=np.array(near) / sum(near)))


def test_option_errors(setup, no_kernels):
    base, models = setup
    with pytest.raises(ValueError, match="resample > 0 needs `base`"):
        M.select(models, key=KEY, resample=1)
    with pytest.raises(TypeError, match="resample must be a non-negative int"):
        M.select(models, key=KEY, base=base, resample=1.5)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        M.select(models, key=KEY, base=base, resample=1, tolerance=-1.0)
    with pytest.raises(ValueError, match="needs `base`"):
        M.ties(models, None, 0.5)
    with pytest.raises(ValueError, match=r"density must lie in \[0.0, 1.0\]"):
        M.ties(models, base, 1.5)
    with pytest.raises(ValueError, match=r"trim must be one of \['tensor', 'model'\]"):
        M.ties(models, base, 0.5, trim="layer")
    with pytest.raises(ValueError, match=r"drop_rate must lie in \[0.0, 1.0\)"):
        M.dare(models, base, 1.0, key=KEY)
    with pytest.raises(ValueError, match="rescale must be one of"):
        M.dare(models, base, 0.5, key=KEY, rescale="l2")
    with pytest.raises(ValueError, match="weights has 3 entries"):
        M.task_arithmetic(models, base, 1.0, [1, 2, 3])
    with pytest.raises(ValueError, match="scale must be finite"):
        M.task_arithmetic(models, base, float("inf"))


@pytest.mark.parametrize("key, exc", [
    (0, TypeError), (None, TypeError), (np.zeros(2, np.float32), TypeError),
    (np.zeros(3, np.uint32), TypeError), (jax.random.split(KEY, 2), ValueError),
])
def test_key_errors(setup, no_kernels, key, exc):
    base, models = setup
    with pytest.raises(exc, match="key"):
        M.select(models, key=key)
    with pytest.raises(exc, match="key"):
        M.dare(models, base, 0.1, key=key)


@pytest.mark.parametrize("method", ["average", "select", "resample", "task_arithmetic",
                                    "ties", "dare"])
def test_nonfinite_inputs(setup, method):
    base, models = setup
    bad = [dict(m) for m in models]
    bad[2]["layers/1/w"] = bad[2]["layers/1/w"].at[3, 4].set(jnp.nan)
    bad_base = {**base, "bias": base["bias"].at[0].set(-jnp.inf)}
    calls = {
        "average": lambda ms, b: M.average(ms, **kw),
        "select": lambda ms, b: M.select(ms, key=KEY, **kw),
        "resample": lambda ms, b: M.select(ms, key=KEY, base=b, resample=2, **kw),
        "task_arithmetic": lambda ms, b: M.task_arithmetic(ms, b, **kw),
        "ties": lambda ms, b: M.ties(ms, b, 0.01, **kw),
        "dare": lambda ms, b: M.dare(ms, b, 0.9, key=KEY, **kw),
    }
    kw = {}
    with pytest.raises(ValueError, match=r"leaf 'layers/1/w': models\[2\] contains NaN"):
        calls[method](bad, base)
    if method not in ("average", "select"):
        with pytest.raises(ValueError, match=r"leaf 'bias': base contains NaN or inf"):
            calls[method](models, bad_base)
    kw = {"allow_nonfinite": True}
    out = calls[method](bad, base)
    assert out["layers/1/w"].shape == (8, 12)


@pytest.mark.parametrize("method", ["average", "select", "resample", "task_arithmetic",
                                    "ties", "dare"])
def test_allow_nonfinite_merges_the_values_and_propagates_nan(method):
    """With allow_nonfinite=True the merge is the same arithmetic: every scalar that the
    NaN does not enter equals the clean merge bit for bit, and the poisoned scalar is NaN
    exactly where the method uses the poisoned value."""
    rng = np.random.default_rng(11)
    base = {"w": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    models = [{n: v + jnp.asarray(0.1 * rng.standard_normal(v.shape), jnp.float32)
               for n, v in base.items()} for _ in range(4)]
    where = (3, 4)
    bad = [dict(m) for m in models]
    bad[2]["w"] = bad[2]["w"].at[where].set(jnp.nan)
    # TIES's sign vote is undefined at a NaN entry: the scalar must come back NaN, not
    # silently merged as if model 2 had not changed there. Density 1 keeps the trim (which
    # ranks magnitudes, NaN among them) out of the comparison.
    call = {
        "average": lambda ms: M.average(ms, allow_nonfinite=True),
        "select": lambda ms: M.select(ms, key=KEY, allow_nonfinite=True),
        "resample": lambda ms: M.select(ms, key=KEY, base=base, resample=2,
                                        allow_nonfinite=True),
        "task_arithmetic": lambda ms: M.task_arithmetic(ms, base, allow_nonfinite=True),
        "ties": lambda ms: M.ties(ms, base, 1.0, allow_nonfinite=True),
        "dare": lambda ms: M.dare(ms, base, 0.0, key=KEY, allow_nonfinite=True),
    }[method]
    clean = call(models)
    out = call(bad)
    np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(clean["b"]))
    got, want = np.asarray(out["w"]), np.asarray(clean["w"])
    others = np.ones(got.shape, bool)
    others[where] = False
    np.testing.assert_array_equal(got[others], want[others])
    if method in ("select", "resample"):
        # NaN exactly when the draw at that scalar picked model 2 (its value is unique).
        picked_2 = want[where] == np.asarray(models[2]["w"])[where]
        assert np.isnan(got[where]) == picked_2
        if not picked_2:
            assert got[where] == want[where]
    else:  # every model enters average, task arithmetic, TIES and DARE without drops
        assert np.isnan(got[where])


# ---- registry -----------------------------------------------------------------------------

def test_registry_dispatch(setup, monkeypatch):
    base, models = setup
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))  # keep the registry clean
    assert {"average", "select", "task_arithmetic", "ties", "dare", "dare_linear",
            "dare_ties", "linear"} <= set(M.available_methods())
    _assert_trees_identical(M.merge("linear", models), M.average(models))
    _assert_trees_identical(M.merge("dare_ties", models, base=base, drop_rate=0.3, key=KEY),
                            M.dare(models, base, 0.3, key=KEY, combine="ties"))
    M.register_method("first", lambda ms, **kw: ms[0])
    assert M.merge("first", models) is models[0]
    with pytest.raises(ValueError, match="already registered"):
        M.register_method("first", lambda ms: ms)
    with pytest.raises(ValueError, match=r"unknown merge method 'nope'; available: \["):
        M.merge("nope", models)


# ---- property-based -----------------------------------------------------------------------

_DIMS = st.sampled_from([1, 3, 8])
_SHAPE = st.lists(_DIMS, min_size=0, max_size=2).map(tuple)
_LEAF_NAME = st.sampled_from(["a", "b", "w", "kernel"])


def _structures():
    """Random nested dict/list structures with array shapes at the leaves. The root
    is a dict: a list/tuple root would be read as a sequence of models."""
    leaf = _SHAPE
    return st.recursive(
        st.dictionaries(_LEAF_NAME, leaf, min_size=1, max_size=3),
        lambda children: st.one_of(
            st.dictionaries(_LEAF_NAME, children, min_size=1, max_size=2),
            st.lists(children, min_size=1, max_size=2)),
        max_leaves=5).map(lambda tree: {"root": tree})


def _fill(structure, rng, dtype, delta_of=None):
    if isinstance(structure, dict):
        return {k: _fill(v, rng, dtype, delta_of[k] if delta_of else None)
                for k, v in structure.items()}
    if isinstance(structure, list):
        return [_fill(v, rng, dtype, delta_of[i] if delta_of else None)
                for i, v in enumerate(structure)]
    if delta_of is not None:
        base32 = np.asarray(delta_of, np.float32)
        mask = rng.random(base32.shape) < 0.5
        return jnp.asarray((base32 + mask * rng.standard_normal(base32.shape)).astype(dtype))
    return jnp.asarray(rng.standard_normal(structure).astype(dtype))


@settings(max_examples=20, deadline=None)
@given(structure=_structures(), k=st.integers(1, 4),
       dtype=st.sampled_from([np.float32, ml_dtypes.bfloat16, np.float16]),
       seed=st.integers(0, 2**16), resample=st.sampled_from([0, 2]))
def test_property_select_and_average(structure, k, dtype, seed, resample):
    rng = np.random.default_rng(seed)
    base = _fill(structure, rng, dtype)
    models = [_fill(structure, rng, dtype, delta_of=base) for _ in range(k)]
    key = jax.random.key(seed)
    sel = M.select(models, key=key, base=base, resample=resample)
    avg = M.average(models)
    assert jax.tree.structure(sel) == jax.tree.structure(base)
    _assert_trees_identical(sel, M.select(_stack(models), key=key, base=base, stacked=True,
                                          resample=resample))
    for s, a, b, *ms in zip(jax.tree.leaves(sel), jax.tree.leaves(avg), jax.tree.leaves(base),
                            *[jax.tree.leaves(m) for m in models]):
        assert s.dtype == dtype and a.dtype == dtype and s.shape == b.shape
        cands = np.stack([np.asarray(m, np.float32) for m in ms])
        s32 = np.asarray(s, np.float32)
        assert (cands == s32[None]).any(axis=0).all()
        if resample:
            # Resampling returns a changed candidate or the base value itself.
            b32 = np.asarray(b, np.float32)
            changed = cands != b32[None]
            assert ((changed & (cands == s32[None])).any(axis=0) | (s32 == b32)).all()
        # float32 reference; XLA may fuse multiply-adds (1-ulp differences in float32,
        # then possibly one ulp of the stored dtype).
        ref = sum(np.asarray(m, np.float32) * np.float32(1 / k) for m in ms)
        ulp = {np.float32: 2e-7, np.float16: 1e-3, ml_dtypes.bfloat16: 8e-3}[dtype]
        np.testing.assert_allclose(np.asarray(a, np.float32), ref, rtol=ulp, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(structure=_structures(), k=st.integers(1, 3), seed=st.integers(0, 2**16),
       density=st.sampled_from([0.2, 0.5, 1.0]))
def test_property_ties_and_task_arithmetic(structure, k, seed, density):
    rng = np.random.default_rng(seed)
    base = _fill(structure, rng, np.float32)
    models = [_fill(structure, rng, np.float32, delta_of=base) for _ in range(k)]
    names = [M.leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0]]
    flat = lambda t: dict(zip(names, jax.tree.leaves(t)))  # noqa: E731
    w = list(rng.uniform(0.2, 2.0, size=k))
    got = flat(M.ties(models, base, density, w))
    ref = _ties_reference([flat(m) for m in models], flat(base), [density] * k, w)
    for n in names:
        np.testing.assert_array_equal(np.asarray(got[n]), ref[n])
    ta = flat(M.task_arithmetic(models, base, 0.5, w))
    for n in names:
        b = np.asarray(flat(base)[n], np.float64)
        want = b + 0.5 * sum(wi * (np.asarray(flat(m)[n], np.float64) - b)
                             for wi, m in zip(w, models))
        np.testing.assert_allclose(np.asarray(ta[n]), want, rtol=1e-5, atol=1e-5)


# ---- TIES on tie-heavy task vectors -----------------------------------------------------

def _tie_heavy_models(dtype, rng, shapes, k_models):
    """Base and K models whose deltas take a handful of magnitudes (float32: 0.05,
    0.03, 0.02, 0.01 and 0 for 10/20/30/20/20% of the entries, random signs, as
    quantised deltas) or are bfloat16 roundings of Gaussian deltas (a few dozen
    magnitudes: multiples of the base's spacing)."""
    base = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    mags = np.asarray([0.05, 0.03, 0.02, 0.01, 0.0], np.float32)
    models = []
    for _ in range(k_models):
        m = {}
        for n, b in base.items():
            b32 = np.asarray(b, np.float32)
            if dtype == ml_dtypes.bfloat16:
                d = 0.01 * rng.standard_normal(b.shape) * (rng.random(b.shape) < 0.7)
            else:
                d = rng.choice(mags, size=b.shape, p=[0.1, 0.2, 0.3, 0.2, 0.2])
                d = d * rng.choice(np.asarray([-1, 1], np.float32), size=b.shape)
            m[n] = (b32 + d).astype(dtype)
        models.append(m)
    return base, models


@pytest.mark.parametrize("path", ["host", "device", "stacked", "staged"])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_ties_tie_heavy_exact_and_counted(monkeypatch, path, dtype, scope):
    """Deltas from a few distinct magnitudes: whole classes of entries tie with
    the k-th magnitude. The sampled search (tensors above the exact-solve size)
    equals brute force bit for bit, with the threshold inside one tie class
    (bracket lo == hi), on the boundary of two (lo < hi, both ends ties) and
    among distinct values; and the tie classes at the bracket's ends are
    counted, not gathered: the entries gathered for the exact selection stay a
    small share of the tensor, as for distinct magnitudes."""
    if path in ("device", "stacked"):  # XLA samples, gathers and recomputes the tie blocks
        monkeypatch.setattr(ties_threshold, "_host_views", lambda leaf: None)
    if path == "staged":  # numpy operands labelled chunk by chunk
        monkeypatch.setattr(host_staging, "MIN_SIZE", 1024)
        monkeypatch.setattr(host_staging, "CHUNK", 1 << 14)
    gathered, modes, found = [], [], []
    solve, tie_mode, find = ties_threshold._solve, ties_threshold._tie_mode, ties_threshold._find_tie
    monkeypatch.setattr(ties_threshold, "_find_tie", lambda *a: (
        found.append(a[-1]), find(*a))[1])
    layouts, make_layouts = set(), ties_threshold._layouts
    monkeypatch.setattr(ties_threshold, "_layouts", lambda *a: (
        lambda out: (layouts.update(out), out)[1])(make_layouts(*a)))
    monkeypatch.setattr(ties_threshold, "_solve", lambda parts, *a: (
        gathered.append((sum(len(p.vals) for p in parts), sum(p.n for p in parts))),
        solve(parts, *a))[1])
    monkeypatch.setattr(ties_threshold, "_tie_mode", lambda s, lo, hi, *sub: (
        modes.append((bool(tie_mode(s, lo, hi, *sub)), lo == hi)), tie_mode(s, lo, hi, *sub))[1])
    rng = np.random.default_rng(31)
    big = (ties_threshold.EXACT // 256 + 7, 300)
    shapes = {"a": big, "b": big, "small": (33, 5)}
    base, models = _tie_heavy_models(dtype, rng, shapes, 4)
    # 0.3 and 0.8 sit on class boundaries of the float32 deltas, 0.45 and 0.05 inside.
    dens, w = [0.3, 0.45, 0.8, 0.05], [0.5, 1.0, 2.0, 1.0]
    if path == "stacked":  # one [K, ...] array per leaf
        got = M.ties(_stack(models), base, dens, w, trim=scope, stacked=True)
    else:
        got = M.ties(models, base, dens, w, trim=scope)
    ref = _ties_reference(models, base, dens, w, scope=scope)
    exact = np.float32
    for n in shapes:
        assert got[n].dtype == dtype
        np.testing.assert_array_equal(np.asarray(got[n], exact), np.asarray(ref[n], exact),
                                      err_msg=n)
    assert all(tie for tie, _ in modes), modes
    if dtype == np.float32:
        assert {same for _, same in modes} == {True, False}, modes
    assert found, "no threshold split a tie class at a bracket end"
    # The label layouts (static arguments of the label kernels) do not depend
    # on the data beyond plain / wide: one group of 2-bit labels, or two of 4-bit.
    lo, hi = np.zeros(4, np.uint32), np.ones(4, np.uint32)
    canonical = set(make_layouts(range(4), lo, hi, [False] * 4))
    canonical |= set(make_layouts(range(4), lo, hi, [True] * 4))
    assert len(canonical) == 3 and layouts <= canonical, layouts
    big_solves = [(g, n) for g, n in gathered if n > ties_threshold.EXACT]
    assert big_solves and all(g <= n // 50 for g, n in big_solves), big_solves
