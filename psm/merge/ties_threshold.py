"""Exact TIES trim thresholds in linear time.

TIES keeps, per model, the k entries of the task vector with the largest
magnitude (k = max(1, int(density * n)), as mergekit). Instead of sorting
(O(n log n); `jnp.partition` / `lax.top_k` are sort-based on CPU) this finds
the k-th largest magnitude exactly with two linear passes:

1. a fixed pseudo-random sample of blocks of BLOCK consecutive scalars (1/16
   of the tensor, at least 2^14 and at most 2^17 scalars) gives a bracket
   [lo, hi] that contains the k-th largest magnitude with
   overwhelming probability: Z = 4 standard deviations of the estimated
   count, plus 64 entries, with the variance taken from the spread between
   blocks where that exceeds the binomial one (neighbouring magnitudes can
   correlate); a miss costs time, not exactness (see below);
2. one fused pass over the data labels each entry as above / inside / below
   the bracket (2 bits per model, packed in a uint8 per scalar); the host
   counts the labels and gathers the few entries inside, where
   `np.partition` finds the exact threshold.

For host-resident leaves (numpy, or `jax.Array`s on one CPU device) numpy takes
the sample and gathers the inside values, reading the arrays in place: both are
bound by memory latency, and XLA keeps its threads busy waiting where numpy
uses one; sharded or accelerator leaves use XLA kernels for both (same bits).

Tie classes. Where many entries share a magnitude (bfloat16 or quantised
deltas, the zero deltas at low thresholds) the sample shows it: lo == hi, or
many sampled values equal lo or hi (`_tie_mode`). Such a model's labels then
separate the entries equal to hi and to lo from those strictly between
(`_layouts`); the host counts the two end classes (per block of >= 2^16
scalars) instead of gathering, partitioning and sorting what may be millions of
equal values, and where the threshold is an end value it finds the position of
the last kept tie from the block counts and one recomputed block (`_find_tie`).
What is gathered stays about as small as for distinct magnitudes.

If the bracket misses (a check on the exact counts), the group falls back to a
full host-side `np.partition`, so the result is always exact. Magnitudes are
compared as the bit patterns of non-negative floats (same order as the values).
Ties at the threshold are broken by position: flat index within a tensor, and
for whole-model trimming the leaves in sorted-name order, then flat index;
exactly k entries are kept.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from psm import global_arrays
from psm.merge import kernels as K
from psm.merge import host_staging

SAMPLE = 1 << 17      # sampled positions per tensor (per-tensor scope), at most ...
SAMPLE_SHARE = 16     # ... 1/SAMPLE_SHARE of the tensor, and at least SAMPLE_MIN
SAMPLE_MIN = 1 << 14
SAMPLE_TOTAL = 1 << 18  # sampled positions per model (whole-model scope)
EXACT = 1 << 17       # tensors up to this size are solved exactly on the host
BLOCK = 32            # consecutive scalars per sampled block (whole cache lines)
Z = 4.0               # bracket half-width in standard deviations of the sample estimate
STRIDE = 16           # every STRIDE-th sampled value forms the sorted sub-sample
CUT_ALL = np.uint32(0xFFFFFFFF)  # keep every tie (flat index < 2^32 - 1 always)


def trim_count(density: float, n: int) -> int:
    """Entries kept from n: mergekit's `max(1, int(density * n))`; 0 / n at the ends."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


@functools.lru_cache(maxsize=64)
def _positions(n: int, s: int) -> np.ndarray:
    """s sorted flat positions in [0, n), one uniformly drawn in each of s equal
    strata (a seed fixed by n), as int32. Jittered rather than strided so that
    the sample does not alias with a tensor's row length."""
    rng = np.random.default_rng(n)
    starts = (np.arange(s, dtype=np.int64) * n) // s
    ends = (np.arange(1, s + 1, dtype=np.int64) * n) // s
    pos = starts + (rng.random(s) * (ends - starts)).astype(np.int64)
    out = np.minimum(pos, ends - 1).astype(np.int32)
    out.setflags(write=False)  # cached: shared between calls
    return out


class _Scratch:
    """Reusable flat buffers for one thread's per-leaf temporaries.

    A leaf's label temporaries are megabytes each; allocated afresh per leaf,
    glibc tends to hand them back to the OS on free, and every leaf pays their
    page faults again (~1,900 faults per 3.2M-scalar leaf when decoded in a
    loop, about half of the decoding time on a virtual machine). One buffer
    per role, reused for all the leaves of a call, faults once.
    """

    def __init__(self):
        self._buffers = {}

    def get(self, role: str, size: int, dtype) -> np.ndarray:
        """An uninitialised flat array of `size` elements, valid until the next
        `get` of the same role."""
        dtype = np.dtype(dtype)
        buf = self._buffers.get((role, dtype))
        if buf is None or buf.size < size:
            buf = self._buffers[(role, dtype)] = np.empty(size, dtype)
        return buf[:size]


def _bucket(m: int) -> int:
    return 1 << max(4, (max(m, 1) - 1).bit_length())


