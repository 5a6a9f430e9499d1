"""Paired bootstrap intervals and claim verdicts for multi-seed reports (METHOD.md section 5).

Pure numpy, no file I/O: `psm.experiment` reads the runs and calls these.

A *metric* is a function of per-example arrays, `fn(predictions [N], labels [N]) -> float`,
recomputed on every bootstrap resample, so metrics that are not a mean over examples
(Matthews correlation, F1, Pearson) get honest intervals. Metrics that are a mean of a
per-example score also carry `per_example`, which the bootstrap uses as a fast path
(the same resamples, the same numbers up to float rounding).

Resampling scheme (paired, multi-seed): for data seed s with N_s test examples, every
draw resamples N_s example indices with replacement from a generator seeded by
`(seed, s)`; all models of seed s are scored on that same resample (pairing); a
difference D is averaged over seeds within each draw. The resample of seed s depends
only on `(seed, s, N_s, draw number)`, so every comparison of a report sees the same
resamples, and a one-seed call reproduces the matching part of a pooled one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from psm.evaluation import glue

DRAWS = 10_000
_CHUNK = 250  # draws per block of resample indices; fixed so the draws do not depend on it


@dataclasses.dataclass(frozen=True)
class Metric:
    """A test metric recomputed on each resample.

    Attributes:
      name: short name for tables (e.g. "accuracy", "mcc").
      fn: `(predictions [N], labels [N]) -> float`.
      per_example: for metrics equal to the mean of a per-example score,
        `(predictions [N], labels [N]) -> [N]` float scores; None otherwise.
    """
    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    per_example: Optional[Callable[[np.ndarray, np.ndarray], np.ndarray]] = None


def _equal(pred, labels):
    return (np.asarray(pred) == np.asarray(labels)).astype(np.float64)


def _values(pred, labels):
    return np.asarray(pred, dtype=np.float64)


ACCURACY = Metric("accuracy", lambda p, y: float(np.mean(_equal(p, y))), _equal)
# The mean of a per-example score (labels unused): e.g. per-example loss or a 0/1 flag.
MEAN = Metric("mean", lambda p, y: float(np.mean(_values(p, y))), _values)
MATTHEWS = Metric("mcc", glue.matthews_corrcoef)
F1 = Metric("f1", glue.f1)
PEARSON = Metric("pearson", glue.pearson)
SPEARMAN = Metric("spearman", glue.spearman)
METRICS = {m.name: m for m in (ACCURACY, MEAN, MATTHEWS, F1, PEARSON, SPEARMAN)}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    return METRICS[name]


def _as_models(x, where: str) -> np.ndarray:
    """One seed's predictions as `[M, N]` (a `[N]` array is one model)."""
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{where}: expected predictions of shape [N] or [M, N] with N > 0, "
                         f"got {a.shape}")
    return a


def _check_seeds(groups: Sequence[Sequence], labels, where: str):
    n_seeds = len(groups[0])
    if n_seeds == 0:
        raise ValueError(f"{where}: no seeds given")
    for g in groups:
        if len(g) != n_seeds:
            raise ValueError(f"{where}: {len(g)} seeds in one argument but {n_seeds} in another")
    if labels is not None and len(labels) != n_seeds:
        raise ValueError(f"{where}: labels for {len(labels)} seeds but predictions for {n_seeds}")


def resample_indices(seed: int, seed_index: int, n: int, draws: int):
    """Yields `(start, idx [chunk, n])` blocks of bootstrap indices for one data seed."""
    rng = np.random.default_rng([seed, seed_index])
    for start in range(0, draws, _CHUNK):
        yield start, rng.integers(0, n, size=(min(_CHUNK, draws - start), n))


def resampled_scores(models: Sequence, labels, metric: Metric = ACCURACY,
                     draws: int = DRAWS, seed: int = 0, seed_index: int = 0) -> np.ndarray:
    """The metric of each model on each resample of one seed's test examples.

    Args:
      models: `[M, N]` predictions (or a `[N]` array) of M models on the same N examples.
      labels: `[N]` labels, or None (then all-True: `models` hold 0/1 correctness flags).
    Returns:
      `[draws, M]`: column m is model m's metric on the same resamples as every other column.
    """
    preds = _as_models(models, "resampled_scores")
    n = preds.shape[1]
    y = np.ones(n, dtype=bool) if labels is None else np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"resampled_scores: labels of shape {y.shape} for {n} examples")
    out = np.empty((draws, preds.shape[0]))
    if metric.per_example is not None:
        scores = np.stack([metric.per_example(p, y) for p in preds])  # [M, N]
        for start, idx in resample_indices(seed, seed_index, n, draws):
            out[start:start + len(idx)] = scores[:, idx].mean(axis=-1).T
    else:
        for start, idx in resample_indices(seed, seed_index, n, draws):
            for j, rows in enumerate(idx):
                out[start + j] = [metric.fn(p[rows], y[rows]) for p in preds]
    return out


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of `values` (any shape, flattened)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("percentile_interval: no values")
    tail = (100.0 - 100.0 * level) / 2  # 2.5 exactly for 0.95 (50 * 0.05 is not)
    lo, hi = np.percentile(v, [tail, 100.0 - tail])
    return float(lo), float(hi)


