"""The multi-seed report: numbers (`report.json`), tables and verdicts (`RESULTS.md`), plots.

`build_report(runs, metric)` turns the seed runs read by `psm.experiment.load_seeds`
into one JSON-ready dict; `write_report` writes it with the plots. Statistics come
from `psm.stats` (paired bootstrap over test examples, pooled over seeds; METHOD.md
section 5); imbalance from `psm.imbalance` (METHOD.md section 1).
"""

from __future__ import annotations

import os

import numpy as np

from psm import imbalance, stats
from psm.training import workdir as wd

MEAN_SINGLE = "mean single"
BEST_SINGLE = "best single (val)"


def _spread(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "per_seed": v.tolist()}


def split_names(names: list, k: int) -> tuple[list, list]:
    """(the K single replicas, every other model: merged or derived)."""
    singles = [f"replica {i}" for i in range(k)]
    if names[:k] != singles:
        raise ValueError(f"results.json models start with {names[:k]}, expected {singles}")
    return singles, names[k:]


def comparisons(methods: list) -> list[tuple[str, str, str, int]]:
    """The differences a report bootstraps: (label, A, B, the paper's sign of A - B).

    Every non-single method against the mean and the best single; selection against
    averaging; selection with resampling against selection and against averaging.
    """
    out = []
    for m in methods:
        out.append((f"{m} - {MEAN_SINGLE}", m, MEAN_SINGLE, 1))
        out.append((f"{m} - {BEST_SINGLE}", m, BEST_SINGLE, 1))
    if "select" in methods and "average" in methods:
        out.append(("select - average", "select", "average", 1))
    for m in methods:
        if m.startswith("select_resample"):
            if "select" in methods:
                out.append((f"{m} - select", m, "select", 1))
            if "average" in methods:
                out.append((f"{m} - average", m, "average", 1))
    return out


def build_report(runs, metric_name: str = "accuracy", draws: int = stats.DRAWS,
                 bootstrap_seed: int = 0, command: str = "", labels_fn=None,
                 level: float = 0.95) -> dict:
    """All numbers of the report (see the module docstring); JSON-ready.

    Args:
      runs: `psm.experiment.SeedRun`s, one per data seed, reporting the same models.
      metric_name: the test metric (`psm.stats.METRICS`), recomputed per resample.
      labels_fn: gold labels for label-based metrics (default: the task's data).
    """
    from psm import experiment

    metric = stats.get_metric(metric_name)
    k = runs[0].num_replicas
    singles, methods = split_names(runs[0].names, k)
    inputs = experiment.metric_inputs(runs, metric_name, labels_fn)
    points = [stats.point_scores(p, y, metric) for p, y in inputs]  # per seed [M]
    resampled = [stats.resampled_scores(p, y, metric, draws, bootstrap_seed, s)
                 for s, (p, y) in enumerate(inputs)]  # per seed [draws, M]
    col = {n: i for i, n in enumerate(runs[0].names)}
    val = [np.array([r.results["models"][n]["val_loss"] for n in r.names]) for r in runs]
    best = [int(np.argmin(v[:k])) for v in val]  # best single on validation, per seed

    def columns(name: str, s: int) -> list:
        if name == MEAN_SINGLE:
            return list(range(k))
        if name == BEST_SINGLE:
            return [best[s]]
        return [col[name]]

    test_key = f"test_{metric_name}"
    table = {}
    for name in runs[0].names + [MEAN_SINGLE, BEST_SINGLE]:
        table[name] = {
            "val_loss": _spread([v[columns(name, s)].mean() for s, v in enumerate(val)]),
            test_key: _spread([p[columns(name, s)].mean() for s, p in enumerate(points)])}
        if metric_name != "accuracy":
            table[name]["test_accuracy"] = _spread([
                np.mean([r.results["models"][runs[0].names[c]]["test_accuracy"]
                         for c in columns(name, s)]) for s, r in enumerate(runs)])
    diffs = []
    for label, a, b, sign in comparisons(methods):
        d = stats.paired_difference(resampled, points,
                                    [columns(a, s) for s in range(len(runs))],
                                    [columns(b, s) for s in range(len(runs))], level)
        d.pop("draws")
        diffs.append({"comparison": label, "a": a, "b": b, "paper_sign": sign, **d,
                      "verdict": stats.verdict(d["lo"], d["hi"], sign)})
    report = {
        "command": command,
        "task": runs[0].config["task"]["name"],
        "metric": metric_name,
        "num_replicas": k,
        "seeds": len(runs),
        "data_seeds": [int(r.config["data_seed"]) for r in runs],
        "seed_folders": [os.path.basename(r.folder) for r in runs],
        "test_examples": [int(r.correct.shape[1]) for r in runs],
        "bootstrap": {"draws": draws, "seed": bootstrap_seed, "level": level,
                      "scheme": "paired over test examples within each seed; D averaged "
                                "over seeds in each draw"},
        "best_single_per_seed": [singles[b] for b in best],
        "methods": table,
        "comparisons": diffs,
        "imbalance": imbalance_summary(runs, level),
    }
    report["claims"] = claims(report, methods)
    return report