@dataclasses.dataclass
class _Part:
    """What one tensor contributes to one model's search.

    Plain labelling: `above` counts the entries > hi and idx / vals hold every
    entry in [lo, hi]. Tie labelling (`_tie_mode`: the sample shows many entries
    equal to lo or hi, e.g. bfloat16 or quantised deltas): the entries equal to
    hi and to lo are only counted (`n_hi`, `n_lo`), never gathered, and idx /
    vals hold the entries strictly between; `find(value, r)` then gives the
    flat index of the r-th (0-based, ascending) entry whose bits equal `value`
    (hi or lo), for the tie-break by position.
    """

    n: int
    above: int = 0            # entries with bits > hi
    idx: np.ndarray = None    # flat indices of the gathered entries, ascending
    vals: np.ndarray = None   # their bits
    n_hi: int = 0             # tie labelling: entries with bits == hi
    n_lo: int = 0             # tie labelling: entries with bits == lo (lo < hi)
    hi: object = None         # tie labelling: the bracket's ends (utype)
    lo: object = None
    find: object = None       # tie labelling: callable(value, r) -> flat index


def _sample_variance(vals, n, k, block, sub=None):
    """Variance of the count of entries above the k-th largest of n estimated
    from the sample vals `[S]` (runs of `block` consecutive scalars): the larger
    of the binomial n^2/S q(1-q) and the cluster-sample (n/S)^2 B var(c_b), c_b
    the count per block above an approximate threshold (from the sorted
    sub-sample `sub`, every STRIDE-th value) and B the number of blocks."""
    s = len(vals)
    q = k / n
    var = n * n / s * q * (1 - q)
    if block > 1 and s >= 2 * block:
        sub = np.sort(vals[::STRIDE]) if sub is None else sub
        t = sub[len(sub) - 1 - min(len(sub) - 1, int(q * len(sub)))]
        per_block = np.count_nonzero((vals >= t).reshape(-1, block), axis=1)
        var = max(var, (n / s) ** 2 * len(per_block) * float(np.var(per_block, ddof=1)))
    return var


def _bracket_uniform(vals, weight, k, var, nonebits, sub=None):
    """`_bracket` for a sample in which every value stands for `weight` entries
    (sub: `np.sort(vals[::STRIDE])` if already computed)."""
    s = len(vals)
    margin = Z * np.sqrt(var) + 64
    j_hi = int(np.floor((k - margin) / weight)) - 1   # desc. index, count <= k - margin
    j_lo = int(np.ceil((k + margin) / weight)) - 1    # desc. index, count >= k + margin
    want = [s - 1 - j for j in (j_hi, j_lo) if 0 <= j < s]
    stats = dict(zip(want, _order_stats(vals, want, sub))) if want else {}
    hi = stats[s - 1 - j_hi] if 0 <= j_hi < s else vals.dtype.type(nonebits)
    lo = stats[s - 1 - j_lo] if 0 <= j_lo < s else vals.dtype.type(0)
    return lo, hi


def _order_stats(vals: np.ndarray, ranks, sub=None) -> np.ndarray:
    """`np.partition(vals, ranks)[ranks]` (0-based ascending ranks), exactly, in
    a fraction of the time for large samples: the sorted strided sub-sample
    `sub` = `np.sort(vals[::STRIDE])` (computed if not given) brackets the wanted
    ranks (6 sigma), and only the values inside the bracket are partitioned.
    Falls back to a full partition if the bracket misses."""
    order = np.argsort(ranks)
    result = np.empty(len(ranks), vals.dtype)
    result[order] = _order_stats_sorted(vals, sorted(int(r) for r in ranks), sub)
    return result


