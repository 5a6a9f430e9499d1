"""Two JAX processes on localhost (4 CPU devices each) train one run on one 8-device mesh.

The per-step losses equal those of a single-process run on 8 devices with the same
mesh, and so do the merged and single models' scores and per-sample losses (the
merges and evaluations run on the global arrays of both processes); one process
killed after the first checkpoint leaves a run that the same two commands resume;
processes given different configs stop at start naming the keys.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from psm.training import distributed, trainer
from tiny_config import tiny_test_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny:test cut to 12 steps (checkpoints at 6 and 12, rows at 4, 8, 12, validation at
# 6 and 12), three merges (TIES: its thresholds are searched on the devices with
# several processes) and short generations: the multi-process path, not the results.
# The mesh splits K over both processes and each replica's batch over two devices.
OVERRIDES = {"train.epochs": 1, "train.eval_every": 6, "mesh.replica": 4, "mesh.fsdp": 2,
             "merge.methods": ("average", "select_resample", "ties"), "eval.barrier": False,
             "export.hf": (), "task.max_new_tokens": 4}
TOTAL = 12
CRASH_AT = 9  # process 1 dies before this step: after the checkpoint at step 6

# Process 1 of the first launch: `python -m psm.train` that kills itself (SIGKILL, no
# clean-up) when it asks for the batch of step CRASH_AT.
_CRASHING = f"""
import os, signal, sys
from psm.training import trainer
real = trainer.orders.batch_indices
def batch_indices(step, **kw):
    if step == {CRASH_AT}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(step, **kw)
trainer.orders.batch_indices = batch_indices
from psm import cli, train
sys.argv[0] = "psm.train"
cli.run_absl(train.main)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _args(workdir, port, process_id, overrides=OVERRIDES):
    return ["--config=configs/tiny.py:test", f"--workdir={workdir}",
            *(f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()),
            f"--coordinator=localhost:{port}", "--num_processes=2",
            f"--process_id={process_id}"]


def _flag_value(v):
    if isinstance(v, tuple):
        return "(" + "".join(f"'{x}'," for x in v) + ")"
    return str(v)


