"""Metrics: one JSON object per line in `workdir/metrics.jsonl`, and the log.

Vectors (per-replica values, shape `[K]`) are written as JSON lists, so a
plot of any replica's curve can be redrawn from the file alone.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import logging

log = logging.getLogger(__name__)


def _jsonable(v):
    if isinstance(v, (np.ndarray, np.generic)) or hasattr(v, "__array__"):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    return v


class MetricWriter:
    """Appends metrics to `metrics.jsonl` (flushed per write, so a crash loses nothing).

    `enabled=False` (processes other than 0 of a multi-process run) writes and
    logs nothing.
    """

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", *, enabled: bool = True):
        self.path = os.path.join(workdir, filename)
        self.enabled = enabled

    def write(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = ", ".join(f"{k}={_fmt(record[k])}" for k in metrics)
        log.info("[%d] %s", step, shown)


def _fmt(v):
    if isinstance(v, list):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(workdir: str, filename: str = "metrics.jsonl") -> list[dict]:
    path = os.path.join(workdir, filename)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
