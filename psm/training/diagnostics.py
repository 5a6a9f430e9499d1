"""Merge-readiness diagnostics (METHOD.md section 5): is merging meaningful for this run?

- Loss barrier (Frankle et al. 2020, linear mode connectivity): validation loss
  along the straight line theta(t) = (1-t) theta_a + t theta_b between two
  models; barrier = max_t [L(theta(t)) - ((1-t) L(theta_a) + t L(theta_b))].
  Near 0: one basin, averaging is expected to help; large: expected to hurt.
  Measured between every pair of replicas and between each replica and the
  uniform average.
- Task-vector geometry (tau_i = theta_i - base): relative pairwise distances
  ||tau_a - tau_b|| / mean_i ||tau_i|| and the pairwise sign agreement.
- Fraction of parameters still equal to the base (where resampling acts).

Parameters stay where they are (global arrays of several processes included):
the reductions run on the devices and only their small results are read back.
Everything here is a pure function of its inputs; the model evaluation is
injected as `loss_fn(stacked params [M, ...]) -> [M]`, so the functions are
tested on toy losses over toy trees.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from psm import global_arrays

LossFn = Callable[[object], np.ndarray]


def check_grid(grid) -> np.ndarray:
    """The interpolation grid as float64 `[G]`; ValueError unless it is strictly
    increasing in [0, 1] and starts at 0 and ends at 1 (the barrier needs both ends)."""
    g = np.asarray(grid, np.float64)
    if g.ndim != 1 or g.size < 2 or g[0] != 0.0 or g[-1] != 1.0 or np.any(np.diff(g) <= 0):
        raise ValueError(f"barrier grid {tuple(np.ravel(grid).tolist())} must be strictly "
                         "increasing, start at 0 and end at 1")
    return g


def barrier(grid, losses) -> float:
    """max_t [L(t) - ((1-t) L(0) + t L(1))] over the grid.

    Args:
      grid: `[G]` values of t (`check_grid`).
      losses: `[G]` validation losses at those t.
    Returns:
      The barrier (>= 0: the ends themselves contribute 0).
    """
    g = check_grid(grid)
    loss = np.asarray(losses, np.float64)
    if loss.shape != g.shape:
        raise ValueError(f"losses have shape {loss.shape}; the grid has {g.shape}")
    return float(np.max(loss - ((1.0 - g) * loss[0] + g * loss[-1])))


def line_ends(k: int) -> list[tuple[int, int]]:
    """The lines measured among K replicas and their average (index K).

    Returns:
      [(a, b)]: every replica pair a < b, then (i, K) for each replica i.
    """
    return list(itertools.combinations(range(k), 2)) + [(i, k) for i in range(k)]


def interpolate(ends, a, b, t):
    """Stacked models on straight lines between stacked endpoints.

    Args:
      ends: tree with leaves `[E, ...]`.
      a, b: `[M]` endpoint indices; t: `[M]` positions on each line.
    Returns:
      Tree with leaves `[M, ...]`: (1 - t) ends[a] + t ends[b], computed in
      float32 (float64 leaves in float64) and cast back to each leaf's dtype.
    """
    a, b = np.asarray(a), np.asarray(b)
    t = np.asarray(t, np.float64)  # cast to each leaf's compute dtype in _interpolate_leaf

    return jax.tree.map(lambda x: global_arrays.in_order(_interpolate_leaf(x, a, b, t)), ends)


@jax.jit
def _interpolate_leaf(x, a, b, t):
    """One leaf of `interpolate` (jitted: one program per leaf, also across processes)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x[a]
    ct = jnp.promote_types(x.dtype, jnp.float32)
    tt = t.astype(ct).reshape((-1,) + (1,) * (x.ndim - 1))
    xa, xb = x[a].astype(ct), x[b].astype(ct)
    return ((1 - tt) * xa + tt * xb).astype(x.dtype)


def _losses_in_passes(loss_fn: LossFn, ends, a, b, t, models_per_pass: int) -> np.ndarray:
    """loss_fn on the interpolated models, `models_per_pass` at a time.

    The last pass is padded (repeating its last model) so that every pass has
    the same shape and one compiled evaluation serves them all.
    """
    out = []
    for start in range(0, len(t), models_per_pass):
        sl = np.arange(start, start + models_per_pass)
        n = int(np.sum(sl < len(t)))
        sl = np.minimum(sl, len(t) - 1)
        out.append(np.asarray(loss_fn(interpolate(ends, a[sl], b[sl], t[sl])))[:n])
    return np.concatenate(out) if out else np.zeros((0,))


