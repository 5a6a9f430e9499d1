"""Jitted kernels of `psm.merge`.

Every method is one elementwise *body* (a function of the K inputs, the base and
the flat index of each scalar) wrapped two ways:

- a whole-leaf kernel (`average_kernel`, `select_kernel`, ...) that takes the K
  inputs of one leaf either as a K-tuple of arrays (models given as K trees:
  never stacked into a `[K, ...]` copy) or as one `[K, ...]` array
  (`stacked=True`, sliced inside the jit so XLA fuses the slices), and computes
  the merged leaf in one fused pass; used for sharded or accelerator arrays;
- `chunk_kernel`, which computes `chunk` consecutive scalars (row-major) of a
  leaf into a donated buffer; `psm.merge.host_staging` uses it to merge host-resident
  leaves chunk by chunk into huge-page-backed host memory.

Both apply the same body to the same values, so they give the same bits.

Random draws are counter-based (see `draw`): a scalar's draw is a hash of
(leaf key, stream, flat index), so it does not depend on sharding, chunking,
device count or the order leaves are visited in.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

_MUL1 = np.uint32(0x7FEB352D)
_MUL2 = np.uint32(0x846CA68B)


def compute_dtype(dtype) -> np.dtype:
    """float32 for 16-bit floats, else the dtype itself (float32 / float64)."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def uint_for(dtype) -> np.dtype:
    """Unsigned integer type with the width of a float compute dtype."""
    return np.dtype(np.uint32) if np.dtype(dtype).itemsize == 4 else np.dtype(np.uint64)


def int_for(dtype) -> np.dtype:
    """Signed integer type with the width (4 or 8 bytes) of a compute dtype or its
    unsigned twin."""
    return np.dtype(np.int32) if np.dtype(dtype).itemsize == 4 else np.dtype(np.int64)


def _mix32(h):
    """Chris Wellons' `lowbias32` integer hash (a bijection on uint32)."""
    h = h ^ (h >> 16)
    h = h * _MUL1
    h = h ^ (h >> 15)
    h = h * _MUL2
    return h ^ (h >> 16)


def stream_seeds(key, words, stream):
    """Two uint32 seed words of one random stream of one leaf, `[2]`: (s0, s1).

    s0 = random.bits(leaf_key, (), uint32) is the leaf's word, shared by all its
    streams; s1 = random.bits(fold_in(leaf_key, stream), (), uint32) is the
    stream's own; leaf_key = fold_in(fold_in(key, w0), w1) with (w0, w1) the
    leaf's name words (see `leaf_inputs.name_words`). Sharing s0 lets a kernel
    that needs several streams at once (DARE: one per model) hash the first
    round once (see `draws`).
    """
    leaf_key = jax.random.fold_in(jax.random.fold_in(key, words[0]), words[1])
    s0 = jax.random.bits(leaf_key, (), jnp.uint32)
    s1 = jax.random.bits(jax.random.fold_in(leaf_key, stream), (), jnp.uint32)
    return jnp.stack([s0, s1])


@partial(jax.jit, static_argnames=("n",))
def leaf_seeds(key, words, *, n):
    """Seeds of streams 0..n-1 of one leaf, `[n, 2]` uint32 (kept out of the big
    kernels so those compile fast and are shared by all leaves of a shape)."""
    return jnp.stack([stream_seeds(key, words, i) for i in range(n)])


def _explicit_sharding(x):
    """x's NamedSharding when it is sharded over Explicit mesh axes (else None).

    Under explicit sharding (the default of `jax.make_mesh`) shardings are part
    of the types, so the kernels must line operands up themselves.
    """
    sh = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sh, NamedSharding) or not any(s is not None for s in sh.spec):
        return None
    if not any(t == AxisType.Explicit for t in sh.mesh.axis_types):
        return None
    return sh


def like(x, ref):
    """x resharded to ref's explicit sharding (no-op otherwise)."""
    sh = _explicit_sharding(ref)
    if sh is None or getattr(jax.typeof(x), "sharding", None) == sh:
        return x
    return jax.sharding.reshard(x, sh)