def imbalance_summary(runs, level: float = 0.95) -> dict:
    """Spearman rho of final train loss vs first-epoch position per (seed, replica), raw and
    difficulty-controlled, with a percentile interval across replicas x seeds, and the
    quintile means (earliest fifth first) averaged over replicas and seeds."""
    out = {}
    per = [imbalance.imbalance_report(r.positions, r.losses, int(r.config["eval"]["num_bins"]))
           for r in runs]
    for kind in ("raw", "controlled"):
        if any(p[kind] is None for p in per):
            out[kind] = None  # K = 1: no other replicas to control difficulty with
            continue
        rho = [[t["spearman"] for t in p[kind]] for p in per]  # [seeds][K]
        quint = np.array([[t["quintile_means"] for t in p[kind]] for p in per])  # [S, K, 5]
        lo, hi = stats.percentile_interval(rho, level)
        out[kind] = {"spearman_per_seed": rho, "spearman_mean": float(np.mean(rho)),
                     "lo": lo, "hi": hi, "level": level,
                     "quintile_means": np.nanmean(quint, axis=(0, 1)).tolist(),
                     "verdict": stats.verdict(lo, hi, -1)}
    return out


def claims(report: dict, methods: list) -> list[dict]:
    """The paper's claims with the measured interval and verdict ("not measured" when the
    runs lack a method the claim needs)."""
    by_label = {d["comparison"]: d for d in report["comparisons"]}
    resample = [m for m in methods if m.startswith("select_resample")]
    wanted = [("merging beats a single fine-tune (average)", f"average - {MEAN_SINGLE}")]
    wanted += [(f"merging beats a single fine-tune ({m})", f"{m} - {MEAN_SINGLE}")
               for m in resample or ["select_resample"]]
    wanted += [("selection + resampling beats averaging", f"{m} - average")
               for m in resample or ["select_resample"]]
    wanted += [("resampling helps over selection", f"{m} - select")
               for m in resample or ["select_resample"]]
    out = []
    for claim, label in wanted:
        d = by_label.get(label)
        out.append({"claim": claim, "measure": label, "paper_sign": 1,
                    **({"estimate": d["estimate"], "lo": d["lo"], "hi": d["hi"],
                        "verdict": d["verdict"]} if d else {"verdict": "not measured"})})
    for kind in ("raw", "controlled"):
        imb = report["imbalance"].get(kind)
        out.append({"claim": f"training imbalance: final loss falls with first-epoch "
                             f"position (Spearman < 0, {kind})",
                    "measure": f"Spearman rho, {kind}, across replicas x seeds", "paper_sign": -1,
                    **({"estimate": imb["spearman_mean"], "lo": imb["lo"], "hi": imb["hi"],
                        "verdict": imb["verdict"]} if imb else {"verdict": "not measured"})})
    return out


# ----------------------------------------------------------------------------- writing

def write_report(workdir: str, runs, report: dict) -> list[str]:
    """Writes plots/, report.json and RESULTS.md into the workdir. Returns their paths."""
    plots = draw_plots(workdir, runs, report)
    report["plots"] = [os.path.relpath(p, workdir) for p in plots]
    json_path = wd.write_json(workdir, "report.json", report)
    md_path = os.path.join(workdir, "RESULTS.md")
    with open(md_path + ".tmp", "w") as f:
        f.write(results_markdown(report))
    os.replace(md_path + ".tmp", md_path)
    return [md_path, json_path] + plots


