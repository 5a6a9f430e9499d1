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


def read_metrics(workdir: str, filename: str = "metrics.jsonl", *,
                 torn_tail: str = "error") -> list[dict]:
    """The records of `workdir/filename`, in file order ([] when there is no file).

    A missing or empty file holds no records. Every record is a JSON object with
    an integer "step"; a line that is not is a ValueError naming the file and
    its 1-based line.

    `MetricWriter` writes a record and its newline in one call, so a process
    killed mid-write leaves a last line without its newline ("torn"). The
    trainer reads with `torn_tail="drop"` on resume, which drops such a line
    with a warning (its step is redone); any other bad line, including a torn
    one that is not last, is corruption and always an error.

    Args:
      torn_tail: "error" (default) or "drop".
    """
    if torn_tail not in ("error", "drop"):
        raise ValueError(f"torn_tail must be 'error' or 'drop', got {torn_tail!r}")
    path = os.path.join(workdir, filename)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    # `lines[-1]` is b"" when the file ends with a newline, else the torn tail.
    records = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        torn = i == len(lines) - 1
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if torn and torn_tail == "drop":
                log.warning("%s: dropping its last line %d, cut off mid-write by an "
                            "interrupted run: %r", path, i + 1, raw[:80])
                break
            if torn:
                raise ValueError(f"{path}, line {i + 1}: the last line is cut off (a run "
                                 "killed mid-write; resuming the run drops it)") from None
            where = (f"column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError)
                     else f"not valid UTF-8: {e.reason}")
            raise ValueError(f"{path}, line {i + 1}: invalid JSON ({where})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {i + 1}: not a metrics record (a JSON object "
                             f"with an integer \"step\"): {raw[:80].decode('utf-8', 'replace')}")
        records.append(record)
    return records