def counters(shape, offset, ref=None):
    """Row-major flat index of every element, plus offset, as uint32 `shape`.

    ref: an operand whose explicit sharding the counters should share.
    """
    offset = jnp.asarray(offset, jnp.uint32)
    if not shape:
        return offset
    sh = None if ref is None else _explicit_sharding(ref)
    iota = partial(lax.broadcasted_iota, jnp.uint32, shape, out_sharding=sh)
    ndim = len(shape)
    idx = iota(ndim - 1)
    stride = 1
    for d in range(ndim - 2, -1, -1):
        stride *= shape[d + 1]
        idx = idx + iota(d) * np.uint32(stride)
    return idx + offset


def draw(ctr, seeds):
    """uint32 draw per counter: mix32(mix32(ctr ^ s0) ^ s1)."""
    return _mix32(_mix32(ctr ^ seeds[0]) ^ seeds[1])


def draws(ctr, seeds):
    """`[draw(ctr, seeds[i]) for i]` for streams of one leaf (`seeds` `[n, 2]`
    from `leaf_seeds`, which share s0): the first hash round is computed once,
    so n streams cost n + 1 rounds instead of 2n."""
    h = _mix32(ctr ^ seeds[0, 0])
    return [_mix32(h ^ seeds[i, 1]) for i in range(seeds.shape[0])]


def _unstack(inputs, stacked: bool):
    """The K per-model arrays (slices of a stacked input, fused by XLA)."""
    if not stacked:
        xs = list(inputs)
        return [xs[0]] + [like(x, xs[0]) for x in xs[1:]]
    sh = _explicit_sharding(inputs)
    if sh is not None and sh.spec[0] is not None:
        # Explicit sharding cannot slice a sharded model axis: gather it first.
        inputs = jax.sharding.reshard(
            inputs, NamedSharding(sh.mesh, PartitionSpec(None, *tuple(sh.spec)[1:])))
    return [inputs[i] for i in range(inputs.shape[0])]


def _constrain(out, out_sharding):
    if not isinstance(out_sharding, NamedSharding):
        return out
    if any(t == AxisType.Explicit for t in out_sharding.mesh.axis_types):
        if getattr(jax.typeof(out), "sharding", None) != out_sharding:
            out = jax.sharding.reshard(out, out_sharding)
        return out
    return lax.with_sharding_constraint(out, out_sharding)


def _poison(arrays, dtype):
    """-0 where every array is finite at that position, NaN elsewhere.

    x - x is +0 for every finite x and NaN for inf or NaN, so -(sum of x_i - x_i)
    is -0 or NaN (one subtraction and one addition per array). Adding it to a
    result leaves every finite result bit-identical (y + -0 == y, including
    y = -0) and makes the result non-finite wherever an input is, so one host
    check of the output detects non-finite inputs.
    """
    z = None
    for a in arrays:
        a = a.astype(dtype)
        z = a - a if z is None else z + (a - a)
    return -z


# ---- per-element bodies ---------------------------------------------------------------
#
# body(xs, base, ctr, *arrays, **static) -> merged values, where xs are the K input
# arrays of one shape (stored dtype), base the base array or None and ctr the uint32
# flat index (+ offset) of every element.

def _average_body(xs, base, ctr, weights):
    """sum_i w_i x_i accumulated in float32 (or float64) in model order."""
    del base, ctr
    dtype = xs[0].dtype
    ct = compute_dtype(dtype)
    acc = xs[0].astype(ct) * weights[0]
    for i in range(1, len(xs)):
        acc = acc + xs[i].astype(ct) * weights[i]
    return acc.astype(dtype)


def _select_body(xs, base, ctr, seeds, thresholds, *, last, poison):
    """Per scalar: model i where C_{i-1} <= u < C_i (u = 32-bit draw, C = cum. probs)."""
    del base
    u = draw(ctr, seeds[0])
    out = xs[last]
    for i in range(last - 1, -1, -1):
        out = jnp.where(u < thresholds[i], xs[i], out)
    if poison:
        out = out + _poison(xs, out.dtype)
    return out


def _unit(u):
    """uint32 draw -> float32 in (0, 1] with 2^-24 resolution: the midpoint of the draw's
    top-24-bit bin, rounded to float32 (above 2^23 the midpoint k + 0.5 rounds to even,
    so the top bin gives exactly 1.0; `_resample_body` caps its ratio for that case)."""
    return ((u >> 8).astype(jnp.float32) + 0.5) * np.float32(2.0**-24)