def _env(cache=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    if cache:  # the rerun loads what the first launch compiled (speed only)
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def _start(args, log_path, crash=False):
    head = [sys.executable, "-c", _CRASHING] if crash else [sys.executable, "-m", "psm.train"]
    log = open(log_path, "w")
    cache = os.path.join(os.path.dirname(log_path), "jax_cache")
    return subprocess.Popen(head + args, cwd=REPO, env=_env(cache), stdout=log,
                            stderr=subprocess.STDOUT)


def _wait(procs, logs, timeout=240):
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process run timed out; logs:\n" + _tails(logs))
    return codes


def _tails(logs):
    out = []
    for path in logs:
        with open(path) as f:
            lines = [x for x in f.read().splitlines() if "[Gloo]" not in x]
        out.append(f"--- {path}\n" + "\n".join(lines[-25:]))
    return "\n".join(out)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _reference(reference_dir):
    """(metrics.jsonl rows, results.json) of one process on 8 devices
    (tests/conftest.py), the same mesh."""
    results = trainer.train_and_evaluate(tiny_test_config(**OVERRIDES), reference_dir)
    return _rows(reference_dir), results


def _per_sample(workdir):
    with open(os.path.join(workdir, "per_sample.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_close(got, want, where):
    """Nested dicts / lists equal, floats within rtol 1e-5."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}/{i}")
    elif isinstance(want, float):
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=where)
    else:
        assert got == want, where


def _assert_same_results(got, want, workdir, reference_dir):
    """The merged and single models' scores and the per-sample records of the
    two-process run equal the single-process ones (rtol 1e-5, as the losses)."""
    assert sorted(got["models"]) == sorted(want["models"]) == sorted(
        [f"replica {i}" for i in range(4)] + ["average", "select_resample3", "ties"])
    for name, row in want["models"].items():
        for key in ("val_loss", "train_loss"):
            np.testing.assert_allclose(got["models"][name][key], row[key], rtol=1e-5,
                                       err_msg=f"{name} {key}")
        assert got["models"][name]["test_accuracy"] == row["test_accuracy"], name
    np.testing.assert_allclose(got["fraction_unchanged_from_base"],
                               want["fraction_unchanged_from_base"], rtol=1e-5)
    records, ref_records = _per_sample(workdir), _per_sample(reference_dir)
    assert [r["id"] for r in records] == [r["id"] for r in ref_records]
    for r, ref in zip(records, ref_records):
        _assert_close(r, ref, where=f"per_sample id {ref['id']}")
    # The generated test answers are the same text.
    with open(os.path.join(workdir, "test_predictions.jsonl")) as f:
        predictions = f.read()
    with open(os.path.join(reference_dir, "test_predictions.jsonl")) as f:
        assert predictions == f.read()


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_a_killed_process(tmp_path):
    workdir = str(tmp_path / "two")
    port = _free_port()
    logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
    # First launch: process 1 dies mid-run; process 0 is then stuck (or fails) in a
    # collective and is stopped, as an operator would before rerunning both.
    p0 = _start(_args(workdir, port, 0), logs[0])
    p1 = _start(_args(workdir, port, 1), logs[1], crash=True)
    try:
        assert _wait([p1], logs) == [-signal.SIGKILL], _tails(logs)
    finally:
        p0.kill()
        p0.wait()
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                   if d.isdigit())
    assert saved == [6], (saved, _tails(logs))
    assert not os.path.exists(os.path.join(workdir, "results.json"))

    # The base the two processes pre-trained and saved is the reference's too (a
    # single process reads their checkpoint), which also spares pre-training it again.
    reference_dir = str(tmp_path / "one")
    shutil.copytree(os.path.join(workdir, "base"), os.path.join(reference_dir, "base"))
    ref_rows, ref_results = _reference(reference_dir)

    # The same two commands again: the run continues from step 6.
    logs = [str(tmp_path / f"rerun{i}.log") for i in range(2)]
    procs = [_start(_args(workdir, port, i), logs[i]) for i in range(2)]
    assert _wait(procs, logs) == [0, 0], _tails(logs)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["resumed_from_step"] == 6 and results["steps"] == TOTAL
    rows = _rows(workdir)
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == [r["step"] for r in ref_rows if "train/loss" in r] == [4, 8, 12]
    assert [r["step"] for r in rows if "val/loss" in r] == [6, 12]
    for key in ("train/loss", "train/grad_norm", "val/loss"):
        got = np.array([r[key] for r in rows if key in r])
        want = np.array([r[key] for r in ref_rows if key in r])
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)
    _assert_same_results(results, ref_results, workdir, reference_dir)
    # Process 0 alone wrote the run's files; none is left half-written.
    names = set(os.listdir(workdir))
    assert {"config.json", "metrics.jsonl", "results.json", "per_sample.jsonl"} <= names
    assert not [n for n in names if n.endswith(".tmp")]


def test_processes_with_different_configs_stop_naming_the_keys(tmp_path):
    port = _free_port()
    logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
    other = {**OVERRIDES, "train.epochs": 2, "optim.learning_rate": 0.002}
    procs = [_start(_args(str(tmp_path / "w"), port, i, OVERRIDES if i == 0 else other),
                    logs[i]) for i in range(2)]
    assert _wait(procs, logs, timeout=120) == [2, 2], _tails(logs)
    for path in logs:
        with open(path) as f:
            errors = [x for x in f.read().splitlines() if x.startswith("error:")]
        assert errors == ["error: the processes of a multi-process run were given different "
                          "configs: process 1 differs from process 0 in config keys "
                          "optim.learning_rate, train.epochs; give every process the same "
                          "--config and --config.* overrides"], _tails(logs)
    assert not os.path.exists(tmp_path / "w" / "config.json")


@pytest.mark.parametrize("flags,message", [
    ((None, 2, 0), "--num_processes, --process_id given without --coordinator"),
    (("localhost:1", None, None), "--coordinator given without --num_processes, --process_id"),
    (("localhost:1", 2, 2), "--process_id=2 must lie in [0, 2)"),
    (("localhost:1", 2, -1), "--process_id=-1 must lie in [0, 2)"),
    (("localhost:1", 0, 0), "--num_processes must be >= 1"),
    (("localhost", 2, 0), "must be host:port"),
])
def test_multiprocess_flags_are_checked(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.check_flags(*flags)
    assert distributed.check_flags(None, None, None) is False


def test_a_bad_flag_is_one_line_before_anything_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "psm.train", "--config=configs/tiny.py:test",
         f"--workdir={tmp_path / 'w'}", "--num_processes=2", "--process_id=0"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --num_processes, --process_id given without --coordinator: a multi-process "
        "run needs all three (--coordinator=host:port --num_processes=N --process_id=i), a "
        "single-process run none")
    assert not os.path.exists(tmp_path / "w")



def test_a_base_that_differs_between_processes_is_refused_naming_the_leaf(monkeypatch):
    """`distributed.check_same_values` (the base each process loaded itself): only
    per-leaf hashes travel. Two processes are simulated: process_allgather returns this
    process's hashes and those process 1 computed from its own values."""
    from jax.experimental import multihost_utils
    monkeypatch.setattr(distributed, "is_multiprocess", lambda: True)

    def base(last=0.0):
        return {"embed": np.arange(12, dtype=np.float32).reshape(3, 4),
                "layers": [{"w": np.ones((2, 2), np.float32)},
                           {"w": np.array([0.0, 0.0, last], np.float32)}]}

    def hashes_of(tree):
        seen = []
        monkeypatch.setattr(multihost_utils, "process_allgather",
                            lambda mine: seen.append(mine) or mine[None])
        distributed.check_same_values(tree, "the base model")
        return seen[0]

    theirs = hashes_of(base(last=1e-45))  # process 1: one bit differs (a subnormal)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda mine: np.stack([mine, theirs]))
    with pytest.raises(ValueError, match=r"the base model differs between processes: "
                                         r"process\(es\) \[1\] hold other values than "
                                         r"process 0 in \['layers'\]\[1\]\['w'\]; every"):
        distributed.check_same_values(base(), "the base model")
    distributed.check_same_values(base(last=1e-45), "the base model")  # the same bits
