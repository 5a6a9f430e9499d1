"""Files and the printed table a run leaves in its workdir."""

from __future__ import annotations

import json
import os

import numpy as np


def write_per_sample(workdir: str, ids, positions: np.ndarray, replica_losses: np.ndarray,
                     merged_losses: dict) -> str:
    """One JSON line per training sample.

    Each line: {"id", "position": [K] epoch-1 positions in [0, 1), "loss":
    {"replicas": [K] final losses, "merged": {name: loss}}}.
    """
    path = os.path.join(workdir, "per_sample.jsonl")
    with open(path + ".tmp", "w") as f:
        for i, sid in enumerate(ids):
            f.write(json.dumps({
                "id": int(sid),
                # Full precision: the statistics recomputed from this file
                # (`psm.imbalance`) then equal the run's own bit for bit.
                "position": [float(p) for p in positions[:, i]],
                "loss": {"replicas": [float(x) for x in replica_losses[:, i]],
                         "merged": {n: float(v[i]) for n, v in merged_losses.items()}},
            }) + "\n")
    os.replace(path + ".tmp", path)
    return path


def write_test_predictions(workdir: str, per_example: dict) -> str:
    """Per test example: each model's prediction, extracted answer and correctness.

    Args:
      per_example: model name -> list of {id, prediction, extracted, correct}
        (from `psm.evaluation.runner.evaluate_models`), all in the same order.
    """
    path = os.path.join(workdir, "test_predictions.jsonl")
    names = list(per_example)
    with open(path + ".tmp", "w") as f:
        for i, first in enumerate(per_example[names[0]] if names else []):
            f.write(json.dumps({
                "id": first["id"],
                "models": {n: {"text": per_example[n][i]["prediction"],
                               "extracted": per_example[n][i]["extracted"],
                               "correct": per_example[n][i]["correct"]} for n in names},
            }) + "\n")
    os.replace(path + ".tmp", path)
    return path


def format_table(results: dict, k: int) -> str:
    """The run's summary table: singles (with mean and spread), then each merge."""
    models = results["models"]
    names = list(models)
    rows = [("model", "val loss", "test acc")]
    for n in names[:k]:
        rows.append((n, f"{models[n]['val_loss']:.4f}", f"{models[n]['test_accuracy']:.3f}"))
    s = results["singles"]
    rows.append((f"single (mean +- std of {k})",
                 f"{s['val_loss_mean']:.4f} +- {s['val_loss_std']:.4f}",
                 f"{s['test_accuracy_mean']:.3f} +- {s['test_accuracy_std']:.3f}"))
    for n in names[k:]:
        rows.append((f"merge: {n}", f"{models[n]['val_loss']:.4f}",
                     f"{models[n]['test_accuracy']:.3f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [" | ".join(r[c].ljust(widths[c]) for c in range(3)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    trends = results["imbalance"]["replicas"]
    raw = ", ".join(f"{t['spearman']:+.3f}" for t in trends["raw"])
    lines.append("")
    lines.append(f"final train loss vs epoch-1 position, Spearman per replica: {raw}")
    if trends["controlled"]:
        ctrl = ", ".join(f"{t['spearman']:+.3f}" for t in trends["controlled"])
        lines.append(f"  difficulty-controlled (loss minus other replicas' mean): {ctrl}")
    return "\n".join(lines)