def _resample_body(xs, base, ctr, seeds, probs, tol, *, n, use_tol, poison):
    """Selection with n redraws, sampled from its closed form in one pass.

    With q = sum of p_i over unchanged candidates, P(base) = q^(n+1); else a
    changed candidate with probability proportional to p_i. One uniform u per
    scalar decides both: base where u < P(base); otherwise
    r = (u - P(base)) / (1 - P(base)), uniform given u >= P(base), picks the
    first candidate i with r * W < W_i, where W_i are the cumulative sums of
    p_i over changed candidates (so an unchanged one is never the first) and
    W = W_{K-1}. r is capped at 1 - 2^-23 so that r * W < W always holds.
    """
    dtype = xs[0].dtype
    ct = compute_dtype(dtype)
    if use_tol:
        bc = base.astype(ct)
        changed = [jnp.abs(x.astype(ct) - bc) > tol for x in xs]
    else:
        changed = [x != base for x in xs]
    zero = np.float32(0)
    q, cum = None, []
    for i, c in enumerate(changed):
        qi = jnp.where(c, zero, probs[i])
        wi = jnp.where(c, probs[i], zero)
        q = qi if q is None else q + qi
        cum.append(wi if not cum else cum[-1] + wi)
    total = cum[-1]
    u = _unit(draw(ctr, seeds[0]))
    p_base = lax.integer_pow(q, n + 1)
    r = jnp.minimum((u - p_base) / (1 - p_base), np.float32(1 - 2.0**-23))
    v = r * total
    out = xs[-1]
    for i in range(len(xs) - 2, -1, -1):
        out = jnp.where(v < cum[i], xs[i], out)
    out = jnp.where((u < p_base) | (total == 0), base, out)
    if poison:
        out = out + _poison(xs + [base], dtype)
    return out


def _task_arithmetic_body(xs, base, ctr, weights, scale):
    """base + scale * sum_i w_i (x_i - base), in float32 (or float64)."""
    del ctr
    dtype = xs[0].dtype
    ct = compute_dtype(dtype)
    b = base.astype(ct)
    acc = None
    for i, x in enumerate(xs):
        term = (x.astype(ct) - b) * weights[i]
        acc = term if acc is None else acc + term
    return (b + acc * scale).astype(dtype)


def _disjoint_mean(ds, ws, normalize):
    """TIES sign election + disjoint merge of weighted deltas ds (mergekit 'sum')."""
    total = ds[0]
    for d in ds[1:]:
        total = total + d
    # d agrees with the elected sign (+ where total >= 0) iff sign(d) == that
    # sign: two comparisons and a select, cheaper than jnp.sign; 0 and NaN agree
    # with neither sign either way.
    negative = total < 0
    num, den = None, None
    for d, w in zip(ds, ws):
        agree = jnp.where(negative, d < 0, d > 0)
        nd = jnp.where(agree, d, 0)
        num = nd if num is None else num + nd
        if normalize:
            wd = jnp.where(agree, w, 0)
            den = wd if den is None else den + wd
    if normalize:
        num = num / jnp.where(den == 0, jnp.ones((), den.dtype), den)
    return num


def magnitude_bits(x, b, ct):
    """|x - b| in the compute dtype, bit-cast to its unsigned integer type."""
    return lax.bitcast_convert_type(jnp.abs(x.astype(ct) - b.astype(ct)), uint_for(ct))