def _order_stats_sorted(vals, ranks, sub):
    """`_order_stats` for ascending ranks."""
    s = len(vals)
    if s < 64 * STRIDE:
        return np.partition(vals, ranks)[ranks]
    sub = np.sort(vals[::STRIDE]) if sub is None else sub
    pad = int(3 * np.sqrt(len(sub))) + 16
    a = sub[max(0, ranks[0] // STRIDE - pad)]
    b = sub[min(len(sub) - 1, ranks[-1] // STRIDE + pad)]
    below = int(np.count_nonzero(vals < a))
    if a == b:  # one value fills the bracket (ties): no partition of a tie class
        if below <= ranks[0] <= ranks[-1] < below + int(np.count_nonzero(vals == a)):
            return np.full(len(ranks), a, vals.dtype)
        return np.partition(vals, ranks)[ranks]
    mid = np.compress((vals >= a) & (vals <= b), vals)
    if not below <= ranks[0] <= ranks[-1] < below + len(mid):
        return np.partition(vals, ranks)[ranks]
    rel = [r - below for r in ranks]
    return np.partition(mid, rel)[rel]


def _bracket(vals, weights, k, var, nonebits):
    """(lo, hi) bits from a weighted sample: est. count >= hi is < k - margin and
    est. count >= lo exceeds k + margin."""
    order = np.argsort(vals, kind="stable")[::-1]
    v, c = vals[order], np.cumsum(weights[order])
    margin = Z * np.sqrt(var) + 64
    j_hi = np.searchsorted(c, k - margin, side="right") - 1
    j_lo = np.searchsorted(c, k + margin, side="left")
    hi = v[j_hi] if j_hi >= 0 else v.dtype.type(nonebits)
    lo = v[j_lo] if j_lo < len(v) else v.dtype.type(0)
    return lo, hi


def _solve(parts, ranks, k, utype):
    """Exact (t, cuts) from the parts of one model, or None if the bracket missed.

    ranks: the tie-break rank of each part (sorted-name order). The parts are
    all plain or all tie-labelled (see `_Part`): counted from the top, the
    entries are `above`, then `n_hi` (== hi), the gathered `vals`, then `n_lo`
    (== lo).
    """
    above = sum(p.above for p in parts)
    n_hi = sum(p.n_hi for p in parts)
    inside = sum(len(p.vals) for p in parts)
    n_lo = sum(p.n_lo for p in parts)
    if not above < k <= above + n_hi + inside + n_lo:
        return None
    if k <= above + n_hi:  # the threshold is hi, shared by n_hi entries
        t = parts[0].hi
        return utype.type(t), _endpoint_cuts(parts, ranks, "n_hi", t, k - above, n_hi)
    above += n_hi
    if k > above + inside:  # the threshold is lo
        t = parts[0].lo
        return utype.type(t), _endpoint_cuts(parts, ranks, "n_lo", t, k - above - inside,
                                             n_lo)
    vals = np.concatenate([p.vals for p in parts])
    r = k - above
    t = np.partition(vals, len(vals) - r)[len(vals) - r]
    need = k - above - int(np.count_nonzero(vals > t))
    # Position of every tie in the global order (rank, flat index).
    tie_rank, tie_idx = [], []
    for p, rank in zip(parts, ranks):
        sel = p.idx[p.vals == t]
        tie_rank.append(np.full(len(sel), rank, np.int64))
        tie_idx.append(sel.astype(np.int64))
    tie_rank, tie_idx = np.concatenate(tie_rank), np.concatenate(tie_idx)
    cuts = [CUT_ALL] * len(parts)
    if len(tie_idx) > need:
        order = np.lexsort((tie_idx, tie_rank))
        last = order[need - 1]
        cuts = _cuts_at(ranks, int(tie_rank[last]), int(tie_idx[last]))
    return utype.type(t), cuts


def _cuts_at(ranks, rank, index):
    """Cuts keeping the ties up to flat index `index` of the part ranked `rank`:
    every tie of the parts ranked before it, none of those after."""
    return [CUT_ALL if r < rank else np.uint32(index + 1) if r == rank else np.uint32(0)
            for r in ranks]


def _endpoint_cuts(parts, ranks, count, t, need, total):
    """Cuts keeping the first `need` of the `total` entries whose bits equal the
    bracket end t (hi or lo; `count` names the part field counting them), in
    (rank, flat index) order. Only the part holding the last kept one is
    searched (`_Part.find`), so a tie class of millions costs no gather or sort."""
    if need == total:
        return [CUT_ALL] * len(parts)
    before = 0
    for j in np.argsort(ranks, kind="stable"):
        c = getattr(parts[j], count)
        if before + c >= need:
            return _cuts_at(ranks, ranks[j], parts[j].find(t, need - before - 1))
        before += c
    raise AssertionError("tie counts do not add up")  # unreachable: need < total


def _solve_full(bits_list, ranks, k, utype):
    """Exact (t, cuts) from the complete bits of every part."""
    parts = [_Part(n=len(b), idx=np.arange(len(b), dtype=np.int64), vals=b)
             for b in bits_list]
    return _solve(parts, ranks, k, utype)


def _trivial(k, n_total, utype):
    nonebits = np.iinfo(utype).max
    if k <= 0:
        return utype.type(nonebits), np.uint32(0)
    if k >= n_total:
        return utype.type(0), CUT_ALL
    return None


@dataclasses.dataclass
class _Job:
    """The per-tensor search of one leaf, advanced stage by stage."""

    leaf: object
    ks: list
    todo: list
    tbits: np.ndarray
    cuts: np.ndarray
    utype: np.dtype
    pending: object = None  # the device result the next stage waits for
    parts: dict = None
    host: tuple = None      # `_host_views` of a host-resident leaf
    lo: np.ndarray = None   # the brackets, `[K]`
    hi: np.ndarray = None
    tie: np.ndarray = None  # `_tie_mode` flags, `[K]`


def per_tensor(leaves, k_models: int, densities, on_ready=None) -> dict:
    """Thresholds trimming each model's tensor on its own, for every leaf.

    The leaves advance through the stages together (sample, bracket + label,
    gather, solve) so that host work on one leaf overlaps the asynchronously
    dispatched device passes of the next.

    Args:
        leaves: float `LeafInputs` with their base arrays set.
        k_models: K.
        densities: `[K]` kept fractions.
        on_ready: optional callback(leaf, tbits, cuts), called as soon as a leaf's
            thresholds are known (lets the caller start its merge pass while the
            host still searches the other leaves).

    Returns:
        dict leaf name -> (tbits `[K]` unsigned, cuts `[K]` uint32) for `ties_kernel`.
    """
    on_ready = on_ready or (lambda leaf, tbits, cuts: None)
    out, jobs = {}, []
    for leaf in leaves:
        utype = K.uint_for(K.compute_dtype(leaf.dtype))
        n = leaf.size
        ks = [trim_count(d, n) for d in densities]
        job = _Job(leaf, ks, [], np.zeros(k_models, utype),
                   np.full(k_models, CUT_ALL, np.uint32), utype)
        for i, k in enumerate(ks):
            triv = _trivial(k, n, utype)
            if triv is None:
                job.todo.append(i)
            else:
                job.tbits[i], job.cuts[i] = triv
        out[leaf.name] = (job.tbits, job.cuts)
        if not job.todo:
            on_ready(leaf, job.tbits, job.cuts)
        elif jax.process_count() > 1:
            # Several processes: no host sees the entries of an array split over
            # them, and device passes dispatched from the helper thread below could
            # meet the other processes' collectives in another order; the search
            # runs on the devices, leaf by leaf, in every process alike.
            _solve_job_on_devices(job)
            on_ready(leaf, job.tbits, job.cuts)
        elif n <= EXACT:
            _solve_job_exact(job)
            on_ready(leaf, job.tbits, job.cuts)
        else:
            # The sample's cost grows with its size, the decoding's with the
            # bracket's width (~1/sqrt(size)) times n: small tensors take less.
            size = min(SAMPLE, max(SAMPLE_MIN, n // SAMPLE_SHARE))
            rows = _positions(n // BLOCK, min(size // BLOCK, n // BLOCK))
            job.host = _host_views(leaf)
            if job.host is not None:  # taken when its bracket is computed (below)
                job.pending = functools.partial(_host_block_sample, *job.host, rows, BLOCK)
            else:
                job.pending = K.block_sample_bits_kernel(
                    leaf.inputs, leaf.base, rows, stacked=leaf.xs is None, block=BLOCK)
            jobs.append(job)
    # Brackets from the samples, then the labelling passes. A helper thread
    # decodes each leaf's labels (counts and inside positions) and gathers its
    # inside values (numpy, which releases the GIL), while this thread computes
    # the next brackets and solves the leaves the helper has finished; each
    # solved leaf goes to on_ready at once, so merge passes start early.
    x64 = bool(jax.config.jax_enable_x64)  # thread-local: the helper must share it
    helper_scratch = _Scratch()
    with concurrent.futures.ThreadPoolExecutor(1, "psm-ties-decode") as pool:
        labelled = collections.deque()

        def solve(job, done):
            done.result()
            _solve_job(job)
            on_ready(job.leaf, job.tbits, job.cuts)

        for job in jobs:
            n = job.leaf.size
            sample = job.pending() if callable(job.pending) else np.asarray(job.pending)
            nonebits = np.iinfo(job.utype).max
            lo = np.zeros(k_models, job.utype)
            hi = np.full(k_models, nonebits, job.utype)
            tie = np.zeros(k_models, bool)
            for i in job.todo:
                sub = np.sort(sample[i, ::STRIDE])
                var = _sample_variance(sample[i], n, job.ks[i], BLOCK, sub)
                lo[i], hi[i] = _bracket_uniform(sample[i], n / sample.shape[1], job.ks[i],
                                                var, nonebits, sub)
                tie[i] = _tie_mode(sample[i], lo[i], hi[i], sub)
            job.lo, job.hi, job.tie = lo, hi, tie
            job.pending = _label_dispatch(job.leaf, job.leaf.base, lo, hi, job.todo, tie)
            labelled.append((job, pool.submit(_decode_and_gather, job, k_models, x64,
                                              helper_scratch)))
            while labelled and labelled[0][1].done():
                solve(*labelled.popleft())
        while labelled:
            solve(*labelled.popleft())
    return out


def _host_views(leaf):
    """(K flat numpy views of the inputs, flat view of the base, compute dtype)
    when the leaf's inputs and base are C-contiguous arrays in host memory
    (numpy, or `jax.Array`s on one CPU device: no copy), else None."""
    if any(host_staging.host_device(a) is None for a in leaf.arrays):
        return None
    if not all(np.asarray(a).flags.c_contiguous for a in leaf.arrays):
        return None  # flat_views would copy
    *xs, base = host_staging.flat_views(leaf, leaf.base)
    return xs, base, K.compute_dtype(leaf.dtype)


def _host_block_sample(xs, base, ct, rows, block):
    """`kernels.block_sample_bits_kernel` computed by numpy on host-resident
    arrays, `[K, len(rows) * block]`: the same bits, at a third of the wall time
    and a fifth of the CPU time on a 2-core machine (the sample is bound by
    memory latency: XLA keeps its threads busy waiting; numpy's row `take`
    copies each block with one memcpy)."""
    n_rows = base.size // block

    def blocks(flat):
        rows_view = flat[:n_rows * block].reshape(n_rows, block)
        return np.take(rows_view, rows, axis=0).reshape(-1).astype(ct, copy=False)

    b = blocks(base)
    out = np.empty((len(xs), b.size), ct)
    for i, x in enumerate(xs):
        np.subtract(blocks(x), b, out=out[i])
    np.abs(out, out=out)
    return out.view(K.uint_for(ct))


def _decode_and_gather(job, k_models, x64: bool, scratch: _Scratch):
    """Counts and inside positions from a leaf's labels, then the gather of the
    inside values started (job.parts, job.pending). x64: the caller's 64-bit
    mode (float64 leaves), which is thread-local in JAX. scratch: this (helper)
    thread's `_Scratch`."""
    with jax.enable_x64(x64):
        job.parts = _label_decode(job.leaf, job.pending, scratch, job.lo, job.hi, job.tie)
        if job.host is None:
            job.pending = _gather_dispatch(job.leaf, job.leaf.base, job.parts, k_models)
        else:  # numpy, on this thread: keeps XLA's queue for the streaming passes
            _host_gather(job.parts, *job.host)
            job.pending = None


def _host_gather(parts, xs, base, ct):
    """Sets every part's vals: model i's magnitude bits at its inside positions
    (the same bits as `kernels.gather_bits_kernel`)."""
    for i, p in parts.items():
        v = np.take(xs[i], p.idx).astype(ct, copy=False)  # fresh: written in place below
        np.subtract(v, np.take(base, p.idx).astype(ct, copy=False), out=v)
        p.vals = np.abs(v, out=v).view(K.uint_for(ct))


def _solve_job(job):
    """Exact thresholds of job.todo from its gathered inside values (a full
    search for models whose bracket missed)."""
    _gather_fill(job.parts, job.pending, job.utype)
    missed = []
    for i in job.todo:
        got = _solve([job.parts[i]], [0], job.ks[i], job.utype)
        if got is None:
            missed.append(i)
        else:
            job.tbits[i], (job.cuts[i],) = got
    if missed:
        job.todo = missed
        _solve_job_exact(job)


def _solve_job_on_devices(job):
    """Exact thresholds of job.todo by `kernels.threshold_search_kernel` (counts only
    come to the host; the same (t, cut) as the host search)."""
    leaf = job.leaf
    ks = np.array([min(max(k, 1), leaf.size - 1) for k in job.ks], np.int32)
    tbits, cuts = global_arrays.tree_to_numpy(K.threshold_search_kernel(
        leaf.inputs, leaf.base, ks, stacked=leaf.xs is None))
    for i in job.todo:
        job.tbits[i], job.cuts[i] = tbits[i], cuts[i]


def _solve_job_exact(job):
    """Exact thresholds of job.todo from the leaf's complete magnitude bits."""
    leaf = job.leaf
    bits = np.asarray(K.full_bits_kernel(leaf.inputs, leaf.base, stacked=leaf.xs is None))
    for i in job.todo:
        job.tbits[i], (job.cuts[i],) = _solve_full([bits[i]], [0], job.ks[i], job.utype)


def _tie_mode(sample, lo, hi, sub=None) -> bool:
    """Whether a model's bracket [lo, hi] should be tie-labelled (see `_Part`):
    when lo == hi (the sample puts one value on both ends: a tie class wider
    than the bracket), or when at least a quarter of the sampled entries in the
    bracket (and 8 or more) equal lo or hi. Such classes (bfloat16 or quantised
    deltas, or the zero deltas at low thresholds) would otherwise be gathered
    and sorted entry by entry; counted instead, they cost two bits per scalar.
    A wrong guess costs time, never exactness.

    sub: the sorted sub-sample `np.sort(sample[::STRIDE])`, if at hand; it is
    then read instead of the sample (four binary searches rather than passes
    over the sample), with 2 or more entries on the ends."""
    if lo == hi:
        return True
    if sub is not None:
        left = np.searchsorted(sub, [lo, hi], side="left")
        right = np.searchsorted(sub, [lo, hi], side="right")
        ends = int((right - left).sum())
        return ends >= 2 and 4 * ends >= int(right[1] - left[0])
    ends = int(np.count_nonzero(sample == lo)) + int(np.count_nonzero(sample == hi))
    inside = int(np.count_nonzero((sample >= lo) & (sample <= hi)))
    return ends >= 8 and 4 * ends >= inside


def _layouts(models, lo, hi, tie) -> list:
    """Label groups of at most 8 bits (one uint8 per scalar): per group a tuple
    of (model, above bit, == hi bit, gathered bit, == lo bit), -1 for none.

    Plain models take 2 bits (above hi; inside [lo, hi]), and so do
    tie-labelled ones with lo == hi, whose "inside" is then == hi (counted,
    not gathered: see `_label_args`, `_label_decode`); other tie-labelled
    ones take 4 (above; == hi; strictly between; == lo), and if one does,
    every model does (plain ones ignore their == bits), so that a leaf shape
    compiles at most two label kernels per group size whatever the data. Inside
    bits fill the byte from the top, so that
    `labels >= 1 << (lowest inside bit)` marks every scalar to gather when
    every inside bit is gathered."""
    groups, cur, used = [], [], 0
    wide = any(tie[i] and lo[i] != hi[i] for i in models)
    for i in models:
        width = 4 if wide else 2
        if used + width > 8:
            groups.append(cur)
            cur, used = [], 0
        cur.append((int(i), width))
        used += width
    if cur:
        groups.append(cur)
    out = []
    for group in groups:
        low, top, layout = 0, 8, []
        for i, width in group:
            above, eq_hi, eq_lo = low, -1, -1
            low += 1
            top -= 1
            mid = top
            if width == 4:
                eq_hi, eq_lo, low = low, low + 1, low + 2
            layout.append((i, above, eq_hi, mid, eq_lo))
        out.append(tuple(layout))
    return out


def _label_args(lo, hi, tie):
    """The code body's arrays (hi, lowest inside, highest inside, lo), `[K]`
    each: the inside range is [lo, hi] for plain models, [lo + 1, hi - 1]
    (bit patterns) for tie-labelled ones with lo < hi, and [hi, hi] (the tie
    class, counted) for tie-labelled ones with lo == hi."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    tie = np.asarray(tie, bool) & (lo < hi)
    mid_lo = np.where(tie, lo + tie.astype(lo.dtype), lo).astype(lo.dtype)
    mid_hi = np.where(tie, hi - tie.astype(hi.dtype), hi).astype(hi.dtype)
    return hi, mid_lo, mid_hi, lo  # lo == hi: [lo, hi] is [hi, hi] already


def _label_dispatch(leaf, base, lo, hi, models, tie=None):
    """Starts the labelling passes of one leaf: [(layout, packed labels)] (see
    `_layouts`), the labels a uint8 array, or [(start, uint8 chunk)] for host
    leaves with numpy operands (labelled chunk by chunk, so that XLA reads the
    numpy memory in place rather than copying every operand: see
    `host_staging`). tie: `[K]` bools (`_tie_mode`), default all False."""
    tie = np.zeros(len(lo), bool) if tie is None else np.asarray(tie, bool)
    args = _label_args(lo, hi, tie)
    views = host_staging.numpy_views(leaf, base) if host_staging.accepts(leaf) else None
    out = []
    for layout in _layouts(models, lo, hi, tie):
        if views is None:
            out.append((layout, K.code_kernel(leaf.inputs, base, *args,
                                              stacked=leaf.xs is None, models=layout)))
            continue
        chunks, device = [], host_staging.host_device(leaf.arrays[0])
        for start, size in host_staging.chunk_grid(leaf.size, views):
            ops = [None if v is None else v[start:start + size] for v in views]
            stage = jnp.zeros(size, jnp.uint8, device=device)  # commits the kernel to it
            chunks.append((start, K.chunk_kernel(
                stage, tuple(ops[:-1]), ops[-1], np.int32(start),
                np.uint32(0), args, body="code", stacked=False, chunk=size,
                static=(("models", layout),), sliced=True)))
        out.append((layout, chunks))
    return out


def _labels(leaf, packed) -> np.ndarray:
    """The flat uint8 labels of one group (`_label_dispatch`), waiting for them."""
    if not isinstance(packed, list):
        return np.asarray(packed).reshape(-1)
    out = np.empty(leaf.size, np.uint8)
    for start, chunk in packed:
        chunk = np.asarray(chunk)
        out[start:start + len(chunk)] = chunk
    return out


def sparse_flatnonzero(mask: np.ndarray) -> np.ndarray:
    """`np.flatnonzero` of a 1-D bool array, about twice as fast where few
    entries are set (a few percent, as the inside labels): numpy's nonzero
    costs ~0.5 ns per entry scanned, so it first finds the 8-entry words with
    any entry set and scans only those. Falls back to one scan where more
    than half of the words have one."""
    head = mask.size - mask.size % 8
    words = mask[:head].view(np.uint64)
    hit = np.flatnonzero(words != 0)
    if 2 * len(hit) > len(words):
        return np.flatnonzero(mask)
    j = np.flatnonzero(np.take(words, hit).view(bool))  # positions within the hit words
    idx = np.take(hit, j >> 3)
    idx <<= 3
    idx += np.bitwise_and(j, 7, out=j)  # in place: few megabyte-sized temporaries
    if head == mask.size:
        return idx
    return np.concatenate([idx, head + np.flatnonzero(mask[head:])])


def _label_decode(leaf, pending, scratch: _Scratch | None = None, lo=None, hi=None,
                  tie=None) -> dict:
    """Exact bracket counts: model i -> _Part (counts, flat indices to gather).
    scratch: the calling thread's `_Scratch` for the temporaries. lo, hi, tie:
    the brackets and `_tie_mode` flags (`[K]`), needed by tie-labelled models."""
    scratch = scratch or _Scratch()
    parts = {}
    for layout, packed in pending:
        packed = _labels(leaf, packed)
        bits = scratch.get("bits", packed.size, np.uint8)
        # Models with lo == hi are tie-labelled (`_tie_mode`): their inside bit
        # marks the tie class == hi, which is counted, not gathered.
        counted = {i for i, *_ in layout if lo is not None and lo[i] == hi[i]}
        gathered = [mid for i, _, _, mid, _ in layout if i not in counted]
        inside = scratch.get("inside", packed.size, bool)
        if len(gathered) == len(layout):  # the inside bits are the top ones
            np.greater_equal(packed, np.uint8(1 << min(gathered)), out=inside)
        elif gathered:
            mask = np.uint8(sum(1 << mid for mid in gathered))
            np.not_equal(np.bitwise_and(packed, mask, out=bits), 0, out=inside)
        if gathered:
            inside_any = sparse_flatnonzero(inside)
            sub = np.take(packed, inside_any)
        for i, above, eq_hi, mid, eq_lo in layout:
            # count_nonzero of uint8 is vectorised: ~2x faster than popcounts of
            # masked uint64 words.
            part = _Part(n=leaf.size, above=int(np.count_nonzero(
                np.bitwise_and(packed, np.uint8(1 << above), out=bits))))
            # np.compress with a bool condition is ~4x faster than boolean
            # indexing (and than np.compress with an integer condition).
            if i in counted:  # the class == hi (the inside bit, or == hi if labelled)
                part.idx = np.zeros(0, np.intp)
                _count_ends(part, leaf, i, packed, bits, lo[i], hi[i],
                            eq_hi if eq_hi >= 0 else mid, -1)
            else:
                part.idx = np.compress((sub & np.uint8(1 << mid)) != 0, inside_any)
                if eq_hi >= 0 and tie is not None and tie[i]:
                    _count_ends(part, leaf, i, packed, bits, lo[i], hi[i], eq_hi, eq_lo)
            parts[i] = part
    return parts


def _count_ends(part, leaf, i, packed, bits, lo, hi, eq_hi, eq_lo):
    """Sets a tie-labelled part's end counts and its `find`, from per-block
    counts of the == hi and == lo labels (blocks of >= 2^16 scalars, at most
    ~128 of them): finding the r-th tie later recomputes one block's magnitudes."""
    n = packed.size
    block = max(1 << 16, -(-n // 128))
    counts = {}
    for value, bit in ((hi, eq_hi), (lo, eq_lo)):
        if bit < 0:
            continue
        c = np.empty(-(-n // block), np.int64)
        for b, start in enumerate(range(0, n, block)):
            piece = bits[start:start + block]
            c[b] = np.count_nonzero(np.bitwise_and(packed[start:start + block],
                                                   np.uint8(1 << bit), out=piece))
        counts[int(value)] = c
    part.hi, part.lo = hi, lo
    part.n_hi = int(counts[int(hi)].sum())
    part.n_lo = int(counts[int(lo)].sum()) if eq_lo >= 0 else 0
    part.find = functools.partial(_find_tie, leaf, i, counts, block)


def _find_tie(leaf, i, counts, block, value, r) -> int:
    """Flat index of the r-th (0-based) entry of model i whose magnitude bits
    equal `value`, from the per-block counts of such entries."""
    c = counts[int(value)]
    b = int(np.searchsorted(np.cumsum(c), r + 1))  # first block reaching r + 1
    r -= int(c[:b].sum())
    start, stop = b * block, min(leaf.size, (b + 1) * block)
    bits = _range_bits(leaf, i, start, stop)
    return start + int(np.flatnonzero(bits == value)[r])


def _range_bits(leaf, i, start, stop) -> np.ndarray:
    """Magnitude bits of model i at flat positions [start, stop) (numpy for
    host-resident leaves, else the gather kernel: the same bits)."""
    host = _host_views(leaf)
    if host is not None:
        xs, base, ct = host
        v = xs[i][start:stop].astype(ct)
        np.subtract(v, base[start:stop].astype(ct, copy=False), out=v)
        return np.abs(v, out=v).view(K.uint_for(ct))
    k_models = leaf.stacked.shape[0] if leaf.xs is None else len(leaf.xs)
    pos = np.zeros((k_models, stop - start), np.int32)
    pos[i] = np.arange(start, stop, dtype=np.int32)
    with host_staging.x64_if_needed(leaf.dtype):
        return np.asarray(K.gather_bits_kernel(leaf.inputs, leaf.base, pos,
                                               stacked=leaf.xs is None))[i]


def _small_part(b, lo, hi, tie) -> _Part:
    """The _Part of a leaf whose complete magnitude bits b are on the host."""
    part = _Part(n=len(b), above=int(np.count_nonzero(b > hi)))
    if tie:
        mid_lo, mid_hi = (lo + 1, hi - 1) if lo < hi else (hi + 1, hi)  # (empty if lo == hi)
        part.hi, part.lo = hi, lo
        part.n_hi = int(np.count_nonzero(b == hi))
        part.n_lo = int(np.count_nonzero(b == lo)) if lo < hi else 0
        part.find = lambda value, r: int(np.flatnonzero(b == value)[r])
    else:
        mid_lo, mid_hi = lo, hi
    part.idx = np.flatnonzero((b >= mid_lo) & (b <= mid_hi))
    part.vals = b[part.idx]
    return part


def _gather_dispatch(leaf, base, parts, k_models):
    """Starts the gather of every part's inside values (one padded gather)."""
    if not parts:
        return None
    size = _bucket(max(len(p.idx) for p in parts.values()))
    idx = np.zeros((k_models, size), np.int32)
    for i, p in parts.items():
        idx[i, :len(p.idx)] = p.idx
    return K.gather_bits_kernel(leaf.inputs, base, idx, stacked=leaf.xs is None)


def _gather_fill(parts, pending, utype):
    if pending is None:
        return
    vals = np.asarray(pending)
    for i, p in parts.items():
        p.vals = vals[i, :len(p.idx)].astype(utype)


def whole_model(leaves, k_models: int, densities):
    """Thresholds trimming each model's task vector over all float leaves jointly.

    Args:
        leaves: float `LeafInputs` (any order) with their base arrays set, all
            computed in float32 (16- and 32-bit floats) or all in float64.
        k_models: K.
        densities: `[K]` kept fractions.

    Returns:
        dict leaf name -> (tbits `[K]`, cuts `[K]`).
    """
    spanning = [leaf.name for leaf in leaves
                if any(global_arrays.spans_processes(a) for a in leaf.arrays)]
    if spanning:
        raise ValueError(
            f"whole-model TIES trimming (trim='model') reads every entry's magnitude on "
            f"the host, but leaf '{spanning[0]}' is split over several processes; use "
            "trim='tensor' (config.merge.ties_trim='tensor')")
    order = sorted(range(len(leaves)), key=lambda j: leaves[j].name)
    rank = {j: r for r, j in enumerate(order)}
    utypes = {K.uint_for(K.compute_dtype(leaves[j].dtype)) for j in order}
    if len(utypes) > 1:
        raise ValueError(
            "whole-model TIES trimming compares magnitudes across leaves, so it needs all "
            "float leaves in float32-or-narrower or all in float64; got "
            f"{sorted({str(leaves[j].dtype) for j in order})}")
    utype = utypes.pop()
    nonebits = np.iinfo(utype).max
    n_total = sum(leaves[j].size for j in order)
    ks = [trim_count(d, n_total) for d in densities]
    tbits = np.zeros(k_models, utype)
    cuts = {j: np.full(k_models, CUT_ALL, np.uint32) for j in order}
    todo = []
    for i, k in enumerate(ks):
        triv = _trivial(k, n_total, utype)
        if triv is None:
            todo.append(i)
        else:
            tbits[i] = triv[0]
            for j in order:
                cuts[j][i] = triv[1]
    if todo:
        _whole_model_search(leaves, order, rank, ks, todo, tbits, cuts, utype, nonebits,
                            k_models)
    return {leaves[j].name: (tbits.copy(), cuts[j]) for j in order}


def _whole_model_search(leaves, order, rank, ks, todo, tbits, cuts, utype, nonebits,
                        k_models):
    n_total = sum(leaves[j].size for j in order)
    # Pass 1: samples of big leaves, complete bits of small ones.
    big = {j for j in order if leaves[j].size > 4096}
    n_big = sum(leaves[j].size for j in big)
    samples, weights, var_unit = {}, {}, 0.0
    for j in order:
        leaf, stacked = leaves[j], leaves[j].xs is None
        if j in big:
            s = max(256, int(SAMPLE_TOTAL * leaf.size / n_big))
            pos = _positions(leaf.size, min(s, leaf.size))
            bits = K.sample_bits_kernel(leaf.inputs, leaf.base, pos, stacked=stacked)
            weights[j] = np.full(len(pos), leaf.size / len(pos))
            var_unit += leaf.size * leaf.size / len(pos)
        else:
            bits = K.full_bits_kernel(leaf.inputs, leaf.base, stacked=stacked)
            weights[j] = np.ones(leaf.size)
        samples[j] = np.asarray(bits)
    lo = np.zeros(k_models, utype)
    hi = np.full(k_models, nonebits, utype)
    tie = np.zeros(k_models, bool)
    wgt = np.concatenate([weights[j] for j in order])
    for i in todo:
        q = ks[i] / n_total
        vals = np.concatenate([samples[j][i] for j in order])
        lo[i], hi[i] = _bracket(vals, wgt, ks[i], var_unit * q * (1 - q), nonebits)
        tie[i] = _tie_mode(vals, lo[i], hi[i])
    # Pass 2: labels (device passes for big leaves, dispatched together so host
    # decoding overlaps them; host labelling for small ones).
    labels = {j: _label_dispatch(leaves[j], leaves[j].base, lo, hi, todo, tie) for j in order
              if j in big}
    leaf_parts, gathers, scratch = {}, {}, _Scratch()
    for j in order:
        leaf = leaves[j]
        if j in big:
            leaf_parts[j] = _label_decode(leaf, labels.pop(j), scratch, lo, hi, tie)
            gathers[j] = _gather_dispatch(leaf, leaf.base, leaf_parts[j], k_models)
        else:
            leaf_parts[j] = {i: _small_part(samples[j][i], lo[i], hi[i], tie[i])
                             for i in todo}
    for j, pending in gathers.items():
        _gather_fill(leaf_parts[j], pending, utype)
    parts = {i: [leaf_parts[j][i] for j in order] for i in todo}
    ranks = [rank[j] for j in order]
    for i in todo:
        got = _solve(parts[i], ranks, ks[i], utype)
        if got is None:
            bits_list = []
            for j in order:
                leaf = leaves[j]
                full = K.full_bits_kernel(leaf.inputs, leaf.base, stacked=leaf.xs is None)
                bits_list.append(np.asarray(full[i]))
            got = _solve_full(bits_list, ranks, ks[i], utype)
        tbits[i] = got[0]
        for j, cut in zip(order, got[1]):
            cuts[j][i] = cut
