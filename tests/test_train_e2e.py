"""End to end: the tiny config's `:test` variant trains, merges, evaluates, reports,
resumes bit-identically after a kill, and refuses bad input before writing."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from psm.training import throughput, trainer
from psm.data import orders
from tiny_config import tiny_test_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    # One device, like a plain `python -m psm.train` process here.
    return tiny_test_config(**{"mesh.replica": 1, **overrides})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    results = trainer.train_and_evaluate(_config(), workdir)
    return workdir, results


def _final_params(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
        restored = mngr.restore(step, args=ocp.args.StandardRestore())
    return restored["params"]


def test_run_writes_every_report_file(finished_run):
    workdir, results = finished_run
    c = _config()
    k = c.num_replicas
    for name in ("config.json", "metrics.jsonl", "results.json", "per_sample.jsonl",
                 "test_predictions.jsonl", "plots/loss_vs_position.png",
                 "plots/anchor_view.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    names = list(results["models"])
    assert names == [f"replica {i}" for i in range(k)] + [
        "average", "select", f"select_resample{c.merge.resample}", "greedy_soup", "ensemble"]
    for m in results["models"].values():
        assert np.isfinite(m["val_loss"]) and 0.0 <= m["test_accuracy"] <= 1.0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    train = [m for m in metrics if "train/loss" in m]
    assert train[-1]["step"] == results["steps"]
    assert all(len(m["train/loss"]) == k for m in train)
    assert train[-1]["train/loss"] != train[0]["train/loss"]
    assert any("val/loss_average_merge" in m for m in metrics)


def test_log_rows_and_results_carry_the_training_speed(finished_run):
    """Every training log row has the window's step time and tokens/s (all tokens and
    loss tokens, over the K replicas), MFU only where the device's peak is known;
    results.json has the run's means."""
    workdir, results = finished_run
    c = _config()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train = [m for m in map(json.loads, f) if "train/loss" in m]
    peak = throughput.peak_flops()
    for row in train:
        for key in ("perf/step_time_s", "perf/tokens_per_s", "perf/loss_tokens_per_s"):
            assert row[key] > 0, (key, row)
        assert row["perf/loss_tokens_per_s"] < row["perf/tokens_per_s"]
        assert ("perf/mfu" in row) == (peak is not None)
    # tokens per step: K replicas x batch x max_len, so the ratio is the step time.
    per_step = c.num_replicas * c.train.batch_size * c.task.max_len
    for row in train:
        assert row["perf/tokens_per_s"] * row["perf/step_time_s"] == pytest.approx(per_step)
    speed = results["speed"]
    assert speed["tokens_per_s"] > speed["loss_tokens_per_s"] > 0
    # Every step but the compiling one is timed.
    assert speed["timed_steps"] == results["steps"] - 1
    assert (speed["mfu"] is None) == (peak is None)
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["speed"] == speed


def test_per_sample_records_join_ids_positions_and_losses(finished_run):
    workdir, results = finished_run
    c = _config()
    with open(os.path.join(workdir, "per_sample.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == list(range(c.task.num_train))
    pos = orders.first_epoch_positions(data_seed=c.data_seed, num_replicas=c.num_replicas,
                                       num_samples=c.task.num_train,
                                       batch_size=c.train.batch_size)
    np.testing.assert_allclose(np.array([r["position"] for r in rows]).T, pos, atol=1e-6)
    merged = set(rows[0]["loss"]["merged"])
    assert merged == {"average", "select", f"select_resample{c.merge.resample}", "greedy_soup",
                      "ensemble"}
    losses = np.array([r["loss"]["replicas"] for r in rows])
    assert losses.shape == (c.task.num_train, c.num_replicas) and np.all(losses > 0)
    np.testing.assert_allclose(losses.mean(0), [results["models"][f"replica {i}"]["train_loss"]
                                                for i in range(c.num_replicas)], rtol=1e-6)
    spearman = results["imbalance"]["replicas"]["raw"]
    assert len(spearman) == c.num_replicas and all(-1 <= t["spearman"] <= 1 for t in spearman)


def test_results_imbalance_equals_a_recomputation_from_the_records(finished_run):
    """What results.json reports is what `psm.imbalance` computes from per_sample.jsonl
    (so the plots and any later analysis of the records agree with the run's numbers)."""
    from psm import imbalance

    workdir, results = finished_run
    c = _config()
    positions, losses, merged, ids = imbalance.load_records(workdir)
    assert ids == list(range(c.task.num_train))
    assert imbalance.imbalance_report(positions, losses, c.eval.num_bins) == \
        results["imbalance"]["replicas"]
    recomputed = {name: imbalance.trend(positions[0], merged[name], c.eval.num_bins)
                  for name in merged}
    assert recomputed == results["imbalance"]["merged_vs_replica0_positions"]
    # The report's controlled trend uses the mean over the OTHER replicas.
    k = c.num_replicas
    others = (losses.sum(0) - losses[1]) / (k - 1)
    assert results["imbalance"]["replicas"]["controlled"][1]["slope"] == pytest.approx(
        np.polyfit(positions[1], losses[1] - others, 1)[0], rel=1e-9)


def test_rerun_on_finished_workdir_resumes_and_reproduces(finished_run):
    workdir, results = finished_run
    again = trainer.train_and_evaluate(_config(), workdir)
    for name, m in results["models"].items():
        assert again["models"][name] == m


def test_workdir_of_another_config_is_refused(finished_run):
    workdir, _ = finished_run
    with pytest.raises(ValueError, match="train.epochs"):
        trainer.train_and_evaluate(_config(**{"train.epochs": 2}), workdir)


@pytest.mark.parametrize("key,value,match", [
    ("num_replicas", 0, "config.num_replicas"),
    ("merge.resample", -1, "config.merge.resample"),
    ("merge.methods", ("average", "mean"), "config.merge.methods"),
    ("task.name", "nope", "config.task.name"),
])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, key, value, match):
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match=match):
        trainer.train_and_evaluate(_config(**{key: value}), str(workdir))
    assert not workdir.exists() or not any(workdir.iterdir())


