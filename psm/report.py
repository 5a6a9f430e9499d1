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
                "position": [round(float(p), 6) for p in positions[:, i]],
                "loss": {"replicas": [float(x) for x in replica_losses[:, i]],
                         "merged": {n: float(v[i]) for n, v in merged_losses.items()}},
            }) + "\n")
    os.replace(path + ".tmp", path)
    return path


def write_test_predictions(workdir: str, examples, names, texts, scores) -> str:
    """Per test example and model: the generated text, extracted answer, correctness."""
    path = os.path.join(workdir, "test_predictions.jsonl")
    with open(path + ".tmp", "w") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps({
                "id": int(ex["id"]),
                "models": {n: {"text": texts[m][i], "extracted": scores[m][i]["extracted"],
                               "correct": bool(scores[m][i]["correct"])}
                           for m, n in enumerate(names)},
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