def _ties_body(xs, base, ctr, tbits, cuts, weights, scale, *, normalize, poison,
               by_position=True):
    """TIES with precomputed per-model trim thresholds (ctr: flat index, no offset).

    by_position (default): model i keeps entry j iff |tau_ij| > t_i, or
    |tau_ij| == t_i and j < cut_i (ties at the threshold are kept in flat-index
    order), with tbits = t_i and magnitudes compared as the bit patterns of the
    non-negative floats.
    by_position=False: tbits are signed strict lower bounds (`strict_bounds`),
    model i keeps entry j iff signed(bits |tau_ij|) > tbits_i, and cuts are
    unused: one comparison per model instead of five, for leaves where no
    threshold splits its ties.
    """
    dtype = xs[0].dtype
    ct = compute_dtype(dtype)
    b = base.astype(ct)
    ds = []
    for i, x in enumerate(xs):
        tau = x.astype(ct) - b
        if by_position:
            u = lax.bitcast_convert_type(jnp.abs(tau), uint_for(ct))
            keep = (u > tbits[i]) | ((u == tbits[i]) & (ctr < cuts[i]))
        else:
            u = lax.bitcast_convert_type(jnp.abs(tau), int_for(ct))
            keep = u > tbits[i]
        ds.append(jnp.where(keep, tau * weights[i], 0))
    mixed = _disjoint_mean(ds, [weights[i] for i in range(len(xs))], normalize)
    out = b + mixed * scale
    if poison:
        out = out + _poison(xs + [base], ct)
    return out.astype(dtype)


def strict_bounds(tbits, cuts):
    """Signed strict lower bounds equivalent to TIES thresholds (tbits, cuts),
    `[K]` int32 (int64 for 64-bit tbits), or None if some cut splits the
    entries tied at a nonzero threshold (then only `by_position` is exact).

    Magnitude bit patterns are at most the largest NaN (sign bit clear), so they
    compare the same as signed integers. Model i with (t, cut) keeps
    bits > t - 1 if cut keeps every tie (cut = 2^32 - 1), bits > t if it keeps
    none (cut = 0), and nothing if t is the all-ones "keep none" pattern. Ties at
    t = 0 are zero deltas, which change no TIES sum (their sign agrees with
    neither elected sign), so any cut there is equivalent to keeping bits > 0.
    """
    tbits, cuts = np.asarray(tbits), np.asarray(cuts, np.uint32)
    stype = int_for(tbits.dtype)
    out = np.empty(tbits.shape, stype)
    smax = np.iinfo(stype).max
    for i, (t, cut) in enumerate(zip(tbits.tolist(), cuts.tolist())):
        if t > smax:                      # "keep none" (k = 0)
            out[i] = smax
        elif cut == 0xFFFFFFFF:           # every tie kept: bits >= t
            out[i] = t - 1
        elif cut == 0 or t == 0:          # no tie kept (or only zero deltas tied)
            out[i] = t
        else:
            return None
    return out


def _dare_deltas(xs, b, ct, ctr, seeds, drop_thr):
    """Per model: (tau_i, keep_i), keep_i true with probability 1 - drop_rate_i."""
    return [(x.astype(ct) - b, u >= drop_thr[i])
            for i, (x, u) in enumerate(zip(xs, draws(ctr, seeds)))]


def _dare_body(xs, base, ctr, seeds, drop_thr, factors, weights, scale, *, combine,
               normalize, poison):
    """DARE: keep each tau entry with prob. 1 - p_i, multiply kept ones by factor_i,
    weight, then combine linearly (sum, optionally / sum w) or TIES-style."""
    dtype = xs[0].dtype
    ct = compute_dtype(dtype)
    b = base.astype(ct)
    pairs = _dare_deltas(xs, b, ct, ctr, seeds, drop_thr)
    # factor_i * w_i folded into one multiplier: one multiplication per model.
    ds = [jnp.where(k, t, 0) * (factors[i] * weights[i]) for i, (t, k) in enumerate(pairs)]
    if combine == "ties":
        mixed = _disjoint_mean(ds, [weights[i] for i in range(len(xs))], normalize)
    else:
        mixed = ds[0]
        for d in ds[1:]:
            mixed = mixed + d
        if normalize:
            total = weights[0]
            for i in range(1, len(xs)):
                total = total + weights[i]
            mixed = mixed / jnp.where(jnp.abs(total) < 1e-8, jnp.ones((), ct), total)
    out = b + mixed * scale
    if poison:
        out = out + _poison(xs + [base], ct)
    return out.astype(dtype)


