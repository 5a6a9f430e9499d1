"""psm.experiment: multi-seed runs, resume seed by seed, and a report whose numbers equal a
recomputation from the seed folders (read here independently of psm.experiment)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from psm import experiment, experiment_report, stats
from psm.training import workdir as wd
from psm.evaluation import glue
from tiny_config import tiny_test_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRAWS = 500
# Shrinks tiny:test (36 steps, 24 new tokens) to 12 steps and 8 tokens: a seed in ~15 s.
OVERRIDES = {"mesh.replica": 1, "train.epochs": 1, "train.eval_every": 6,
             "task.max_new_tokens": 8, "export.hf": ()}


# ------------------------------------------------------------- an independent recomputation

def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def recompute(workdir, seeds, metric=stats.ACCURACY, labels=None, draws=DRAWS):
    """The report's numbers straight from the seed folders' files."""
    folders = [os.path.join(workdir, f"seed{s}") for s in range(seeds)]
    results = [json.load(open(os.path.join(f, "results.json"))) for f in folders]
    configs = [json.load(open(os.path.join(f, "config.json"))) for f in folders]
    k = configs[0]["num_replicas"]
    names = list(results[0]["models"])
    preds = []
    for f in folders:
        rows = _read_jsonl(os.path.join(f, "test_predictions.jsonl"))
        key = "correct" if metric is stats.ACCURACY else "extracted"
        preds.append({n: np.array([-1 if r["models"][n][key] is None else r["models"][n][key]
                                   for r in rows]) for n in names})
    best = [min(range(k), key=lambda i: r["models"][f"replica {i}"]["val_loss"])
            for r in results]

    def side(name, s):
        if name == "mean single":
            return np.stack([preds[s][f"replica {i}"] for i in range(k)])
        if name == "best single (val)":
            return preds[s][f"replica {best[s]}"]
        return preds[s][name]

    out = {"val_loss": {n: np.mean([r["models"][n]["val_loss"] for r in results])
                        for n in names}, "diffs": {}, "rho": []}
    for a, b in [(m, "mean single") for m in names[k:]] + [
            (m, "best single (val)") for m in names[k:]] + [("select", "average")]:
        out["diffs"][f"{a} - {b}"] = stats.paired_bootstrap(
            [side(a, s) for s in range(seeds)], [side(b, s) for s in range(seeds)], metric,
            labels=labels, draws=draws, seed=0)
    for f in folders:
        rows = _read_jsonl(os.path.join(f, "per_sample.jsonl"))
        pos = np.array([r["position"] for r in rows]).T
        loss = np.array([r["loss"]["replicas"] for r in rows]).T
        out["rho"].append([sps.spearmanr(pos[i], loss[i])[0] for i in range(k)])
    return out


def assert_report_matches(report, expected):
    for name, v in expected["val_loss"].items():
        assert report["methods"][name]["val_loss"]["mean"] == pytest.approx(v, abs=1e-12)
    got = {d["comparison"]: d for d in report["comparisons"]}
    for label, d in expected["diffs"].items():
        for key in ("estimate", "lo", "hi"):
            assert got[label][key] == pytest.approx(d[key], abs=1e-12), (label, key)
        assert got[label]["verdict"] == stats.verdict(d["lo"], d["hi"], 1)
    raw = report["imbalance"]["raw"]
    np.testing.assert_allclose(raw["spearman_per_seed"], expected["rho"], atol=1e-12)
    assert (raw["lo"], raw["hi"]) == pytest.approx(np.percentile(expected["rho"], [2.5, 97.5]))


# ------------------------------------------------------------------ synthetic seed folders

def write_seed(folder, seed, k=3, methods=("average", "select", "select_resample3",
                                           "greedy_soup"), n_test=40, n_train=50,
               task="arithmetic", labels=None):
    """A finished run's files with random but valid contents."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = [f"replica {i}" for i in range(k)] + list(methods)
    skill = {n: 0.3 + 0.1 * rng.random() + (0.1 if n in methods else 0) for n in names}
    gold = labels if labels is not None else rng.integers(0, 2, n_test)
    extracted = {n: [None if rng.random() < 0.1 else
                     int(g if rng.random() < skill[n] + 0.3 else 1 - g) for g in gold]
                 for n in names}
    correct = {n: [e is not None and e == g for e, g in zip(extracted[n], gold)]
               if labels is not None else list(rng.random(n_test) < skill[n]) for n in names}
    results = {"models": {n: {"val_loss": float(2 + rng.random()),
                              "test_accuracy": float(np.mean(correct[n])),
                              "train_loss": 1.0} for n in names}}
    config = {"num_replicas": k, "data_seed": seed, "task": {"name": task, "data_dir": ""},
              "eval": {"num_bins": 5}}
    for name, obj in (("results.json", results), ("config.json", config)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f)
    with open(os.path.join(folder, "test_predictions.jsonl"), "w") as f:
        for i in range(n_test):
            f.write(json.dumps({"id": i, "models": {
                n: {"text": "", "extracted": extracted[n][i], "correct": bool(correct[n][i])}
                for n in names}}) + "\n")
    positions = np.stack([rng.permutation(n_train) / n_train for _ in range(k)])
    losses = 1.0 - 0.2 * positions + 0.3 * rng.random((k, n_train))
    with open(os.path.join(folder, "per_sample.jsonl"), "w") as f:
        for i in range(n_train):
            f.write(json.dumps({"id": i, "position": positions[:, i].tolist(), "loss": {
                "replicas": losses[:, i].tolist(),
                "merged": {n: float(losses[:, i].mean()) for n in methods}}}) + "\n")
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in (5, 10):
            f.write(json.dumps({"step": step, "val/loss": (3 - rng.random(k)).tolist(),
                                "val/loss_average_merge": 2.5}) + "\n")


