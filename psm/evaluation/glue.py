"""GLUE metrics: accuracy, F1, Matthews correlation, Pearson and Spearman.

`glue_metrics(task, predictions, labels)` returns the metrics the GLUE
benchmark reports for a task (Wang et al. 2018):

=======  ===============================
task     metrics
=======  ===============================
CoLA     Matthews correlation (``mcc``)
SST-2    accuracy
MRPC     accuracy, F1 (positive class 1)
QQP      accuracy, F1 (positive class 1)
STS-B    Pearson, Spearman correlation
MNLI     accuracy (matched or mismatched)
QNLI     accuracy
RTE      accuracy
WNLI     accuracy
=======  ===============================

Classification predictions are integer class ids, ``[N]``; STS-B predictions
are real similarity scores, ``[N]``. All values come back as Python floats.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

_TASK_METRICS = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}
REGRESSION_TASKS = frozenset({"stsb"})


def canonical_task(task: str) -> str:
    """``"STS-B"``, ``"sts_b"``, ``"glue/stsb"`` -> ``"stsb"``; raises for unknown tasks."""
    if not isinstance(task, str):
        raise TypeError(f"GLUE task name must be str, got {type(task).__name__}")
    name = task.lower().split("/")[-1].replace("-", "").replace(" ", "")
    name = name if name in _TASK_METRICS else name.replace("_", "")
    if name not in _TASK_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(_TASK_METRICS)}")
    return name


def metric_names(task: str) -> tuple[str, ...]:
    """Names of the metrics `glue_metrics` returns for `task`."""
    return _TASK_METRICS[canonical_task(task)]


def _pair(predictions, labels, where: str, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(predictions)
    gold = np.asarray(labels)
    if pred.ndim != 1 or gold.ndim != 1:
        raise ValueError(f"{where}: predictions and labels must be 1-D [N], got shapes "
                         f"{pred.shape} and {gold.shape}")
    if pred.shape != gold.shape:
        raise ValueError(f"{where}: {pred.shape[0]} predictions but {gold.shape[0]} labels")
    if pred.size == 0:
        raise ValueError(f"{where}: no examples")
    for name, arr in (("predictions", pred), ("labels", gold)):
        if integer:
            if arr.dtype.kind not in "iub" and not (
                    arr.dtype.kind == "f" and np.all(np.isfinite(arr))
                    and np.all(arr == np.round(arr))):
                raise ValueError(f"{where}: {name} must be integer class ids, got dtype "
                                 f"{arr.dtype} (first value {arr.flat[0].item()!r})")
        elif arr.dtype.kind not in "iubf" or not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: {name} must be finite real numbers")
    if integer:
        return pred.astype(np.int64), gold.astype(np.int64)
    return pred.astype(np.float64), gold.astype(np.float64)


def accuracy(predictions, labels) -> float:
    """Fraction of ``predictions[i] == labels[i]``; both ``[N]`` class ids."""
    pred, gold = _pair(predictions, labels, "accuracy", integer=True)
    return float(np.mean(pred == gold))


def f1(predictions, labels, positive: int = 1) -> float:
    """Binary F1 of class `positive`: ``2 tp / (2 tp + fp + fn)`` (0.0 if undefined)."""
    pred, gold = _pair(predictions, labels, "f1", integer=True)
    tp = np.sum((pred == positive) & (gold == positive))
    fp = np.sum((pred == positive) & (gold != positive))
    fn = np.sum((pred != positive) & (gold == positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004).

    For two classes it is ``(tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))``.
    Returns 0.0 when it is undefined (a constant prediction or label vector),
    the convention of scikit-learn and the GLUE scripts.
    """
    pred, gold = _pair(predictions, labels, "matthews_corrcoef", integer=True)
    classes, index = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    n = gold.size
    confusion = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(confusion, (index[:n], index[n:]), 1.0)
    t = confusion.sum(axis=1)  # true counts per class
    p = confusion.sum(axis=0)  # predicted counts per class
    c = np.trace(confusion)
    s = float(n)
    cov_yp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_yy = s * s - t @ t
    denom = np.sqrt(cov_pp * cov_yy)
    return float(cov_yp / denom) if denom > 0 else 0.0


def pearson(predictions, labels) -> float:
    """Pearson correlation of two ``[N]`` real vectors (nan if one is constant)."""
    x, y = _pair(predictions, labels, "pearson", integer=False)
    return _pearson(x, y)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc @ xc) * (yc @ yc))
    return float(xc @ yc / denom) if denom > 0 else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's rankdata default)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, and the run each element is in.
    starts = np.flatnonzero(np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]]))
    ends = np.concatenate([starts[1:], [x.size]])
    run_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman rank correlation (Pearson of average ranks) of two ``[N]`` vectors."""
    x, y = _pair(predictions, labels, "spearman", integer=False)
    return _pearson(_average_ranks(x), _average_ranks(y))


_METRIC_FNS = {"accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef,
               "pearson": pearson, "spearman": spearman}


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """The GLUE metrics of `task` (see the module table).

    Args:
      task: a GLUE task name, e.g. ``"CoLA"``, ``"mrpc"``, ``"STS-B"``.
      predictions: ``[N]`` class ids, or ``[N]`` scores for STS-B.
      labels: ``[N]`` gold labels of the same kind.

    Returns:
      ``{metric: value}``, e.g. ``{"accuracy": 0.86, "f1": 0.9}`` for MRPC.

    Raises:
      ValueError: unknown task, or predictions/labels of the wrong shape or
        type; the message names the task.
    """
    name = canonical_task(task)
    # Validate once here so that errors name the task, not an inner metric.
    _pair(predictions, labels, f"GLUE task {task!r}", integer=name not in REGRESSION_TASKS)
    return {metric: _METRIC_FNS[metric](predictions, labels) for metric in _TASK_METRICS[name]}


def score(task: str, prediction, label) -> dict:
    """Per-example record: ``correct`` for classification, ``abs_error`` for STS-B."""
    name = canonical_task(task)
    if name in REGRESSION_TASKS:
        return {"prediction": float(prediction), "label": float(label),
                "abs_error": abs(float(prediction) - float(label))}
    return {"prediction": int(prediction), "label": int(label),
            "correct": int(prediction) == int(label)}


def per_example(task: str, predictions: Sequence, labels: Sequence,
                ids: Optional[Sequence] = None) -> list[dict]:
    """JSON-serialisable per-example records (with ``id`` when `ids` is given)."""
    name = canonical_task(task)
    pred, gold = _pair(predictions, labels, f"GLUE task {task!r}",
                       integer=name not in REGRESSION_TASKS)
    if ids is not None and len(ids) != pred.size:
        raise ValueError(f"GLUE task {task!r}: {len(ids)} ids for {pred.size} predictions")
    records = []
    for i in range(pred.size):
        record = score(name, pred[i], gold[i])
        if ids is not None:
            record = {"id": ids[i].item() if hasattr(ids[i], "item") else ids[i], **record}
        records.append(record)
    return records