def _code_body(xs, base, ctr, hi, mid_lo, mid_hi, lo, *, models):
    """Bracket labels of several models packed in one uint8 per scalar.

    models: per model (i, above bit, == hi bit, inside bit, == lo bit), -1 for a
    label not wanted (see `ties_threshold._layouts`). With u = model i's magnitude
    bits, the labels are u > hi_i, u == hi_i, mid_lo_i <= u <= mid_hi_i and
    u == lo_i.
    """
    del ctr
    ct = compute_dtype(xs[0].dtype)
    out = None
    for i, above, eq_hi, mid, eq_lo in models:
        u = magnitude_bits(xs[i], base, ct)
        code = (u > hi[i]).astype(jnp.uint8) << above
        if eq_hi >= 0:
            code = code | ((u == hi[i]).astype(jnp.uint8) << eq_hi)
        if mid >= 0:
            code = code | (((u >= mid_lo[i]) & (u <= mid_hi[i])).astype(jnp.uint8) << mid)
        if eq_lo >= 0:
            code = code | ((u == lo[i]).astype(jnp.uint8) << eq_lo)
        out = code if out is None else out | code
    return out


# ---- whole-leaf kernels -----------------------------------------------------------------

_STATIC = ("stacked", "out_sharding")


@partial(jax.jit, static_argnames=_STATIC)
def average_kernel(inputs, weights, *, stacked, out_sharding):
    """sum_i w_i x_i accumulated in float32 (or float64) in model order."""
    xs = _unstack(inputs, stacked)
    return _constrain(_average_body(xs, None, None, weights), out_sharding)


@partial(jax.jit, static_argnames=_STATIC + ("last", "poison"))
def select_kernel(inputs, seeds, offset, thresholds, *, stacked, last, out_sharding,
                  poison):
    """Per scalar: model i where C_{i-1} <= u < C_i (u = 32-bit draw, C = cum. probs)."""
    xs = _unstack(inputs, stacked)
    ctr = counters(xs[0].shape, offset, xs[0])
    out = _select_body(xs, None, ctr, seeds, thresholds, last=last, poison=poison)
    return _constrain(out, out_sharding)


@partial(jax.jit, static_argnames=_STATIC + ("n", "use_tol", "poison"))
def resample_kernel(inputs, base, seeds, offset, probs, tol, *, stacked, n, use_tol,
                    out_sharding, poison):
    """Selection with n redraws (see `_resample_body`)."""
    xs = _unstack(inputs, stacked)
    ctr = counters(xs[0].shape, offset, xs[0])
    out = _resample_body(xs, like(base, xs[0]), ctr, seeds, probs, tol, n=n,
                         use_tol=use_tol, poison=poison)
    return _constrain(out, out_sharding)


@partial(jax.jit, static_argnames=_STATIC)
def task_arithmetic_kernel(inputs, base, weights, scale, *, stacked, out_sharding):
    """base + scale * sum_i w_i (x_i - base), in float32 (or float64)."""
    xs = _unstack(inputs, stacked)
    out = _task_arithmetic_body(xs, like(base, xs[0]), None, weights, scale)
    return _constrain(out, out_sharding)


@partial(jax.jit, static_argnames=_STATIC + ("normalize", "poison", "by_position"))
def ties_kernel(inputs, base, tbits, cuts, weights, scale, *, stacked, normalize,
                out_sharding, poison, by_position=True):
    """TIES with precomputed per-model trim thresholds (see `_ties_body`)."""
    xs = _unstack(inputs, stacked)
    ctr = counters(xs[0].shape, 0, xs[0])
    out = _ties_body(xs, like(base, xs[0]), ctr, tbits, cuts, weights, scale,
                     normalize=normalize, poison=poison, by_position=by_position)
    return _constrain(out, out_sharding)


@partial(jax.jit, static_argnames=("stacked",))
def dare_l1_kernel(inputs, base, seeds, offset, drop_thr, *, stacked):
    """Per model |tau_i| and its kept part, `[2, K, *shape]` (summed on the host)."""
    xs = _unstack(inputs, stacked)
    ct = compute_dtype(xs[0].dtype)
    ctr = counters(xs[0].shape, offset, xs[0])
    pairs = _dare_deltas(xs, like(base, xs[0]).astype(ct), ct, ctr, seeds, drop_thr)
    before = jnp.stack([jnp.abs(t) for t, _ in pairs])
    after = jnp.stack([jnp.where(k, jnp.abs(t), 0) for t, k in pairs])
    return jnp.stack([before, after])


