"""In-memory merging of K parameter trees (re-exported as `psm.merge`): average, select, TIES, DARE.

Inputs. `models` is either a list/tuple of K trees of identical structure, or,
with the keyword `stacked=True`, one pytree whose leaves are stacked on a leading
model axis of size K (e.g. an NNX `State` with leaves `[K, ...]`). Anything else
is refused with a TypeError saying how the argument was read: a dict of K models
and a single unstacked model are both one tree, and reading them as a stacked
tree would merge along the wrong axis (pass `list(d.values())` for the first).
`base` (the pre-trained tree) has the
structure of one model, without the model axis; it is matched to the models by
leaf name (see `leaf_name`), so a plain nested dict can serve as the base of an
NNX State. Any pytree of jax or numpy arrays works (NNX `State`, Linen param
dicts, nested dicts, dataclasses).

Output. A tree with the structure, dtypes and (for sharded `jax.Array` inputs)
sharding of one input model; numpy leaves come back as (read-only, zero-copy)
numpy arrays. Floating leaves are merged; 16-bit floats are computed in float32
and cast back. Integer, bool and PRNG-key leaves are not merged: they must be
equal in every model and are returned as they are.

Validation. Structure, shapes, dtypes, weights, probabilities, keys and options
are checked before any computation, with errors naming the leaf and what
differs. Non-finite inputs (NaN / inf) raise a ValueError naming the leaf and the
model unless `allow_nonfinite=True`; to keep merging at memory bandwidth the
check rides on the merge pass itself (a non-finite input poisons the result; the
host sums each result, chunk by chunk while it is in cache for large host-resident
leaves), so the error comes after the arithmetic but before anything is returned.

Memory. Large leaves held in host memory (numpy, or a `jax.Array` on one CPU
device) are merged chunk by chunk into huge-page-backed host memory, which avoids
the page faults of a fresh XLA output buffer (see `psm.merge.host_staging`); the
results are bit-identical to the whole-leaf kernels used for sharded or
accelerator arrays.

Randomness. `select` and `dare` take a `key` (a new-style typed key such as
`jax.random.key(0)`, or a raw `uint32[2]` key such as `jax.random.PRNGKey(0)`).
Each leaf's draws depend only on that key, the leaf's name and each scalar's
flat index (`leaf_bits`), never on tree order, device count or sharding, so the
same key gives bit-identical merges on one CPU or on a sharded mesh.

Methods (names accepted by `merge`; tau_i = theta_i - base):

- `average` (`linear`): sum_i w_i theta_ij, w >= 0 summing to 1 (default 1/K).
- `select`: theta_ij with i drawn with probability p_i, per scalar. With
  `resample=n` and `base`: redraw while the drawn candidate is unchanged
  (== base), at most n times; the first changed one wins; base if all n+1
  draws are unchanged.
- `task_arithmetic`: base_j + scale * sum_i w_i tau_ij.
- `ties`: trim each tau_i to its k = max(1, int(density * n)) largest
  magnitudes (per tensor, or per whole model), elect the sign of
  sum_i w_i tau_ij, base_j + scale * (sum of agreeing w_i tau_ij) / (sum of
  agreeing w_i).
- `dare` (`dare_linear`, `dare_ties`): drop each tau_ij with probability p,
  rescale the kept ones (1/(1-p), or mergekit's per-tensor L1 match), combine
  linearly or TIES-style.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm import global_arrays
from psm.merge import host_staging, leaf_inputs, ties_threshold
from psm.merge import kernels as K
from psm.merge.host_staging import x64_if_needed as _x64_if_needed
from psm.merge.leaf_inputs import leaf_name

__all__ = [
    "average", "select", "task_arithmetic", "ties", "dare", "merge", "register_method",
    "available_methods", "leaf_name", "leaf_key", "leaf_bits", "PROB_SUM_TOL",
]

PROB_SUM_TOL = 1e-5
"""Absolute tolerance on sum(probs) - 1 and sum(weights) - 1 for `select` and
`average`; accepted values are then renormalised in float64."""


# ---- public random helpers ---------------------------------------------------------

def _as_key(key):
    """A typed PRNG key from a typed key or a raw uint32 key; TypeError otherwise."""
    if isinstance(key, (jax.Array, np.ndarray)):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise ValueError(f"key must be a single PRNG key; got a batch of shape "
                                 f"{key.shape}")
            return key
        raw_shape = jax.random.key_data(jax.random.key(0)).shape
        if key.dtype == np.uint32 and key.shape == raw_shape:
            return jax.random.wrap_key_data(key)
        raise TypeError(
            f"key must be a PRNG key (jax.random.key(seed)) or a raw uint32{list(raw_shape)} "
            f"key (jax.random.PRNGKey(seed)); got an array of dtype {key.dtype} and shape "
            f"{key.shape}")
    raise TypeError(
        f"key must be a PRNG key such as jax.random.key(seed); got {type(key).__name__}")


def leaf_key(key, name: str):
    """Key of one leaf: fold_in(fold_in(key, w0), w1).

    (w0, w1) are the two little-endian uint32 words opening sha256(name in UTF-8),
    a hash that is stable across processes and platforms (unlike Python's hash()).

    Args:
        key: typed PRNG key or raw uint32 key.
        name: canonical leaf name (`leaf_name`), e.g. "layers/0/attn/q_proj/kernel".

    Returns:
        A typed PRNG key.
    """
    words = leaf_inputs.name_words(name)
    return jax.random.fold_in(jax.random.fold_in(_as_key(key), words[0]), words[1])


@functools.partial(jax.jit, static_argnames=("shape",))
def _leaf_bits(key, words, stream, offset, *, shape):
    return K.draw(K.counters(shape, offset), K.stream_seeds(key, words, stream))


def leaf_bits(key, name: str, shape: Sequence[int], *, stream: int = 0, offset: int = 0):
    """The uint32 draws that `select` and `dare` use for one leaf, `shape`.

    Draw of the scalar with row-major flat index j:
    `mix32(mix32(c ^ s0) ^ s1)` with c = uint32(offset + j),
    s0 = random.bits(leaf_key(key, name), (), uint32) (the leaf's word, the same
    for every stream), s1 = random.bits(fold_in(leaf_key(key, name), stream), (),
    uint32) and mix32 Chris Wellons' lowbias32 hash. `select` uses stream 0
    (plain selection compares the 32-bit draw with integer thresholds;
    resampling uses its top 24 bits as the uniform ((u >> 8) + 0.5) / 2^24);
    `dare` uses stream i for model i (its K streams share the first hash round,
    so it is computed once; the tests check that streams are independent).

    Args:
        key: typed PRNG key or raw uint32 key.
        name: canonical leaf name.
        shape: shape of the (chunk of the) leaf.
        stream: stream number (uint32).
        offset: flat index of the chunk's first element within the whole leaf.

    Returns:
        uint32 array of `shape`.
    """
    return _leaf_bits(_as_key(key), leaf_inputs.name_words(name), np.uint32(stream),
                      np.uint32(offset), shape=tuple(int(s) for s in shape))


# ---- argument checks -----------------------------------------------------------------

def _shown(value) -> str:
    """repr of a value for a message, numpy scalars and arrays as plain Python
    (`0.6`, not `np.float64(0.6)`)."""
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    return repr(value)


def _vector(values, k: int, what: str) -> np.ndarray:
    if isinstance(values, (str, bytes)) or np.ndim(values) != 1:
        raise ValueError(f"{what} must be a sequence of K = {k} numbers; got {_shown(values)}")
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (k,):
        raise ValueError(f"{what} has {arr.shape[0]} entries but there are K = {k} models")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} must be finite; got {arr.tolist()}")
    return arr


def _probs(values, k: int, what: str) -> np.ndarray:
    """Validated probability vector (>= 0, sums to 1 within PROB_SUM_TOL), float64."""
    if values is None:
        return np.full(k, 1.0 / k)
    arr = _vector(values, k, what)
    if (arr < 0).any():
        raise ValueError(f"{what} must be non-negative; got {arr.tolist()}")
    total = arr.sum()
    if abs(total - 1.0) > PROB_SUM_TOL:
        raise ValueError(f"{what} must sum to 1 (tolerance {PROB_SUM_TOL}); got sum "
                         f"{float(total)} for {arr.tolist()}")
    return arr / total


def _per_model(value, k: int, what: str, lo: float, hi: float, hi_open: bool) -> np.ndarray:
    """A scalar or a length-K sequence with every entry in [lo, hi] (or [lo, hi))."""
    arr = (np.full(k, float(value)) if np.ndim(value) == 0
           else _vector(value, k, what))
    bad = (arr < lo) | (arr >= hi if hi_open else arr > hi) | ~np.isfinite(arr)
    if bad.any():
        rng = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"{what} must lie in {rng}; got {arr.tolist()}")
    return arr


def _scalar(value, what: str) -> float:
    if np.ndim(value) != 0 or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be a finite number; got {_shown(value)}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{what} must be finite; got {value}")
    return value


def _choice(value, options, what: str):
    if value not in options:
        raise ValueError(f"{what} must be one of {list(options)}; got {_shown(value)}")
    return value


def _count(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be a non-negative int; got {_shown(value)}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0; got {value}")
    return int(value)


# ---- the leaf loop ---------------------------------------------------------------------

def _prepare(models, base=None, *, need_base: bool = False,
             stacked: bool = False) -> leaf_inputs.Prepared:
    """Flattens and checks the inputs, including that non-float leaves agree."""
    prep = leaf_inputs.prepare(models, base, need_base=need_base, stacked=stacked)
    prep.fixed = {j: leaf_inputs.equal_leaf(leaf, prep.k)
                  for j, leaf in enumerate(prep.leaves) if not leaf.is_float}
    return prep


def _run(prep: leaf_inputs.Prepared, leaf_fn: Callable, *, allow_nonfinite: bool,
         check_base: bool, stager: host_staging.Stager | None = None):
    """Merges every float leaf and assembles the output tree.

    leaf_fn(leaf, stager) either returns the merged leaf (a whole-leaf kernel
    call, dispatched asynchronously) or queues it on the stager and returns the
    `host_staging.Job` (merged by the stager's worker thread meanwhile).
    """
    outs: list[Any] = [None] * len(prep.leaves)
    for j, value in prep.fixed.items():
        outs[j] = value
    with host_staging.Stager() if stager is None else stager as stager:
        for j, leaf in enumerate(prep.leaves):
            if leaf.is_float:
                with _x64_if_needed(leaf.dtype):
                    outs[j] = global_arrays.in_order(leaf_fn(leaf, stager))
    for j, leaf in enumerate(prep.leaves):
        if not leaf.is_float:
            continue
        out = outs[j]
        if isinstance(out, host_staging.Job):
            ok, out = out.finite, out.result()
        else:
            ok = allow_nonfinite or leaf_inputs.all_finite(out)
        if not allow_nonfinite and not ok:
            err = leaf_inputs.nonfinite_error(leaf, prep.k, check_base)
            if err is not None:
                raise err
            # Finite inputs, non-finite result: an overflow of the arithmetic itself.
        outs[j] = leaf_inputs.finish_leaf(leaf, out)
    return prep.unflatten(outs)


def _cast(values, leaf) -> np.ndarray:
    return np.asarray(values, dtype=K.compute_dtype(leaf.dtype))


def _stacked(leaf) -> bool:
    return leaf.xs is None


# ---- methods -----------------------------------------------------------------------------

def average(models, weights=None, *, stacked: bool = False, allow_nonfinite: bool = False):
    """Weighted average (model soup): merged_j = sum_i w_i theta_ij.

    Accumulated in float32 (float64 for float64 leaves) in model order and cast to
    the stored dtype. Matches mergekit `linear` (normalize: true).

    Args:
        models: list/tuple of K trees, or (with stacked=True) one tree with leaves
            `[K, ...]`.
        weights: K non-negative numbers summing to 1 (within `PROB_SUM_TOL`,
            then renormalised); default 1/K each.
        stacked: True when `models` is one tree whose leaves carry a leading
            model axis K (keyword only; a list/tuple is never stacked).
        allow_nonfinite: merge NaN/inf inputs instead of raising.

    Returns:
        The merged tree (structure, dtypes, sharding of one model).
    """
    prep = _prepare(models, stacked=stacked)
    w = _probs(weights, prep.k, "weights")

    def leaf_fn(leaf, stager):
        if host_staging.accepts(leaf):
            return stager.add(leaf, "average", (_cast(w, leaf),), check=not allow_nonfinite)
        return K.average_kernel(leaf.inputs, _cast(w, leaf), stacked=_stacked(leaf),
                                out_sharding=leaf.out_sharding)

    return _run(prep, leaf_fn, allow_nonfinite=allow_nonfinite, check_base=False)


def select(models, *, key, base=None, probs=None, resample: int = 0,
           tolerance: float | None = None, offset: int = 0, stacked: bool = False,
           allow_nonfinite: bool = False):
    """Parameter selection: every scalar is copied from one model drawn at random.

    For each scalar j independently, model i is drawn with probability p_i and
    merged_j = theta_ij (an exact copy, no arithmetic). Draws come from
    `leaf_bits(key, name, shape)`: model i is taken where
    C_{i-1} <= u < C_i, C_i = round(2^32 * (p_0 + ... + p_i)).

    Resampling (`resample=n > 0`, needs `base`): a candidate is *unchanged* where
    theta_ij == base_j exactly in the stored dtype (or |theta_ij - base_j| <=
    tolerance, computed in float32, when `tolerance` is given). The sequential
    definition draws a candidate, and while it is unchanged draws again, at most
    n more times; the first changed candidate wins, and if all n+1 draws are
    unchanged the base value is used. This is sampled in one pass from its
    closed form: with q_j = sum of p_i over unchanged candidates, merged_j =
    base_j with probability q_j^(n+1), else a changed candidate chosen with
    probability proportional to p_i. One uniform per scalar (stream 0, 24-bit
    resolution) makes both choices: base if u < q^(n+1), else the rescaled
    (u - q^(n+1)) / (1 - q^(n+1)) picks the changed candidate, whose
    resolution is 2^-24 / (1 - q^(n+1)).

    Args:
        models: list/tuple of K trees, or (with stacked=True) one tree with leaves
            `[K, ...]`.
        key: typed PRNG key (`jax.random.key`) or raw uint32 key (`PRNGKey`).
        base: the pre-trained tree; needed when resample > 0.
        probs: K non-negative numbers summing to 1 (within `PROB_SUM_TOL`);
            default uniform.
        resample: n, the number of extra draws (0 = plain selection).
        tolerance: optional >= 0; None (default) means exact equality.
        offset: flat index of every leaf's first element within its full tensor
            (lets a streaming merger process tensors in row-major chunks).
        stacked: True when `models` is one tree whose leaves carry a leading
            model axis K (keyword only; a list/tuple is never stacked).
        allow_nonfinite: merge NaN/inf inputs instead of raising.

    Returns:
        The merged tree.
    """
    key = _as_key(key)
    n = _count(resample, "resample")
    offset = _count(offset, "offset")
    if n > 0 and base is None:
        raise ValueError("resample > 0 needs `base`: unchanged candidates are found by "
                         "comparing with the pre-trained values")
    if tolerance is not None:
        tolerance = _scalar(tolerance, "tolerance")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0; got {tolerance}")
    prep = _prepare(models, base, stacked=stacked)
    p = _probs(probs, prep.k, "probs")
    last = int(np.flatnonzero(p > 0)[-1])
    thresholds = np.minimum(np.round(np.cumsum(p) * 2.0**32), 2.0**32 - 1).astype(np.uint32)
    for leaf in prep.leaves:
        if offset + leaf.size > 2**32:
            raise ValueError(f"leaf '{leaf.name}': offset + size exceeds 2^32")

    def leaf_fn(leaf, stager):
        seeds = K.leaf_seeds(key, leaf_inputs.name_words(leaf.name), n=1)
        poison = not allow_nonfinite
        if host_staging.accepts(leaf):
            if n == 0:
                return stager.add(leaf, "select", (seeds, thresholds),
                                  (("last", last), ("poison", poison)), offset=offset,
                                  check=poison)
            return stager.add(
                leaf, "resample", (seeds, p.astype(np.float32), _cast(tolerance or 0.0, leaf)),
                (("n", n), ("use_tol", tolerance is not None), ("poison", poison)),
                base=leaf.base, offset=offset, check=poison)
        if n == 0:
            return K.select_kernel(
                leaf.inputs, seeds, np.uint32(offset), thresholds,
                stacked=_stacked(leaf), last=last, out_sharding=leaf.out_sharding,
                poison=not allow_nonfinite)
        return K.resample_kernel(
            leaf.inputs, leaf.base, seeds, np.uint32(offset), p.astype(np.float32),
            _cast(tolerance or 0.0, leaf), stacked=_stacked(leaf), n=n,
            use_tol=tolerance is not None, out_sharding=leaf.out_sharding,
            poison=not allow_nonfinite)

    return _run(prep, leaf_fn, allow_nonfinite=allow_nonfinite, check_base=n > 0)


def task_arithmetic(models, base, scale: float = 1.0, weights=None, *,
                    stacked: bool = False, allow_nonfinite: bool = False):
    """Task arithmetic: merged = base + scale * sum_i w_i (theta_i - base).

    Computed in float32 (float64 for float64 leaves). Matches mergekit
    `task_arithmetic` with `lambda = scale` and `weight = w_i`.

    Args:
        models: list/tuple of K trees, or (with stacked=True) one tree with leaves
            `[K, ...]`.
        base: the pre-trained tree.
        scale: lambda.
        weights: K finite numbers (any sign); default 1 each.
        stacked: True when `models` is one tree whose leaves carry a leading
            model axis K (keyword only; a list/tuple is never stacked).
        allow_nonfinite: merge NaN/inf inputs instead of raising.

    Returns:
        The merged tree.
    """
    prep = _prepare(models, base, need_base=True, stacked=stacked)
    w = np.ones(prep.k) if weights is None else _vector(weights, prep.k, "weights")
    scale = _scalar(scale, "scale")

    def leaf_fn(leaf, stager):
        if host_staging.accepts(leaf):
            return stager.add(leaf, "task_arithmetic", (_cast(w, leaf), _cast(scale, leaf)),
                              base=leaf.base, check=not allow_nonfinite)
        return K.task_arithmetic_kernel(
            leaf.inputs, leaf.base, _cast(w, leaf), _cast(scale, leaf),
            stacked=_stacked(leaf), out_sharding=leaf.out_sharding)

    return _run(prep, leaf_fn, allow_nonfinite=allow_nonfinite, check_base=True)


def ties(models, base, density, weights=None, scale: float = 1.0, *, trim: str = "tensor",
         normalize: bool = True, stacked: bool = False, allow_nonfinite: bool = False):
    """TIES merging (trim, elect sign, disjoint mean), with mergekit's conventions.

    1. Trim: tau_i = theta_i - base keeps its k largest-magnitude entries, the
       rest set to 0, k = max(1, int(density_i * n)) (k = n for density 1, 0 for
       density 0). `trim="tensor"` (default, as mergekit) counts n per tensor;
       `trim="model"` over all float leaves of the model (the original TIES
       code). The k-th largest magnitude is found exactly by a linear-time
       sample-bracket-and-select search (see `psm.merge.ties_threshold`); ties at the
       threshold are kept in flat-index order (leaves by sorted name for
       `trim="model"`), so exactly k entries survive.
    2. Elect: d_i = w_i * trimmed tau_i; the sign per scalar is + where
       sum_i d_ij >= 0, else -.
    3. Disjoint merge: m_j = sum of d_ij whose sign equals the elected one,
       divided by the sum of their w_i (if `normalize`; a zero divisor counts as 1).
    merged = base + scale * m, computed in float32 (float64 for float64 leaves).
    Matches mergekit `ties` (density, weight, normalize, lambda = scale); the
    tau entries are computed in float32 (mergekit: in the stored dtype).

    Args:
        models: list/tuple of K trees, or (with stacked=True) one tree with leaves
            `[K, ...]`.
        base: the pre-trained tree.
        density: fraction kept, in [0, 1]; a number or K numbers.
        weights: K finite numbers; default 1 each.
        scale: lambda.
        trim: "tensor" or "model".
        normalize: divide by the agreeing weights (mergekit default for ties).
        stacked: True when `models` is one tree whose leaves carry a leading
            model axis K (keyword only; a list/tuple is never stacked).
        allow_nonfinite: merge NaN/inf inputs instead of raising; a scalar whose
            inputs or base hold a NaN/inf is NaN in the result (the sign vote is
            undefined there).

    Returns:
        The merged tree.
    """
    prep = _prepare(models, base, need_base=True, stacked=stacked)
    dens = _per_model(density, prep.k, "density", 0.0, 1.0, hi_open=False)
    w = np.ones(prep.k) if weights is None else _vector(weights, prep.k, "weights")
    scale = _scalar(scale, "scale")
    _choice(trim, ("tensor", "model"), "trim")
    floats = [leaf for leaf in prep.leaves if leaf.is_float]
    for leaf in floats:
        if leaf.size >= 2**31:
            raise ValueError(f"leaf '{leaf.name}' has {leaf.size} elements; TIES supports "
                             "tensors below 2^31 elements")

    # The poison term (NaN wherever an input or the base is NaN/inf) stays on even with
    # allow_nonfinite: without it a NaN entry silently drops out of the sign vote (NaN
    # agrees with no sign) and the scalar comes back finite, as if the model were unchanged.
    poison = True
    check = not allow_nonfinite

    def kernel(leaf, tbits, cuts, stager):
        # Most leaves need no tie-break by position: one comparison per model.
        bounds = K.strict_bounds(tbits, cuts)
        by_position = bounds is None
        if not by_position:
            tbits = bounds
        if host_staging.accepts(leaf):
            return stager.add(
                leaf, "ties", (tbits, cuts, _cast(w, leaf), _cast(scale, leaf)),
                (("normalize", bool(normalize)), ("poison", poison),
                 ("by_position", by_position)), base=leaf.base, check=check)
        return global_arrays.in_order(K.ties_kernel(
            leaf.inputs, leaf.base, tbits, cuts, _cast(w, leaf), _cast(scale, leaf),
            stacked=_stacked(leaf), normalize=bool(normalize),
            out_sharding=leaf.out_sharding, poison=poison, by_position=by_position))

    # Thresholds for all leaves (a pipeline over leaves); each leaf's merge pass
    # is dispatched (or queued on the stager) as soon as its thresholds are known.
    merged, stager = {}, host_staging.Stager()

    def on_ready(leaf, tbits, cuts):
        with _x64_if_needed(leaf.dtype):
            merged[leaf.name] = kernel(leaf, tbits, cuts, stager)

    widest = max((leaf.dtype for leaf in floats), key=lambda d: d.itemsize,
                 default=np.dtype(np.float32))
    try:
        with _x64_if_needed(widest):
            if trim == "model" and floats:
                thresholds = ties_threshold.whole_model(floats, prep.k, dens)
            else:
                ties_threshold.per_tensor(floats, prep.k, dens, on_ready=on_ready)
    except BaseException:
        stager.close()
        raise

    def leaf_fn(leaf, stager):
        if leaf.name in merged:
            return merged.pop(leaf.name)
        return kernel(leaf, *thresholds[leaf.name], stager)

    return _run(prep, leaf_fn, allow_nonfinite=allow_nonfinite, check_base=True,
                stager=stager)


def dare(models, base, drop_rate, *, key, weights=None, scale: float = 1.0,
         rescale: str = "inverse", combine: str = "linear", normalize: bool = False,
         offset: int = 0, stacked: bool = False, allow_nonfinite: bool = False):
    """DARE: drop and rescale task-vector entries at random, then combine.

    tau_i = theta_i - base; entry j of model i is kept where its draw
    u = leaf_bits(key, name, shape, stream=i) satisfies u >= round(2^32 * p_i),
    i.e. with probability 1 - p_i, independently per model and scalar. Kept
    entries are multiplied by a rescale factor:
    - "inverse" (default; DARE paper, PEFT, MergeLM): 1 / (1 - p_i);
    - "l1" (mergekit `rescale: true`): sum|tau_i| / sum|kept tau_i| per tensor
      (factor 1 when either sum is below 1e-7), so the L1 norm is preserved
      exactly rather than in expectation; the sums are taken on the host by
      numpy's pairwise summation (same bits however the tensor is sharded), at
      the cost of one extra pass that writes 2K arrays of the leaf's size;
    - "none": 1.
    With d_i = w_i * rescaled kept tau_i, `combine="linear"` gives
    m = sum_i d_i (divided by sum_i w_i if `normalize`; mergekit `dare_linear`),
    and `combine="ties"` elects a sign and takes the disjoint sum of the agreeing
    d_i (divided by their sum of w_i if `normalize`; mergekit `dare_ties`).
    merged = base + scale * m, computed in float32 (float64 for float64 leaves).

    Args:
        models: list/tuple of K trees, or (with stacked=True) one tree with leaves
            `[K, ...]`.
        base: the pre-trained tree.
        drop_rate: p in [0, 1); a number or K numbers (mergekit density = 1 - p).
        key: typed PRNG key or raw uint32 key.
        weights: K finite numbers; default 1 each.
        scale: lambda.
        rescale: "inverse", "l1" or "none".
        combine: "linear" or "ties".
        normalize: divide by the (agreeing) weights; mergekit's DARE default is off.
        offset: flat index of every leaf's first element within its full tensor
            (streaming in chunks; not with rescale="l1").
        stacked: True when `models` is one tree whose leaves carry a leading
            model axis K (keyword only; a list/tuple is never stacked).
        allow_nonfinite: merge NaN/inf inputs instead of raising.

    Returns:
        The merged tree.
    """
    key = _as_key(key)
    prep = _prepare(models, base, need_base=True, stacked=stacked)
    p = _per_model(drop_rate, prep.k, "drop_rate", 0.0, 1.0, hi_open=True)
    w = np.ones(prep.k) if weights is None else _vector(weights, prep.k, "weights")
    scale = _scalar(scale, "scale")
    _choice(rescale, ("inverse", "l1", "none"), "rescale")
    _choice(combine, ("linear", "ties"), "combine")
    offset = _count(offset, "offset")
    if offset and rescale == "l1":
        raise ValueError("rescale='l1' needs whole tensors (per-tensor norms); offset "
                         "must be 0")
    for leaf in prep.leaves:
        if offset + leaf.size > 2**32:
            raise ValueError(f"leaf '{leaf.name}': offset + size exceeds 2^32")
    drop_thr = np.minimum(np.round(p * 2.0**32), 2.0**32 - 1).astype(np.uint32)

    def leaf_fn(leaf, stager):
        seeds = K.leaf_seeds(key, leaf_inputs.name_words(leaf.name), n=prep.k)
        if rescale == "inverse":
            factors = 1.0 / (1.0 - p)
        elif rescale == "none":
            factors = np.ones(prep.k)
        else:
            parts = K.dare_l1_kernel(leaf.inputs, leaf.base, seeds, np.uint32(offset),
                                     drop_thr, stacked=_stacked(leaf))
            if any(global_arrays.spans_processes(a) for a in leaf.arrays):
                # Split over several processes: summed on the devices (only the 2K
                # sums come to the host; the last bits may differ from numpy's).
                sums = global_arrays.to_numpy(jnp.sum(
                    jnp.reshape(parts, (2, prep.k, -1)), axis=2))
            else:
                # Summed by numpy (pairwise) from the gathered host array: the same
                # bits however the leaf is sharded, which an on-device reduction is not.
                sums = np.asarray(parts).reshape(2, prep.k, -1).sum(axis=2)
            before, after = sums[0], sums[1]
            ok = (before >= 1e-7) & (after >= 1e-7)
            factors = np.where(ok, before / np.where(ok, after, 1), 1).astype(before.dtype)
        if host_staging.accepts(leaf):
            return stager.add(
                leaf, "dare", (seeds, drop_thr, _cast(factors, leaf), _cast(w, leaf),
                               _cast(scale, leaf)),
                (("combine", combine), ("normalize", bool(normalize)),
                 ("poison", not allow_nonfinite)),
                base=leaf.base, offset=offset, check=not allow_nonfinite)
        return K.dare_kernel(
            leaf.inputs, leaf.base, seeds, np.uint32(offset), drop_thr,
            _cast(factors, leaf), _cast(w, leaf), _cast(scale, leaf),
            stacked=_stacked(leaf), combine=combine, normalize=bool(normalize),
            out_sharding=leaf.out_sharding, poison=not allow_nonfinite)

    return _run(prep, leaf_fn, allow_nonfinite=allow_nonfinite, check_base=True)


# ---- registry ----------------------------------------------------------------------------

_METHODS: dict[str, Callable] = {
    "average": average,
    "linear": average,
    "select": select,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "dare_linear": functools.partial(dare, combine="linear"),
    "dare_ties": functools.partial(dare, combine="ties"),
}


def register_method(name: str, fn: Callable, *, overwrite: bool = False) -> None:
    """Makes fn(models, **kwargs) available to `merge` under name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string; got {name!r}")
    if name in _METHODS and not overwrite:
        raise ValueError(f"merge method {name!r} is already registered; pass overwrite=True")
    _METHODS[name] = fn


def available_methods() -> list[str]:
    """Sorted names accepted by `merge`."""
    return sorted(_METHODS)


def merge(method: str, models, **kwargs):
    """Merges with the method registered under `method` (see `available_methods`).

    `average`/`linear`, `select`, `task_arithmetic`, `ties`, `dare`, and
    `dare_linear` / `dare_ties` (= `dare` with combine "linear" / "ties").
    Keyword arguments go to the method, e.g.
    `merge("select", models, key=jax.random.key(0), base=base, resample=3)`;
    `stacked=True` when `models` is one tree with leaves `[K, ...]`.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown merge method {method!r}; available: {available_methods()}")
    return _METHODS[method](models, **kwargs)