def test_report_numbers_equal_a_recomputation_from_the_folders(tmp_path):
    for s in range(3):
        write_seed(str(tmp_path / f"seed{s}"), s)
    runs = experiment.load_seeds(str(tmp_path), 3)
    report = experiment_report.build_report(runs, "accuracy", draws=DRAWS, command="cmd")
    expected = recompute(str(tmp_path), 3)
    assert_report_matches(report, expected)
    assert any(d["verdict"] != "inconclusive" or d["lo"] != d["hi"]
               for d in report["comparisons"])  # the data are not all-equal
    # Methods are whatever results.json lists (greedy_soup is not a built-in name).
    assert "greedy_soup" in report["methods"]
    assert "greedy_soup - mean single" in {d["comparison"] for d in report["comparisons"]}
    # Quintiles: mean over replicas and seeds of each fifth's mean loss.
    quint = []
    for r in runs:
        for i in range(3):
            # Position r / N lies in fifth floor(5 r / N), computed in integers.
            n = r.positions.shape[1]
            which = (np.rint(r.positions[i] * n).astype(int) * 5) // n
            quint.append([r.losses[i][which == q].mean() for q in range(5)])
    np.testing.assert_allclose(report["imbalance"]["raw"]["quintile_means"],
                               np.mean(quint, axis=0), atol=1e-12)
    claims = {c["claim"]: c for c in report["claims"]}
    assert claims["resampling helps over selection"]["measure"] == "select_resample3 - select"
    assert all(c["verdict"] in ("reproduced", "not reproduced", "inconclusive")
               for c in report["claims"])


def test_matthews_report_uses_extracted_labels(tmp_path):
    gold = np.random.default_rng(9).integers(0, 2, 30)
    for s in range(2):
        write_seed(str(tmp_path / f"seed{s}"), s, task="cola", n_test=30, labels=gold)
    runs = experiment.load_seeds(str(tmp_path), 2)
    assert experiment.task_metric("cola") == "mcc"
    labels_fn = lambda config, ids: gold[np.asarray(ids)]  # noqa: E731
    report = experiment_report.build_report(runs, "mcc", draws=DRAWS, labels_fn=labels_fn)
    expected = recompute(str(tmp_path), 2, stats.MATTHEWS, labels=[gold, gold])
    assert_report_matches(report, expected)
    row = report["methods"]["average"]["test_mcc"]
    want = []
    for s in range(2):
        rows = _read_jsonl(str(tmp_path / f"seed{s}" / "test_predictions.jsonl"))
        pred = [-1 if r["models"]["average"]["extracted"] is None
                else r["models"]["average"]["extracted"] for r in rows]
        want.append(glue.matthews_corrcoef(pred, gold))
    assert row["per_seed"] == pytest.approx(want)
    assert "test_accuracy" in report["methods"]["average"]


