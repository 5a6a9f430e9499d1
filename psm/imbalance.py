"""Training imbalance: per-sample final loss against first-epoch position.

Statistics (METHOD.md section 1) and plots, computed from the per-sample
records a run writes, so a figure can be redrawn without retraining:

  python -m psm.imbalance --workdir=<run>      # rewrites plots/*.png

A missing or corrupt `per_sample.jsonl` is one `error:` line naming the file
and line, exit status 2 (`psm.cli`).
"""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import stats


def binned_means(positions: np.ndarray, losses: np.ndarray, num_bins: int):
    """Mean loss per equal-width position bin. Returns (bin centres, means) `[num_bins]`.

    Bin b holds positions in [b / num_bins, (b + 1) / num_bins). The edges are
    computed as `b / num_bins` (one rounding each), so a position r / N that
    equals an edge exactly lands in the bin it starts; `np.linspace` edges can
    be one ulp above (0.6000000000000001), which moved such samples a bin down.
    """
    positions = np.asarray(positions)
    if positions.size and not (positions.min() >= 0.0 and positions.max() < 1.0):
        raise ValueError(f"positions must lie in [0, 1) (a sample's index in the epoch "
                         f"over N); got values in [{positions.min()}, {positions.max()}]")
    edges = np.arange(num_bins + 1) / num_bins
    which = np.digitize(positions, edges) - 1
    means = np.array([losses[which == b].mean() if np.any(which == b) else np.nan
                      for b in range(num_bins)])
    return (edges[:-1] + edges[1:]) / 2, means


def trend(positions: np.ndarray, losses: np.ndarray, num_bins: int = 20) -> dict:
    """Spearman correlation, least-squares slope, binned means and quintiles.

    Args:
      positions: `[N]` in [0, 1). losses: `[N]`.
    """
    rho, p = stats.spearmanr(positions, losses)
    slope, intercept = np.polyfit(positions, losses, 1)
    _, means = binned_means(positions, losses, num_bins)
    _, quint = binned_means(positions, losses, 5)
    return {"spearman": float(rho), "spearman_p": float(p), "slope": float(slope),
            "intercept": float(intercept), "binned_means": means.tolist(),
            "quintile_means": quint.tolist()}


def imbalance_report(positions: np.ndarray, losses: np.ndarray, num_bins: int = 20) -> dict:
    """Per-replica trends, raw and difficulty-controlled.

    Args:
      positions: `[K, N]` epoch-1 positions of each sample in each replica's order.
      losses: `[K, N]` final loss of each sample under each replica.
    Returns:
      {"raw": [K trend dicts], "controlled": [K trend dicts] or None}. The
      controlled trend correlates `loss_k - mean over the other replicas of the
      same sample's loss` with replica k's position, removing sample difficulty.
    """
    k = positions.shape[0]
    raw = [trend(positions[i], losses[i], num_bins) for i in range(k)]
    controlled = None
    if k > 1:
        others = (losses.sum(0, keepdims=True) - losses) / (k - 1)
        controlled = [trend(positions[i], losses[i] - others[i], num_bins) for i in range(k)]
    return {"raw": raw, "controlled": controlled}