@partial(jax.jit, static_argnames=_STATIC + ("combine", "normalize", "poison"))
def dare_kernel(inputs, base, seeds, offset, drop_thr, factors, weights, scale, *,
                stacked, combine, normalize, out_sharding, poison):
    """DARE (see `_dare_body`)."""
    xs = _unstack(inputs, stacked)
    ctr = counters(xs[0].shape, offset, xs[0])
    out = _dare_body(xs, like(base, xs[0]), ctr, seeds, drop_thr, factors, weights, scale,
                     combine=combine, normalize=normalize, poison=poison)
    return _constrain(out, out_sharding)


# ---- chunked kernel (host-resident leaves; see psm.merge.host_staging) ---------------------

BODIES = {
    "average": _average_body,
    "select": _select_body,
    "resample": _resample_body,
    "task_arithmetic": _task_arithmetic_body,
    "ties": _ties_body,
    "dare": _dare_body,
    "code": _code_body,
}


# The chunked kernel only runs on CPU. 512-bit vectors (where the CPU has them)
# cut the instruction count of the hash-heavy bodies by a quarter to a third (e.g.
# resample 1.06 -> 0.79 ns per scalar in cache); results are the same bits.
_CPU_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


@partial(jax.jit, static_argnames=("body", "stacked", "chunk", "static", "sliced"),
         donate_argnums=0, keep_unused=True, compiler_options=_CPU_OPTIONS)
def chunk_kernel(stage, inputs, base, start, offset, args, *, body, stacked, chunk, static,
                 sliced=False):
    """Scalars [start, start + chunk) of one leaf (row-major) through BODIES[body].

    Args:
        stage: a donated `[chunk]` buffer of the result's dtype; XLA writes the
            result into it, so a pipeline of chunks allocates no new memory.
        inputs: K-tuple of arrays of the leaf's shape, or one `[K, ...]` array.
        base: the base array of the leaf's shape, or None.
        start: int32 flat index of the chunk's first scalar.
        offset: uint32 added to the flat index for the counters (`offset=` of
            select/dare; 0 otherwise).
        args: the body's array arguments (weights, seeds, thresholds, ...).
        body: key of BODIES.
        stacked: whether inputs is one `[K, ...]` array.
        chunk: chunk length (static).
        static: the body's static options as a tuple of (name, value) pairs.
        sliced: inputs (a K-tuple) and base are the chunk's `[chunk]` scalars
            already, not whole leaves.

    Returns:
        `[chunk]` merged values (uint8 labels for the "code" body).
    """
    del stage
    if sliced:
        xs, b = list(inputs), base
    else:
        if stacked:
            flat = inputs.reshape(inputs.shape[0], -1)
            block = lax.dynamic_slice(flat, (jnp.zeros_like(start), start),
                                      (flat.shape[0], chunk))
            xs = [block[i] for i in range(flat.shape[0])]
        else:
            xs = [lax.dynamic_slice(x.reshape(-1), (start,), (chunk,)) for x in inputs]
        b = None if base is None else lax.dynamic_slice(base.reshape(-1), (start,), (chunk,))
    ctr = lax.iota(jnp.uint32, chunk) + (start.astype(jnp.uint32) + offset)
    return BODIES[body](xs, b, ctr, *args, **dict(static))


# ---- helpers of the exact TIES threshold search (see ties_threshold) ----------------

def _flat(x):
    """x flattened; explicitly sharded arrays are gathered first (explicit
    sharding cannot reshape across sharded dimensions)."""
    sh = _explicit_sharding(x)
    if sh is not None:
        x = jax.sharding.reshard(x, NamedSharding(sh.mesh, PartitionSpec()))
    return x.reshape(-1)


@partial(jax.jit, static_argnames=("stacked",))
def sample_bits_kernel(inputs, base, positions, *, stacked):
    """Magnitude bits of every model at the given flat positions, `[K, S]`."""
    xs = _unstack(inputs, stacked)
    ct = compute_dtype(xs[0].dtype)
    bf = _flat(base)[positions]
    return jnp.stack([magnitude_bits(_flat(x)[positions], bf, ct) for x in xs])