def paired_difference(resampled: Sequence[np.ndarray], points: Sequence[np.ndarray],
                      a_cols: Sequence[Sequence[int]], b_cols: Sequence[Sequence[int]],
                      level: float = 0.95) -> dict:
    """D = mean metric of columns A - mean metric of columns B, pooled over seeds.

    Args:
      resampled: per seed `[draws, M_s]` from `resampled_scores` (same draws for all).
      points: per seed `[M_s]` metrics on the full test set.
      a_cols, b_cols: per seed, the columns averaged into A and into B.
    Returns:
      {"estimate": mean over seeds of D_s on the full test sets, "lo", "hi",
       "per_seed": [D_s], "draws": `[draws]` pooled D, "level", "num_draws"}.
    """
    _check_seeds([resampled, points, a_cols, b_cols], None, "paired_difference")
    pooled = np.zeros(resampled[0].shape[0])
    per_seed = []
    for s, (r, p, a, b) in enumerate(zip(resampled, points, a_cols, b_cols)):
        if r.shape[0] != pooled.shape[0]:
            raise ValueError(f"paired_difference: seed {s} has {r.shape[0]} draws, seed 0 "
                             f"has {pooled.shape[0]}")
        if not len(a) or not len(b):
            raise ValueError(f"paired_difference: seed {s} has an empty side (A {list(a)}, "
                             f"B {list(b)})")
        a, b = list(a), list(b)
        pooled += r[:, a].mean(axis=1) - r[:, b].mean(axis=1)
        p = np.asarray(p, dtype=np.float64)
        per_seed.append(float(p[a].mean() - p[b].mean()))
    pooled /= len(per_seed)
    lo, hi = percentile_interval(pooled, level)
    return {"estimate": float(np.mean(per_seed)), "lo": lo, "hi": hi, "per_seed": per_seed,
            "draws": pooled, "level": level, "num_draws": int(pooled.shape[0])}


def point_scores(models: Sequence, labels, metric: Metric = ACCURACY) -> np.ndarray:
    """`[M]`: each model's metric on the full test set (labels None: all-True)."""
    preds = _as_models(models, "point_scores")
    y = np.ones(preds.shape[1], dtype=bool) if labels is None else np.asarray(labels)
    return np.array([metric.fn(p, y) for p in preds], dtype=np.float64)


def paired_bootstrap(a_scores: Sequence, b_scores: Sequence, metric: Metric = ACCURACY,
                     labels: Optional[Sequence] = None, draws: int = DRAWS, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Paired bootstrap interval of D = metric(A) - metric(B), pooled over data seeds.

    Args:
      a_scores, b_scores: one entry per data seed, each `[N_s]` predictions of one model
        or `[M, N_s]` of M models whose metrics are averaged (e.g. the K singles, for
        "mean single"). A and B of a seed are scored on the same examples.
      metric: recomputed on each resample (default accuracy).
      labels: per seed `[N_s]` labels; None means all-True (predictions are 0/1 flags).
      draws: bootstrap resamples; seed: their generator's seed.
    Returns:
      see `paired_difference`.
    """
    _check_seeds([a_scores, b_scores], labels, "paired_bootstrap")
    resampled, points, a_cols, b_cols = [], [], [], []
    for s, (a, b) in enumerate(zip(a_scores, b_scores)):
        a = _as_models(a, f"paired_bootstrap seed {s} A")
        b = _as_models(b, f"paired_bootstrap seed {s} B")
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"paired_bootstrap seed {s}: A has {a.shape[1]} examples, "
                             f"B has {b.shape[1]}")
        y = None if labels is None else labels[s]
        both = np.concatenate([a, b])
        resampled.append(resampled_scores(both, y, metric, draws, seed, s))
        points.append(point_scores(both, y, metric))
        a_cols.append(range(len(a)))
        b_cols.append(range(len(a), len(both)))
    return paired_difference(resampled, points, a_cols, b_cols, level)


def verdict(lo: float, hi: float, paper_sign: int = 1) -> str:
    """"reproduced" when [lo, hi] lies strictly on the paper's side of 0 (`paper_sign`
    +1: the paper found a positive difference, -1: negative), "not reproduced" when it
    lies strictly on the other side, "inconclusive" when it touches or spans 0."""
    if paper_sign not in (1, -1):
        raise ValueError(f"verdict: paper_sign must be +1 or -1, got {paper_sign!r}")
    if not lo <= hi:
        raise ValueError(f"verdict: interval [{lo}, {hi}] is empty or not a number")
    lo, hi = (lo, hi) if paper_sign == 1 else (-hi, -lo)
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "not reproduced"
    return "inconclusive"