def _ci(d: dict, digits: int = 4) -> str:
    return f"[{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def results_markdown(report: dict) -> str:
    m, s = report["metric"], report["seeds"]
    test_key = f"test_{m}"
    lines = [f"# Results: {report['task']}, K = {report['num_replicas']}, {s} data seeds", "",
             "Command:", "", "```", report["command"], "```", "",
             f"Data seeds {report['data_seeds']} (folders {', '.join(report['seed_folders'])}); "
             f"test examples per seed {report['test_examples']}; test metric: {m}. "
             f"Best single per seed (lowest validation loss): "
             f"{', '.join(report['best_single_per_seed'])}.", "",
             "## Claims", ""]
    for c in report["claims"]:
        num = (f"{c['estimate']:+.4f}, 95% CI {_ci(c)}" if "lo" in c else "no data")
        lines.append(f"- {c['claim']}: **{c['verdict']}** ({c['measure']}: {num})")
    lines += ["", f"## Methods (mean +- std across {s} seeds)", "",
              f"| method | val loss | test {m} | test {m} per seed |", "| --- | --- | --- | --- |"]
    for name, row in report["methods"].items():
        v, t = row["val_loss"], row[test_key]
        lines.append(f"| {name} | {v['mean']:.4f} +- {v['std']:.4f} | "
                     f"{t['mean']:.4f} +- {t['std']:.4f} | "
                     f"{', '.join(f'{x:.4f}' for x in t['per_seed'])} |")
    b = report["bootstrap"]
    lines += ["", f"## Paired differences of test {m}", "",
              f"Paired bootstrap, {b['draws']} draws (seed {b['seed']}): {b['scheme']}. "
              f"{int(100 * b['level'])}% percentile interval.", "",
              "| A - B | estimate | 95% CI | per seed | verdict |",
              "| --- | --- | --- | --- | --- |"]
    for d in report["comparisons"]:
        lines.append(f"| {d['comparison']} | {d['estimate']:+.4f} | {_ci(d)} | "
                     f"{', '.join(f'{x:+.4f}' for x in d['per_seed'])} | {d['verdict']} |")
    lines += ["", "## Training imbalance (final train loss vs first-epoch position)", "",
              "| Spearman rho | mean | 95% interval across replicas x seeds | per seed "
              "(replicas) | verdict (paper: < 0) |", "| --- | --- | --- | --- | --- |"]
    imb = report["imbalance"]
    for kind in ("raw", "controlled"):
        if imb.get(kind) is None:
            lines.append(f"| {kind} | - | - | - | not measured |")
            continue
        r = imb[kind]
        per = "; ".join(", ".join(f"{x:+.3f}" for x in seed) for seed in r["spearman_per_seed"])
        lines.append(f"| {kind} | {r['spearman_mean']:+.4f} | {_ci(r)} | {per} | "
                     f"{r['verdict']} |")
    lines += ["", "Quintile means of final train loss, earliest fifth of epoch 1 first "
              "(mean over replicas and seeds):", "",
              "| | Q1 | Q2 | Q3 | Q4 | Q5 |", "| --- | --- | --- | --- | --- | --- |"]
    for kind in ("raw", "controlled"):
        if imb.get(kind) is not None:
            lines.append(f"| {kind} | " + " | ".join(f"{x:.4f}" for x in
                                                      imb[kind]["quintile_means"]) + " |")
    lines += ["", "## Plots", ""]
    lines += [f"- [{os.path.basename(p)}]({p})" for p in report.get("plots", [])]
    return "\n".join(lines) + "\n"


def summary(report: dict) -> str:
    """A few lines for the terminal: the claims and their verdicts."""
    return "\n".join(f"{c['claim']}: {c['verdict']}" + (f" ({c['estimate']:+.4f}, {_ci(c)})"
                                                       if "lo" in c else "")
                     for c in report["claims"])


# ------------------------------------------------------------------------------- plots

def draw_plots(workdir: str, runs, report: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = os.path.join(workdir, "plots")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, n) for n in (
        "fig1_loss_vs_position.png", "fig3_anchor_view.png", "fig4_val_loss.png",
        "methods_ci.png")]
    for path, draw in zip(paths, (_fig1, _fig3, _fig4, _bars)):
        fig = draw(plt, runs, report)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return paths