def loss_barriers(loss_fn: LossFn, params_k, average, grid, models_per_pass: int = 0) -> dict:
    """Validation loss along the lines of `line_ends(K)` and their barriers.

    Args:
      loss_fn: stacked parameters `[M, ...]` -> `[M]` validation losses.
      params_k: the replicas, leaves `[K, ...]`.
      average: their uniform average, leaves `[...]` (the same dtypes).
      grid: values of t (`check_grid`).
      models_per_pass: models per `loss_fn` call; 0 = K + 1.
    Returns:
      {"grid": [G], "pairs": [{"a", "b", "losses": [G], "barrier"}],
       "to_average": [{"replica", "losses": [G], "barrier"}]}.
    """
    g = check_grid(grid)
    k = jax.tree.leaves(params_k)[0].shape[0]
    ends = jax.tree.map(lambda s, m: global_arrays.in_order(
        jnp.concatenate([s, m[None].astype(s.dtype)])), params_k, average)
    m = models_per_pass or k + 1
    end_loss = _losses_in_passes(loss_fn, ends, np.arange(k + 1), np.arange(k + 1),
                                 np.zeros(k + 1), m)
    lines = line_ends(k)
    inner = g[1:-1]
    a = np.repeat([p for p, _ in lines], len(inner))
    b = np.repeat([q for _, q in lines], len(inner))
    t = np.tile(inner, len(lines))
    inner_loss = _losses_in_passes(loss_fn, ends, a, b, t, m).reshape(len(lines), len(inner))
    pairs, to_average = [], []
    for (p, q), mid in zip(lines, inner_loss):
        losses = [float(end_loss[p])] + [float(x) for x in mid] + [float(end_loss[q])]
        row = {"losses": losses, "barrier": barrier(g, losses)}
        if q < k:
            pairs.append({"a": p, "b": q, **row})
        else:
            to_average.append({"replica": p, **row})
    return {"grid": [float(x) for x in g], "pairs": pairs, "to_average": to_average}


def _float_pairs(params_k, base):
    """(replica leaf `[K, ...]`, base leaf `[...]`) for every floating leaf."""
    for s, b in zip(jax.tree.leaves(params_k), jax.tree.leaves(base)):
        if jnp.issubdtype(s.dtype, jnp.floating):
            yield s, b


@functools.partial(jax.jit, static_argnames=("pairs",))
def _leaf_geometry(s, b, pairs):
    """One leaf's share of `task_vector_geometry`, on the devices: `[K]` squared
    norms of tau_i, and per pair (a, b) `[P]` sums of (tau_a - tau_b)^2, of
    entries of equal signs and of entries non-zero in both."""
    k = s.shape[0]
    ct = jnp.promote_types(s.dtype, jnp.float32)
    tau = jnp.reshape(s, (k, -1)).astype(ct) - jnp.reshape(b, (1, -1)).astype(ct)
    sign = jnp.sign(tau)
    d2, agree, both = [], [], []
    for i, j in pairs:
        d = tau[i] - tau[j]
        prod = sign[i] * sign[j]
        d2.append(jnp.sum(d * d))
        agree.append(jnp.sum(prod > 0))
        both.append(jnp.sum(prod != 0))
    stack = lambda xs: jnp.stack(xs) if xs else jnp.zeros((0,), ct)
    return jnp.sum(tau * tau, axis=1), stack(d2), stack(agree), stack(both)


@jax.jit
def _leaf_unchanged(s, b):
    """`[K]` entries of each replica's leaf equal to the base's."""
    k = s.shape[0]
    return jnp.sum(jnp.reshape(s, (k, -1)) == jnp.reshape(b, (1, -1)), axis=1)


def task_vector_geometry(params_k, base) -> dict:
    """Pairwise geometry of the task vectors tau_i = theta_i - base (floating leaves).

    Args:
      params_k: leaves `[K, ...]`; base: leaves `[...]`, the same structure.
    Returns:
      {"norm": [K] ||tau_i||,
       "relative_distance": [K][K] ||tau_a - tau_b|| / mean_i ||tau_i|| (the mean
         over all K replicas, so that the matrix is one distance scaled by one
         number; NaN if every tau is 0),
       "sign_agreement": [K][K] fraction of the entries where both tau_a and
         tau_b are non-zero that have the same sign (NaN if there are none)}.
      Differences are taken in float32 (float64 leaves in float64) and summed
      in float64 on the host.
    """
    k = jax.tree.leaves(params_k)[0].shape[0]
    pairs = tuple(itertools.combinations(range(k), 2))
    sq = np.zeros(k)
    dist2, agree, both = np.zeros((k, k)), np.zeros((k, k)), np.zeros((k, k))
    for s, b in _float_pairs(params_k, base):
        # On the devices, one program per leaf; only the sums come to the host.
        leaf_sq, d2, ag, bo = global_arrays.tree_to_numpy(_leaf_geometry(s, b, pairs))
        sq += np.asarray(leaf_sq, np.float64)
        for p, (i, j) in enumerate(pairs):
            dist2[i, j] += float(d2[p])
            agree[i, j] += float(ag[p])
            both[i, j] += float(bo[p])
    dist2, agree, both = (x + x.T for x in (dist2, agree, both))
    norm = np.sqrt(sq)
    mean_norm = norm.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.sqrt(dist2) / mean_norm if mean_norm > 0 else np.full((k, k), np.nan)
        sign_agreement = np.where(both > 0, agree / np.where(both > 0, both, 1), np.nan)
    np.fill_diagonal(sign_agreement, 1.0)
    return {"norm": norm.tolist(), "relative_distance": rel.tolist(),
            "sign_agreement": sign_agreement.tolist()}


def fraction_unchanged(params_k, base) -> list[float]:
    """Per replica, the fraction of all parameters exactly equal to the base's
    (in the trees' own dtype: compare rounded trees for a storage dtype)."""
    k = jax.tree.leaves(params_k)[0].shape[0]
    same, total = np.zeros(k), 0
    for s, b in zip(jax.tree.leaves(params_k), jax.tree.leaves(base)):
        # Counted on the devices; only the [K] counts come to the host.
        same += np.asarray(global_arrays.to_numpy(_leaf_unchanged(s, b)), np.float64)
        total += s.size // k
    return (same / max(total, 1)).tolist()