@partial(jax.jit, static_argnames=("stacked", "block"))
def block_sample_bits_kernel(inputs, base, rows, *, stacked, block):
    """Magnitude bits of every model in sampled blocks of `block` consecutive
    scalars, `[K, len(rows) * block]`; block r covers flat positions
    [r * block, (r + 1) * block). A block gather moves whole cache lines: ~5x
    faster on CPU than gathering as many scalars at random positions."""
    xs = _unstack(inputs, stacked)
    ct = compute_dtype(xs[0].dtype)

    def blocks(x):
        flat = _flat(x)
        n_rows = flat.shape[0] // block
        return flat[:n_rows * block].reshape(n_rows, block)[rows].reshape(-1)

    bf = blocks(base)
    return jnp.stack([magnitude_bits(blocks(x), bf, ct) for x in xs])


@partial(jax.jit, static_argnames=("stacked",))
def gather_bits_kernel(inputs, base, positions, *, stacked):
    """Magnitude bits of model i at positions[i], `[K, S]`."""
    xs = _unstack(inputs, stacked)
    ct = compute_dtype(xs[0].dtype)
    bf = _flat(base)
    return jnp.stack([magnitude_bits(_flat(x)[positions[i]], bf[positions[i]], ct)
                      for i, x in enumerate(xs)])


@partial(jax.jit, static_argnames=("stacked",))
def full_bits_kernel(inputs, base, *, stacked):
    """Magnitude bits of every model, flattened, `[K, N]`."""
    xs = _unstack(inputs, stacked)
    ct = compute_dtype(xs[0].dtype)
    return jnp.stack([_flat(magnitude_bits(x, like(base, x), ct)) for x in xs])


@partial(jax.jit, static_argnames=("stacked", "models"))
def code_kernel(inputs, base, hi, mid_lo, mid_hi, lo, *, stacked, models):
    """Bracket labels of several models packed in one uint8 per scalar, `shape`
    (see `_code_body`)."""
    xs = _unstack(inputs, stacked)
    return _code_body(xs, like(base, xs[0]), None, hi, mid_lo, mid_hi, lo, models=models)


def _count(mask):
    return jnp.sum(mask, dtype=jnp.int32)


@partial(jax.jit, static_argnames=("stacked",))
def threshold_search_kernel(inputs, base, ks, *, stacked):
    """Exact per-tensor TIES thresholds found on the devices, `([K] tbits, [K] cuts)`.

    For arrays split over several processes, whose entries the host cannot read
    (see `ties_threshold.per_tensor`). Per model i, a bitwise search over the
    magnitude bits u (`magnitude_bits`): t_i is the largest value with at least
    k_i entries u >= t_i (the k-th largest magnitude), one counting pass per bit;
    then, when the entries equal to t_i are more than the need_i = k_i -
    #(u > t_i) still to keep, cut_i is one past the flat index of the need_i-th
    of them (another pass per bit of the index), else 2^32 - 1 (keep every tie):
    the same (t, cut) as the host search. Only counts leave the devices.

    Args:
      ks: `[K]` int32 entries to keep, each in [1, n - 1] (the trivial counts
        0 and n are settled without a search).
    """
    xs = _unstack(inputs, stacked)
    ct = compute_dtype(xs[0].dtype)
    ut = uint_for(ct)
    nbits = 8 * ut.itemsize
    b = like(base, xs[0])
    ctr = counters(xs[0].shape, 0, xs[0])
    ts, cuts = [], []
    for i, x in enumerate(xs):
        u = magnitude_bits(x, b, ct)
        k = ks[i]

        def grow_t(j, t, u=u, k=k):
            cand = t | lax.shift_left(jnp.ones((), ut), (nbits - 1 - j).astype(ut))
            return jnp.where(_count(u >= cand) >= k, cand, t)

        t = lax.fori_loop(0, nbits, grow_t, jnp.zeros((), ut))
        need = k - _count(u > t)
        eq = u == t

        def grow_c(j, c, eq=eq, need=need):
            cand = c | lax.shift_left(jnp.ones((), jnp.uint32), (31 - j).astype(jnp.uint32))
            return jnp.where(_count(eq & (ctr < cand)) < need, cand, c)

        c = lax.fori_loop(0, 32, grow_c, jnp.zeros((), jnp.uint32))
        ts.append(t)
        cuts.append(jnp.where(_count(eq) > need, c + 1, jnp.uint32(0xFFFFFFFF)))
    return jnp.stack(ts), jnp.stack(cuts)