def _fig1(plt, runs, report):
    """Paper Fig. 1: binned final loss vs first-epoch position, every replica of every seed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = []
    for s, r in enumerate(runs):
        bins = int(r.config["eval"]["num_bins"])
        for i in range(r.positions.shape[0]):
            c, m = imbalance.binned_means(r.positions[i], r.losses[i], bins)
            curves.append(m)
            ax.plot(c, m, "-", lw=0.7, alpha=0.5, color="tab:blue",
                    label="one replica of one seed" if not s and not i else None)
    ax.plot(c, np.nanmean(curves, axis=0), "o-", color="tab:red", ms=3, lw=2,
            label="mean over replicas x seeds")
    imb = report["imbalance"]["raw"]
    ax.set_title(f"Spearman rho {imb['spearman_mean']:+.3f}, 95% interval {_ci(imb, 3)}",
                 fontsize=9)
    ax.set_xlabel("position in epoch 1 (fraction)")
    ax.set_ylabel("final train loss, binned mean")
    ax.legend(fontsize=7)
    return fig


def _fig3(plt, runs, report):
    """Paper Fig. 3: against replica 0's positions, losses of replica 0, the other replicas
    and each merged model (binned, averaged over seeds)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = {}
    for r in runs:
        bins = int(r.config["eval"]["num_bins"])
        pos = r.positions[0]
        series = {"replica 0 (anchor)": r.losses[0]}
        if r.losses.shape[0] > 1:
            series["other replicas (mean)"] = r.losses[1:].mean(axis=0)
        series.update({f"merged: {n}": v for n, v in r.merged_losses.items()})
        for name, losses in series.items():
            c, m = imbalance.binned_means(pos, losses, bins)
            lines.setdefault(name, []).append(m)
    for name, ms in lines.items():
        ax.plot(c, np.nanmean(ms, axis=0), "--" if name.startswith("merged") else "-",
                lw=2.0 if "anchor" in name else 1.2, label=name)
    ax.set_xlabel("position in replica 0's epoch 1 (fraction)")
    ax.set_ylabel(f"final train loss, binned mean over {len(runs)} seeds")
    ax.legend(fontsize=7)
    return fig


def val_curves(run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From metrics.jsonl: (steps [T], singles' val loss [T, K], average merge's [T]).

    T = 0 when the run never evaluated during training (train.eval_every = 0).
    """
    rows = [m for m in run.metrics if "val/loss" in m and "val/loss_average_merge" in m]
    # K from the config, not -1: numpy cannot infer a dimension of an empty array.
    return (np.array([m["step"] for m in rows]),
            np.array([m["val/loss"] for m in rows], dtype=float).reshape(len(rows),
                                                                         run.num_replicas),
            np.array([m["val/loss_average_merge"] for m in rows]))


def _fig4(plt, runs, report):
    """Paper Fig. 4: validation loss through training, singles vs their average."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for s, r in enumerate(runs):
        steps, singles, avg = val_curves(r)
        if not len(steps):
            continue
        color = colors[s % len(colors)]
        for i in range(singles.shape[1]):
            # Markers: a run evaluated once still shows its point.
            ax.plot(steps, singles[:, i], "-o", lw=0.7, ms=2, alpha=0.6, color=color,
                    label=f"seed {s}: singles" if not i else None)
        ax.plot(steps, avg, "--s", lw=2, ms=4, color=color, label=f"seed {s}: average of singles")
    if not ax.lines:
        ax.text(0.5, 0.5, "no validation during training (train.eval_every = 0)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    return fig


def _bars(plt, runs, report):
    """Left: test metric per method (mean, error bar = std across seeds). Right: paired
    differences against the mean single with their bootstrap intervals."""
    m = report["metric"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(report["methods"])
    rows = [report["methods"][n][f"test_{m}"] for n in names]
    a1.bar(range(len(names)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
           capsize=3, color=["tab:gray" if n.startswith("replica") else "tab:blue"
                             for n in names])
    a1.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    a1.set_ylabel(f"test {m} (mean +- std over {report['seeds']} seeds)")
    diffs = [d for d in report["comparisons"] if d["b"] == MEAN_SINGLE]
    est = np.array([d["estimate"] for d in diffs])
    err = np.array([[d["estimate"] - d["lo"] for d in diffs],
                    [d["hi"] - d["estimate"] for d in diffs]])
    a2.bar(range(len(diffs)), est, yerr=np.maximum(err, 0), capsize=3, color="tab:green")
    a2.axhline(0.0, color="black", lw=0.8)
    a2.set_xticks(range(len(diffs)), [d["a"] for d in diffs], rotation=45, ha="right",
                  fontsize=7)
    a2.set_ylabel(f"{m} minus mean single\n(paired 95% CI)")
    return fig