def test_report_only_cli_writes_every_file(tmp_path):
    for s in range(2):
        write_seed(str(tmp_path / f"seed{s}"), s)
    subprocess.run([sys.executable, "-m", "psm.experiment", f"--workdir={tmp_path}",
                    "--seeds=2", "--report_only", f"--draws={DRAWS}"], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    for name in ("RESULTS.md", "report.json", "plots/fig1_loss_vs_position.png",
                 "plots/fig3_anchor_view.png", "plots/fig4_val_loss.png",
                 "plots/methods_ci.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    report = json.load(open(tmp_path / "report.json"))
    assert_report_matches(report, recompute(str(tmp_path), 2))
    md = (tmp_path / "RESULTS.md").read_text()
    assert "python -m psm.experiment" in md and "(plots/fig4_val_loss.png)" in md
    for c in report["claims"]:
        assert f"{c['claim']}: **{c['verdict']}**" in md


def test_report_of_a_run_without_validation_during_training(tmp_path):
    # train.eval_every = 0: metrics.jsonl has training rows only; Fig. 4 says so
    # instead of the report failing on an empty reshape.
    write_seed(str(tmp_path / "seed0"), 0)
    with open(tmp_path / "seed0" / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 10, "train/loss": [1.0, 1.1, 1.2]}) + "\n")
    runs = experiment.load_seeds(str(tmp_path), 1)
    steps, singles, avg = experiment_report.val_curves(runs[0])
    assert steps.shape == (0,) and singles.shape == (0, 3) and avg.shape == (0,)
    report = experiment_report.build_report(runs, "accuracy", draws=DRAWS,
                                            bootstrap_seed=0, command="test")
    experiment_report.write_report(str(tmp_path), runs, report)
    assert os.path.getsize(tmp_path / "plots" / "fig4_val_loss.png") > 0


def test_folders_that_disagree_are_refused(tmp_path):
    write_seed(str(tmp_path / "seed0"), 0)
    write_seed(str(tmp_path / "seed1"), 1, methods=("average", "ties"))
    with pytest.raises(ValueError, match="seed1/results.json lists models"):
        experiment.load_seeds(str(tmp_path), 2)
    with pytest.raises(FileNotFoundError, match="seed2/results.json is missing"):
        experiment.load_seeds(str(tmp_path), 3)


# ------------------------------------------------------------------------ orchestration

@pytest.mark.parametrize("text,message", [
    ('{"step": 5}\n{"step": 10, "val/lo\n{"step": 15}\n', r"metrics.jsonl, line 2: invalid JSON"),
    ('{"step": 5}\n{"step": 10, "val/lo', r"metrics.jsonl, line 2: the last line is cut off"),
    ("", r"metrics.jsonl is missing or holds no records"),
], ids=["corrupt-line", "torn-last-line", "empty"])
def test_corrupt_or_empty_metrics_are_refused(tmp_path, text, message):
    """A finished run's metrics.jsonl feeds the report's Fig. 4: a bad line or no records
    is an error naming the file (and line), not a traceback or a silently empty plot."""
    write_seed(str(tmp_path / "seed0"), 0)
    (tmp_path / "seed0" / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message):
        experiment.load_seeds(str(tmp_path), 1)


def test_a_bad_byte_in_test_predictions_names_its_line(tmp_path):
    write_seed(str(tmp_path / "seed0"), 0, n_test=3)
    with open(tmp_path / "seed0" / "test_predictions.jsonl", "ab") as f:
        f.write(b'{"id": 3\xff}\n')
    with pytest.raises(ValueError, match=r"test_predictions.jsonl, line 4: not valid UTF-8"):
        experiment.load_seeds(str(tmp_path), 1)


def _config():
    return tiny_test_config(**OVERRIDES)