# Plotting is cosmetic (figure sizes, colours, labels): mutation testing skips it.
# pragma: no mutate start
def plot_loss_vs_position(positions: np.ndarray, losses: np.ndarray, path: str,
                          num_bins: int = 20, title: str = "") -> None:
    """Scatter + binned means of final loss vs epoch-1 position, one panel per replica."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = positions.shape[0]
    cols = min(k, 4)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False,
                             sharey=True)
    for i in range(k):
        ax = axes[i // cols][i % cols]
        ax.scatter(positions[i], losses[i], s=4, alpha=0.3, color="tab:blue", label="samples")
        centres, means = binned_means(positions[i], losses[i], num_bins)
        ax.plot(centres, means, "o-", color="tab:red", ms=3, label=f"{num_bins}-bin mean")
        t = trend(positions[i], losses[i], num_bins)
        ax.set_title(f"replica {i}: Spearman {t['spearman']:+.3f}, slope {t['slope']:+.3f}",
                     fontsize=9)
        ax.set_xlabel("position in epoch 1 (fraction)")
        if i % cols == 0:
            ax.set_ylabel("final loss (nats/token)")
    for j in range(k, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_anchor_view(positions: np.ndarray, losses: np.ndarray, merged: dict, path: str,
                     anchor: int = 0, num_bins: int = 20) -> None:
    """Paper Fig. 3: binned losses of every model against the anchor replica's positions.

    Args:
      positions: `[K, N]`; losses: `[K, N]`; merged: name -> `[N]` losses.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pos = positions[anchor]
    for i in range(losses.shape[0]):
        c, m = binned_means(pos, losses[i], num_bins)
        ax.plot(c, m, "-", lw=2.0 if i == anchor else 0.8,
                label=f"replica {i}" + (" (anchor)" if i == anchor else ""))
    for name, l in merged.items():
        c, m = binned_means(pos, l, num_bins)
        ax.plot(c, m, "--", lw=1.8, label=f"merged: {name}")
    ax.set_xlabel(f"position in replica {anchor}'s epoch 1 (fraction)")
    ax.set_ylabel("final loss, binned mean")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
# pragma: no mutate end


def load_records(workdir: str) -> tuple[np.ndarray, np.ndarray, dict, list[int]]:
    """Reads `per_sample.jsonl`: returns (positions [K,N], losses [K,N], merged {name: [N]}, ids).

    Raises:
      FileNotFoundError: the workdir has no `per_sample.jsonl` (the run has not finished).
      ValueError: the file is empty, or a line is not a record of the expected
        shape; the message names the file and the 1-based line.
    """
    path = os.path.join(workdir, "per_sample.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: per-sample records are written at the "
                                "end of a finished run")
    ids, positions, losses, merged = [], [], [], []
    # Bytes, decoded per line by json.loads: a bad byte is reported with its line.
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                row = (int(r["id"]), [float(p) for p in r["position"]],
                       [float(x) for x in r["loss"]["replicas"]],
                       {name: float(v) for name, v in r["loss"]["merged"].items()})
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}, line {line_no}: not a per-sample record "
                                 f"({type(e).__name__}: {e})") from None
            if positions and (len(row[1]) != len(positions[0]) or
                              len(row[2]) != len(losses[0]) or set(row[3]) != set(merged[0])):
                raise ValueError(f"{path}, line {line_no}: {len(row[1])} positions, "
                                 f"{len(row[2])} replica losses and merged models "
                                 f"{sorted(row[3])}, unlike the first record")
            ids.append(row[0])
            positions.append(row[1])
            losses.append(row[2])
            merged.append(row[3])
    if not ids:
        raise ValueError(f"{path} holds no records")
    names = list(merged[0])
    return (np.array(positions).T, np.array(losses).T,
            {name: np.array([m[name] for m in merged]) for name in names}, ids)


def redraw(workdir: str, num_bins: int = 20) -> list[str]:
    """Redraws the imbalance plots of a finished run from its records."""
    positions, losses, merged, _ = load_records(workdir)
    a = os.path.join(workdir, "plots", "loss_vs_position.png")
    b = os.path.join(workdir, "plots", "anchor_view.png")
    plot_loss_vs_position(positions, losses, a, num_bins,
                          title="final training loss vs first-epoch position")
    plot_anchor_view(positions, losses, merged, b, num_bins=num_bins)
    return [a, b]


def main(argv) -> None:
    if len(argv) > 1:
        from absl import app
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print("\n".join(redraw(_WORKDIR.value)))


if __name__ == "__main__":
    from absl import flags

    from psm import cli

    _WORKDIR = flags.DEFINE_string("workdir", None, "a finished psm run", required=True)
    cli.run_absl(main)
