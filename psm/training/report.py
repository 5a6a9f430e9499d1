"""Files and the printed table a run leaves in its workdir."""

from __future__ import annotations

import json
import os

import numpy as np

MERGE_METHODS = ("average", "select", "select_resample", "ties", "dare")
"""Merges computed from the replicas (and base) alone (`config.merge.methods`). Kept in
this light module so that `python -m psm.evaluate` checks its flags before importing JAX."""
REFERENCE_ROWS = ("best_single", "greedy_soup", "ensemble")
"""Rows beyond the paper's merges (METHOD.md section 5), labelled "reference" in the table."""


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
        rows.append((_label(n, models[n]), f"{models[n]['val_loss']:.4f}",
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



def _label(name: str, row: dict) -> str:
    """Table label of a merged or reference row (with what a reference row chose)."""
    if name not in REFERENCE_ROWS:
        return f"merge: {name}"
    if name == "best_single":
        return f"reference: best_single (replica {row['replica']})"
    if name == "greedy_soup":
        return f"reference: greedy_soup (replicas {row['kept']})"
    return f"reference: ensemble of {row['members']} (mean probabilities)"


def format_barrier(barrier: dict) -> str:
    """Merge-readiness lines: loss barriers and task-vector geometry (`psm.training.diagnostics`)."""
    grid = ", ".join(f"{t:g}" for t in barrier["grid"])
    lines = [f"merge readiness: validation loss on straight lines (t = {grid}); barrier = max_t "
             "[L(t) - chord], ~0: one basin, large: merging expected to hurt"]
    pairs = barrier["pairs"]
    if pairs:
        values = np.array([p["barrier"] for p in pairs])
        worst = pairs[int(np.argmax(values))]
        lines.append(f"  replica pairs: mean {values.mean():.3g}, max {values.max():.3g} "
                     f"(replicas {worst['a']}-{worst['b']}): "
                     + ", ".join(f"{p['a']}-{p['b']} {p['barrier']:.3g}" for p in pairs))
    lines.append("  replica -> uniform average: " + ", ".join(
        f"{r['replica']} {r['barrier']:.3g}" for r in barrier["to_average"]))
    tv = barrier.get("task_vectors")
    if tv:
        k = len(tv["norm"])
        off = ~np.eye(k, dtype=bool)
        dist = np.array(tv["relative_distance"])[off]
        sign = np.array(tv["sign_agreement"])[off]
        lines.append("  task vectors: ||tau|| " + ", ".join(f"{x:.4g}" for x in tv["norm"]))
        if k > 1:
            lines.append(f"  ||tau_a - tau_b|| / mean ||tau||: mean {np.mean(dist):.3f} "
                         f"(min {np.min(dist):.3f}, max {np.max(dist):.3f}); sign agreement: "
                         f"mean {np.mean(sign):.3f} (min {np.min(sign):.3f}, "
                         f"max {np.max(sign):.3f})")
    return "\n".join(lines)