def test_unwritable_workdir_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        trainer.train_and_evaluate(_config(), str(blocker / "run"))


def test_locked_config_rejects_unknown_key():
    result = subprocess.run(
        [sys.executable, "-m", "psm.train", "--config=configs/tiny.py:test",
         "--workdir=/nonexistent/never", "--config.train.epoch=2"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown config key train.epoch; did you mean train.epochs?" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_finite_loss_stops_with_replica_and_step_and_keeps_last_checkpoint(
        tmp_path, monkeypatch):
    real = trainer.replicas.make_train_step

    def poisoned(*args, **kwargs):
        step_fn, calls = real(*args, **kwargs), [0]

        def wrapped(params, opt, batch):
            params, opt, metrics = step_fn(params, opt, batch)
            calls[0] += 1
            if calls[0] == 8:  # the 8th step's loss of replica 2 becomes NaN
                metrics = dict(metrics, loss=metrics["loss"].at[2].set(np.nan))
            return params, opt, metrics
        return wrapped

    monkeypatch.setattr(trainer.replicas, "make_train_step", poisoned)
    workdir = str(tmp_path / "w")
    with pytest.raises(FloatingPointError, match=r"replica\(s\) \[2\] at step 7"):
        trainer.train_and_evaluate(_config(), workdir)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                   if d.isdigit())
    assert steps[-1] == 6  # the checkpoint before the bad step survives, none after it


@pytest.mark.slow
def test_killed_run_resumes_to_bit_identical_parameters(finished_run, tmp_path):
    _, results = finished_run
    # Both runs are separate processes: this test process simulates 8 devices,
    # which makes XLA compile the same step differently (rounding-level changes).
    def command(workdir):
        # Only the parameters are compared: one merge, no barrier lines, no export.
        return [sys.executable, "-m", "psm.train", "--config=configs/tiny.py:test",
                f"--workdir={workdir}", "--config.mesh.replica=1",
                "--config.merge.methods=('average',)", "--config.eval.barrier=False",
                "--config.export.hf=()"]

    reference_dir = str(tmp_path / "reference")
    subprocess.run(command(reference_dir), cwd=REPO, check=True, capture_output=True,
                   timeout=300)
    workdir = str(tmp_path / "killed")
    cmd = command(workdir)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first_ckpt = os.path.join(workdir, "checkpoints", "12")
    deadline = time.time() + 240
    while not os.path.isdir(first_ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert max(steps) < results["steps"], "killed run must not have finished training"
    rows_before = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["resumed_from_step"] == max(steps)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == results["steps"]
    # Rows up to the checkpoint survive the rerun untouched.
    assert [r for r in rows if r["step"] <= max(steps)] == \
        [r for r in rows_before if r["step"] <= max(steps)]
    resumed = _final_params(workdir, results["steps"])
    reference = _final_params(reference_dir, results["steps"])
    leaves_a, leaves_b = jax.tree.leaves(resumed), jax.tree.leaves(reference)
    assert len(leaves_a) == len(leaves_b) > 0
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kwargs,names", [
    ({}, ["replica 0", "replica 1", "replica 2", "replica 3"]),
    ({"replica": 2}, ["replica 2"]),
    ({"merge": "select_resample"}, ["select_resample3"]),
    ({"merge": "average"}, ["average"]),
])
def test_evaluate_command_reproduces_the_trainers_scores(finished_run, tmp_path, kwargs, names):
    from psm import evaluate

    workdir, results = finished_run
    report = evaluate.evaluate(_config(), workdir, out=str(tmp_path), **kwargs)
    assert list(report["models"]) == names
    for name in names:
        assert report["models"][name]["val_loss"] == pytest.approx(
            results["models"][name]["val_loss"], rel=1e-6)
        assert report["models"][name]["test_accuracy"] == results["models"][name][
            "test_accuracy"]
    with open(tmp_path / "eval.json") as f:
        written = json.load(f)
    rows = written["per_example"][names[0]]
    assert len(rows) == _config().task.num_test
    assert set(rows[0]) == {"id", "prediction", "extracted", "correct"}


@pytest.mark.oracle
def test_merged_model_is_exported_in_hf_format(finished_run):
    workdir, results = finished_run
    folder = os.path.join(workdir, results["exported"]["average"])
    assert os.path.exists(os.path.join(folder, "config.json"))
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax import nnx

    from psm.models import hf_llama, llama

    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    cfg, params = hf_llama.load_hf_llama(folder)
    tokens = np.arange(1, 17, dtype=np.int64)[None] % cfg.vocab_size
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens)).logits.numpy()
    graphdef, _ = llama.abstract_model(cfg)
    ours = np.asarray(nnx.merge(graphdef, params)(tokens.astype(np.int32)))
    np.testing.assert_allclose(ours, expected, atol=1e-4)