def test_seed_config_changes_only_the_data_seed():
    c = _config()
    c.data_seed = 5
    s2 = experiment.seed_config(c, 2)
    assert s2.data_seed == 7 and c.data_seed == 5
    s2.data_seed = 5
    assert s2.to_dict() == c.to_dict()


def test_unfinished_seeds_only_are_trained(tmp_path):
    write_seed(str(tmp_path / "seed0"), 0)  # finished (results.json present)
    with open(tmp_path / "seed0" / "config.json", "w") as f:
        json.dump(wd.config_to_dict(experiment.seed_config(_config(), 0)), f)
    calls = []
    trained = experiment.run_seeds(_config(), str(tmp_path), 3,
                                   train_fn=lambda c, w: calls.append((c.data_seed, w)))
    assert trained == [1, 2]
    assert calls == [(1, str(tmp_path / "seed1")), (2, str(tmp_path / "seed2"))]


def test_a_merge_change_re_evaluates_finished_seeds(tmp_path):
    """A finished seed is skipped only when its config is this one; one that differs in
    merge keys only is handed to training again (which then merges and evaluates its
    trained replicas without training: tests/test_resume.py)."""
    for s in (0, 1):
        write_seed(str(tmp_path / f"seed{s}"), s)
        with open(tmp_path / f"seed{s}" / "config.json", "w") as f:
            json.dump(wd.config_to_dict(experiment.seed_config(_config(), s)), f)
    assert experiment.run_seeds(_config(), str(tmp_path), 2, train_fn=lambda c, w: 1 / 0) == []
    c = _config()
    c.merge.storage_dtype = "bfloat16"
    calls = []
    assert experiment.run_seeds(c, str(tmp_path), 2,
                                train_fn=lambda c, w: calls.append(c.merge.storage_dtype)) \
        == [0, 1]
    assert calls == ["bfloat16", "bfloat16"]


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory):
    """`python -m psm.experiment` on tiny:test (shrunk), two seeds."""
    workdir = str(tmp_path_factory.mktemp("exp"))
    cmd = [sys.executable, "-m", "psm.experiment", "--config=configs/tiny.py:test",
           "--seeds=2", f"--workdir={workdir}", f"--draws={DRAWS}"]
    cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=400)
    return workdir


@pytest.mark.slow
def test_experiment_end_to_end(experiment_dir):
    for name in ("RESULTS.md", "report.json", "experiment.json", "plots/fig1_loss_vs_position.png",
                 "plots/fig3_anchor_view.png", "plots/fig4_val_loss.png", "plots/methods_ci.png",
                 "seed0/results.json", "seed1/results.json"):
        assert os.path.getsize(os.path.join(experiment_dir, name)) > 0, name
    report = json.load(open(os.path.join(experiment_dir, "report.json")))
    assert report["data_seeds"] == [0, 1] and report["seeds"] == 2
    assert report["bootstrap"]["draws"] == DRAWS
    assert_report_matches(report, recompute(experiment_dir, 2))
    # The two seeds trained on different data orders.
    pos = [np.array([r["position"] for r in _read_jsonl(
        os.path.join(experiment_dir, f"seed{s}", "per_sample.jsonl"))]) for s in range(2)]
    assert not np.array_equal(pos[0], pos[1])


@pytest.mark.slow
def test_rerun_does_not_retrain_finished_seeds(experiment_dir):
    paths = [os.path.join(experiment_dir, f"seed{s}", "results.json") for s in range(2)]
    before = [os.stat(p).st_mtime_ns for p in paths]

    def fail(config, workdir):
        raise AssertionError(f"train_and_evaluate called for {workdir}")

    # The config the command line built is the one the folders hold (else this raises).
    assert experiment.run_seeds(_config(), experiment_dir, 2, train_fn=fail) == []
    assert [os.stat(p).st_mtime_ns for p in paths] == before


@pytest.mark.slow
def test_a_different_config_is_refused_before_training(experiment_dir):
    c = _config()
    c.optim.learning_rate = 0.5
    with pytest.raises(ValueError, match=r"seed0/config.json holds a run of a different "
                                         r"config \(differing keys: optim.learning_rate\)"):
        experiment.run_seeds(c, experiment_dir, 3, train_fn=lambda c, w: 1 / 0)
